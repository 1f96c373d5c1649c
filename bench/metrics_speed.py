"""Speed of the metric suite: `perceiver_music.evaluate` against the mgeval way, in one run.

The mgeval way is the straightforward implementation of the same features: pretty_midi
reads each file, PC and PR come from its piano roll (fs=100), PCTM from pretty_midi's
transition matrix (a full end-by-onset distance matrix), the other features and the per-
segment ones from per-note Python loops; pairwise distances are Python loops over pairs;
KL divergence samples each KDE on its own grid and the overlap area integrates with
`scipy.integrate.quad`, as mgeval does.

Both sides start from MIDI paths and end with KL and overlap for all 13 metrics between a
"generated" and a "reference" half of the files (our side without plots). Before timing,
the files are rewritten as their quantised, sustained notes (what the tokenizer reads, pedal
folded into note lengths), so both sides read identical notes and the feature values can be
checked against each other; the largest disagreement per metric is in the JSON. PCTM may
disagree: pretty_midi's plain float test |end - onset| < 50 ms counts some of the gaps of
exactly 50 ms (common on a 10 ms grid) by float noise; ours counts none.

    python bench/metrics_speed.py                        # 60 ASAP files, 30 against 30
    python bench/metrics_speed.py --files 200 --out bench/results/metrics_speed.json

Target: ours at least 20x the pieces per second of the mgeval way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from perceiver_music.evaluate import metrics  # noqa: E402
from perceiver_music.evaluate.sets import evaluate_sets, load_set  # noqa: E402
from perceiver_music.tokens.performance import PerformanceTokenizer  # noqa: E402

TARGET = 20.0
SEGMENTS = 64


# ----------------------------------------------------------------------------- the mgeval way


def mgeval_features(path: str) -> dict[str, np.ndarray]:
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(path)
    inst = pm.instruments[0]
    notes = sorted(inst.notes, key=lambda n: (n.start, n.pitch))
    roll = inst.get_piano_roll(fs=100)
    used = np.where(roll.sum(axis=1) > 0)[0]
    pch = np.zeros(12)
    for n in notes:
        pch[n.pitch % 12] += 1
    shifts = [abs(notes[i + 1].pitch - notes[i].pitch) for i in range(len(notes) - 1)]
    onsets = sorted(n.start for n in notes)
    unit = 4 * 60.0 / metrics.BPM / 96
    classes = []
    for n in notes:
        length = n.end - n.start
        best, best_diff = 0, float("inf")
        for k, c in enumerate(metrics.LENGTH_CLASSES_96):
            if abs(length - c * unit) < best_diff:
                best, best_diff = k, abs(length - c * unit)
        classes.append(best)
    nlh = np.zeros(12)
    for c in classes:
        nlh[c] += 1
    nltm = np.zeros((12, 12))
    for a, b in zip(classes[:-1], classes[1:]):
        nltm[a, b] += 1

    span = max(n.end for n in notes)
    pc_seg, nc_seg, pch_seg, ioi_seg = (
        np.zeros(SEGMENTS),
        np.zeros(SEGMENTS),
        np.zeros((SEGMENTS, 12)),
        np.zeros(SEGMENTS),
    )
    for s in range(SEGMENTS):
        inside = [n for n in notes if min(int(n.start / span * SEGMENTS + metrics.EPS), SEGMENTS - 1) == s]
        pc_seg[s] = len({n.pitch for n in inside})
        nc_seg[s] = len(inside)
        for n in inside:
            pch_seg[s, n.pitch % 12] += 1
        if inside:
            pch_seg[s] /= len(inside)
        starts = sorted(n.start for n in inside)
        ioi_seg[s] = np.mean(np.diff(starts)) if len(starts) > 1 else 0.0
    return {
        "PC": np.array([len(used)], float),
        "PC/seg": pc_seg,
        "NC": np.array([len(notes)], float),
        "NC/seg": nc_seg,
        "PCH": pch / len(notes),
        "PCH/seg": pch_seg.ravel(),
        "PCTM": inst.get_pitch_class_transition_matrix(normalize=False).ravel(),
        "PR": np.array([used.max() - used.min()], float),
        "PI": np.array([np.mean(shifts) if shifts else 0.0]),
        "IOI": np.array([np.mean(np.diff(onsets)) if len(onsets) > 1 else 0.0]),
        "IOI/seg": ioi_seg,
        "NLH": nlh / len(notes),
        "NLTM": nltm.ravel(),
    }


def mgeval_kl(a: np.ndarray, b: np.ndarray, points: int = 1000) -> float:
    """mgeval's utils.kl_dist: each KDE sampled on its own grid, then scipy's entropy."""
    from scipy import stats

    pdf_a = stats.gaussian_kde(a)(np.linspace(a.min(), a.max(), points)) + 1e-10
    pdf_b = stats.gaussian_kde(b)(np.linspace(b.min(), b.max(), points)) + 1e-10
    return float(stats.entropy(pdf_a, pdf_b))


def mgeval_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """mgeval's utils.overlap_area: quad over the min of the two KDEs."""
    from scipy import integrate, stats

    ka, kb = stats.gaussian_kde(a), stats.gaussian_kde(b)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    return float(integrate.quad(lambda x: min(ka(x)[0], kb(x)[0]), lo, hi, limit=50)[0])


def mgeval_suite(generated: list[str], reference: list[str]) -> dict[str, dict]:
    gen = [mgeval_features(p) for p in generated]
    ref = [mgeval_features(p) for p in reference]
    out = {}
    for m in metrics.METRICS:
        intra = [
            np.linalg.norm(ref[i][m] - ref[j][m]) for i in range(len(ref)) for j in range(len(ref)) if i < j
        ]
        inter = [np.linalg.norm(g[m] - r[m]) for g in gen for r in ref]
        intra, inter = np.array(intra), np.array(inter)
        try:
            out[m] = {"kl": mgeval_kl(intra, inter), "overlap": mgeval_overlap(intra, inter)}
        except (np.linalg.LinAlgError, ValueError) as e:  # a singular KDE: mgeval would stop here
            out[m] = {"error": str(e)}
    return {"features": {"generated": gen, "reference": ref}, "metrics": out}


# ----------------------------------------------------------------------------- driver


def rewrite_as_notes(files: list[Path], folder: Path) -> list[Path]:
    """Each file as its quantised, sustained notes: the notes both sides will read."""
    tok = PerformanceTokenizer()
    out = []
    for i, path in enumerate(files):
        target = folder / f"{i:04d}_{path.stem}.mid"
        tok.decode_to_midi(tok.encode(path), target)
        out.append(target)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--asap", type=Path, default=REPO.parent / "shared" / "data" / "asap")
    parser.add_argument("--files", type=int, default=60, help="files in all, split in two halves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "metrics_speed.json")
    args = parser.parse_args(argv)

    every = sorted(args.asap.rglob("*.mid"))
    if not every:
        sys.exit(f"no MIDI files under {args.asap}")
    rng = np.random.default_rng(args.seed)
    chosen = [every[i] for i in sorted(rng.choice(len(every), min(args.files, len(every)), replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gen").mkdir()
        (tmp / "ref").mkdir()
        half = len(chosen) // 2
        gen = rewrite_as_notes(chosen[:half], tmp / "gen")
        ref = rewrite_as_notes(chosen[half:], tmp / "ref")
        notes = sum(len(PerformanceTokenizer().midi_to_notes(p)) for p in gen + ref)

        # Imports are not what is measured: both sides' libraries are loaded before the clocks.
        import pretty_midi  # noqa: F401
        import scipy.integrate  # noqa: F401
        import scipy.signal  # noqa: F401
        import scipy.spatial  # noqa: F401
        import scipy.stats  # noqa: F401

        t0 = time.perf_counter()
        ours = evaluate_sets([tmp / "gen"], tmp / "ref", tmp / "out", plots=False)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = mgeval_suite([str(p) for p in gen], [str(p) for p in ref])
        theirs_s = time.perf_counter() - t0

        # The same features from the same notes: how far apart are the two implementations?
        ours_gen = load_set(tmp / "gen").features
        agreement = {}
        for m in metrics.METRICS:
            mine = ours_gen[m]
            other = np.stack([f[m] for f in theirs["features"]["generated"]])
            agreement[m] = float(np.abs(mine - other).max())

    pieces = len(gen) + len(ref)
    report = {
        "pieces": pieces,
        "notes": notes,
        "ours": {"seconds": ours_s, "pieces_per_s": pieces / ours_s},
        "mgeval_way": {"seconds": theirs_s, "pieces_per_s": pieces / theirs_s},
        "speedup": theirs_s / ours_s,
        "target": TARGET,
        "met": theirs_s / ours_s >= TARGET,
        "feature_max_abs_difference": agreement,
        "ours_metrics": {m: ours["metrics"]["gen"][m] for m in metrics.METRICS},
        "mgeval_metrics": theirs["metrics"],
        "machine": _machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=float))
    print(f"{pieces} pieces, {notes:,} notes")
    print(f"ours:       {ours_s:8.2f} s  {pieces / ours_s:8.2f} pieces/s")
    print(f"mgeval way: {theirs_s:8.2f} s  {pieces / theirs_s:8.2f} pieces/s")
    print(
        f"speed-up {theirs_s / ours_s:.1f}x (target {TARGET:.0f}x): {'met' if report['met'] else 'NOT met'}"
    )
    print("largest feature difference per metric:", {m: round(v, 6) for m, v in agreement.items()})
    for m in metrics.METRICS:
        a, b = ours["metrics"]["gen"][m], theirs["metrics"][m]
        if "error" not in b and not math.isnan(b["kl"]):
            print(
                f"  {m:8s} ours KL {a['kl']:.3f} OA {a['overlap']:.3f} | mgeval KL {b['kl']:.3f} OA {b['overlap']:.3f}"
            )
    print(f"written: {args.out}")


def _machine() -> dict:
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._machine()


if __name__ == "__main__":
    main()
