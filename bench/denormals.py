"""Training step time on CPU with denormal floats computed, and flushed to zero, one run, JSON.

Why: as a model trains, its softmax and the backward produce floats below 1.2e-38
(denormals), which x86 CPUs compute far slower than normal ones; a freshly initialised model
has few, so throughput benches from initialisation do not see them. `train` flushes them to
zero on CPU (`torch.set_flush_denormal`). Measured at step 1,250 of the bundle run (2 threads,
bf16 autocast, nothing else running): 1.033 s a step with denormals, 0.982 s flushed (1.05x).

What is measured: forward, loss and backward of one fixed batch of training windows from the
checkpoint's own data, under the checkpoint's training precision, flush off and on,
interleaved over --rounds rounds (the host's speed drifts); the median of each side's times.

    python bench/denormals.py --ckpt runs/bundle/full/checkpoints/step_0001000 --data data/asap-exact \
        [--threads 1] [--rounds 4] [--out bench/results/denormals.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a training checkpoint (or run) of a token model")
    p.add_argument("--data", required=True, help="the prepared data it was trained on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default="bench/results/denormals.json")
    args = p.parse_args(argv)

    import torch

    from perceiver_music.checkpoint import load_model, trained_steps
    from perceiver_music.model.base import autocast
    from perceiver_music.train import _token_task

    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.ckpt, "cpu")
    model.train()
    task = _token_task(cfg, args.data)
    batch = task.collate([task.train_windows[i] for i in range(args.batch)])
    precision = cfg.train.precision

    def step() -> float:
        t = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            loss, _ = task.loss(model, model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            step()  # warm-up under this setting
            times[flush].append(min(step() for _ in range(2)))
    result = {
        "checkpoint": str(args.ckpt),
        "trained_steps": trained_steps(args.ckpt),
        "precision": precision,
        "threads": args.threads,
        "batch": args.batch,
        "step_s_denormals": statistics.median(times[False]),
        "step_s_flushed": statistics.median(times[True]),
        "rounds": {"denormals": times[False], "flushed": times[True]},
    }
    result["speedup"] = result["step_s_denormals"] / result["step_s_flushed"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"{args.ckpt} (step {result['trained_steps']}): {result['step_s_denormals']:.3f} s with denormals, "
        f"{result['step_s_flushed']:.3f} s flushed ({result['speedup']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
