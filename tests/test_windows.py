"""Window arithmetic: segmentation, padding, determinism and augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perceiver_music.config import DataConfig
from perceiver_music.data.prepare import SPLITS
from perceiver_music.data.windows import TokenData, WindowDataset, stretch, transpose
from perceiver_music.tokens.performance import BOS, EOS, PAD, PerformanceTokenizer

TOK = PerformanceTokenizer()
V = TOK.vocab


def fake_data(tmp_path, lengths, split="train"):
    """A prepared-data folder whose piece k holds BOS, then ids that encode (piece, index), EOS.

    Token values are unique per (piece, position) modulo the event range, so a window's
    contents identify exactly where they came from.
    """
    pieces, tokens, offset = [], [], 0
    for k, n in enumerate(lengths):
        body = V.note_on + (np.arange(n - 2) + 1000 * k) % 250  # NOTE_ON / NOTE_OFF ids only
        ids = np.concatenate([[BOS], body, [EOS]]).astype(np.uint16)
        tokens.append(ids)
        pieces.append({"path": f"p{k}.mid", "split": split, "offset": offset, "length": n})
        offset += n
    for s in SPLITS:
        chosen = [t for t, p in zip(tokens, pieces) if p["split"] == s]
        np.save(tmp_path / f"{s}.npy", np.concatenate(chosen) if chosen else np.zeros(0, np.uint16))
        index = [[p["offset"], p["length"]] for p in pieces if p["split"] == s]
        np.save(tmp_path / f"{s}.index.npy", np.array(index, np.int64).reshape(-1, 2))
    from dataclasses import asdict

    meta = {"tokenizer": asdict(TOK.cfg), "pieces": pieces}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return TokenData(tmp_path, split)


def assert_padding(w) -> None:
    """PAD before BOS at the window's left and after EOS at its right, nowhere else."""
    seq = np.append(w.inputs, w.targets[-1])
    real = np.flatnonzero(seq != PAD)
    assert len(real) and np.all(np.diff(real) == 1)  # one run of real tokens
    if real[0] > 0:
        assert seq[real[0]] == BOS and w.positions[real[0]] == 0
    if real[-1] < len(seq) - 1:
        assert seq[real[-1]] == EOS


@pytest.mark.parametrize("segmentation", ["effective", "baseline"])
def test_windows_are_contiguous_and_never_mix_pieces(tmp_path, segmentation):
    data = fake_data(tmp_path, [40, 7, 300, 120])
    cfg = (
        DataConfig(segmentation=segmentation, transpose=0, stretch=0),
        64,
        16,
    )  # data config, max_len, num_latents
    for train in (True, False):
        ds = WindowDataset(data, *cfg, train=train, seed=3)
        for i in range(min(len(ds), 400)):
            w = ds[i]
            assert w.inputs.shape == (64,) and w.targets.shape == (16,) and w.positions.shape == (64,)
            piece = np.asarray(data.piece(w.piece), np.int64)
            real = w.inputs != PAD
            # Padding on the left only where the piece starts inside the window, on the right
            # only after its EOS (a window ending past the piece).
            assert_padding(w)
            start = int(w.positions[real][0])
            assert np.array_equal(w.inputs[real], piece[start : start + real.sum()])
            assert np.array_equal(w.positions[real], np.arange(start, start + real.sum()))
            # Each latent's target is the token after its input in the same piece; nothing
            # follows EOS, and a PAD input (before the piece) predicts nothing.
            latent = np.arange(64 - 16, 64)
            for i, j in enumerate(latent):
                if w.inputs[j] == PAD or w.inputs[j] == EOS:
                    assert w.targets[i] == PAD
                else:
                    assert w.targets[i] == piece[w.positions[j] + 1]


def test_effective_covers_every_target_including_the_first_event(tmp_path):
    lengths = [5, 17, 64, 200]
    data = fake_data(tmp_path, lengths)
    cfg = (
        DataConfig(segmentation="effective", transpose=0, stretch=0),
        48,
        16,
    )  # data config, max_len, num_latents
    ds = WindowDataset(data, *cfg, train=True, seed=0)
    covered = {k: set() for k in range(len(lengths))}
    for i in range(4000):
        w = ds[i]
        for j, t in enumerate(w.targets):
            if t != PAD:  # the token after latent j's input
                covered[w.piece].add(int(w.positions[48 - 16 + j]) + 1)
    for k, n in enumerate(lengths):
        assert covered[k] == set(range(1, n)), k  # every token after BOS, index 1 included


@pytest.mark.parametrize("length", [2, 5, 16, 17, 40, 300])
def test_effective_ends_cover_every_target_equally_often(tmp_path, length):
    """Every token after BOS, the first event and the EOS included, is a target of exactly
    num_latents of the windows a training end can be drawn for."""
    from perceiver_music.data.windows import window_ends

    data = fake_data(tmp_path, [length])
    ds = WindowDataset(data, DataConfig(segmentation="effective", transpose=0, stretch=0), 48, 16, train=True)
    lo, hi = window_ends(length, "effective", 48, 16)
    assert ds.counts[0] == hi - lo + 1
    coverage = np.zeros(length + 16, np.int64)
    piece = np.asarray(data.piece(0))
    for end in range(lo, hi + 1):
        w = ds._window(0, end, None)
        assert_padding(w)
        real = np.flatnonzero(w.targets != PAD)
        coverage[end - 16 + real] += 1
        assert np.array_equal(w.targets[real], piece[end - 16 + real])
    assert coverage[0] == 0 and (coverage[1:length] == 16).all() and coverage[length:].sum() == 0


def test_end_windows_draw_that_share_of_windows_ending_their_piece(tmp_path):
    """data.end_windows: that share of training windows hold their piece's EOS among the
    targets, at every target position (none learns to end); the others are the plain draws."""
    data = fake_data(tmp_path, [300, 500, 40])
    plain = WindowDataset(data, DataConfig(transpose=0, stretch=0), 48, 16, train=True, seed=3)
    ending = WindowDataset(
        data, DataConfig(transpose=0, stretch=0, end_windows=0.5), 48, 16, train=True, seed=3
    )
    n = 400
    with_eos = lambda ds: [i for i in range(n) if EOS in ds[i].targets]
    assert len(with_eos(plain)) < 0.15 * n  # an EOS in 16 of ~850 windows' targets
    ended = with_eos(ending)
    assert 0.45 * n < len(ended) < 0.7 * n
    where = {int(np.flatnonzero(ending[i].targets == EOS)[0]) for i in ended}
    assert len(where) > 10  # spread over the targets
    for i in range(n):
        assert_padding(ending[i])
    same = [i for i in range(n) if np.array_equal(ending[i].inputs, plain[i].inputs)]
    assert len(same) > 0.3 * n  # the windows not redrawn are those of a run without it


def test_baseline_never_targets_the_opening(tmp_path):
    data = fake_data(tmp_path, [200])
    cfg = (
        DataConfig(segmentation="baseline", transpose=0, stretch=0),
        48,
        16,
    )  # data config, max_len, num_latents
    ds = WindowDataset(data, *cfg, train=True, seed=0)
    first_targets = set()
    for i in range(2000):
        w = ds[i]
        end = int(w.positions[-1]) + 2
        first_targets.add(end - 16)
    assert min(first_targets) == 49 - 16  # never a target below max_len + 1 - num_latents
    assert max(first_targets) == 200 - 16


def test_validation_tiles_each_target_exactly_once_and_is_deterministic(tmp_path):
    lengths = [5, 17, 64, 200, 33]
    data = fake_data(tmp_path, lengths)
    cfg = (DataConfig(), 48, 16)  # data config, max_len, num_latents
    a = WindowDataset(data, *cfg, train=False)
    b = WindowDataset(data, *cfg, train=False)
    seen = {k: [] for k in range(len(lengths))}
    for i in range(len(a)):
        wa, wb = a[i], b[i]
        assert np.array_equal(wa.inputs, wb.inputs) and np.array_equal(wa.targets, wb.targets)
        real = wa.inputs != PAD
        end = int(wa.positions[real][-1]) + 2
        seen[wa.piece] += [end - 16 + j for j, t in enumerate(wa.targets) if t != PAD]
    for k, n in enumerate(lengths):
        assert sorted(seen[k]) == list(range(1, n))


def test_training_windows_depend_only_on_seed_and_index(tmp_path):
    data = fake_data(tmp_path, [100, 300])
    cfg = (DataConfig(), 32, 8)  # data config, max_len, num_latents
    a, b = WindowDataset(data, *cfg, True, seed=1), WindowDataset(data, *cfg, True, seed=1)
    c = WindowDataset(data, *cfg, True, seed=2)
    assert all(np.array_equal(a[i].inputs, b[i].inputs) for i in (0, 7, 12345))
    assert any(not np.array_equal(a[i].inputs, c[i].inputs) for i in range(10))


def test_transpose_drops_notes_leaving_the_keyboard():
    names = ["VELOCITY:20", "NOTE_ON:126", "NOTE_ON:60", "TIME_SHIFT:10", "NOTE_OFF:126", "NOTE_OFF:60"]
    ids = np.array([V.parse(n) for n in names])
    up = V.names(transpose(ids, 2, V))
    assert up == ["VELOCITY:20", "NOTE_ON:62", "TIME_SHIFT:10", "NOTE_OFF:62"]
    down = V.names(transpose(ids, -3, V))
    assert down == [
        "VELOCITY:20",
        "NOTE_ON:123",
        "NOTE_ON:57",
        "TIME_SHIFT:10",
        "NOTE_OFF:123",
        "NOTE_OFF:57",
    ]


def test_stretch_rescales_event_times(asap_files):
    ids = TOK.encode(asap_files[3])[:3000].astype(np.int64)
    for factor in (0.95, 1.05):
        out = stretch(ids, factor, V)
        a, b = TOK.decode_notes(ids), TOK.decode_notes(out)
        assert len(a) == len(b)
        # Each note starts at round(step * factor); ends are checked for closed notes only.
        moved = sorted(zip(np.floor(a.start * factor + 0.5).astype(int).tolist(), a.pitch.tolist()))
        assert sorted(zip(b.start.tolist(), b.pitch.tolist())) == moved

        def steps(t):
            t = np.asarray(t, np.int64)
            return int(np.where((t >= V.time_shift) & (t < V.velocity), t - V.time_shift + 1, 0).sum())

        assert steps(out) == int(np.floor(steps(ids) * factor + 0.5))  # total duration scaled
    # A trailing gap is stretched too.
    tail = np.array([V.parse(n) for n in ["NOTE_ON:60", "TIME_SHIFT:100", "TIME_SHIFT:100"]])
    assert V.names(stretch(tail, 1.05, V)) == [
        "NOTE_ON:60",
        "TIME_SHIFT:100",
        "TIME_SHIFT:100",
        "TIME_SHIFT:10",
    ]


def test_augmented_windows_stay_well_formed(asap_dir, tmp_path):
    from perceiver_music.config import PrepareConfig
    from perceiver_music.data.prepare import prepare

    sub = tmp_path / "midi"
    sub.mkdir()
    for f in sorted(asap_dir.rglob("*.mid"))[:6]:
        (sub / f.name).write_bytes(f.read_bytes())
    prepare(
        sub, tmp_path / "data", PrepareConfig(split="hash", valid_fraction=0, test_fraction=0), progress=False
    )
    data = TokenData(tmp_path / "data", "train")
    ds = WindowDataset(data, DataConfig(transpose=3, stretch=0.05), 256, 64, True, seed=0)
    for i in range(200):
        w = ds[i]
        assert_padding(w)  # augmented alike
        assert w.inputs.max() < V.size and (w.targets != PAD).sum() > 0
