"""Training windows over prepared token data: segmentation and augmentation (DESIGN.md section 4).

A window is `max_len` input tokens; the model predicts the tokens at its last `num_latents`
positions. Windows never cross a piece boundary: a window that reaches a piece's start is
left-padded with PAD, and padding is masked out of attention and loss.

* `effective` (PerceiverS, the default): a random END is drawn, so every token of a piece
  after BOS (its first event included) is a target of some window, and each as often as any
  other: the end is drawn from [2, length + N - 1] (`window_ends`), so a window may end
  before N targets (left-padded, as a short piece's) or after the piece (right-padded after
  its EOS). Drawn from the ends of full windows alone, a token k places from either edge of a
  piece would be a target of only k of the N windows that cover a token inside it: the
  piece's EOS, the ending a timing-conditioned model is asked for, N times less often.
* `baseline` (Perceiver AR as usually reimplemented): a random START is drawn, so the first
  `max_len - num_latents` tokens of a piece are never targets.

`data.end_windows` draws that share of windows among those whose targets hold their piece's
EOS instead (the EOS at any target position, so no position learns to end): a piece ends once
in thousands of tokens, too rarely for a model told a length to learn how music ends.

Window i of a training set is drawn from an RNG seeded by (seed, i), so the stream is the
same on every run and a resumed run continues exactly where it stopped. Validation windows
tile every target of every piece exactly once, in a fixed order, without augmentation.

For a conditioned model (`Conditions`) a window also carries what it is conditioned on: its
piece's label, the piece's total length and the time elapsed through each input (both after
the window's stretch), and a style reference: `style_len` tokens of the same piece outside
the window, augmented as the window is, so the model learns the performance's manner rather
than copying the notes it must predict. Training windows drop each of the three at its own
rate, and all three at once at another; the draws come after the window's own, so its tokens
are those an unconditioned run draws. A keyboard-conditioned model's windows also carry the
keyboard state through each input, counted from the piece's start (notes held into the
window included), after the window's augmentation; it is never dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from perceiver_music.config import DataConfig, TokenizerConfig
from perceiver_music.tokens.performance import (
    NUM_PITCHES,
    PAD,
    Vocab,
    held_at_end,
    interleave_time_shifts,
    keyboard_state,
)


class TokenData:
    """One split of a prepared data folder, memory-mapped."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{data_dir}: no meta.json; run `perceiver-music prepare` first")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = TokenizerConfig(**self.meta["tokenizer"])
        self.split = split
        self.tokens = np.load(data_dir / f"{split}.npy", mmap_mode="r")
        self.index = np.load(data_dir / f"{split}.index.npy")  # [pieces, 2]: offset, length
        pieces = [p for p in self.meta["pieces"] if p["split"] == split]
        self.paths = [p["path"] for p in pieces]
        self.labels: list[str | None] = [p.get("label") for p in pieces]

    @cached_property
    def clock(self) -> tuple[np.ndarray, float]:
        """(steps [vocab_size] each token id moves time forward, steps per second): MIDI moves
        time with its TIME_SHIFTs; audio codes by one frame at each frame's last codebook."""
        V = int(self.meta["vocab_size"])
        if self.meta.get("kind") == "codes":
            from perceiver_music.audio.codes import frame_steps  # audio.codes builds on this module

            c = self.meta["codec"]
            return frame_steps(c["codebooks"], c["cardinality"], V), float(c["frame_rate"])
        return Vocab(self.tokenizer).shift_steps(np.arange(V)), float(self.tokenizer.steps_per_second)

    def label_names(self) -> list[str]:
        """The labels this split's pieces carry, most pieces first (ties by name)."""
        counts: dict[str, int] = {}
        for label in self.labels:
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
        return sorted(counts, key=lambda name: (-counts[name], name))

    def label_ids(self, labels: list[str]) -> list[int]:
        """Each piece's label as a model with these label names numbers it: 1 + its index,
        0 for a piece without a label or with one the model does not know."""
        ids = {name: i + 1 for i, name in enumerate(labels)}
        return [ids.get(label, 0) if label is not None else 0 for label in self.labels]

    def __len__(self) -> int:
        return len(self.index)

    def piece(self, i: int) -> np.ndarray:
        offset, length = self.index[i]
        return self.tokens[offset : offset + length]


@dataclass
class Conditions:
    """What a conditioned model's windows carry (from ModelConfig.condition and TrainConfig)."""

    labels: list[str] = field(default_factory=list)  # label i has id i + 1; others 0
    timing: bool = False
    style_len: int = 0  # reference tokens; 0: no style
    label_dropout: float = 0.0
    timing_dropout: float = 0.0
    style_dropout: float = 0.0
    condition_dropout: float = 0.0  # windows that drop all three at once
    keyboard: bool = False  # the keyboard state through each input (never dropped)


@dataclass
class Window:
    inputs: np.ndarray  # [max_len] int64, PAD on the left where the piece starts inside
    targets: np.ndarray  # [num_latents] int64, PAD where there is nothing to predict
    positions: np.ndarray  # [max_len] int64 position of each input in its piece (0 for PAD)
    piece: int
    label: int = 0  # 0: none (or dropped)
    total: float = 0.0  # seconds of the whole piece; 0: unknown (or dropped)
    elapsed: np.ndarray | None = None  # [max_len] float32 seconds through each input (timing)
    reference: np.ndarray | None = None  # [style_len] int64 style reference, all PAD: none
    keyboard: np.ndarray | None = None  # [max_len, 128] float32 seconds each pitch has sounded, -1: silent


def window_ends(length: int, segmentation: str, max_len: int, num_latents: int) -> tuple[int, int]:
    """The range [lo, hi] of window ends (exclusive token index) for a piece of `length` tokens.

    A window ending at e has targets tokens[e - num_latents : e] (those at index >= 1 and
    below length; PAD beyond) and inputs tokens[e - max_len - 1 : e - 1].
    """
    if segmentation == "effective":  # every target after BOS in exactly num_latents windows
        return 2, max(2, length + num_latents - 1)
    return min(length, max_len + 1), length  # baseline: the window starts in [0, length - max_len - 1]


class WindowDataset:
    """Windows over a TokenData split; `ds[i]` is a Window.

    train=True: window i is random (seeded by (seed, i)) with augmentation; any i >= 0 is valid
    and `len()` is the number of distinct windows, a nominal epoch.
    train=False: the deterministic tiling of every target, no augmentation.
    """

    def __init__(
        self,
        data: TokenData,
        cfg: DataConfig,
        max_len: int,
        num_latents: int,
        train: bool,
        seed: int = 0,
        conditions: Conditions | None = None,
    ):
        if not 1 <= num_latents <= max_len:
            raise ValueError(f"num_latents ({num_latents}) must be in 1..max_len ({max_len})")
        self.data, self.cfg, self.train, self.seed = data, cfg, train, seed
        self.conditions = conditions
        if conditions is not None:
            self._label_ids = data.label_ids(conditions.labels)
            self._total_steps: dict[int, int] = {}
        self.max_len, self.num_latents = max_len, num_latents
        self.vocab = Vocab(data.tokenizer)
        lengths = data.index[:, 1] if len(data) else np.zeros(0, np.int64)
        lo_hi = [window_ends(int(n), cfg.segmentation, max_len, num_latents) for n in lengths]
        self.counts = np.array([hi - lo + 1 for lo, hi in lo_hi], np.int64)
        self._lo = np.array([lo for lo, _ in lo_hi], np.int64)
        # Pieces are drawn in proportion to how many windows they hold: every window is equally likely.
        self._cum = np.cumsum(self.counts)
        self._val = self._validation_ends(lengths) if not train else None

    def _validation_ends(self, lengths: np.ndarray) -> np.ndarray:
        """(piece, end) pairs whose targets cover each predictable token exactly once."""
        rows = []
        n = self.num_latents
        for i, length in enumerate(lengths.tolist()):
            if self.cfg.segmentation == "effective":
                ends = range(length, 1, -n)  # targets (e - n, e] cover 1..length-1
            else:
                lo = min(length, self.max_len + 1)
                ends = range(length, lo - 1, -n) if length > lo else [length]
            rows.extend((i, e) for e in sorted(ends))
        return np.array(rows, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        if not self.train:
            return len(self._val)
        return int(self._cum[-1]) if len(self._cum) else 0

    def __getitem__(self, i: int) -> Window:
        if not self.train:
            piece, end = self._val[i]
            return self.window(int(piece), int(end))
        if len(self._cum) == 0:
            raise IndexError("no pieces in this split")
        rng = np.random.default_rng([self.seed, int(i)])
        piece = int(np.searchsorted(self._cum, rng.integers(self._cum[-1]), side="right"))
        end = int(self._lo[piece] + rng.integers(self.counts[piece]))
        # (no draw at all without end_windows: the stream stays that of runs before it)
        if self.cfg.end_windows and rng.random() < self.cfg.end_windows:
            length = int(self.data.index[piece, 1])  # targets tokens[end - N : end] hold the EOS
            end = max(2, length + int(rng.integers(self.num_latents)))
        return self._window(piece, end, rng)

    def window(self, piece: int, end: int) -> Window:
        """The window of `piece` whose last target is token end - 1, as validation sees it (no
        augmentation, nothing dropped): end = the piece's length ends on its EOS."""
        return self._window(piece, end, None)

    def _window(self, piece: int, end: int, rng: np.random.Generator | None) -> Window:
        cfg = self.cfg
        tokens = self.data.piece(piece)
        need = self.max_len + 1  # inputs plus the final target
        shift, factor = 0, 1.0
        past = max(0, end - len(tokens))  # a window past the piece's end: PAD after its EOS
        if rng is None or (cfg.transpose == 0 and cfg.stretch == 0):
            begin = max(0, end - past - need)
            chunk = np.asarray(tokens[begin : end - past], np.int64)
        else:
            shift, factor, begin, chunk = self._augmented(tokens, end - past, need, rng)
        if past:
            chunk = np.concatenate([chunk, np.full(past, PAD, np.int64)])
        window = self._assemble(piece, end, chunk[-need:])
        if self.conditions is not None:
            self._condition(window, tokens, end, begin, chunk, shift, factor, rng)
        return window

    def _assemble(self, piece: int, end: int, chunk: np.ndarray) -> Window:
        need = self.max_len + 1
        start = end - len(chunk)  # position of chunk[0] in the piece (approximate if stretched)
        seq = np.full(need, PAD, np.int64)
        seq[need - len(chunk) :] = chunk
        positions = np.zeros(need, np.int64)
        positions[need - len(chunk) :] = np.arange(max(start, 0), max(start, 0) + len(chunk))
        targets = seq[-self.num_latents :].copy()
        # A piece's first token (BOS) is never a target: nothing precedes it.
        targets[seq[-self.num_latents - 1 : -1] == PAD] = PAD
        return Window(inputs=seq[:-1], targets=targets, positions=positions[:-1], piece=piece)

    def _condition(self, window, tokens, end, begin, chunk, shift, factor, rng) -> None:
        """Fill in what `window` is conditioned on. chunk: tokens[begin:end] as augmented (at
        least the window's inputs and target)."""
        c, (steps, sps) = self.conditions, self.data.clock
        piece = window.piece
        drop = rng.random(4) if rng is not None else np.ones(4)  # always 4 draws: a fixed stream
        if drop[3] < c.condition_dropout:
            drop[:3] = -1.0  # below every rate: all dropped
        if c.labels and drop[0] >= c.label_dropout:
            window.label = self._label_ids[piece]
        if c.timing:
            before = int(steps[tokens[:begin]].sum()) * factor
            elapsed = (before + np.cumsum(steps[chunk])) / sps  # seconds through each
            need = self.max_len + 1
            full = np.zeros(need, np.float32)
            kept = elapsed[-need:]
            full[need - len(kept) :] = kept
            window.elapsed = full[:-1]
            if drop[1] >= c.timing_dropout:
                if piece not in self._total_steps:
                    self._total_steps[piece] = int(steps[tokens].sum())
                window.total = self._total_steps[piece] * factor / sps
        if c.keyboard:
            window.keyboard = self._keyboard(tokens, begin, chunk, shift, factor)
        if c.style_len:
            window.reference = np.full(c.style_len, PAD, np.int64)
            if drop[2] >= c.style_dropout:
                ref = self._reference(tokens, end, shift, factor, rng, piece)
                window.reference[: len(ref)] = ref

    def _keyboard(self, tokens, begin, chunk, shift, factor) -> np.ndarray:
        """[max_len, 128] keyboard state (seconds) through each input; PAD inputs are silent.
        Notes held from before the chunk are counted from the piece as it was recorded, then
        moved as the chunk was (transposed, their time stretched)."""
        vocab, need = self.vocab, self.max_len + 1
        before = held_at_end(tokens[:begin], vocab)
        if shift:
            moved = np.full_like(before, -1.0)
            lo, hi = max(0, -shift), min(NUM_PITCHES, NUM_PITCHES - shift)
            moved[lo + shift : hi + shift] = before[lo:hi]
            before = moved
        before = np.where(before >= 0, before * factor, -1.0)
        held = keyboard_state(chunk, vocab, before)[-need:]
        full = np.full((need, NUM_PITCHES), -1.0, np.float32)
        full[need - len(held) :] = held
        return full[:-1]

    def _reference(self, tokens, end, shift, factor, rng, piece) -> np.ndarray:
        """`style_len` tokens of the piece that do not overlap the window (none if it has no
        room), transposed and stretched as the window."""
        R, need = self.conditions.style_len, self.max_len + 1
        before = max(0, end - need - R + 1)  # starts s with s + R <= end - need
        after = max(0, len(tokens) - R - end + 1)  # starts s >= end
        if before + after == 0:
            return np.zeros(0, np.int64)
        if rng is None:  # validation: the same reference every time
            rng = np.random.default_rng([self.seed, piece, end])
        k = int(rng.integers(before + after))
        s = k if k < before else end + (k - before)
        ref = np.asarray(tokens[s : s + R + R // 4], np.int64)
        return stretch(transpose(ref, shift, self.vocab), factor, self.vocab)[:R]

    def _augmented(self, tokens: np.ndarray, end: int, need: int, rng: np.random.Generator):
        """Transpose and stretch the tokens before `end`: (shift, factor, begin, the augmented
        tokens[begin:end]), at least `need` of them unless the piece starts first.

        Stretching can shorten a stretch of tokens, so more are read from before the window
        until enough are left or the piece start is reached: padding then still means "the
        piece starts here".
        """
        shift = int(rng.integers(-self.cfg.transpose, self.cfg.transpose + 1)) if self.cfg.transpose else 0
        factor = float(rng.uniform(1 - self.cfg.stretch, 1 + self.cfg.stretch)) if self.cfg.stretch else 1.0
        margin = need // 4 + 16
        while True:
            begin = max(0, end - need - margin)
            chunk = np.asarray(tokens[begin:end], np.int64)
            out = stretch(transpose(chunk, shift, self.vocab), factor, self.vocab)
            if len(out) >= need or begin == 0:
                return shift, factor, begin, out
            margin *= 2


def transpose(tokens: np.ndarray, semitones: int, vocab: Vocab) -> np.ndarray:
    """Shift every NOTE_ON/NOTE_OFF by `semitones`; notes that leave 0..127 are dropped whole."""
    if semitones == 0:
        return tokens
    tokens = np.asarray(tokens, np.int64)
    on = (tokens >= vocab.note_on) & (tokens < vocab.note_off)
    off = (tokens >= vocab.note_off) & (tokens < vocab.time_shift)
    pitch = np.where(on, tokens - vocab.note_on, tokens - vocab.note_off) + semitones
    out_of_range = (on | off) & ((pitch < 0) | (pitch > 127))
    shifted = np.where(on | off, tokens + semitones, tokens)
    return shifted[~out_of_range]


def stretch(tokens: np.ndarray, factor: float, vocab: Vocab) -> np.ndarray:
    """Scale time by `factor`: every event moves to round(step * factor) and the TIME_SHIFTs
    between events are re-emitted (at most `max_shift` steps each)."""
    if factor == 1.0:
        return tokens
    tokens = np.asarray(tokens, np.int64)
    shift = vocab.shift_steps(tokens)
    is_shift = shift > 0
    step = np.cumsum(shift)
    events = tokens[~is_shift]
    # A trailing time shift (a window may end inside a gap) is kept via an end marker.
    ev_step = np.append(step[~is_shift], step[-1] if len(step) else 0)
    new_step = np.floor(ev_step * factor + 0.5).astype(np.int64)
    payload_count = np.ones(len(new_step), np.int64)
    payload_count[-1] = 0  # the end marker is not a token
    return interleave_time_shifts(np.diff(new_step, prepend=0), events, payload_count, vocab)
