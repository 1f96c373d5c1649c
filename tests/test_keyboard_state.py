"""The keyboard state a keyboard-conditioned model reads: the vectorised count against a loop
over tokens, the training windows against the whole piece's state, and the sampler's
token-by-token state against the same count of what it sampled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceiver_music.config import DataConfig, PrepareConfig, TokenizerConfig
from perceiver_music.data.prepare import prepare
from perceiver_music.data.windows import Conditions, TokenData, WindowDataset, transpose
from perceiver_music.sample import CachedStream, ReferenceStream
from perceiver_music.sample import Conditions as SampleConditions
from perceiver_music.tokens.performance import BOS, NUM_PITCHES, Vocab, held_at_end, keyboard_state
from test_conditioning import tiny

from conftest import random_pieces

TOKENIZER = TokenizerConfig()
VOCAB = Vocab(TOKENIZER)


def loop_state(ids, held_before=None) -> np.ndarray:
    """keyboard_state as its definition reads, one token at a time."""
    sps = TOKENIZER.steps_per_second
    onset = {p: -h * sps for p, h in enumerate(held_before) if h >= 0} if held_before is not None else {}
    step, out = 0, []
    for token in ids:
        step += int(VOCAB.shift_steps(np.array([token]))[0])
        if VOCAB.note_on <= token < VOCAB.note_off:
            onset[token - VOCAB.note_on] = step
        elif VOCAB.note_off <= token < VOCAB.time_shift:
            onset.pop(token - VOCAB.note_off, None)
        row = np.full(NUM_PITCHES, -1.0)
        for p, t in onset.items():
            row[p] = (step - t) / sps
        out.append(row)
    return np.array(out, np.float32).reshape(len(ids), NUM_PITCHES)


def random_stream(rng, n, pitches=12) -> np.ndarray:
    """Notes on a few pitches with stray NOTE_OFFs and re-strikes among them, and time."""
    kind = rng.integers(0, 4, n)
    pitch = 60 + rng.integers(0, pitches, n)
    return np.select(
        [kind == 0, kind == 1, kind == 2],
        [VOCAB.note_on + pitch, VOCAB.note_off + pitch, VOCAB.time_shift + rng.integers(0, 50, n)],
        VOCAB.velocity + rng.integers(0, 32, n),
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_vectorised_state_is_the_loops(seed):
    rng = np.random.default_rng(seed)
    ids = random_stream(rng, 300)
    assert np.allclose(keyboard_state(ids, VOCAB), loop_state(ids), atol=1e-6)
    assert np.allclose(held_at_end(ids, VOCAB), loop_state(ids)[-1], atol=1e-6)
    # Split anywhere, the second part carried on from the first's end is the whole.
    cut = int(rng.integers(1, 299))
    carried = keyboard_state(ids[cut:], VOCAB, held_at_end(ids[:cut], VOCAB))
    assert np.allclose(carried, keyboard_state(ids, VOCAB)[cut:], atol=1e-5)
    assert (keyboard_state(ids, VOCAB) >= 0).any() and (keyboard_state(ids, VOCAB) < 0).any()
    assert len(keyboard_state(ids[:0], VOCAB)) == 0 and (held_at_end(ids[:0], VOCAB) == -1).all()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    # Long notes (2 s) that overlap: many are held into a window from before it.
    midi = random_pieces(root / "midi", 4, seed=5, notes=200, span_ms=40_000, length_ms=2000)
    prepare(midi, root / "data", PrepareConfig(workers=1, split="hash", valid_fraction=0.25), progress=False)
    return root / "data"


def test_validation_windows_carry_the_whole_pieces_state(data_dir):
    data = TokenData(data_dir, "train")
    ds = WindowDataset(data, DataConfig(), 64, 16, train=False, conditions=Conditions(keyboard=True))
    carried_in = 0
    for i in range(0, len(ds), 7):
        w = ds[i]
        piece = np.asarray(data.piece(w.piece))
        whole = keyboard_state(piece, VOCAB)
        real = w.inputs != 0  # PAD inputs are silent
        assert np.allclose(w.keyboard[real], whole[w.positions[real]], atol=1e-5)
        assert (w.keyboard[~real] == -1).all()
        first = w.positions[real][0]
        carried_in += int(first > 0 and (whole[first - 1] >= 0).any())
    assert carried_in > 0  # notes held from before a window were counted


def test_a_transposed_windows_state_is_the_transposed_pieces(data_dir):
    data = TokenData(data_dir, "train")
    cfg = DataConfig(transpose=3, stretch=0.0)
    ds = WindowDataset(data, cfg, 64, 16, train=True, seed=2, conditions=Conditions(keyboard=True))
    checked = 0
    for i in range(40):
        w = ds[i]
        piece = np.asarray(data.piece(w.piece))
        for shift in range(-3, 4):  # the window's shift: the one whose tokens match
            moved = transpose(piece, shift, VOCAB)
            if len(moved) != len(piece):
                continue  # a note left the keyboard: positions no longer line up
            real = w.inputs != 0
            if np.array_equal(moved[w.positions[real]], w.inputs[real]):
                whole = keyboard_state(moved, VOCAB)
                assert np.allclose(w.keyboard[real], whole[w.positions[real]], atol=1e-5)
                checked += 1
                break
    assert checked > 10


@pytest.mark.parametrize("stream", [CachedStream, ReferenceStream])
def test_the_sampler_follows_the_state_of_what_it_samples(stream):
    model = tiny(["keyboard"], arch="perceiver_ar", scales=["full"])
    rng = np.random.default_rng(1)
    prompt = torch.as_tensor(random_stream(rng, 2 * 9).reshape(2, 9))
    prompt[:, 0] = BOS
    forced = torch.as_tensor(random_stream(rng, 2 * 50).reshape(2, 50))
    s = stream(model, prompt, 60, cond=SampleConditions().cond(2, "cpu"), tokenizer=TOKENIZER)
    with torch.no_grad():
        for i in range(50):
            s.append(forced[:, i])
    for row in range(2):
        tokens = s.tokens[row, : s.length].numpy()
        assert np.allclose(s.keyboard[row, : s.length].numpy(), keyboard_state(tokens, VOCAB), atol=1e-4)
