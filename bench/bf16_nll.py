"""Does bf16 autocast change what a model learns? Validation NLL, float32 versus bf16, on ASAP.

The same small PerceiverS is trained twice with `perceiver-music train` on the ASAP
performances (prepared here first), from the same seed and on the same windows: once in
float32, once under bf16 autocast (train.precision=bf16; weights and optimizer in float32).
Both runs' validation NLL (nats and bits per token, the same validation windows) and tokens/s
go to JSON, with the difference in NLL.

    python bench/bf16_nll.py [--steps 400] [--out bench/results/bf16_nll.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "model.max_len=1024",
    "model.num_latents=128",
    "model.width=256",
    "model.heads=4",
    "model.layers=4",
    "model.scales=[full, 128]",
    "model.dropout=0.0",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.warmup_steps=50",
    "train.eval_windows=256",
    "train.log_every=10",
    "train.threads=2",
]


def run(data: Path, out: Path, steps: int, precision: str) -> dict:
    args = [
        sys.executable,
        "-m",
        "perceiver_music",
        "train",
        "--config",
        "debug",
        "--data",
        str(data),
        "--out",
        str(out),
        "--quiet",
        *MODEL,
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        f"train.precision={precision}",
    ]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"][-1]
    train = [r for r in rows if r["kind"] == "train"]
    speeds = sorted(r["tokens_per_s"] for r in train[1:])  # the first interval includes start-up
    return {
        "precision": precision,
        "val_nll": valid["val_nll"],
        "val_bits": valid["val_bits"],
        "final_train_loss": train[-1]["loss"],
        "tokens_per_s_median": speeds[len(speeds) // 2],
        "wall_s": valid["elapsed_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--midi", type=Path, default=REPO.parent / "shared" / "data" / "asap")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bf16_nll.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "perceiver_music",
                "prepare",
                str(args.midi),
                "--out",
                str(data),
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        fp32 = run(data, Path(tmp) / "fp32", args.steps, "fp32")
        bf16 = run(data, Path(tmp) / "bf16", args.steps, "bf16")

    result = {
        "benchmark": "bf16_nll",
        "data": str(args.midi),
        "steps": args.steps,
        "model": MODEL,
        "runs": [fp32, bf16],
        "val_nll_difference": round(bf16["val_nll"] - fp32["val_nll"], 5),
        "bf16_speedup": round(bf16["tokens_per_s_median"] / fp32["tokens_per_s_median"], 3),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in (fp32, bf16):
        print(
            f"{r['precision']:>5}: validation {r['val_nll']:.4f} nats/token ({r['val_bits']:.4f} bits), "
            f"{r['tokens_per_s_median']:.0f} tokens/s"
        )
    print(
        f"difference {result['val_nll_difference']:+.4f} nats/token; bf16 {result['bf16_speedup']:.2f}x -> {args.out}"
    )


if __name__ == "__main__":
    main()
