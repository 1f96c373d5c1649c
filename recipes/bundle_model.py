"""Copy the trained default model into the package and write its model card.

    python recipes/bundle_model.py [--runs runs/default] [--data data/asap]

Reads what recipes/default_model.sh produced: runs/default/{perceivers,perceiver_ar} (the
best checkpoint of each, their training logs) and runs/default/eval (likelihood on the
held-out ASAP pieces, and the set metrics of generated pieces when present). Writes
src/perceiver_music/bundled/: model.safetensors, config.json, info.json and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from perceiver_music.evaluate.sets import table_one, validity_table

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "perceiver_music" / "bundled"
MAX_BYTES = 25 * 1000 * 1000


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _training(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    cfg = json.loads((run / "config.json").read_text())
    t = cfg["train"]
    last = train_rows[-1]
    # elapsed_s restarts at each resume or branch: the run's time is the sum of its stretches.
    seconds, previous = 0.0, 0.0
    for r in train_rows:
        if r["elapsed_s"] < previous:
            seconds += previous
        previous = r["elapsed_s"]
    seconds += previous
    best = json.loads((run / "best" / "info.json").read_text())
    world = best.get("world_size", 1)  # processes (torchrun): each step saw world x batch_size windows
    tokens = last["step"] * t["batch_size"] * t.get("grad_accum", 1) * cfg["model"]["num_latents"] * world
    return {
        "steps": last["step"],
        "hours": seconds / 3600,
        "tokens": tokens,
        "world": world,
        "best": best,
        "config": cfg,
        "before": _before(run, cfg["model"]["num_latents"]),
    }


def _before(run: Path, latents: int) -> dict | None:
    """What trained the weights a fine-tuning run (`train --init`, init.json; for a run made by
    `train --branch`, that of the run it branched off) started from: the source's own record of
    it (a model bundled by this script), else its steps (hours unknown).
    Only init.json is read: the source folder may since hold another model (the bundled one
    is replaced by the model fine-tuned from it)."""
    from perceiver_music.train import branch_chain

    stages = [stage for stage, _ in reversed(branch_chain(run))]  # itself, then what it branched off
    run = next((stage for stage in stages if (stage / "init.json").is_file()), stages[-1])
    record = _json(run / "init.json")
    if record is None:
        return None
    info, t = record["source_info"], record["source_train"]
    if "trained" in info:
        return info["trained"]
    steps = info.get("step", t.get("steps", 0))
    tokens = steps * t.get("batch_size", 1) * t.get("grad_accum", 1) * latents * info.get("world_size", 1)
    return {"steps": steps, "tokens": tokens, "hours": None}


def _trained(t: dict) -> dict:
    """The weights' whole training: the fine-tuning run's and what came before it."""
    b = t["before"] or {"steps": 0, "tokens": 0, "hours": 0.0}
    hours = None if b["hours"] is None else round(b["hours"] + t["hours"], 3)
    return {"steps": b["steps"] + t["steps"], "tokens": b["tokens"] + t["tokens"], "hours": hours}


def _training_line(t: dict, hardware: str) -> str:
    line = (
        f"- {t['steps']:,} steps, {t['tokens'] / 1e6:.1f} M target tokens, {t['hours']:.2f} h on {hardware}"
    )
    b = t["before"]
    if b is None:
        return line
    whole = _trained(t)
    hours = lambda h: "" if h is None else f", {h:.2f} h"
    return (
        line
        + f", fine-tuned (`train --init`: its weights, a fresh optimizer and a new warm-up) from the model "
        f"bundled before it ({b['steps']:,} steps, {b['tokens'] / 1e6:.1f} M target tokens{hours(b['hours'])}): "
        f"in all {whole['steps']:,} steps, {whole['tokens'] / 1e6:.1f} M target tokens{hours(whole['hours'])}"
    )


def _stages(run: Path, steps: int, condition: list[str]) -> str | None:
    """The stages of a run made by `train --branch` (branch.json, followed back), as one line."""
    from perceiver_music.train import branch_chain

    records = [record for _, record in branch_chain(run)]
    if len(records) == 1:
        return None
    parts = []
    for k, record in enumerate(records):
        after = records[k + 1] if k + 1 < len(records) else None  # the stage branched off this one
        start, end = record["step"] if record else 0, after["step"] if after else steps
        c = after.get("source_condition", []) if after else condition
        note = record.get("note") if record else None  # note: what else changed
        parts.append(
            f"steps {start:,}-{end:,} "
            + ("conditioned on " + ", ".join(c) if c else "unconditioned")
            + (f" ({note})" if note else "")
        )
    return (
        "- trained in stages (`train --branch`; conditioning added by a stage starts as a no-op): "
        + "; ".join(parts)
    )


def _params(run: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(run / "best" / "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not iterable)


def _nll_row(name: str, ev: Path, model: str) -> str:
    cells = []
    for split in ("valid", "test"):
        r = _json(ev / f"{model}-{split}" / "likelihood.json")
        if r is None:
            cells += ["not measured", ""]
            continue
        first = r["buckets"][0]
        cells += [
            f"{r['nats_per_token']:.4f} ({r['bits_per_token']:.3f} bits)",
            f"{first['nats_per_token']:.4f}",
        ]
    return f"| {name} | " + " | ".join(cells) + " |"


def _buckets(ev: Path, model: str) -> list[str]:
    """NLL by position in the piece, valid and test side by side."""
    rows = {split: _json(ev / f"{model}-{split}" / "likelihood.json") for split in ("valid", "test")}
    if any(r is None for r in rows.values()):
        return []
    lines = [
        "",
        "By position in the piece (nats/token; tokens scored in each bucket):",
        "",
        "| tokens | valid | test |",
        "| --- | ---: | ---: |",
    ]
    for a, b in zip(rows["valid"]["buckets"], rows["test"]["buckets"]):
        cell = lambda r: f"{r['nats_per_token']:.4f} ({r['tokens']:,})" if r["tokens"] else "-"
        lines.append(f"| {a['label']} | {cell(a)} | {cell(b)} |")
    return lines


def _difference(ev: Path) -> list[str]:
    """One sentence per split: how much lower (better) PerceiverS's NLL is than the baseline's."""
    out = []
    for split in ("valid", "test"):
        ours, base = (
            _json(ev / f"perceivers-{split}" / "likelihood.json"),
            _json(ev / f"perceiver_ar-{split}" / "likelihood.json"),
        )
        if ours is None or base is None:
            continue
        total = base["nats_per_token"] - ours["nats_per_token"]
        first = base["buckets"][0]["nats_per_token"] - ours["buckets"][0]["nats_per_token"]
        word = "lower" if total > 0 else "higher"
        out.append(
            f"On {split}, PerceiverS's NLL is {abs(total):.4f} nats/token {word} than the baseline's "
            f"({first:+.4f} nats/token in its favour over each piece's first 1,024 tokens)."
        )
    return out


def _sampling(runs: Path) -> str:
    g = _json(runs / "samples" / "perceivers" / "generate.json")
    if g is None:
        return "settings not recorded"
    secs = g["piece_seconds"]
    sampling = ", ".join(f"{k} {v}" for k, v in g["sampling"].items())
    return f"{g['max_tokens']:,} tokens each, {min(secs):.0f}-{max(secs):.0f} s of music, {sampling}, seed {g['seed']}"


def _conditioning(ev: Path, m: dict) -> list[str]:
    """The card's section on a conditioned model: how to steer it and what each condition is worth."""
    if not m.get("condition"):
        return []
    kinds = {
        "label": "composer",
        "timing": "length (total, elapsed, fraction" + (", time left)" if m.get("timing_remaining") else ")"),
        "style": "style of a reference",
        "keyboard": "the keys sounding after each token and for how long (from the tokens: never asked for)",
    }
    lines = [
        "",
        "## Conditioning",
        "",
        "Conditioned on " + ", ".join(kinds[k] for k in m["condition"]) + " (README: Conditioning).",
    ]
    if m.get("labels"):
        lines += ["", "`--composer` takes: " + ", ".join(m["labels"]) + "."]
    nll = _json(ev / "conditioning" / "conditioning.json")
    start = _json(ev / "conditioning" / "conditioning_start.json")  # `--at start`
    if nll is not None:
        head = f"NLL on {nll['windows']} evenly spaced {nll['split']} windows ({nll['targets']:,} targets)"
        rows = [f"| {k} | {v:.4f} |" for k, v in nll["nll"].items()]
        table = ["| told | nats/token |", "| --- | ---: |"]
        if start is not None:
            head += (
                f" and on the first window of each of the {start['windows']} pieces (their first "
                f"{start['targets'] // max(1, start['windows']):,} tokens or so, nothing before them: what a "
                "piece generated from nothing is told)"
            )
            rows = [
                f"| {k} | {v:.4f} | {start['nll'][k]:.4f} |"
                for k, v in nll["nll"].items()
                if k in start["nll"]
            ]
            table = ["| told | anywhere | piece start |", "| --- | ---: | ---: |"]
        lines += ["", head + ", `python bench/conditioning.py [--at start]`:", "", *table, *rows]
        eos = nll.get("eos_at_end")
        if eos:
            told, not_told = eos["told the length"], eos["not told"]
            lines += [
                "",
                f"P(EOS) at the true end of the {eos['pieces']} {nll['split']} pieces: mean {told['mean']:.3f} "
                f"(median {told['median']:.3f}) told the length, {not_told['mean']:.3f} "
                f"({not_told['median']:.3f}) not told.",
            ]
    for name in ("composers", "endings", "style"):
        path = ev / "conditioning" / f"{name}.md"
        if path.is_file():
            lines += ["", *path.read_text().strip().splitlines()]
    return lines


def card(runs: Path, data: Path, hardware: str) -> str:
    main, base = runs / "perceivers", runs / "perceiver_ar"
    ev = runs / "eval"
    t = _training(main)
    tb = _training(base) if (base / "config.json").is_file() else None  # the baseline is optional
    m = t["config"]["model"]
    d = t["config"]["data"]
    tr = t["config"]["train"]
    meta = json.loads((data / "meta.json").read_text())
    counts = meta["counts"]
    size_mb = (main / "best" / "model.safetensors").stat().st_size / 1e6
    sets = _json(ev / "sets" / "metrics.json")

    lines = [
        "# perceiver-music default model: PerceiverS on ASAP",
        "",
        "The model `perceiver-music generate` uses when no `--ckpt` is given. A small PerceiverS",
        "(Perceiver AR with Effective Segmentation and multi-scale cross-attention) trained on the",
        "ASAP piano performances, small enough to generate on a laptop CPU.",
        "",
        "## Licence",
        "",
        "The weights are derived from the ASAP dataset and inherit its licence: **CC BY-NC-SA 4.0**",
        "(attribution, non-commercial, share-alike). Music generated with them is for",
        "non-commercial use on the same terms. The code of perceiver-music is licensed separately.",
        "",
        "## Data",
        "",
        f"ASAP performances: {sum(c['pieces'] for c in counts.values())} MIDI files, split by piece folder so",
        "no piece (in any performance) is in two splits:",
        "",
        "| split | pieces | tokens | hours |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {s} | {c['pieces']} | {c['tokens']:,} | {c['seconds'] / 3600:.1f} |"
            for s, c in counts.items()
        ],
        "",
        "Tokens: performance events (128 NOTE_ON, 128 NOTE_OFF, 100 TIME_SHIFT of 10 ms, 32 VELOCITY,",
        "sustain pedal folded into note lengths) plus PAD/BOS/EOS: 391 ids.",
        "Augmentation in training: transposition up to "
        f"±{d['transpose']} semitones, time stretch up to ±{d['stretch'] * 100:.0f} %.",
        "",
        "## Configuration",
        "",
        f"- Perceiver AR, {m['layers']} layers, width {m['width']}, {m['heads']} heads, "
        f"context {m['max_len']:,} tokens, {m['num_latents']} latents, {_params(main):,} parameters "
        f"({size_mb:.1f} MB, float32 safetensors)",
        f"- cross-attention scales {m['scales']} ({m['scale_mode']} windows), "
        f"segmentation `{d['segmentation']}`",
        f"- dropout {m['dropout']}, prefix dropout {m['prefix_dropout']}"
        + (f"; {d['end_windows']:.0%} of training windows end their piece" if d.get("end_windows") else ""),
        f"- training precision {tr.get('precision', 'auto')}"
        + (" (autocast: float32 weights, bfloat16 matrix products)" if tr.get("precision") == "bf16" else ""),
        f"- AdamW, lr {tr['lr']} (warm-up {tr['warmup_steps']} steps, "
        + (
            f"then held, and a linear decay to {tr['min_lr']}), "
            if tr.get("schedule") == "wsd"
            else f"cosine to {tr['min_lr']}), "
        )
        + f"weight decay {tr['weight_decay']}, "
        f"batch {tr['batch_size']} windows"
        + (f" per process x {t['world']} processes" if t["world"] > 1 else "")
        + f", seed {tr['seed']}",
        _training_line(t, hardware),
        *filter(None, [_stages(main, t["steps"], m.get("condition", []))]),
        f"- best validation NLL during training (sampled windows): {t['best']['val_nll']:.4f} nats/token "
        f"at step {t['best']['step']}",
        "",
        *(
            ["![training loss and validation NLL](training_curve.png)", ""]
            if (main / "loss.png").is_file()
            else []
        ),
        "## Results on the held-out ASAP pieces",
        "",
        "Every token of every held-out piece scored with the model's full context (stride = latents),",
        "`perceiver-music evaluate --ckpt ... --data data/asap --split valid|test`.",
    ]
    if tb:
        lines += [
            "The baseline is a Perceiver AR (one full cross-attention, baseline segmentation) trained",
            f"with the same recipe, data and seed ({tb['steps']:,} steps, {tb['hours']:.2f} h"
            + (
                f"; a smaller budget than this model's {t['steps']:,}, so compare with care)."
                if tb["steps"] < t["steps"]
                else ", the same budget)."
            ),
        ]
    else:
        lines += ["No Perceiver AR baseline was trained beside this model: its CPU time went to this model."]
    lines += [
        "",
        "| model | valid NLL nats/token | valid, tokens 1-1,023 | test NLL nats/token | test, tokens 1-1,023 |",
        "| --- | ---: | ---: | ---: | ---: |",
        _nll_row("PerceiverS (this model)", ev, "perceivers"),
        *([_nll_row("Perceiver AR baseline", ev, "perceiver_ar")] if tb else []),
        *_buckets(ev, "perceivers"),
        "",
        *_difference(ev),
        "",
        "The second column of each split is the NLL over the first 1,024 tokens of each piece, where",
        "Effective Segmentation matters most: baseline segmentation never trains on a window that",
        "starts at a piece's beginning.",
    ]
    if sets is not None:
        names = list(sets["metrics"])
        lines += [
            "",
            "## Generated pieces against the test set (PerceiverS Table I)",
            "",
            f"{sets['sets'][names[0]]['pieces']} unconditioned pieces from each model ({_sampling(runs)}), "
            f"compared with the {sets['sets']['reference']['pieces']} test performances by",
            "`perceiver-music evaluate --generated ... --reference ...` (the full table, distances, plots",
            f"and repetition figures are in {runs}/eval/sets after the recipe). The generated pieces",
            "are short and the performances whole, so the whole-piece counts (NC, PCTM, NLTM) are far from",
            "the reference"
            + (" for both models: compare the two models' columns with each other." if tb else "."),
            "",
            *table_one(sets),
        ]
    sampling = _json(ev / "sampling" / "metrics.json")
    if sampling is not None:
        names = list(sampling["metrics"])
        metric_names = list(sampling["metrics"][names[0]])
        best = {n: 0 for n in names}
        for metric in metric_names:
            best[max(names, key=lambda n: sampling["metrics"][n][metric]["overlap"])] += 1
        lines += [
            "",
            "## Sampling settings",
            "",
            "The same comparison for this model under four sampling settings (same seed and length).",
            "Plain sampling at temperature 1 is `generate`'s default:",
            "",
            "| setting | mean OA ↑ over the 13 metrics | metrics where its OA is highest |",
            "| --- | ---: | ---: |",
            *[
                f"| {n} | {sum(sampling['metrics'][n][m]['overlap'] for m in metric_names) / len(metric_names):.3f} "
                f"| {best[n]} |"
                for n in names
            ],
        ]
    validity = _json(ev / "validity" / "metrics.json")
    if validity is not None:
        lines += [
            "",
            "## Does it play the keyboard? Event validity",
            "",
            "8 pieces of 45 s from each model (`generate --num 8 --seconds 45 --seed 5`), with generate's",
            "defaults (the keyboard mask on: no NOTE_OFF of a silent pitch, no NOTE_ON of a sounding one)",
            "and with `--no-keyboard-mask`, which shows what the model itself learned. `old` is the model",
            "this one replaced. Counted on the emitted tokens; the reference is the test performances.",
            "",
            *validity_table(validity["sets"])[2:],
            "",
            "The same pieces on the metric suite against the test performances:",
            "",
            *table_one(validity),
        ]
    lines += _conditioning(ev, m)
    lines += [
        "",
        "## Retrain",
        "",
        "```bash",
        *(
            [
                "bash recipes/bundle_run.sh                   # the held run (resumes where it stopped)",
                "DECAY=400 bash recipes/bundle_run.sh decay   # a finished model off its latest checkpoint",
                "MAIN=runs/bundle/decay_STEP OUT=runs/final DATA=data/asap-exact BASELINE=0 \\",
                "    bash recipes/default_model.sh            # evaluate it",
                "python recipes/bundle_model.py --runs runs/final --data data/asap-exact",
            ]
            if tr.get("schedule") == "wsd"
            else [
                "bash recipes/default_model.sh                # prepare ASAP, train both models, evaluate them",
                "python recipes/bundle_model.py               # copy the PerceiverS weights here, rewrite this card",
            ]
        ),
        "```",
        "",
        "`STEPS=...` changes the budget; on a GPU, or a CPU with bf16 units, the same recipe trains in bf16. A larger model:",
        "`perceiver-music train --config asap_cpu model.width=512 model.layers=8 ...`.",
        "",
        "## Limitations",
        "",
        f"A small model trained briefly on {counts['train']['seconds'] / 3600:.0f} hours of classical piano: expect local",
        "texture and phrasing, not long-range form. Its context is",
        f"{m['max_len']:,} tokens (about {m['max_len'] / (counts['train']['tokens'] / counts['train']['seconds']):.0f} s of music);",
        "longer pieces are generated with a sliding band over the last tokens.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "default")
    p.add_argument("--data", type=Path, default=REPO / "data" / "asap")
    p.add_argument(
        "--hardware",
        default="a 2-core CPU (one thread per model, the two models trained side by side)",
        help="where the models were trained, for the card",
    )
    args = p.parse_args(argv)
    best = args.runs / "perceivers" / "best"
    weights = best / "model.safetensors"
    if not weights.is_file():
        print(f"{weights}: not found; run recipes/default_model.sh first", file=sys.stderr)
        return 1
    if weights.stat().st_size > MAX_BYTES:
        print(f"{weights}: {weights.stat().st_size / 1e6:.1f} MB, over the 25 MB limit", file=sys.stderr)
        return 1
    text = card(args.runs, args.data, args.hardware)
    BUNDLED.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(best / name, BUNDLED / name)
    # With its whole training, which the next fine-tuning stage's card adds to (see _before).
    info = json.loads((best / "info.json").read_text())
    info["trained"] = _trained(_training(args.runs / "perceivers"))
    (BUNDLED / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    if (args.runs / "perceivers" / "loss.png").is_file():
        shutil.copyfile(args.runs / "perceivers" / "loss.png", BUNDLED / "training_curve.png")
    (BUNDLED / "MODEL_CARD.md").write_text(text)
    print(f"bundled {weights} ({weights.stat().st_size / 1e6:.1f} MB) into {BUNDLED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
