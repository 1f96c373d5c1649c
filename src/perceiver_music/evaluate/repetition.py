"""Repetition measures (PerceiverS section IV-B and figure 5).

A model that leans only on a long context tends to loop: it plays a short figure, then the same
figure again, and again. Two measures show it:

* repeated-note density: a note is *repeated* when it belongs to the second copy of a figure
  played twice back to back: a pattern of p notes (p = 1..16) followed at once by the same p
  notes, spanning at least 4 notes in all. Notes match by pitch and onset gap, the gap on a log
  scale (classes a factor 1.5 apart, everything under 30 ms one class) because performed timing
  is never exactly equal twice while an eighth and a sixteenth must differ. Reported per second
  of music, over the whole piece and per equal-time segment, so a piece that loops more as it
  goes on shows it.
* token autocorrelation at lags 1..K (the paper's equation 9) over the performance-event ids.
"""

from __future__ import annotations

import numpy as np

from perceiver_music.evaluate.metrics import segment_of
from perceiver_music.tokens.performance import Notes

MIN_NOTES = 4  # a trill of two notes played twice is not yet a loop
MAX_PERIOD = 16
CHORD_GAP = 0.03  # seconds: onsets closer than this are one chord
GAP_RATIO = 1.5
MAX_LAG = 64


def gap_classes(gap: np.ndarray) -> np.ndarray:
    """0 for gaps under CHORD_GAP, else 1 + the gap's log-scale class."""
    ratio = np.log(np.maximum(gap, CHORD_GAP) / CHORD_GAP) / np.log(GAP_RATIO)
    return np.where(gap < CHORD_GAP, 0, 1 + np.round(ratio)).astype(np.int64)


def repeated_notes(notes: Notes, min_notes: int = MIN_NOTES, max_period: int = MAX_PERIOD) -> np.ndarray:
    """Boolean mask over `notes`, in their given order: notes in the second copy of a
    back-to-back repeat (patterns are found in onset order)."""
    order = notes.order()
    notes = notes.take(order)
    count = len(notes)
    marks = np.zeros(count + 1, np.int64)
    pitch = notes.pitch.astype(np.int64)
    gap = gap_classes(np.diff(notes.start, prepend=notes.start[0] if count else 0.0))
    gap[:1] = -1  # nothing precedes the first note: its gap matches any
    for period in range(1, min(max_period, count - 1) + 1):
        # same[i]: note i + period repeats note i. A run of at least max(period, min_notes)
        # matches starting at s means notes s+period .. s+period+run-1 replay what came before.
        a, b = slice(0, count - period), slice(period, count)
        match = (pitch[a] == pitch[b]) & ((gap[a] == gap[b]) | (gap[a] < 0))
        same = np.concatenate([[False], match, [False]])
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))
        starts, stops = edges[::2], edges[1::2]
        keep = stops - starts >= max(period, min_notes)
        np.add.at(marks, starts[keep] + period, 1)
        np.add.at(marks, stops[keep] + period, -1)
    mask = np.zeros(count, bool)
    mask[order] = np.cumsum(marks[:-1]) > 0
    return mask


def repetition_profile(notes: Notes, segments: int = 16) -> dict[str, object]:
    """Repeated notes per second, overall and in each of `segments` equal-time segments."""
    mask = repeated_notes(notes)
    span = max(float(notes.end.max()) if len(notes) else 0.0, 1e-9)
    seg = segment_of(notes.start, span, segments)
    per_segment = np.bincount(seg[mask], minlength=segments) / (span / segments)
    return {
        "repeated_per_second": float(mask.sum() / span),
        "repeated_fraction": float(mask.mean()) if len(mask) else 0.0,
        "per_segment": per_segment,
    }


def token_autocorrelation(tokens: np.ndarray, max_lag: int = MAX_LAG) -> np.ndarray:
    """R(k) = sum_t (x_t - m)(x_{t+k} - m) / sum_t (x_t - m)^2 for k = 1..max_lag.

    NaN when the sequence is constant or shorter than max_lag + 1, where R is undefined.
    """
    x = np.asarray(tokens, np.float64)
    if len(x) <= max_lag:
        return np.full(max_lag, np.nan)
    x = x - x.mean()
    energy = float(x @ x)
    if energy == 0:
        return np.full(max_lag, np.nan)
    # Row t of the view is x[t .. t + max_lag], zero past the end: one matrix-vector product
    # gives every lag's sum, and no more than the lags asked for are computed.
    padded = np.concatenate([x, np.zeros(max_lag)])
    rows = np.lib.stride_tricks.sliding_window_view(padded, max_lag + 1)[: len(x)]
    return (x @ rows)[1:] / energy
