from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASAP = REPO.parent / "shared" / "data" / "asap"


@pytest.fixture(scope="session")
def asap_dir() -> Path:
    if not ASAP.is_dir():
        pytest.skip(f"ASAP data not found at {ASAP}")
    return ASAP


@pytest.fixture(scope="session")
def asap_files(asap_dir) -> list[Path]:
    return sorted(asap_dir.rglob("*.mid"))


def write_midi(path, notes=(), pedals=(), tpq=480, tempos=((0, 480_000),), tracks=None, drum_notes=()):
    """A MIDI file from notes (start_tick, end_tick, pitch, velocity) and pedals (tick, value).

    The default tempo makes one tick exactly 1 ms. `tracks` (a list of (notes, pedals)) adds
    more tracks; `drum_notes` adds a drum track.
    """
    from symusic import ControlChange, Note, Score, Tempo, Track

    score = Score(tpq)
    for tick, mspq in tempos:
        score.tempos.append(Tempo(tick, mspq=mspq))
    for track_notes, track_pedals in [(notes, pedals), *(tracks or [])]:
        track = Track(name="piano", program=0)
        for s, e, p, v in track_notes:
            track.notes.append(Note(s, e - s, p, v))
        for t, value in track_pedals:
            track.controls.append(ControlChange(t, 64, value))
        score.tracks.append(track)
    if drum_notes:
        drums = Track(name="drums", program=0, is_drum=True)
        for s, e, p, v in drum_notes:
            drums.notes.append(Note(s, e - s, p, v))
        score.tracks.append(drums)
    score.dump_midi(str(path))
    return Path(path)


def random_pieces(folder, count, seed=0, notes=60, span_ms=20_000, length_ms=300, low=48, high=84) -> Path:
    """`count` MIDI files p0.mid ... in `folder`: `notes` random onsets within `span_ms`, each
    `length_ms` long, pitches in [low, high), velocity 80 (1 tick = 1 ms)."""
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        starts = np.sort(rng.integers(0, span_ms, notes))
        pitches = [int(rng.integers(low, high)) for _ in starts]
        write_midi(
            folder / f"p{i}.mid", [(int(s), int(s) + length_ms, p, 80) for s, p in zip(starts, pitches)]
        )
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A folder with midi/ (six random pieces), data/ (prepared) and run/ (a tiny PerceiverS
    trained for three steps): a real checkpoint for the commands that need one."""

    from perceiver_music.config import PrepareConfig, load_config
    from perceiver_music.data.prepare import prepare
    from perceiver_music.train import train

    root = tmp_path_factory.mktemp("tiny_run")
    midi = random_pieces(root / "midi", 6, seed=1, notes=80, span_ms=10_000, length_ms=200, low=50, high=80)
    prepare(midi, root / "data", PrepareConfig(workers=1, split="hash", valid_fraction=0.2), progress=False)
    cfg = load_config(
        "debug",
        [
            "model.max_len=64",
            "model.num_latents=16",
            "model.width=32",
            "model.layers=1",
            "model.scales=[full, 16]",
            "train.steps=3",
            "train.batch_size=2",
        ],
    )
    train(cfg, root / "data", root / "run", progress=False)
    return root


@pytest.fixture(scope="session")
def checkpointed_run(tiny_run, tmp_path_factory) -> Path:
    """A tiny run with a checkpoint at every step (steps 1-3, all kept), trained once: read it
    as it is, or copy it before damaging it."""
    from perceiver_music.cli import main

    run = tmp_path_factory.mktemp("checkpointed") / "run"
    tiny = [
        "model.max_len=64",
        "model.num_latents=16",
        "model.width=32",
        "model.layers=1",
        "model.scales=[full, 16]",
        "train.batch_size=2",
        "train.ckpt_every=1",
        "train.eval_every=3",
        "train.keep_last=3",
        "train.steps=3",
    ]
    args = ["train", "--config", "debug", "--data", str(tiny_run / "data"), "--out", str(run), "--quiet"]
    assert main([*args, *tiny]) == 0
    return run
