"""Bounded fuzzing of checkpoints (slow suite): random damage (truncation, flipped bits, NaN and
Inf weights, configs that do not match the weights or are not JSON) to the files of a tiny run,
then `generate`, `evaluate` and `train --resume` through the command line. Each must either
work or refuse with one line naming a file: zero tracebacks.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from perceiver_music.checkpoint import load_tensors, save_tensors
from perceiver_music.cli import main

CASES = 20  # damaged runs, each through the three commands


def _targets(run: Path) -> list[Path]:
    step = run / "checkpoints" / "step_0000003"
    return [
        run / "best" / "model.safetensors",
        run / "best" / "config.json",
        run / "config.json",
        step / "model.safetensors",
        step / "optimizer.safetensors",
        step / "rng_rank0.safetensors",
        step / "trainer.json",
    ]


def damage(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(
        ["truncate", "flip", "bytes"] + (["nan", "inf"] if path.suffix == ".safetensors" else ["config"])
    )
    if kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind == "flip":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        p = rng.randrange(len(data))
        data[p : p + 8] = rng.randbytes(rng.randint(0, 16))
    elif kind in ("nan", "inf"):
        tensors = load_tensors(path)
        floats = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
        if floats:
            t = tensors[rng.choice(floats)].view(-1)
            t[rng.randrange(t.numel())] = float(kind)
        save_tensors(tensors, path)
        return f"{kind} in {path}"
    else:  # a config that parses but describes another model
        config = json.loads(data)
        section = config.get("model", config)
        key, value = rng.choice(
            [("width", 64), ("layers", 2), ("vocab_size", 500), ("heads", 3), ("arch", "x")]
        )
        section[key] = value
        data = bytearray(json.dumps(config).encode())
        kind = f"config {key}={value}"
    path.write_bytes(bytes(data))
    return f"{kind} in {path}"


@pytest.mark.slow
def test_damaged_checkpoints_never_give_a_traceback(checkpointed_run, tiny_run, tmp_path, capsys):
    rng = random.Random(14)
    for case in range(CASES):
        run = Path(shutil.copytree(checkpointed_run, tmp_path / f"run{case}"))
        targets = _targets(run)
        what = [damage(path, rng) for path in rng.sample(targets, rng.randint(1, 2))]
        commands = [
            ["generate", "--ckpt", str(run), "--out", str(tmp_path / f"g{case}"), "--tokens", "8", "--quiet", "--no-render"],
            ["evaluate", "--ckpt", str(run), "--data", str(tiny_run / "data"), "--out", str(tmp_path / f"e{case}"), "--split", "train", "--max-pieces", "1", "--quiet"],
            ["train", "--data", str(tiny_run / "data"), "--out", str(run), "--resume", "--quiet", "train.steps=4"],
        ]  # fmt: skip
        for command in commands:
            try:
                code = main(command)
            except Exception as e:  # the test's point: report what escaped, and with what damage
                pytest.fail(f"{command[0]} raised {type(e).__name__}: {e} after {what}")
            err = capsys.readouterr().err
            assert code in (0, 2), (command[0], code, what, err)
            if code == 2:
                errors = [line for line in err.splitlines() if line.startswith("perceiver-music: error:")]
                assert len(errors) == 1 and str(run) in errors[0], (command[0], what, err)
        torch.manual_seed(case)  # training above reseeded the global RNG; keep cases independent
