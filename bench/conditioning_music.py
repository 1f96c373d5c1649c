"""Does conditioning steer the music? Generation measured with the metric suite.

    python bench/conditioning_music.py composers --ckpt RUN --data DATA_DIR --source MIDI_DIR \
        [--composers Beethoven Chopin Liszt Schubert] [--num 8] [--seconds 45] --out OUT
    python bench/conditioning_music.py endings --ckpt RUN [--baseline UNCOND_RUN] [--targets 60 180] --out OUT
    python bench/conditioning_music.py style --ckpt RUN --data DATA_DIR --source MIDI_DIR [--refs 4] --out OUT

* composers: `num` pieces per composer (`--composer X`), each set compared (mean overlap area
  of the metric suite's distributions) with excerpts of each composer's held-out performances
  (valid + test: Liszt has no test pieces in ASAP), cut to the generated length and spread
  evenly over the performances (`--excerpts` per composer). Whole performances would not do:
  their whole-piece counts measure length, and the four composers' held-out performances run
  from minutes (Schubert) to half an hour (Liszt's sonata). Steering works when each row's
  highest value is on the diagonal.
* endings: `num` pieces per target length told to a timing-conditioned model; the share that
  end with EOS within +-15 % of the target; the same for the same model not told the length
  (under the same limit, 1.25 x the target) and, with --baseline, for an unconditioned model's
  pieces under the same `--seconds`.
* style: `refs` held-out performances of different composers as references; `num` pieces with
  `--style X` each, compared with every reference cut into 20 s excerpts (the metric suite
  needs a set on each side). Style works when each row is closest to its own reference.

Writes OUT/NAME.json and OUT/NAME.md, and keeps the generated MIDI under OUT/NAME/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def mean_overlap(gen_features: dict, ref_features: dict) -> float:
    from perceiver_music.evaluate import metrics

    compared = metrics.compare_sets(gen_features, ref_features)
    return float(np.mean([row["overlap"] for row in compared.values()]))


def held_out(data_dir: Path, labels: list[str], splits=("valid", "test")) -> dict[str, list[str]]:
    meta = json.loads((data_dir / "meta.json").read_text())
    return {
        name: [p["path"] for p in meta["pieces"] if p.get("label") == name and p["split"] in splits]
        for name in labels
    }


def matrix_markdown(title: str, rows: list[str], cols: list[str], values: np.ndarray) -> str:
    lines = [
        f"## {title}",
        "",
        "| generated \\ reference | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in zip(rows, values):
        best = int(np.argmax(row))
        cells = [f"**{v:.3f}**" if j == best else f"{v:.3f}" for j, v in enumerate(row)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    hits = sum(int(np.argmax(r)) == i for i, r in enumerate(values))
    lines += ["", f"rows whose highest value is on the diagonal: {hits} of {len(rows)}", ""]
    return "\n".join(lines)


def _settings(args) -> str:
    """How a steering bench's pieces were generated, for its table's title."""
    return f"{args.num} pieces of {args.seconds:g} s each, --guidance {args.guidance:g}, seed {args.seed}"


def cmd_composers(args) -> dict:
    from perceiver_music.evaluate.sets import load_set
    from perceiver_music.generate import generate_midi

    out = Path(args.out)
    refs = held_out(Path(args.data), args.composers)
    ref_sets = {
        c: load_set(
            excerpt_set(
                [Path(args.source) / r for r in refs[c]],
                out / "composers_ref" / c,
                args.seconds,
                args.excerpts,
            ),
            c,
        )
        for c in args.composers
    }
    gen_sets = {}
    for c in args.composers:
        folder = out / "composers" / c
        generate_midi(
            args.ckpt, folder, num=args.num, seconds=args.seconds, composer=c, seed=args.seed,
            guidance=args.guidance, render=False, progress=False,
        )  # fmt: skip
        gen_sets[c] = load_set(folder, c)
    values = np.array(
        [
            [mean_overlap(gen_sets[g].features, ref_sets[r].features) for r in args.composers]
            for g in args.composers
        ]
    )
    md = matrix_markdown(
        f"Composer steering: mean overlap area ({_settings(args)})", args.composers, args.composers, values
    )
    return {
        "composers": args.composers,
        "references": {c: len(refs[c]) for c in args.composers},
        "excerpts": {c: len(ref_sets[c]) for c in args.composers},
        "matrix": values.tolist(),
        "markdown": md,
    }


def cmd_endings(args) -> dict:
    from perceiver_music.checkpoint import trained_steps
    from perceiver_music.generate import generate_midi

    out = Path(args.out)
    rows = {}
    models = [("conditioned (told the length)", args.ckpt, True, "cond")]  # label, ckpt, told, folder
    if not args.no_untold:  # the same model, its timing left out as in training's dropout
        models.append(("the same model, not told the length", args.ckpt, False, "untold"))
    if args.baseline:
        steps = trained_steps(args.baseline)
        label = "unconditioned baseline" + ("" if steps is None else f" ({steps:,} steps)")
        models.append((label, args.baseline, True, "base"))
    md = [
        "## Endings: pieces that end (EOS) within +-15 % of the length asked for",
        "",
        "| model | target | ended in range | durations (s) |",
        "|---|---:|---:|---|",
    ]
    for label, ckpt, told, kind in models:
        for target in args.targets:
            folder = out / "endings" / f"{kind}_{target:g}"
            r = generate_midi(
                ckpt, folder, num=args.num, seconds=target, seed=args.seed, render=False, progress=False,
                tell_length=told,
            )  # fmt: skip
            ok = [why == "eos" and abs(s - target) <= 0.15 * target for why, s in zip(r.stopped, r.seconds)]
            rows[f"{label} @ {target:g}"] = {
                "stopped": r.stopped,
                "seconds": r.seconds,
                "in_range": float(np.mean(ok)),
            }
            md.append(
                f"| {label} | {target:g} s | {np.mean(ok):.0%} | {', '.join(f'{s:.0f}' for s in r.seconds)} |"
            )
    return {"rows": rows, "markdown": "\n".join(md) + "\n"}


def _spans(steps, span: int) -> list[int]:
    """The start step of each `span`-step stretch of a performance in which 8 notes or more
    start (write_excerpt keeps those notes)."""
    return [
        lo
        for lo in range(0, int(steps.end.max()), span)
        if np.count_nonzero((steps.start >= lo) & (steps.start < lo + span)) >= 8
    ]


def excerpts(midi: Path, folder: Path, seconds: float = 20.0) -> Path:
    """Cut a performance into `seconds`-long MIDI excerpts (a reference set for one piece)."""
    return excerpt_set([midi], folder, seconds)


def excerpt_set(midis: list[Path], folder: Path, seconds: float, limit: int | None = None) -> Path:
    """`seconds`-long excerpts of several performances, at most `limit` of them, spread evenly
    over all the performances' excerpts (so a long performance gives more than a short one)."""
    from perceiver_music.evaluate.sets import write_excerpt
    from perceiver_music.tokens.performance import PerformanceTokenizer

    tok = PerformanceTokenizer()
    span = int(seconds * tok.cfg.steps_per_second)
    notes = [tok.midi_to_notes(m) for m in midis]
    every = [(i, lo) for i, steps in enumerate(notes) for lo in _spans(steps, span)]
    chosen = range(len(every))
    if limit is not None and len(every) > limit:
        chosen = np.unique(np.linspace(0, len(every) - 1, limit).astype(int))
    folder.mkdir(parents=True, exist_ok=True)
    for k in chosen:
        i, lo = every[k]
        write_excerpt(tok, notes[i], lo, span, folder / f"{i:03d}_{Path(midis[i]).stem}_{k:04d}.mid")
    return folder


def cmd_style(args) -> dict:
    from perceiver_music.evaluate.sets import load_set
    from perceiver_music.generate import generate_midi

    out = Path(args.out)
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    chosen, seen = [], set()
    for p in meta["pieces"]:  # one held-out performance per composer, longest first
        if (
            p["split"] in ("valid", "test")
            and p.get("label")
            and p["label"] not in seen
            and p["seconds"] > 120
        ):
            chosen.append(p)
            seen.add(p["label"])
    chosen = sorted(chosen, key=lambda p: -p["seconds"])[: args.refs]
    names = [f"{p['label']}: {Path(p['path']).parent.name}" for p in chosen]
    ref_sets = [
        load_set(excerpts(Path(args.source) / p["path"], out / "style_ref" / f"{i}"), f"ref{i}")
        for i, p in enumerate(chosen)
    ]
    values = []
    for i, p in enumerate(chosen):
        folder = out / "style" / f"{i}"
        generate_midi(
            args.ckpt, folder, num=args.num, seconds=args.seconds, style=Path(args.source) / p["path"],
            seed=args.seed, guidance=args.guidance, render=False, progress=False,
        )  # fmt: skip
        gen = load_set(folder, f"gen{i}")
        values.append([mean_overlap(gen.features, r.features) for r in ref_sets])
    values = np.array(values)
    md = matrix_markdown(
        f"Style: mean overlap area with each reference's excerpts ({_settings(args)})",
        names,
        [f"ref {i}" for i in range(len(names))],
        values,
    )
    return {"references": [p["path"] for p in chosen], "matrix": values.tolist(), "markdown": md}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("composers", "endings", "style"):
        s = sub.add_parser(name)
        s.add_argument("--ckpt", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--num", type=int, default=8)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--guidance", type=float, default=1.0)
        if name != "endings":
            s.add_argument("--data", required=True, help="the prepared data (meta.json: labels, splits)")
            s.add_argument("--source", required=True, help="the MIDI folder it was prepared from")
            s.add_argument("--seconds", type=float, default=45.0)
    sub.choices["composers"].add_argument(
        "--excerpts", type=int, default=64, help="reference excerpts per composer (of --seconds each)"
    )
    sub.choices["composers"].add_argument(
        "--composers", nargs="+", default=["Beethoven", "Chopin", "Liszt", "Schubert"]
    )
    sub.choices["endings"].add_argument("--baseline", help="an unconditioned model to compare")
    sub.choices["endings"].add_argument(
        "--no-untold", action="store_true", help="skip the same model not told the length"
    )
    sub.choices["endings"].add_argument("--targets", type=float, nargs="+", default=[60.0, 180.0])
    sub.choices["style"].add_argument("--refs", type=int, default=4)
    args = p.parse_args(argv)
    result = {"composers": cmd_composers, "endings": cmd_endings, "style": cmd_style}[args.what](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "markdown"} | {"args": vars(args)}, indent=1)
    )
    (out / f"{args.what}.md").write_text(result["markdown"])
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
