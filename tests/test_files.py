"""Output files get the permissions of any other program's: 0666 less the user's umask."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from perceiver_music.cli import main

from conftest import write_midi


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def midi_folder(root, count: int):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        starts = np.sort(rng.integers(0, 3000, 20))
        write_midi(root / f"p{i}.mid", [(int(s), int(s) + 100, 40 + i + int(s) % 30, 80) for s in starts])
    return root


def test_prepare_and_set_evaluation_outputs_follow_the_umask(umask, tmp_path):
    midi = midi_folder(tmp_path / "midi", 4)
    assert main(["prepare", str(midi), "--out", str(tmp_path / "data"), "--quiet", "--workers", "1"]) == 0
    found = modes(tmp_path / "data")
    assert {"meta.json", "skipped.csv", "train.npy", "train.index.npy"} <= set(found)
    assert found == dict.fromkeys(found, 0o666 & ~umask)
    out = tmp_path / "sets"
    assert (
        main(
            ["evaluate", "--generated", str(midi), "--reference", str(midi), "--out", str(out), "--no-plots"]
        )
        == 0
    )
    found = modes(out)
    assert {"metrics.json", "table.md"} <= set(found)
    assert found == dict.fromkeys(found, 0o666 & ~umask)


def test_checkpoint_weights_follow_the_umask(umask, tmp_path):
    torch = pytest.importorskip("torch")
    from perceiver_music.checkpoint import save_best
    from perceiver_music.config import Config

    save_best(tmp_path, torch.nn.Linear(2, 2), Config(), {"step": 1})
    found = modes(tmp_path / "best")
    assert set(found) == {"model.safetensors", "config.json", "info.json"}
    assert found == dict.fromkeys(found, 0o666 & ~umask)
