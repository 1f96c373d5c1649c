"""How much does a small set of pieces vary? Real performances, drawn as a generated set is
judged: SETS draws of PIECES random excerpts of SECONDS each from held-out ASAP performances
(a random performance, a random start), each scored as `evaluate --generated` scores a set
against the reference performances (mean note length, notes ended by the tokenizer's cap,
and the overlap area of every metric). Generated folders given with --generated are scored the
same way, so a model's sets and the data's own sets sit side by side, and the share of draws
that pass a bar (--bar note_seconds_mean=0.3:0.8 --bar NLH=0.7:) says how strict the bar is
for the music itself.

    python bench/set_spread.py --source ../shared/data/asap --data data/asap-exact \\
        --generated out/seed5 out/seed6 --bar note_seconds_mean=0.3:0.8 --bar NLH=0.7: \\
        --bar capped_share=:0.03 --out bench/out/set_spread.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from perceiver_music.evaluate import metrics
from perceiver_music.evaluate.sets import PieceSet, load_set, write_excerpt
from perceiver_music.tokens.performance import PerformanceTokenizer


def score(s: PieceSet, reference: PieceSet) -> dict[str, float]:
    """The figures `evaluate --generated` reports for a set: note summaries and each metric's
    overlap area against the reference."""
    comparison = metrics.compare_sets(s.features, reference.features)
    row = {k: s.validity[k] for k in ("note_seconds_mean", "note_seconds_median", "capped_share")}
    row.update({m: comparison[m]["overlap"] for m in metrics.METRICS})
    row["mean_overlap"] = float(np.mean([comparison[m]["overlap"] for m in metrics.METRICS]))
    return row


def parse_bar(text: str) -> tuple[str, float, float]:
    name, _, bounds = text.partition("=")
    lo, _, hi = bounds.partition(":")
    return name, float(lo) if lo else -np.inf, float(hi) if hi else np.inf


def passes(row: dict, bars: list[tuple[str, float, float]]) -> bool:
    return all(lo <= row[name] <= hi for name, lo, hi in bars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the MIDI folder prepared")
    parser.add_argument("--data", type=Path, required=True, help="its prepare folder (splits)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sets", type=int, default=40)
    parser.add_argument("--pieces", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generated", type=Path, nargs="*", default=[], help="generated folders")
    parser.add_argument("--bar", action="append", default=[], help="NAME=LO:HI, either side may be empty")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bars = [parse_bar(b) for b in args.bar]

    meta = json.loads((args.data / "meta.json").read_text())
    held = [args.source / p["path"] for p in meta["pieces"] if p["split"] == args.split]
    tok = PerformanceTokenizer()
    span = int(args.seconds * tok.cfg.steps_per_second)
    performances = [tok.midi_to_notes(m) for m in held]
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = Path(tmp) / "reference"
        ref_dir.mkdir()
        for i, m in enumerate(held):
            (ref_dir / f"{i:03d}.mid").symlink_to(m.resolve())
        reference = load_set(ref_dir, "reference")
        data_rows = []
        for d in range(args.sets):
            folder = Path(tmp) / f"draw{d:03d}"
            folder.mkdir()
            for k, i in enumerate(rng.choice(len(held), args.pieces, replace=False)):
                steps = performances[i]
                lo = int(rng.integers(0, max(1, int(steps.end.max()) - span)))
                write_excerpt(tok, steps, lo, span, folder / f"{k}_{held[i].stem}.mid")
            data_rows.append(score(load_set(folder), reference))
        model_rows = {str(g): score(load_set(g), reference) for g in args.generated}

    def spread(rows: list[dict]) -> dict:
        keys = rows[0].keys()
        out = {
            k: {
                "mean": round(float(np.mean([r[k] for r in rows])), 4),
                "min": round(float(np.min([r[k] for r in rows])), 4),
                "max": round(float(np.max([r[k] for r in rows])), 4),
            }
            for k in keys
        }
        for name, lo, hi in bars:
            out[name]["share_within_bar"] = round(float(np.mean([lo <= r[name] <= hi for r in rows])), 4)
        if bars:
            out["share_passing_every_bar"] = round(float(np.mean([passes(r, bars) for r in rows])), 4)
        return out

    report = {
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("out", "generated")},
        "reference_performances": len(held),
        "data_sets": spread(data_rows),
        "generated_sets": spread(list(model_rows.values())) if model_rows else None,
        "generated": {k: {**v, "passes": passes(v, bars)} for k, v in model_rows.items()},
    }
    keys = ["note_seconds_mean", "capped_share", "NLH", "mean_overlap"]
    print(f"{'set':<40} " + " ".join(f"{k:>18}" for k in keys))
    for name, rows in (("ASAP excerpts", data_rows), *((g, [r]) for g, r in model_rows.items())):
        mean = {k: np.mean([r[k] for r in rows]) for k in keys}
        lo = {k: np.min([r[k] for r in rows]) for k in keys}
        hi = {k: np.max([r[k] for r in rows]) for k in keys}
        cells = [
            f"{mean[k]:.3f} ({lo[k]:.2f}-{hi[k]:.2f})" if len(rows) > 1 else f"{mean[k]:.3f}" for k in keys
        ]
        print(f"{name[-40:]:<40} " + " ".join(f"{c:>18}" for c in cells))
    if bars:
        print(f"ASAP draws passing every bar: {report['data_sets']['share_passing_every_bar']:.0%}")
        if model_rows:
            print(
                f"generated sets passing every bar: {report['generated_sets']['share_passing_every_bar']:.0%}"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
