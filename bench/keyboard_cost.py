"""What keyboard conditioning costs in generation, one run, JSON.

    python bench/keyboard_cost.py [--tokens 512] [--batch 1 8] [--repeats 5] [--threads 1]

What is measured
    Two models of the bundled model's shape (the `asap_cpu` config, random init, seed 0):
    conditioned on label, timing and style, and the same weights plus the keyboard state. The
    keyboard projection starts at zero, so both compute the same logits and sample the same tokens: the
    only difference in work is following the keyboard state (`_Stream._follow_keyboard`) and
    its projection into the latents' queries. For each batch size, `generate` from BOS for
    --tokens tokens (cached, the keyboard mask on, temperature 1, seed 0) with each model, back
    to back in each repeat, alternating which goes first; "cost" is the median of the paired
    time ratios minus 1. Also timed alone: the state update of one step (median of 2,000).
    Run it on idle cores for a clean figure; under load the paired ratio still compares like
    with like, and the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "keyboard_cost.json")
    args = p.parse_args(argv)

    import torch

    from perceiver_music.config import load_config
    from perceiver_music.model import build_model
    from perceiver_music.sample import CachedStream, Conditions, generate
    from perceiver_music.tokens.performance import BOS

    torch.set_num_threads(args.threads)
    models = {}
    for name, condition in [
        ("without", "[label, timing, style]"),
        ("with", "[label, timing, style, keyboard]"),
    ]:
        cfg = load_config(
            "asap_cpu", [f"model.condition={condition}", "model.labels=[A, B]", "model.style_len=256"]
        )
        torch.manual_seed(0)
        models[name] = build_model(cfg.model).eval()
    # The same weights (the keyboard projection, at zero, is the one the other lacks).
    models["with"].load_state_dict(models["without"].state_dict(), strict=False)
    conditions = Conditions(label=1, total_seconds=60.0)

    rows = []
    for batch in args.batch:
        prompt = torch.full((batch, 1), BOS)
        times: dict[str, list[float]] = {"without": [], "with": []}
        outputs = {}
        generate(models["with"], prompt, 16, conditions=conditions)  # warm-up
        generate(models["without"], prompt, 16, conditions=conditions)
        for r in range(args.repeats):
            order = ["without", "with"] if r % 2 == 0 else ["with", "without"]
            for name in order:
                t0 = time.perf_counter()
                outputs[name] = generate(
                    models[name], prompt, args.tokens, conditions=conditions, stop_at_eos=False
                )
                times[name].append(time.perf_counter() - t0)
        same = all(torch.equal(a, b) for a, b in zip(outputs["with"], outputs["without"]))
        ratios = [w / o for w, o in zip(times["with"], times["without"])]
        rows.append(
            {
                "batch": batch,
                "tokens": args.tokens,
                "seconds_without": statistics.median(times["without"]),
                "seconds_with": statistics.median(times["with"]),
                "cost": statistics.median(ratios) - 1,
                "same_tokens": same,
            }
        )
        print(
            f"batch {batch}: {statistics.median(times['without']):.2f} s without, "
            f"{statistics.median(times['with']):.2f} s with the keyboard: cost {100 * rows[-1]['cost']:+.1f} % "
            f"(same tokens: {same})",
            flush=True,
        )

    # The state update alone, one step of batch 1.
    stream = CachedStream(
        models["with"],
        torch.full((1, 1), BOS),
        2100,
        cond=conditions.cond(1, "cpu"),
        tokenizer=conditions.tokenizer,
    )
    tokens = torch.randint(3, 391, (2000, 1), generator=torch.Generator().manual_seed(0))
    step_ms = []
    for i, t in enumerate(tokens):
        t0 = time.perf_counter()
        stream._follow_keyboard(t)
        step_ms.append(1e3 * (time.perf_counter() - t0))
        stream.length = 1 + i % 2000
    record = {
        "what": "generate() with keyboard conditioning over without, minus 1 (paired, alternating)",
        "model": "asap_cpu shape, random init",
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "rows": rows,
        "state_update_ms": statistics.median(step_ms),
    }
    print(f"state update alone: {record['state_update_ms']:.3f} ms per step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
