"""Set evaluation: folders of MIDI -> the PerceiverS metric table, repetition, plots and JSON.

    perceiver-music evaluate --generated GEN_DIR [GEN_DIR ...] --reference REF_DIR --out OUT_DIR

Pieces are read through the tokenizer (quantised, sustain applied), so generated pieces, whose
pedal is already folded into note lengths, and recorded performances are measured alike.
No torch here: set evaluation starts fast and runs anywhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perceiver_music.config import TokenizerConfig
from perceiver_music.data.prepare import find_midi
from perceiver_music.evaluate import metrics, repetition, validity
from perceiver_music.files import atomic_write_text
from perceiver_music.tokens.performance import MidiError, Notes, PerformanceTokenizer

LAGS_SHOWN = (1, 2, 4, 8, 16)


class SetError(ValueError):
    """A set that cannot be evaluated; the message names the folder and the reason."""


@dataclass
class PieceSet:
    name: str
    root: Path
    paths: list[str] = field(default_factory=list)  # relative to root, the pieces used
    features: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [pieces, dim]
    repeated_per_second: np.ndarray = field(default_factory=lambda: np.zeros(0))
    repeated_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    repetition_profile: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [pieces, segments]
    autocorrelation: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [pieces, lags]
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    validity: dict = field(default_factory=dict)  # see evaluate/validity.py

    def __len__(self) -> int:
        return len(self.paths)


def midi_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SetError(f"{root}: no such folder")
    return find_midi(root)


def write_excerpt(tok: PerformanceTokenizer, steps: Notes, lo: int, span: int, path: Path) -> bool:
    """The notes of a performance (tokenizer steps) that start in [lo, lo + span), whole and
    shifted to start at 0, written as MIDI: an excerpt for a reference set. False if none."""
    keep = np.flatnonzero((steps.start >= lo) & (steps.start < lo + span))
    if len(keep) == 0:
        return False
    part = steps.take(keep)
    tok.decode_to_midi(
        tok.encode_notes(Notes(part.start - lo, part.end - lo, part.pitch, part.velocity)), path
    )
    return True


def load_set(
    root: str | os.PathLike,
    name: str | None = None,
    segments: int = metrics.SEGMENTS,
    tokenizer: TokenizerConfig | None = None,
) -> PieceSet:
    """Read every MIDI file under `root`; unreadable and note-less files are excluded with a reason."""
    root = Path(root)
    tok = PerformanceTokenizer(tokenizer)
    sps = tok.cfg.steps_per_second
    files = midi_files(root)
    if not files:
        raise SetError(f"{root}: no MIDI files (.mid, .midi) found")
    out = PieceSet(name or root.name or str(root), root)
    per_piece, profiles, autocorr, per_second, fraction = [], [], [], [], []
    valid, piece_steps = [], []
    for path in files:
        rel = str(path.relative_to(root)) if path != root else path.name
        try:
            steps = tok.midi_to_notes(path)
        except MidiError as e:
            out.excluded.append((rel, e.reason))
            continue
        if len(steps) == 0:
            out.excluded.append((rel, "no notes"))
            continue
        notes = Notes(steps.start / sps, steps.end / sps, steps.pitch, steps.velocity)
        per_piece.append(metrics.piece_features(notes, segments))
        rep = repetition.repetition_profile(notes)
        per_second.append(rep["repeated_per_second"])
        fraction.append(rep["repeated_fraction"])
        profiles.append(rep["per_segment"])
        autocorr.append(repetition.token_autocorrelation(tok.encode_notes(steps)))
        valid.append(validity.piece_validity(tok, path, steps))
        piece_steps.append(steps)
        out.paths.append(rel)
    if per_piece:
        out.features = metrics.stack_features(per_piece)
        out.repeated_per_second = np.array(per_second)
        out.repeated_fraction = np.array(fraction)
        out.repetition_profile = np.stack(profiles)
        out.autocorrelation = np.stack(autocorr)
        out.validity = validity.summarise(valid, piece_steps, sps)
    return out


def _require(s: PieceSet, at_least: int, role: str) -> None:
    if len(s) >= at_least:
        return
    why = "; ".join(f"{p}: {r}" for p, r in s.excluded[:5]) + (" ..." if len(s.excluded) > 5 else "")
    raise SetError(
        f"{s.root}: the {role} set needs at least {at_least} usable piece(s), found {len(s)}"
        + (f" ({len(s.excluded)} excluded: {why})" if s.excluded else "")
    )


def evaluate_sets(
    generated: list[str | os.PathLike],
    reference: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: list[str] | None = None,
    segments: int = metrics.SEGMENTS,
    plots: bool = True,
) -> dict:
    """Compare each generated folder with the reference folder; write metrics.json, table.md and
    plots into out_dir and return the JSON's contents."""
    if names is not None and len(names) != len(generated):
        raise SetError(f"{len(names)} names for {len(generated)} generated folders")
    ref = load_set(reference, "reference", segments)
    _require(ref, 2, "reference")
    gens = []
    for i, g in enumerate(generated):
        s = load_set(g, names[i] if names else None, segments)
        _require(s, 1, "generated")
        gens.append(s)
    labels = [s.name for s in gens]
    if len(set(labels)) < len(labels) or "reference" in labels:  # e.g. two folders called "samples"
        for i, s in enumerate(gens):
            s.name = f"{s.name}[{i}]"

    distances = {s.name: metrics.set_distances(s.features, ref.features) for s in gens}
    comparisons = {s.name: metrics.compare_sets(s.features, ref.features, distances[s.name]) for s in gens}
    result = {
        "segments": segments,
        "notes": (
            "KL is KL(intra-reference || inter-set) in nats and overlap is that of the two Gaussian KDEs, "
            "both on one shared grid (mgeval evaluates its KL's two KDEs on different grids)."
        ),
        "sets": {s.name: _set_json(s) for s in [ref, *gens]},
        "metrics": comparisons,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", markdown(result))
    np.savez_compressed(
        out / "features.npz",
        **{f"{s.name}/{m}": s.features[m] for s in [ref, *gens] for m in metrics.METRICS},
    )
    np.savez_compressed(
        out / "distances.npz",
        **{
            f"{g}/{m}/{kind}": d
            for g, per in distances.items()
            for m, row in per.items()
            for kind, d in row.items()
        },
    )
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1, allow_nan=False))
    if plots:
        from perceiver_music.evaluate import plots as plotting

        plotting.metric_densities(distances, out / "plots")
        plotting.repetition_plot([ref, *gens], out / "repetition.png")
    return result


def _set_json(s: PieceSet) -> dict:
    lags = s.autocorrelation
    defined = ~np.isnan(lags).any(axis=1) if len(lags) else np.zeros(0, bool)
    return {
        "root": str(s.root),
        "pieces": len(s),
        "excluded": [{"path": p, "reason": r} for p, r in s.excluded],
        "per_piece": [
            {"path": p, **{m: float(s.features[m][i, 0]) for m in ("PC", "NC", "PR", "PI", "IOI")}}
            for i, p in enumerate(s.paths)
        ],
        "validity": s.validity,
        "repetition": {
            "repeated_per_second_mean": float(s.repeated_per_second.mean()),
            "repeated_fraction_mean": float(s.repeated_fraction.mean()),
            "per_segment_mean": s.repetition_profile.mean(axis=0).tolist(),
        },
        "autocorrelation": {
            "pieces": int(defined.sum()),
            "excluded": "pieces shorter than the largest lag + 1 tokens" if (~defined).any() else None,
            "mean_by_lag": lags[defined].mean(axis=0).tolist() if defined.any() else None,
        },
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def table_one(result: dict) -> list[str]:
    """The Markdown rows of PerceiverS Table I: KLD and OA per metric, a column pair per
    generated set, from evaluate_sets' result."""
    gens = list(result["metrics"])
    lines = [
        "| Metric | " + " | ".join(f"{g} KLD ↓ | {g} OA ↑" for g in gens) + " |",
        "| --- | " + " | ".join("---: | ---:" for _ in gens) + " |",
    ]
    for m in metrics.METRICS:
        cells = [
            f"{_fmt(result['metrics'][g][m]['kl'])} | {_fmt(result['metrics'][g][m]['overlap'])}"
            for g in gens
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def validity_table(sets: dict) -> list[str]:
    """The Markdown rows of the event-validity table, one row per set (see evaluate/validity.py)."""
    lines = [
        "## Event validity",
        "",
        "Stray NOTE_OFF: of a pitch not sounding. Re-struck NOTE_ON: of a pitch already sounding.",
        "Capped: notes never released, ended by the decoder's `max_note_seconds`. Generated pieces",
        "are counted on the tokens the model emitted (the continuation only) where `generate` kept them.",
        "",
        "| Set | source | stray NOTE_OFF | re-struck NOTE_ON | capped notes | note length mean / median (s) "
        "| velocity mean ± std |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in sets.items():
        v = s["validity"]
        if not v:
            continue
        lines.append(
            f"| {name} | {v['source']} | {_pct(v['stray_off_rate'])} | {_pct(v['restruck_on_rate'])} "
            f"| {_pct(v['capped_share'])} | {_fmt(v['note_seconds_mean'], 2)} / {_fmt(v['note_seconds_median'], 2)} "
            f"| {_fmt(v['velocity_mean'], 1)} ± {_fmt(v['velocity_std'], 1)} |"
        )
    return lines


def markdown(result: dict) -> str:
    """Table I of the PerceiverS paper (KLD and OA per metric, a column pair per generated set),
    the distance summaries behind it, and the repetition measures."""
    sets = result["sets"]
    gens = list(result["metrics"])
    lines = [
        "# Set evaluation",
        "",
        "Reference: "
        + f"{sets['reference']['root']} ({sets['reference']['pieces']} pieces). "
        + "Generated: "
        + ", ".join(f"{g} = {sets[g]['root']} ({sets[g]['pieces']} pieces)" for g in gens)
        + ".",
        "",
        "## Distribution similarity to the reference (PerceiverS Table I)",
        "",
        "KLD: KL(intra-reference ‖ inter-set) in nats, lower is closer. OA: overlap area of the two",
        "distance densities, higher is closer. Both on one shared grid (see metrics.json).",
        "",
        *table_one(result),
        "",
        "## Distances (mean ± std)",
        "",
        "| Metric | intra reference | " + " | ".join(f"intra {g} | inter {g}" for g in gens) + " |",
        "| --- | ---: | " + " | ".join("---: | ---:" for _ in gens) + " |",
    ]
    for m in metrics.METRICS:
        ref = result["metrics"][gens[0]][m]["intra_reference"]
        cells = [f"{_fmt(ref['mean'])} ± {_fmt(ref['std'])}"]
        for g in gens:
            row = result["metrics"][g][m]
            intra = row.get("intra_generated")
            cells.append(f"{_fmt(intra['mean'])} ± {_fmt(intra['std'])}" if intra else "n/a (one piece)")
            cells.append(f"{_fmt(row['inter']['mean'])} ± {_fmt(row['inter']['std'])}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", *validity_table(sets)]
    lines += [
        "",
        "## Repetition",
        "",
        "Repeated notes: notes in the second copy of a figure (1-16 notes, at least 4 in all) played twice back to back.",
        "Autocorrelation of the performance-event ids at lag k (PerceiverS eq. 9), mean over pieces.",
        "",
        "| Set | repeated notes / s | repeated fraction | "
        + " | ".join(f"R({k})" for k in LAGS_SHOWN)
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in LAGS_SHOWN) + " |",
    ]
    for name, s in sets.items():
        rep, ac = s["repetition"], s["autocorrelation"]["mean_by_lag"]
        cells = [_fmt(ac[k - 1]) if ac and k <= len(ac) else "n/a" for k in LAGS_SHOWN]
        lines.append(
            f"| {name} | {_fmt(rep['repeated_per_second_mean'])} | {_fmt(rep['repeated_fraction_mean'])} | "
            + " | ".join(cells)
            + " |"
        )
    notes = [
        f"- {name}: autocorrelation over {s['autocorrelation']['pieces']} of {s['pieces']} pieces "
        f"({s['autocorrelation']['excluded']})"
        for name, s in sets.items()
        if s["autocorrelation"]["excluded"]
    ]
    excluded = [f"- {name}: {e['path']}: {e['reason']}" for name, s in sets.items() for e in s["excluded"]]
    if notes:
        lines += ["", *notes]
    if excluded:
        lines += ["", "## Excluded files", "", *excluded]
    return "\n".join(lines) + "\n"
