"""MIDI <-> performance events (DESIGN.md section 2).

Magenta's performance encoding with sustain applied: NOTE_ON(pitch), NOTE_OFF(pitch),
TIME_SHIFT(1..100 steps of 10 ms) and VELOCITY(bin 1..32), plus PAD / BOS / EOS.

Every stage is vectorised numpy; the only Python loop is over MIDI tracks. MIDI is read
and written through symusic. Where overlapping notes of one pitch make a file ambiguous,
symusic pairs note-ons with note-offs differently from pretty_midi (which Magenta uses);
symusic's pairing stands. Given the same notes and pedal events, the event sequence is the
one note_seq produces.

Token ids (with the default settings, vocabulary 391):

    0 PAD, 1 BOS, 2 EOS,
    3..130   NOTE_ON 0..127
    131..258 NOTE_OFF 0..127
    259..358 TIME_SHIFT 1..100
    359..390 VELOCITY 1..32
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perceiver_music.config import TokenizerConfig

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3
NUM_PITCHES = 128
# Note ids do not depend on the tokenizer's settings (only TIME_SHIFT and VELOCITY do).
NOTE_ON = NUM_SPECIAL
NOTE_OFF = NOTE_ON + NUM_PITCHES

# symusic is imported lazily: `tokenize --help` and the config code should not pay for it.


class MidiError(ValueError):
    """A MIDI file that cannot be used, with the file and the reason."""

    def __init__(self, source: str | os.PathLike | None, reason: str):
        self.source = None if source is None else str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}" if self.source else reason)


@dataclass
class Notes:
    """Notes as parallel arrays, sorted by (start, pitch).

    Times are seconds (float64) or exact integer units (`score_time_notes`) before
    quantisation, and integer steps after it.
    """

    start: np.ndarray
    end: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray

    def __len__(self) -> int:
        return len(self.pitch)

    @classmethod
    def empty(cls, time_dtype=np.float64) -> Notes:
        return cls(
            np.zeros(0, time_dtype), np.zeros(0, time_dtype), np.zeros(0, np.int16), np.zeros(0, np.int16)
        )

    def take(self, index: np.ndarray) -> Notes:
        return Notes(self.start[index], self.end[index], self.pitch[index], self.velocity[index])

    def order(self) -> np.ndarray:
        """The permutation that sorts by (start, pitch, end, velocity): the encoding's order, made total."""
        return np.lexsort((self.velocity, self.end, self.pitch, self.start))

    def sorted(self) -> Notes:
        return self.take(self.order())


class Vocab:
    """Token ids and readable event names for one tokenizer configuration."""

    def __init__(self, cfg: TokenizerConfig):
        self.cfg = cfg
        self.note_on = NOTE_ON
        self.note_off = NOTE_OFF
        self.time_shift = self.note_off + NUM_PITCHES  # id of TIME_SHIFT(1)
        self.velocity = self.time_shift + cfg.max_shift_steps  # id of VELOCITY(1)
        self.size = self.velocity + cfg.velocity_bins

    def event_name(self, token: int) -> str:
        token = int(token)
        if token == PAD:
            return "PAD"
        if token == BOS:
            return "BOS"
        if token == EOS:
            return "EOS"
        if self.note_on <= token < self.note_off:
            return f"NOTE_ON:{token - self.note_on}"
        if self.note_off <= token < self.time_shift:
            return f"NOTE_OFF:{token - self.note_off}"
        if self.time_shift <= token < self.velocity:
            return f"TIME_SHIFT:{token - self.time_shift + 1}"
        if self.velocity <= token < self.size:
            return f"VELOCITY:{token - self.velocity + 1}"
        raise ValueError(f"token id {token} is outside the vocabulary (0..{self.size - 1})")

    def shift_steps(self, ids: np.ndarray) -> np.ndarray:
        """How far each token moves time forward: its steps for a TIME_SHIFT, 0 for the rest."""
        ids = np.asarray(ids, np.int64)
        return np.where((ids >= self.time_shift) & (ids < self.velocity), ids - self.time_shift + 1, 0)

    def names(self, ids: np.ndarray) -> list[str]:
        return [self.event_name(t) for t in np.asarray(ids).tolist()]

    def parse(self, name: str) -> int:
        """The id of a readable event such as 'NOTE_ON:60'."""
        if name in ("PAD", "BOS", "EOS"):
            return {"PAD": PAD, "BOS": BOS, "EOS": EOS}[name]
        kind, _, value = name.partition(":")
        limits = {
            "NOTE_ON": (self.note_on, 0, NUM_PITCHES - 1),
            "NOTE_OFF": (self.note_off, 0, NUM_PITCHES - 1),
            "TIME_SHIFT": (self.time_shift, 1, self.cfg.max_shift_steps),
            "VELOCITY": (self.velocity, 1, self.cfg.velocity_bins),
        }
        if kind not in limits or not value.lstrip("-").isdigit():
            raise ValueError(f"not an event: {name!r}")
        base, lo, hi = limits[kind]
        v = int(value)
        if not lo <= v <= hi:
            raise ValueError(f"{kind} value {v} outside {lo}..{hi} in {name!r}")
        return base + v - lo


# ----------------------------------------------------------------------------- reading MIDI


def load_score(source: str | os.PathLike | bytes, name: str | None = None):
    """Parse MIDI with symusic in ticks; any failure becomes a MidiError naming the file.

    Files are read here and parsed from bytes: symusic's own file reader was seen to accept
    or reject the same damaged file from one run to the next, its bytes parser was not.
    """
    from symusic import Score

    label = name if name is not None else (None if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        data = source
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise MidiError(label, f"cannot read: {e.strerror or e}") from None
        if not data:
            raise MidiError(label, "empty file (0 bytes)")
        if data[:4] != b"MThd":
            raise MidiError(label, f"not a MIDI file (starts with {data[:4]!r}, expected b'MThd')")
    try:
        return Score.from_midi(data)
    except Exception as e:  # symusic raises RuntimeError with a parser message
        msg = str(e).replace("MiniMidi: ", "").replace(": iostream error", "")
        raise MidiError(label, f"corrupt MIDI: {msg}") from None


def _tick_to_time(score) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """An exact tick -> time map from the score's tempo changes, and its units per second.

    A tick in a tempo segment lasts mspq / (1e6 * tpq) seconds, so in units of
    1 / (1e6 * tpq) seconds every time is the integer sum of ticks * mspq over the segments
    before it: no rounding anywhere (symusic keeps tempos as float32, seconds as float32).
    int64 holds it: ticks are int32 (an onset plus a duration < 2**32) and a MIDI tempo is a
    3-byte field (mspq < 2**24), so a time is below 2**56 units.
    """
    tpq = int(score.ticks_per_quarter)
    if tpq <= 0:
        raise MidiError(None, f"invalid ticks per quarter note: {tpq}")
    tempos = score.tempos.numpy()
    t_tick = tempos["time"].astype(np.int64)
    mspq = tempos["mspq"].astype(np.int64)
    if len(t_tick):
        order = np.argsort(t_tick, kind="stable")
        t_tick, mspq = t_tick[order], mspq[order]
        # Of several tempo events on one tick the last one holds.
        last = np.append(t_tick[1:] != t_tick[:-1], True)
        t_tick, mspq = t_tick[last], mspq[last]
        mspq = np.where(mspq > 0, mspq, 500_000)
        if mspq.max() >= 2**24:
            raise MidiError(None, f"invalid tempo: {int(mspq.max())} microseconds per quarter note")
    if len(t_tick) == 0 or t_tick[0] > 0:
        t_tick = np.insert(t_tick, 0, 0)
        mspq = np.insert(mspq, 0, 500_000)
    seg_start = np.concatenate([[0], np.cumsum(np.diff(t_tick) * mspq[:-1])]).astype(np.int64)

    def convert(ticks: np.ndarray) -> np.ndarray:
        ticks = np.asarray(ticks, dtype=np.int64)
        k = np.searchsorted(t_tick, ticks, side="right") - 1
        return seg_start[k] + (ticks - t_tick[k]) * mspq[k]

    return convert, 1_000_000 * tpq


def _tick_to_seconds(score) -> Callable[[np.ndarray], np.ndarray]:
    """The tick -> seconds map as float64, for plotting, rendering and comparisons."""
    convert, units = _tick_to_time(score)
    return lambda ticks: convert(ticks) / units


def _never(dtype: np.dtype):
    """A time later than any real one, of the times' own dtype (exact integers stay integers)."""
    return np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else np.inf


def apply_sustain(notes: Notes, pedal_time: np.ndarray, pedal_down: np.ndarray, final_time: float) -> Notes:
    """Extend notes held by the sustain pedal, as note_seq's apply_sustain_control_changes.

    Events at one time are ordered pedal-down, pedal-up, note-on, note-off. A note released
    while the pedal is down lasts until the next pedal-up or until the same pitch is struck
    again with the pedal down, whichever is first (a re-strike under the pedal also cuts a
    note that is still held). Notes still sustained at the end end at `final_time`. A note
    cut at its own start by a simultaneous re-strike is dropped, as note_seq does.

    The sequential algorithm reduces to two look-ups per note: the pedal state at its
    release, and the first later onset of its pitch that happens with the pedal down.
    """
    n = len(notes)
    if n == 0:
        return notes
    order = np.lexsort((~pedal_down, pedal_time))  # by time, downs before ups
    p_time, p_down = pedal_time[order], pedal_down[order]
    # Keep only changes of state (CC64 streams are mostly repeats): the pedal state at any
    # time, and the first release after a time the pedal is down, are the same without them.
    change = p_down != np.concatenate([[False], p_down[:-1]])
    p_time, p_down = p_time[change], p_down[change]
    if len(p_time) == 0:  # the pedal never went down
        return notes
    up_times = p_time[~p_down]

    def pedal_is_down(t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(p_time, t, side="right") - 1  # the last pedal event at or before t
        return (i >= 0) & p_down[np.maximum(i, 0)]

    held = pedal_is_down(notes.end)
    # The first pedal-up after each release; with none left, the end of the piece.
    next_up = np.append(up_times, final_time)[np.searchsorted(up_times, notes.end, side="right")]
    natural_end = np.where(held, next_up, notes.end)

    # Note-ons are processed by (time, original order); group them by pitch in that order.
    by_pitch = np.lexsort((np.arange(n), notes.start, notes.pitch))
    start_s, pitch_s = notes.start[by_pitch], notes.pitch[by_pitch]
    cutting = np.append(np.flatnonzero(pedal_is_down(start_s)), n)  # onsets under the pedal; sentinel
    nxt = cutting[np.searchsorted(cutting, np.arange(n), side="right")]  # next one after each note
    pitch_ext = np.append(pitch_s, -1)
    never = _never(notes.start.dtype)
    start_ext = np.append(start_s, never)
    cut_at = np.empty(n, start_s.dtype)
    cut_at[by_pitch] = np.where(pitch_ext[nxt] == pitch_s, start_ext[nxt], never)
    cut = cut_at <= natural_end
    end = np.where(cut, cut_at, natural_end)
    keep = ~(cut & (end == notes.start))
    return Notes(notes.start[keep], end[keep], notes.pitch[keep], notes.velocity[keep])


def score_time_notes(score, source: str | None = None) -> tuple[Notes, int]:
    """All non-drum notes of a symusic Score (in ticks), sustain applied per track, with their
    exact times as integers (see `_tick_to_time`), and how many of those units make a second."""
    try:
        to_time, units = _tick_to_time(score)
    except MidiError as e:
        raise MidiError(source, e.reason) from None
    per_track = []
    # Notes held by the pedal at the end end at the last note or pedal event of ANY track,
    # drums and note-less tracks included, as in note_seq.
    last_event = 0
    for track in score.tracks:
        nt = track.notes.numpy()
        on_tick = nt["time"].astype(np.int64)
        start = to_time(on_tick)
        end = to_time(on_tick + np.maximum(nt["duration"].astype(np.int64), 0))
        cc = track.controls.numpy()
        is_sustain = cc["number"] == 64
        pedal_time = to_time(cc["time"][is_sustain].astype(np.int64))
        pedal_down = cc["value"][is_sustain] >= 64
        last_event = max(last_event, int(end.max(initial=0)), int(pedal_time.max(initial=0)))
        if track.is_drum or len(start) == 0:
            continue
        notes = Notes(start, end, nt["pitch"].astype(np.int16), nt["velocity"].astype(np.int16))
        per_track.append((notes, pedal_time, pedal_down))
    if not per_track:
        return Notes.empty(np.int64), units
    parts = [apply_sustain(n, pt, pd, last_event) for n, pt, pd in per_track]
    merged = Notes(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("start", "end", "pitch", "velocity"))
    )
    valid = (merged.pitch >= 0) & (merged.pitch < NUM_PITCHES) & (merged.velocity > 0)
    return merged.take(np.flatnonzero(valid)), units


def score_to_notes(score, source: str | None = None) -> Notes:
    """All non-drum notes of a symusic Score (in ticks), in seconds, sustain applied per track."""
    notes, units = score_time_notes(score, source)
    return Notes(notes.start / units, notes.end / units, notes.pitch, notes.velocity)


def quantize(notes: Notes, steps_per_second: int, units_per_second: int | None = None) -> Notes:
    """Times -> integer steps: floor(t * steps + 1/2); a note never ends on its start step.

    With `units_per_second`, times are exact integers in those units (`score_time_notes`) and
    the rounding is exact integer arithmetic, so a time exactly on a half step always rounds
    up; without it they are float seconds. The result is in encoding order, (start time,
    pitch), which the steps alone cannot recover once two onsets share a step.
    """
    notes = notes.take(np.lexsort((notes.pitch, notes.start)))
    if units_per_second is None:
        start = np.floor(notes.start * steps_per_second + 0.5).astype(np.int64)
        end = np.floor(notes.end * steps_per_second + 0.5).astype(np.int64)
    else:
        start = _round_to_steps(notes.start, steps_per_second, units_per_second)
        end = _round_to_steps(notes.end, steps_per_second, units_per_second)
    end = np.maximum(end, start + 1)
    return Notes(start, end, notes.pitch, notes.velocity)


def _round_to_steps(time: np.ndarray, steps_per_second: int, units_per_second: int) -> np.ndarray:
    """floor(time * steps / units + 1/2) for integer times, exactly and without overflow: whole
    seconds first, then the remainder (< units, itself < 2**35), so no product nears 2**63."""
    seconds, rest = np.divmod(np.asarray(time, np.int64), units_per_second)
    return seconds * steps_per_second + (2 * rest * steps_per_second + units_per_second) // (
        2 * units_per_second
    )


# ----------------------------------------------------------------------------- tokenizer


class PerformanceTokenizer:
    """Performance-event tokenizer: MIDI file <-> token ids, vectorised."""

    def __init__(self, cfg: TokenizerConfig | None = None):
        self.cfg = cfg or TokenizerConfig()
        self.vocab = Vocab(self.cfg)

    # -- velocity bins --------------------------------------------------------------
    def velocity_bin(self, velocity: np.ndarray) -> np.ndarray:
        """(v - 1) // width + 1, width = ceil(127 / bins): 4 for 32 bins."""
        width = -(-127 // self.cfg.velocity_bins)
        v = np.clip(np.asarray(velocity, np.int64), 1, 127)
        return np.minimum((v - 1) // width + 1, self.cfg.velocity_bins)

    def bin_velocity(self, velocity_bin: np.ndarray) -> np.ndarray:
        width = -(-127 // self.cfg.velocity_bins)
        return np.minimum(1 + (np.asarray(velocity_bin, np.int64) - 1) * width, 127)

    # -- MIDI -> notes -> ids -------------------------------------------------------
    def midi_to_notes(self, source: str | os.PathLike | bytes, name: str | None = None) -> Notes:
        """Read MIDI and return its quantised, sustained notes in steps."""
        label = name if name is not None else (None if isinstance(source, bytes) else str(source))
        score = load_score(source, label)
        notes, units = score_time_notes(score, label)
        # Refuse absurd lengths before anything proportional to them is allocated.
        last = int(notes.end.max()) / units if len(notes) else 0.0
        if last > self.cfg.max_seconds:
            raise MidiError(label, f"absurd length: {last / 3600:.1f} hours (limit tokenizer.max_seconds)")
        return quantize(notes, self.cfg.steps_per_second, units)

    def encode_notes(self, notes: Notes) -> np.ndarray:
        """Quantised notes (steps) -> event ids (no BOS/EOS), uint16.

        Onsets and offsets are sorted by (step, note index, offset after onset) with notes
        indexed by (start, pitch); gaps become TIME_SHIFTs of at most `max_shift_steps`; a
        VELOCITY precedes a NOTE_ON whenever the bin differs from the previous NOTE_ON's.
        """
        v = self.vocab
        n = len(notes)
        if n == 0:
            return np.zeros(0, np.uint16)
        # Notes come in encoding order, (start seconds, pitch) as `quantize` leaves them; the
        # stable sort by step only repairs hand-made input without undoing ties in seconds.
        order = np.argsort(notes.start, kind="stable")
        start, end = notes.start[order], notes.end[order]
        pitch = notes.pitch[order].astype(np.int64)
        vbin = self.velocity_bin(notes.velocity[order])

        idx = np.arange(n)
        ev_step = np.concatenate([start, end])
        ev_idx = np.concatenate([idx, idx])
        ev_off = np.concatenate([np.zeros(n, bool), np.ones(n, bool)])
        ev = np.lexsort((ev_off, ev_idx, ev_step))
        ev_step, ev_idx, ev_off = ev_step[ev], ev_idx[ev], ev_off[ev]

        onset_pos = np.flatnonzero(~ev_off)
        onset_bins = vbin[ev_idx[onset_pos]]
        vel_change = np.zeros(len(ev_step), bool)
        vel_change[onset_pos] = onset_bins != np.concatenate([[0], onset_bins[:-1]])

        # Each event's payload: an optional VELOCITY, then its NOTE_ON / NOTE_OFF.
        payload_count = vel_change + 1
        payload = np.empty(int(payload_count.sum()), np.int64)
        note_at = np.cumsum(payload_count) - 1
        payload[note_at] = np.where(ev_off, v.note_off, v.note_on) + pitch[ev_idx]
        payload[note_at[vel_change] - 1] = v.velocity + vbin[ev_idx[vel_change]] - 1
        out = interleave_time_shifts(np.diff(ev_step, prepend=0), payload, payload_count, v)
        return out.astype(np.uint16)

    def encode(self, source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
        """MIDI file (path or bytes) -> event ids without BOS/EOS."""
        return self.encode_notes(self.midi_to_notes(source, name))

    # -- ids -> notes -> MIDI -------------------------------------------------------
    def decode_notes(self, ids: np.ndarray) -> Notes:
        """Event ids -> notes in steps. Specials are ignored.

        A NOTE_OFF closes the oldest open note of its pitch; a stray NOTE_OFF is ignored; a
        note never closed ends `max_note_seconds` after its start or at the last step,
        whichever is first; a note closed on its own step is dropped (as note_seq does).
        """
        v = self.vocab
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= v.size):
            bad = ids[(ids < 0) | (ids >= v.size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{v.size - 1})")
        step = np.cumsum(v.shift_steps(ids))
        final_step = int(step[-1]) if len(step) else 0

        is_vel = (ids >= v.velocity) & (ids < v.size)
        vel_pos = np.where(is_vel, np.arange(len(ids)), -1)
        last_vel = np.maximum.accumulate(vel_pos) if len(ids) else vel_pos
        cur_bin = np.where(last_vel >= 0, ids[np.maximum(last_vel, 0)] - v.velocity + 1, 0)

        ev = note_events(ids, v)
        if len(ev.pos) == 0:
            return Notes.empty(np.int64)
        pos, on, pitch, group_id, group_start = ev.pos, ev.on, ev.pitch, ev.group_id, ev.group_start
        valid_off = ~on & ~ev.stray_off
        # FIFO: the k-th valid off of a pitch closes its k-th onset.
        on_rank = _rank_within(on, group_id, group_start)
        off_rank = _rank_within(valid_off, group_id, group_start)
        on_global = np.flatnonzero(on)  # onsets in (pitch, order); rank = position in group
        off_global = np.flatnonzero(valid_off)
        on_key = group_id[on_global] * (len(pos) + 1) + on_rank[on_global]
        off_key = group_id[off_global] * (len(pos) + 1) + off_rank[off_global]
        end_step = np.full(len(on_global), -1, np.int64)
        match = np.searchsorted(on_key, off_key)  # every valid off has its onset
        end_step[match] = step[pos[off_global]]
        start_step = step[pos[on_global]]
        max_steps = int(round(self.cfg.max_note_seconds * self.cfg.steps_per_second))
        open_end = np.minimum(start_step + max_steps, final_step)
        end_step = np.where(end_step < 0, open_end, end_step)
        on_bin = cur_bin[pos[on_global]]
        velocity = np.where(on_bin > 0, self.bin_velocity(np.maximum(on_bin, 1)), self.cfg.default_velocity)
        keep = end_step > start_step
        notes = Notes(
            start_step[keep],
            end_step[keep],
            pitch[on_global][keep].astype(np.int16),
            velocity[keep].astype(np.int16),
        )
        return notes.sorted()

    def notes_to_score(self, notes: Notes):
        """Notes in steps -> symusic Score (one piano track, 1 ms per tick)."""
        from symusic import Note, Score, Tempo, Track

        ms_per_step = 1000 // self.cfg.steps_per_second
        score = Score(TICKS_PER_QUARTER)
        score.tempos.append(Tempo(0, mspq=1000 * TICKS_PER_QUARTER))
        order = np.lexsort((notes.pitch, notes.start))
        note_list = Note.from_numpy(
            (notes.start[order] * ms_per_step).astype(np.int32),
            ((notes.end - notes.start)[order] * ms_per_step).astype(np.int32),
            notes.pitch[order].astype(np.int8),
            notes.velocity[order].astype(np.int8),
        )
        score.tracks.append(Track(name="Piano", program=0, notes=note_list))
        return score

    def decode_to_midi(self, ids: np.ndarray, path: str | os.PathLike) -> None:
        """Write event ids as a MIDI file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.notes_to_score(self.decode_notes(ids)).dump_midi(str(path))


# With 480 ticks per quarter at 125 bpm one tick is exactly 1 ms, so steps of 10 ms are exact.
TICKS_PER_QUARTER = 480


def interleave_time_shifts(
    gap: np.ndarray, payload: np.ndarray, payload_count: np.ndarray, vocab: Vocab
) -> np.ndarray:
    """Tokens for a run of events: before event i, TIME_SHIFTs covering `gap[i]` steps (as many
    TIME_SHIFT(max) as needed, then the remainder), then its `payload_count[i]` tokens from
    `payload` (all events' payloads back to back)."""
    max_shift = vocab.cfg.max_shift_steps
    gap = np.asarray(gap, np.int64)
    n_full = np.where(gap > 0, (gap - 1) // max_shift, 0)
    rest = gap - n_full * max_shift  # in (0, max_shift] where gap > 0
    n_shift = n_full + (rest > 0)
    count = n_shift + payload_count
    first = np.cumsum(count) - count
    out = np.empty(int(count.sum()), np.int64)
    shift_pos = np.repeat(first, n_shift) + _ramp(n_shift)
    out[shift_pos] = vocab.time_shift + max_shift - 1
    has_rest = rest > 0
    out[(first + n_shift - 1)[has_rest]] = vocab.time_shift + rest[has_rest] - 1
    out[np.repeat(first + n_shift, payload_count) + _ramp(payload_count)] = payload
    return out


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0, 1, .., counts[0]-1, 0, 1, .., counts[1]-1, ... (the offset inside each run)."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _rank_within(mask: np.ndarray, group_id: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """For each True in `mask`, its 0-based rank among the Trues of its group."""
    c = np.cumsum(mask)
    before_group = np.concatenate([[0], c])[group_start][group_id]
    return c - before_group - 1


def pair_fifo(notes: Notes) -> Notes:
    """Re-pair same-pitch notes as a decoder does: per pitch, the k-th onset with the k-th end.

    Overlapping notes of one pitch are ambiguous in any note-on/note-off stream; this is
    the pairing that the decoder recovers, used to state the round-trip guarantee.
    """
    if len(notes) == 0:
        return notes
    on = np.lexsort((np.arange(len(notes)), notes.start, notes.pitch))
    off = np.lexsort((notes.end, notes.pitch))
    return Notes(notes.start[on], notes.end[off], notes.pitch[on], notes.velocity[on]).sorted()


@dataclass
class NoteEvents:
    """The NOTE_ON / NOTE_OFF tokens of a stream grouped by pitch (in stream order within a
    pitch), with how many notes of that pitch were sounding just before each one."""

    pos: np.ndarray  # index of each note event in the stream
    on: np.ndarray  # bool: NOTE_ON (else NOTE_OFF)
    pitch: np.ndarray
    open_before: np.ndarray  # notes of this pitch sounding before the event
    open_after: np.ndarray  # ... and after it
    group_id: np.ndarray  # index of the event's pitch group
    group_start: np.ndarray  # first event of each pitch group

    @property
    def stray_off(self) -> np.ndarray:
        """NOTE_OFFs of a pitch that is not sounding (the decoder ignores them)."""
        return ~self.on & (self.open_before == 0)

    @property
    def restruck_on(self) -> np.ndarray:
        """NOTE_ONs of a pitch that is already sounding."""
        return self.on & (self.open_before > 0)

    @property
    def unclosed_on(self) -> np.ndarray:
        """NOTE_ONs no NOTE_OFF closes. The decoder pairs first in, first out (the k-th valid
        NOTE_OFF of a pitch closes its k-th NOTE_ON), so they are each pitch's last onsets."""
        on_rank = _rank_within(self.on, self.group_id, self.group_start)
        closing = np.bincount(self.group_id[~self.on & ~self.stray_off], minlength=len(self.group_start))
        return self.on & (on_rank >= closing[self.group_id])

    def sounding_at_end(self) -> np.ndarray:
        """[128] how many notes of each pitch are still sounding after the last event."""
        counts = np.zeros(NUM_PITCHES, np.int64)
        if len(self.pitch) == 0:
            return counts
        last = np.append(self.group_start[1:], len(self.pitch)) - 1
        counts[self.pitch[last]] = self.open_after[last]
        return counts


def note_events(ids: np.ndarray, vocab: Vocab) -> NoteEvents:
    """Group a stream's note events by pitch and count the notes sounding before each one.

    With S the running sum of +1 (on) / -1 (off) per pitch, a NOTE_OFF is stray exactly when
    it takes S to a new low, so the count of sounding notes after an event is S minus its
    running minimum (clipped at 0). Vectorised: one sort, no loop over tokens.
    """
    ids = np.asarray(ids, np.int64)
    is_on = (ids >= vocab.note_on) & (ids < vocab.note_off)
    is_off = (ids >= vocab.note_off) & (ids < vocab.time_shift)
    pos = np.flatnonzero(is_on | is_off)
    on = is_on[pos]
    pitch = np.where(on, ids[pos] - vocab.note_on, ids[pos] - vocab.note_off)
    g = np.lexsort((pos, pitch))
    pos, on, pitch = pos[g], on[g], pitch[g]
    new_group = np.diff(pitch, prepend=-1) != 0
    group_start = np.flatnonzero(new_group)
    group_id = np.cumsum(new_group) - 1
    cs = np.cumsum(np.where(on, 1, -1))
    s = cs - np.concatenate([[0], cs])[group_start][group_id]  # restart at each pitch
    big = 2 * len(s) + 2
    shifted = s - group_id * big  # later groups lie lower, so a running min never leaks back
    low = np.minimum(np.minimum.accumulate(shifted) + group_id * big, 0) if len(s) else s
    open_after = s - low
    open_before = np.concatenate([[0], open_after[:-1]]) if len(s) else s
    open_before[group_start] = 0
    return NoteEvents(pos, on, pitch, open_before, open_after, group_id, group_start)


def keyboard_state(ids: np.ndarray, vocab: Vocab, held_before: np.ndarray | None = None) -> np.ndarray:
    """[L, 128] float32: after each token, how many seconds each pitch has been sounding
    (since its latest NOTE_ON), -1 for a silent pitch.

    The last note event of a pitch decides: a NOTE_ON makes it sound (a re-strike restarts
    its time), a NOTE_OFF silences it. In performance data this is the decoder's count of
    sounding notes; the two differ only for re-struck notes, which the data never holds.
    held_before [128]: the state just before ids[0] (`held_at_end` of what precedes it).
    Vectorised: a running maximum of each pitch's last onset and release, no loop over tokens.
    """
    ids = np.asarray(ids, np.int64)
    L = len(ids)
    step = np.cumsum(vocab.shift_steps(ids))  # [L] steps through each token
    rows = np.arange(L)
    is_on = (ids >= vocab.note_on) & (ids < vocab.note_off)
    is_off = (ids >= vocab.note_off) & (ids < vocab.time_shift)
    last_on = np.full((L, NUM_PITCHES), -1, np.int64)
    last_off = np.full((L, NUM_PITCHES), -1, np.int64)
    last_on[rows[is_on], ids[is_on] - vocab.note_on] = rows[is_on]
    last_off[rows[is_off], ids[is_off] - vocab.note_off] = rows[is_off]
    np.maximum.accumulate(last_on, axis=0, out=last_on)  # [L, 128] latest onset at or before
    np.maximum.accumulate(last_off, axis=0, out=last_off)
    sps = vocab.cfg.steps_per_second
    held = np.where(last_on > last_off, (step[:, None] - step[last_on.clip(0)]) / sps, -1.0)
    if held_before is not None:
        carried = (last_on < 0) & (last_off < 0) & (np.asarray(held_before) >= 0)[None, :]
        held = np.where(carried, np.asarray(held_before)[None, :] + step[:, None] / sps, held)
    return held.astype(np.float32)


def held_at_end(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """[128] float32: `keyboard_state` after the last token only (-1 silent), without the
    [L, 128] matrix, for the long stretch of a piece before a training window."""
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        return np.full(NUM_PITCHES, -1.0, np.float32)
    step = np.cumsum(vocab.shift_steps(ids))
    rows = np.arange(len(ids))
    is_on = (ids >= vocab.note_on) & (ids < vocab.note_off)
    is_off = (ids >= vocab.note_off) & (ids < vocab.time_shift)
    last_on = np.full(NUM_PITCHES, -1, np.int64)
    last_off = np.full(NUM_PITCHES, -1, np.int64)
    np.maximum.at(last_on, ids[is_on] - vocab.note_on, rows[is_on])
    np.maximum.at(last_off, ids[is_off] - vocab.note_off, rows[is_off])
    held = (step[-1] - step[last_on.clip(0)]) / vocab.cfg.steps_per_second
    return np.where(last_on > last_off, held, -1.0).astype(np.float32)
