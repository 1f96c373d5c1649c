"""Training: the loop, checkpoints, exact resume after SIGKILL, accumulation, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_music.checkpoint import load_model
from perceiver_music.cli import main
from perceiver_music.config import ConfigError, PrepareConfig, TrainConfig, load_config
from perceiver_music.data.prepare import prepare
from perceiver_music.train import learning_rate, train

from conftest import write_midi

TINY = [
    "model.max_len=64",
    "model.num_latents=16",
    "model.width=32",
    "model.heads=4",
    "model.layers=1",
    "model.scales=[full, 16]",
    "train.batch_size=2",
    "train.eval_windows=8",
    "train.threads=1",
]

# One deterministic step (no warmup, augmentation or dropout): for comparing two ways of taking it.
ONE_STEP = [
    *TINY,
    "train.steps=1",
    "train.eval_every=1",
    "train.warmup_steps=0",
    "data.transpose=0",
    "data.stretch=0",
    "model.dropout=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    midi = root / "midi"
    midi.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        starts = np.sort(rng.integers(0, 20_000, 120))
        notes = [
            (
                int(s),
                int(s) + int(rng.integers(50, 600)),
                int(rng.integers(48, 84)),
                int(rng.integers(30, 110)),
            )
            for s in starts
        ]
        write_midi(midi / f"piece{i:02d}.mid", notes, pedals=[(0, 127), (5000, 0)])
    prepare(
        midi, root / "data", PrepareConfig(workers=1, valid_fraction=0.25, test_fraction=0.1), progress=False
    )
    return root / "data"


def rows(run: Path, kind: str) -> dict[int, dict]:
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r
    return out


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-3)
    assert learning_rate(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate(100, cfg) == pytest.approx(1e-4)
    lrs = [learning_rate(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_schedule_holds_the_rate_then_decays_linearly_over_the_last_steps():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_steps=20)
    assert learning_rate(5, cfg) == pytest.approx(6e-4)  # warmup as for cosine
    assert [learning_rate(s, cfg) for s in (10, 50, 80)] == pytest.approx([1e-3] * 3)
    assert learning_rate(90, cfg) == pytest.approx(5.5e-4)
    assert learning_rate(100, cfg) == pytest.approx(1e-4)
    # The held part does not depend on where the run will end: extending it changes nothing before.
    longer = TrainConfig(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_steps=20)
    assert [learning_rate(s, longer) for s in range(80)] == [learning_rate(s, cfg) for s in range(80)]
    with pytest.raises(ConfigError, match="decay_steps"):
        TrainConfig(steps=100, schedule="wsd", decay_steps=200)


def test_train_writes_logs_checkpoints_and_learns(data_dir, tmp_path):
    cfg = load_config(
        "debug",
        [
            *TINY,
            "train.steps=60",
            "train.lr=3e-3",
            "train.eval_every=30",
            "train.ckpt_every=20",
            "train.keep_last=2",
            "train.log_every=10",
        ],
    )
    result = train(cfg, data_dir, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.step == 60
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000040", "step_0000060"]
    for ckpt in (run / "checkpoints").iterdir():
        assert sorted(f.name for f in ckpt.iterdir()) == [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "rng_rank0.safetensors",
            "trainer.json",
        ]
    train_rows, valid_rows = rows(run, "train"), rows(run, "valid")
    assert sorted(train_rows) == [10, 20, 30, 40, 50, 60] and sorted(valid_rows) == [30, 60]
    assert train_rows[60]["loss"] < train_rows[10]["loss"] - 0.2  # it learns
    assert valid_rows[60]["val_nll"] < valid_rows[30]["val_nll"]
    assert valid_rows[60]["val_bits"] == pytest.approx(valid_rows[60]["val_nll"] / math.log(2), rel=1e-5)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "log.csv").read_text().startswith("step,kind,loss")
    best = json.loads((run / "best" / "info.json").read_text())
    assert best["val_nll"] == pytest.approx(min(r["val_nll"] for r in valid_rows.values()), abs=1e-6)

    # The best checkpoint loads (no pickle anywhere) and reproduces the logged validation NLL.
    model, loaded_cfg = load_model(run)
    assert loaded_cfg.model == cfg.model
    from perceiver_music.data.windows import TokenData, WindowDataset
    from perceiver_music.train import evaluate_windows

    valid = WindowDataset(TokenData(data_dir, "valid"), cfg.data, 64, 16, train=False)
    idx = np.unique(np.linspace(0, len(valid) - 1, min(8, len(valid))).astype(int))
    nll, _ = evaluate_windows(model, valid, idx, 2, torch.device("cpu"), "fp32")
    assert nll == pytest.approx(best["val_nll"], abs=1e-5)


def test_killed_run_resumes_exactly(data_dir, tmp_path):
    """SIGKILL in the middle, --resume, and every later step's loss equals the uninterrupted run's."""
    args = [
        sys.executable,
        "-m",
        "perceiver_music",
        "train",
        "--config",
        "debug",
        "--data",
        str(data_dir),
        "--quiet",
        *TINY,
        "train.steps=40",
        "train.ckpt_every=5",
        "train.log_every=1",
        "train.eval_every=10",
        "model.dropout=0.1",
        "model.prefix_dropout=0.3",
        "data.transpose=3",
        "data.stretch=0.05",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(rows(run, "train"))
    assert killed_at < 40
    done = subprocess.run([*args, "--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout

    whole, resumed = rows(tmp_path / "whole", "train"), rows(run, "train")
    assert sorted(resumed) == list(range(1, 41))  # nothing logged twice, nothing missing
    assert [resumed[s]["loss"] for s in resumed] == [whole[s]["loss"] for s in resumed]
    assert rows(run, "valid")[40]["val_nll"] == rows(tmp_path / "whole", "valid")[40]["val_nll"]


def test_gradient_accumulation_matches_a_bigger_batch(data_dir, tmp_path):
    common = ONE_STEP
    big = train(
        load_config("debug", [*common, "train.batch_size=4"]), data_dir, tmp_path / "a", progress=False
    )
    acc = train(
        load_config("debug", [*common, "train.batch_size=2", "train.grad_accum=2"]),
        data_dir,
        tmp_path / "b",
        progress=False,
    )
    ma, _ = load_model(tmp_path / "a" / "checkpoints" / "step_0000001")
    mb, _ = load_model(tmp_path / "b" / "checkpoints" / "step_0000001")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(pa, pb, atol=2e-4), name
    assert big.last_loss == pytest.approx(acc.last_loss, rel=0.05)


def test_train_cli_errors(data_dir, tmp_path, capsys):
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r")]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["train", "--config", "debug", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "not a prepared data folder" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                "debug",
                "--data",
                str(data_dir),
                "--out",
                str(tmp_path / "r"),
                "model.vocab_size=100",
            ]
        )
        == 2
    )
    assert "vocabulary of 391 tokens, but model.vocab_size is 100" in capsys.readouterr().err
    run = tmp_path / "short"
    args = ["train", "--config", "debug", "--data", str(data_dir), "--out", str(run), "--quiet", *TINY]
    assert main([*args, "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--resume", "model.width=64"]) == 2
    assert "the model settings differ" in capsys.readouterr().err
    assert main([*args, "--resume", "train.steps=3"]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert main([*args, "train.steps=3"]) == 2  # the same folder again, without --resume
    assert "already holds a run (up to step_0000003): add --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_with_gloo_match_one(data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) takes the same first step as one process with both batches."""
    common = ONE_STEP
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "perceiver_music",
            "train",
            "--config",
            "debug",
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "ddp"),
            "--quiet",
            *common,
            "train.batch_size=2",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.stdout.count("trained to step 1") == 1, done.stdout  # rank 0 speaks for both
    train(load_config("debug", [*common, "train.batch_size=4"]), data_dir, tmp_path / "one", progress=False)
    ma, _ = load_model(tmp_path / "ddp" / "checkpoints" / "step_0000001")
    mb, _ = load_model(tmp_path / "one" / "checkpoints" / "step_0000001")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(pa, pb, atol=2e-4), name
    assert (tmp_path / "ddp" / "checkpoints" / "step_0000001" / "rng_rank1.safetensors").is_file()


def test_fine_tuning_starts_from_the_source_weights_with_a_fresh_optimizer(data_dir, tmp_path, capsys):
    """--init: step 0 holds the source's weights (at a rate of 1e-12 they stay so to 1e-8; a
    fresh model would differ by far more), the source's config is taken when --config is left out, another model is
    refused naming the setting, and the card adds the source's training to the new run's."""
    source = tmp_path / "source"
    train(load_config("debug", [*TINY, "train.steps=3"]), data_dir, source, progress=False)
    tuned = tmp_path / "tuned"
    frozen = [
        "train.steps=2",
        "train.lr=1e-12",
        "train.min_lr=0",
        "train.warmup_steps=0",
        "train.eval_every=2",
    ]
    assert (
        main(
            ["train", "--init", str(source), "--data", str(data_dir), "--out", str(tuned), "--quiet", *frozen]
        )
        == 0
    )
    assert "fine-tuning from" in capsys.readouterr().out
    before, _ = load_model(source / "checkpoints" / "step_0000003")
    after, cfg = load_model(tuned / "checkpoints" / "step_0000002")
    assert cfg.model.width == 32 and cfg.train.steps == 2  # the source's model, the new schedule
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-8), name
    log = [json.loads(line) for line in (tuned / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [2]  # its own log, from step 0
    record = json.loads((tuned / "init.json").read_text())
    assert record["source"] == str(source / "best") and record["source_train"]["steps"] == 3

    # A fine-tuned model's card: its own steps and those of what it started from.
    spec = __import__("importlib.util").util.spec_from_file_location(
        "bundle_model", Path(__file__).parents[1] / "recipes" / "bundle_model.py"
    )
    bundle = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    t = bundle._training(tuned)
    assert t["before"]["steps"] == 3 and t["before"]["tokens"] == 3 * 2 * 16
    assert bundle._trained(t)["steps"] == 5 and bundle._trained(t)["tokens"] == 5 * 2 * 16
    assert "in all 5 steps" in bundle._training_line(t, "a test")

    wide = ["train", "--config", "debug", "--init", str(source), "--data", str(data_dir), "--quiet"]
    assert main([*wide, "--out", str(tmp_path / "wide"), *TINY, "model.width=64", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "--init:" in err and "is another model (model.width=32 there, 64 here)" in err
    assert main([*wide, "--out", str(tmp_path / "none"), "--branch", str(source), *TINY]) == 2
    assert "--branch and --init: choose one" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--init",
                str(tmp_path / "nowhere"),
                "--data",
                str(data_dir),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "--init:" in capsys.readouterr().err
