"""Wall time of `perceiver-music prepare` on a folder of MIDI (default: all ASAP performances).

Runs the command as a user would, in a fresh output folder (a cold run: every file read and
tokenized), then again on the same folder (a warm run: everything reused), and writes both
times with the data counts to JSON. Target on 2 cores: the cold run in under 60 s.

    python bench/prepare.py [--data DIR] [--workers 2] [--out bench/results/prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(midi_dir: Path, out_dir: Path, workers: int) -> float:
    cmd = [sys.executable, "-m", "perceiver_music", "prepare", str(midi_dir), "--out", str(out_dir)]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--workers", str(workers), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "asap")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prepare.json")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no MIDI folder at {args.data}")

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "data"
        cold = run(args.data, out_dir, args.workers)
        warm = run(args.data, out_dir, args.workers)
        meta = json.loads((out_dir / "meta.json").read_text())

    result = {
        "benchmark": "prepare",
        "data": str(args.data),
        "files": len(meta["pieces"]) + len(meta["skipped"]),
        "pieces": len(meta["pieces"]),
        "skipped": len(meta["skipped"]),
        "tokens": sum(c["tokens"] for c in meta["counts"].values()),
        "hours": round(sum(c["seconds"] for c in meta["counts"].values()) / 3600, 2),
        "workers": args.workers,
        "cold_seconds": round(cold, 2),
        "warm_seconds": round(warm, 2),
        "target_cold_seconds": 60,
        "target_met": cold < 60,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"prepare: {result['files']} files, {result['tokens']:,} tokens, {result['hours']} h of music: "
        f"{cold:.1f} s cold, {warm:.1f} s warm with {args.workers} workers "
        f"(target < 60 s: {'met' if result['target_met'] else 'NOT met'}) -> {args.out}"
    )


if __name__ == "__main__":
    main()
