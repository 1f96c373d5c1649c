"""The PerceiverS metric suite (DESIGN.md section 7): per-piece features and set statistics.

Features follow Yang & Lerch's mgeval, the toolbox PerceiverS used, computed from a piece's
notes with numpy instead of per-note Python loops and piano rolls:

=========  ==============================================================================
PC         used pitches: distinct MIDI pitches (mgeval ``total_used_pitch``)
NC         used notes: the number of notes (mgeval ``total_used_note``)
PCH        pitch-class histogram, 12 bins, sums to 1
PCTM       pitch-class transition matrix, 12 x 12 counts: a note ending within 50 ms of
           another's onset is a transition (pretty_midi's definition, which mgeval calls)
PR         pitch range: highest minus lowest pitch
PI         average absolute interval between consecutive notes, in semitones
IOI        average inter-onset interval in seconds (over every onset, chords included)
NLH        note-length histogram over mgeval's 12 classes at 120 BPM, sums to 1
NLTM       note-length transition matrix, 12 x 12 counts between consecutive notes
PC/seg     PC in each of 64 equal-time segments                    (PerceiverS)
NC/seg     NC in each segment
PCH/seg    PCH in each segment (a zero row where a segment is silent)
IOI/seg    IOI in each segment (0 where a segment has fewer than two onsets)
=========  ==============================================================================

The PerceiverS paper's prose describes PC as pitch classes and NC as distinct notes; its
numbers come from mgeval, whose definitions are the ones above.

Two sets are compared as in mgeval: for each feature, the Euclidean distances between pieces
within a set (intra-set) and between the sets (inter-set), a Gaussian KDE of each, and the
KL divergence and overlap area of the reference's intra-set KDE against the inter-set KDE.
Unlike mgeval, whose KL evaluates the two densities on different grids and whose overlap area
calls ``scipy.integrate.quad``, both figures here use one shared grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perceiver_music.tokens.performance import Notes

METRICS = [
    "PC",
    "PC/seg",
    "NC",
    "NC/seg",
    "PCH",
    "PCH/seg",
    "PCTM",
    "PR",
    "PI",
    "IOI",
    "IOI/seg",
    "NLH",
    "NLTM",
]
SEGMENTS = 64
TRANSITION_SECONDS = 0.05
BPM = 120.0
EPS = 1e-9  # seconds: far below any real timing, far above float noise
# mgeval's note-length classes in 96ths of a 4/4 bar: whole, half, quarter, 8th, 16th, their
# dotted forms, then half, quarter and 8th triplets.
LENGTH_CLASSES_96 = np.array([96, 48, 24, 12, 6, 72, 36, 18, 9, 32, 16, 8], np.float64)


def length_classes(duration: np.ndarray, bpm: float = BPM) -> np.ndarray:
    """Index of the nearest of mgeval's 12 note-length classes for each duration (seconds)."""
    unit = 4 * 60.0 / bpm / 96  # seconds per 96th of a bar
    return np.abs(duration[:, None] - LENGTH_CLASSES_96[None, :] * unit).argmin(axis=1)


def _mean_ioi(onsets: np.ndarray) -> float:
    # mean(diff(sorted)) telescopes to the span over the number of gaps.
    return float((onsets[-1] - onsets[0]) / (len(onsets) - 1)) if len(onsets) > 1 else 0.0


def pitch_class_transitions(notes: Notes, threshold: float = TRANSITION_SECONDS) -> np.ndarray:
    """[12, 12] counts of (a, b): a note of class a ends within `threshold` of an onset of class b.

    pretty_midi builds the full end-by-onset distance matrix; sorting the onsets finds the same
    pairs in O(n log n), which matters for pieces of tens of thousands of notes.
    """
    order = np.argsort(notes.start, kind="stable")
    onsets, onset_class = notes.start[order], (notes.pitch[order] % 12).astype(np.int64)
    # Candidates from a slightly wider window, then the strict test |end - onset| < threshold.
    # Times on a 10 ms grid often differ by exactly 50 ms; EPS keeps float noise from counting
    # some of those (pretty_midi's plain float test counts a few, at random).
    lo = np.searchsorted(onsets, notes.end - threshold - 1e-9, side="left")
    hi = np.searchsorted(onsets, notes.end + threshold + 1e-9, side="right")
    counts = np.maximum(hi - lo, 0)
    source = np.repeat(np.arange(len(notes)), counts)
    # Onset index of each pair: lo of its source plus its rank within the source's range.
    target = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    keep = np.abs(notes.end[source] - onsets[target]) < threshold - EPS
    source_class = (notes.pitch[source[keep]] % 12).astype(np.int64)
    pairs = source_class * 12 + onset_class[target[keep]]
    return np.bincount(pairs, minlength=144).reshape(12, 12).astype(np.float64)


def segment_of(time: np.ndarray, span: float, segments: int) -> np.ndarray:
    """Index of the equal-time segment holding each time; a time on a boundary opens the next
    segment even when float division lands a hair below it."""
    return np.minimum(np.floor(time / span * segments + EPS).astype(np.int64), segments - 1)


def piece_features(notes: Notes, segments: int = SEGMENTS) -> dict[str, np.ndarray]:
    """Every metric of one piece, each as a flat float64 vector. `notes` must not be empty."""
    if len(notes) == 0:
        raise ValueError("a piece with no notes has no metrics")
    notes = notes.sorted()
    start, pitch = notes.start, notes.pitch.astype(np.int64)
    n = len(notes)
    pc = pitch % 12
    lengths = length_classes(notes.end - start)
    nltm = np.bincount(lengths[:-1] * 12 + lengths[1:], minlength=144).astype(np.float64)

    # 64 equal-time segments of [0, end of the last note]; a note belongs to its onset's segment.
    span = max(float(notes.end.max()), 1e-9)
    seg = segment_of(start, span, segments)
    seg_counts = np.bincount(seg, minlength=segments).astype(np.float64)
    used = np.zeros((segments, 128), bool)
    used[seg, pitch] = True
    seg_pch = np.bincount(seg * 12 + pc, minlength=segments * 12).reshape(segments, 12).astype(np.float64)
    seg_pch /= np.maximum(seg_counts, 1)[:, None]
    bounds = np.searchsorted(seg, np.arange(segments + 1))  # notes are sorted by onset, so by segment
    seg_ioi = np.array([_mean_ioi(start[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])

    return {
        "PC": np.array([len(np.unique(pitch))], np.float64),
        "PC/seg": used.sum(axis=1).astype(np.float64),
        "NC": np.array([n], np.float64),
        "NC/seg": seg_counts,
        "PCH": np.bincount(pc, minlength=12) / n,
        "PCH/seg": seg_pch.ravel(),
        "PCTM": pitch_class_transitions(notes).ravel(),
        "PR": np.array([pitch.max() - pitch.min()], np.float64),
        "PI": np.array([np.abs(np.diff(pitch)).mean() if n > 1 else 0.0]),
        "IOI": np.array([_mean_ioi(start)]),
        "IOI/seg": seg_ioi,
        "NLH": np.bincount(lengths, minlength=12) / n,
        "NLTM": nltm,
    }


def stack_features(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{metric: [pieces, dim]} from per-piece dicts."""
    return {m: np.stack([p[m] for p in pieces]) for m in METRICS}


def intra_set_distances(features: np.ndarray) -> np.ndarray:
    """Distances between every pair of different pieces of one set, each pair once: [n(n-1)/2]."""
    from scipy.spatial.distance import pdist

    if len(features) < 2:
        raise ValueError("intra-set distances need at least two pieces")
    return pdist(features)


def inter_set_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances from every piece of `a` to every piece of `b`: [len(a) * len(b)]."""
    from scipy.spatial.distance import cdist

    return cdist(a, b).ravel()


@dataclass
class Density:
    """A 1-D Gaussian KDE that survives degenerate samples (all distances equal)."""

    sample: np.ndarray
    bandwidth: float  # standard deviation of each kernel

    @classmethod
    def fit(cls, sample: np.ndarray, scale: float) -> Density:
        """Scott's rule like scipy's gaussian_kde; a sample without spread (one value, or every
        distance equal) gets a kernel 1e-3 of `scale` wide instead of a singular covariance."""
        sample = np.asarray(sample, np.float64)
        std = float(sample.std(ddof=1)) if len(sample) > 1 else 0.0
        bandwidth = std * len(sample) ** (-1 / 5)
        floor = 1e-3 * max(scale, 1e-12)
        return cls(sample, max(bandwidth, floor))

    def _bins(self, grid: np.ndarray) -> np.ndarray:
        """The sample linearly binned onto an evenly spaced grid: weights summing to its size."""
        step = (grid[-1] - grid[0]) / (len(grid) - 1)
        pos = np.clip((self.sample - grid[0]) / step, 0, len(grid) - 1)
        left = np.minimum(pos.astype(np.int64), len(grid) - 2)
        frac = pos - left
        return np.bincount(left, 1 - frac, len(grid)) + np.bincount(left + 1, frac, len(grid))

    def __call__(self, grid: np.ndarray) -> np.ndarray:
        """The density on an evenly spaced grid (np.linspace) that covers the sample.

        The sample is linearly binned onto the grid and the bins convolved with the kernel, the
        usual fast KDE: O(sample + grid log grid) rather than sample x grid, so the 10^5 inter-set
        distances of two 300-piece sets cost milliseconds. Its error is second order in the grid
        spacing, except where the density is below ~1e-13 of its peak: there the FFT's rounding
        error dominates, and `log_on_grid` should be used.
        """
        from scipy.signal import fftconvolve

        step = (grid[-1] - grid[0]) / (len(grid) - 1)
        z = np.arange(-(len(grid) - 1), len(grid)) * step / self.bandwidth  # the whole grid: no tail cut
        kernel = np.exp(-0.5 * z * z) / (self.bandwidth * np.sqrt(2 * np.pi))
        return np.maximum(fftconvolve(self._bins(grid), kernel, mode="same"), 0) / len(self.sample)

    def log_on_grid(self, grid: np.ndarray) -> np.ndarray:
        """The log density on the grid, finite however far a point lies from the sample.

        Within `TAIL` of the peak, the log of the binned FFT density. Below it, the kernel sum
        is done in log space (log-sum-exp, which neither underflows nor loses small terms to
        rounding): exactly, over every distinct sample value, unless there are more of those
        than grid points and the grid resolves the kernel (spacing at most `FINE` bandwidths):
        then over the grid's bins, with a relative error of log p ~ spacing^2 / 4 bandwidth^2.
        """
        dens = self(grid)
        tail = np.flatnonzero(dens < TAIL * dens.max())
        out = np.log(np.maximum(dens, np.finfo(np.float64).tiny))
        if len(tail) == 0:
            return out
        step = (grid[-1] - grid[0]) / (len(grid) - 1)
        centres, weights = np.unique(self.sample, return_counts=True)
        if len(centres) > len(grid) and step <= FINE * self.bandwidth:  # many samples: sum bins
            weights = self._bins(grid)
            centres, weights = grid[weights > 0], weights[weights > 0]
        out[tail] = _log_kernel_sum(grid[tail], centres, weights, self.bandwidth) - np.log(len(self.sample))
        return out


# Below this fraction of its peak the binned FFT density gives way to a log-space kernel sum;
# FINE: the largest grid spacing, in bandwidths, at which that sum may run over the grid's bins.
TAIL = 1e-6
FINE = 0.25


def _log_kernel_sum(x: np.ndarray, centres: np.ndarray, weights: np.ndarray, bandwidth: float) -> np.ndarray:
    """log sum_k weights_k N(x; centres_k, bandwidth^2) at each x, in chunks of bounded memory."""
    from scipy.special import logsumexp

    out = np.empty(len(x))
    chunk = max(1, 2**21 // len(centres))  # a [chunk, centres] work array of at most 16 MB
    for i in range(0, len(x), chunk):
        z = (x[i : i + chunk, None] - centres[None, :]) / bandwidth
        out[i : i + chunk] = logsumexp(-0.5 * z * z, b=weights, axis=1)
    return out - np.log(bandwidth * np.sqrt(2 * np.pi))


def shared_grid(a: Density, b: Density, points: int = 2048) -> np.ndarray:
    lo = min(a.sample.min() - 4 * a.bandwidth, b.sample.min() - 4 * b.bandwidth)
    hi = max(a.sample.max() + 4 * a.bandwidth, b.sample.max() + 4 * b.bandwidth)
    return np.linspace(lo, hi, points)


def compare_distributions(a: np.ndarray, b: np.ndarray, points: int = 2048) -> dict[str, float]:
    """KL(a || b) in nats and the overlap area of the KDEs of two samples, on one shared grid.

    Both densities are renormalised on the grid so that the KL of a sample with itself is 0
    and the overlap area 1. The KL integrand p (log p - log q) uses exact log densities in
    the tails (`Density.log_on_grid`), so the KL of far-apart samples is large but finite,
    and the one of samples that merely differ in their tails is not inflated.
    """
    from scipy.integrate import trapezoid
    from scipy.special import logsumexp

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("cannot compare an empty sample")
    scale = float(max(np.abs(a).max(), np.abs(b).max(), 1e-12))
    da, db = Density.fit(a, scale), Density.fit(b, scale)
    grid = shared_grid(da, db, points)
    log_p, log_q = da.log_on_grid(grid), db.log_on_grid(grid)
    # Normalise on the grid in log space: the trapezoid rule is a weighted sum.
    log_w = np.log(np.full(len(grid), grid[1] - grid[0]) * np.r_[0.5, np.ones(len(grid) - 2), 0.5])
    log_p -= logsumexp(log_p + log_w)
    log_q -= logsumexp(log_q + log_w)
    p, q = np.exp(log_p), np.exp(log_q)
    overlap = float(trapezoid(np.minimum(p, q), grid))
    kl = float(max(trapezoid(p * (log_p - log_q), grid), 0.0))
    return {"kl": kl, "overlap": min(overlap, 1.0)}


def set_distances(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per metric: {"intra_reference", "inter", and "intra_generated" when the generated set
    has two pieces or more}, each a 1-D array of distances. Inputs are stack_features outputs."""
    out = {}
    for m in METRICS:
        row = {
            "intra_reference": intra_set_distances(reference[m]),
            "inter": inter_set_distances(generated[m], reference[m]),
        }
        if len(generated[m]) > 1:
            row["intra_generated"] = intra_set_distances(generated[m])
        out[m] = row
    return out


def compare_sets(
    generated: dict[str, np.ndarray], reference: dict[str, np.ndarray], distances: dict | None = None
) -> dict[str, dict]:
    """Per metric: the distances' summaries and KL / overlap of intra-reference vs inter-set.

    The reference needs two pieces (its intra-set distances are the yardstick); the generated
    set needs one. `distances` (set_distances' result) saves computing them again.
    """
    distances = distances or set_distances(generated, reference)
    out = {}
    for m in METRICS:
        d = distances[m]
        row = {
            "intra_reference": _summary(d["intra_reference"]),
            "inter": _summary(d["inter"]),
            **compare_distributions(d["intra_reference"], d["inter"]),
        }
        if "intra_generated" in d:
            row["intra_generated"] = _summary(d["intra_generated"])
            row["intra_generated_vs_inter"] = compare_distributions(d["intra_generated"], d["inter"])
        out[m] = row
    return out


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std()), "n": int(len(x))}
