"""Damaged checkpoints: one clear line (which file, what is wrong) in generate, evaluate and
train --resume; resume falls back to the newest intact checkpoint and never loses a good one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from perceiver_music import checkpoint
from perceiver_music.checkpoint import CheckpointError, load_model, load_tensors, save_tensors
from perceiver_music.cli import main


@pytest.fixture
def run(checkpointed_run, tmp_path) -> Path:
    return Path(shutil.copytree(checkpointed_run, tmp_path / "run"))


def truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "damaged or truncated"


def flip_bit(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x04  # inside the last tensor: the header still parses, the values changed
    path.write_bytes(bytes(data))
    return "checksum does not match"


def nan_weight(path: Path) -> str:
    tensors = load_tensors(path)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_tensors(tensors, path)  # a valid file, checksum and all, of NaN weights
    return f"tensor {name} holds NaN or Inf"


def bad_json(path: Path) -> str:
    (path.parent / "config.json").write_text('{"model": {"width": 32,')
    return "invalid JSON"


def other_width(path: Path) -> str:
    config = path.parent / "config.json"
    data = json.loads(config.read_text())
    data["model"]["width"] = 64
    config.write_text(json.dumps(data))
    return "does not match"


def other_vocabulary(path: Path) -> str:
    config = path.parent / "config.json"
    data = json.loads(config.read_text())
    data["model"]["vocab_size"] = 500
    config.write_text(json.dumps(data))
    return "does not match"


DAMAGE = [truncate, flip_bit, nan_weight, bad_json, other_width, other_vocabulary]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_generate_and_evaluate_name_the_damaged_file(run, tiny_run, tmp_path, capsys, damage):
    weights = run / "best" / "model.safetensors"
    expected = damage(weights)
    named = "config.json" if damage is bad_json else "model.safetensors"
    commands = [
        ["generate", "--ckpt", str(run), "--out", str(tmp_path / "g"), "--tokens", "8", "--quiet", "--no-render"],
        ["evaluate", "--ckpt", str(run), "--data", str(tiny_run / "data"), "--out", str(tmp_path / "e"), "--quiet"],
    ]  # fmt: skip
    for command in commands:
        assert main(command) == 2, command[0]
        err = capsys.readouterr().err
        assert expected in err and named in err, (command[0], err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g").exists()


def test_bit_flips_anywhere_in_the_tensors_are_caught(checkpointed_run, tmp_path):
    source = checkpointed_run / "best" / "model.safetensors"
    size = source.stat().st_size
    for k, offset in enumerate(range(size // 3, size, size // 7)):
        path = tmp_path / f"m{k}.safetensors"
        data = bytearray(source.read_bytes())
        data[offset] ^= 1 << (k % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=str(path)):
            load_tensors(path)


def test_a_file_without_a_checksum_is_still_read(checkpointed_run, tmp_path):
    from safetensors.torch import save_file

    tensors = load_tensors(checkpointed_run / "best" / "model.safetensors")
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))  # as written before checksums
    shutil.copy(checkpointed_run / "best" / "config.json", folder)
    model, _ = load_model(folder)
    assert torch.equal(model.state_dict()[sorted(tensors)[0]], tensors[sorted(tensors)[0]])


def _resume(run: Path, tiny_run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(tiny_run / "data"), "--out", str(run), "--resume", "--quiet", *extra]


def test_resume_falls_back_past_a_damaged_checkpoint(run, tiny_run, capsys):
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001", "step_0000002", "step_0000003"]
    truncate(ckpts / "step_0000003" / "optimizer.safetensors")
    assert main(_resume(run, tiny_run, "train.steps=4")) == 0
    captured = capsys.readouterr()
    assert "step_0000003/optimizer.safetensors: damaged or truncated" in captured.err
    assert "renamed to step_0000003.damaged" in captured.err
    assert f"resumed from {ckpts / 'step_0000002'} at step 2" in captured.out
    assert "trained to step 4" in captured.out
    # The damaged one is kept aside; steps 3 and 4 were trained again; nothing good was lost.
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["step_0000002", "step_0000003", "step_0000003.damaged", "step_0000004"]
    assert json.loads((ckpts / "step_0000004" / "trainer.json").read_text())["step"] == 4


def test_resume_with_nothing_intact_says_so(run, tiny_run, capsys):
    for step in (1, 2, 3):
        nan_weight(run / "checkpoints" / f"step_000000{step}" / "model.safetensors")
    assert main(_resume(run, tiny_run, "train.steps=4")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from (3 damaged" in err
    assert err.count("holds NaN or Inf") == 3 and "Traceback" not in err
    assert len(list((run / "checkpoints").iterdir())) == 3  # nothing renamed or deleted


def test_resume_of_a_finished_run_says_so(run, tiny_run, capsys):
    assert main(_resume(run, tiny_run)) == 0
    out = capsys.readouterr().out
    assert "already finished (step 3 of train.steps=3); nothing to do" in out
    assert "nan" not in out


def test_only_rank_0_prints_the_summary(run, tiny_run, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(_resume(run, tiny_run, "train.steps=4")) == 0
    assert "trained to step" not in capsys.readouterr().out


def test_step_folders_other_than_published_ones_are_left_alone(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ["step_0000001", "step_0000002", "step_0000002.damaged", "step_0000003.tmp"]:
        (root / name).mkdir(parents=True)
    staging = checkpoint.staging_dir(root, 4)
    checkpoint.publish(staging, keep_last=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_0000002", "step_0000002.damaged", "step_0000003.tmp", "step_0000004"]
