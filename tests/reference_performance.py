"""A plain, event-by-event reference of the performance encoding, used as a test oracle.

Written for clarity, not speed: it follows note_seq's algorithms step by step (sustain as a
sequential pass over sorted events, the encoder as a loop over onsets and offsets, the
decoder as a FIFO queue per pitch), so the vectorised tokenizer can be checked against it.
"""

from __future__ import annotations

from collections import defaultdict, deque
from fractions import Fraction

SUSTAIN_ON, SUSTAIN_OFF, NOTE_ON, NOTE_OFF = 0, 1, 2, 3


def apply_sustain(notes, pedals, final_time):
    """notes: list of [start, end, pitch, velocity] (seconds); pedals: list of (time, down).

    Returns the surviving notes with extended ends, in input order.
    """
    notes = [list(n) for n in notes]
    events = [(n[0], NOTE_ON, i) for i, n in enumerate(notes)]
    events += [(n[1], NOTE_OFF, i) for i, n in enumerate(notes)]
    events += [(t, SUSTAIN_ON if down else SUSTAIN_OFF, -1) for t, down in pedals]
    events.sort(key=lambda e: (e[0], e[1]))  # stable: input order within (time, type)
    active: list[int] = []
    sustain = False
    dropped = set()
    for time, kind, i in events:
        if kind == SUSTAIN_ON:
            sustain = True
        elif kind == SUSTAIN_OFF:
            sustain = False
            still = []
            for j in active:
                if notes[j][1] < time:
                    notes[j][1] = time
                else:
                    still.append(j)
            active = still
        elif kind == NOTE_ON:
            if sustain:
                still = []
                for j in active:
                    if notes[j][2] == notes[i][2]:
                        notes[j][1] = time
                        if notes[j][0] == notes[j][1]:
                            dropped.add(j)
                    else:
                        still.append(j)
                active = still
            active.append(i)
        elif not sustain and i in active:
            active.remove(i)
    for j in active:
        notes[j][1] = final_time
    return [n for k, n in enumerate(notes) if k not in dropped]


def quantize(notes, steps_per_second=100, units_per_second=None):
    """floor(t * steps + 1/2); with `units_per_second`, times are integers in those units and
    are rounded as exact fractions."""
    half = Fraction(1, 2) if units_per_second else 0.5
    scale = Fraction(steps_per_second, units_per_second) if units_per_second else steps_per_second
    out = []
    for s, e, p, v in sorted(notes, key=lambda n: (n[0], n[2])):
        qs = int((s * scale + half) // 1)
        qe = int((e * scale + half) // 1)
        out.append((qs, max(qe, qs + 1), p, v))
    return out


def encode(qnotes, max_shift=100, velocity_bins=32):
    """qnotes in encoding order (start seconds, pitch) -> list of readable events."""
    width = -(-127 // velocity_bins)
    marks = [(n[0], i, False) for i, n in enumerate(qnotes)] + [(n[1], i, True) for i, n in enumerate(qnotes)]
    events, step, vbin = [], 0, 0
    for t, i, is_off in sorted(marks):
        if t > step:
            while t > step + max_shift:
                events.append(f"TIME_SHIFT:{max_shift}")
                step += max_shift
            events.append(f"TIME_SHIFT:{t - step}")
            step = t
        b = (qnotes[i][3] - 1) // width + 1
        if not is_off and b != vbin:
            vbin = b
            events.append(f"VELOCITY:{b}")
        events.append(f"{'NOTE_OFF' if is_off else 'NOTE_ON'}:{qnotes[i][2]}")
    return events


def decode(events, max_note_steps=500, default_velocity=64, velocity_bins=32):
    """Readable events -> sorted list of (start, end, pitch, velocity) in steps."""
    width = -(-127 // velocity_bins)
    step, velocity = 0, default_velocity
    open_notes: dict[int, deque] = defaultdict(deque)
    notes = []
    for ev in events:
        kind, _, value = ev.partition(":")
        if kind == "TIME_SHIFT":
            step += int(value)
        elif kind == "VELOCITY":
            velocity = 1 + (int(value) - 1) * width
        elif kind == "NOTE_ON":
            open_notes[int(value)].append((step, velocity))
        elif kind == "NOTE_OFF" and open_notes[int(value)]:
            start, vel = open_notes[int(value)].popleft()
            if step > start:
                notes.append((start, step, int(value), vel))
    for pitch, queue in open_notes.items():
        for start, vel in queue:
            end = min(start + max_note_steps, step)
            if end > start:
                notes.append((start, end, pitch, vel))
    return sorted(notes, key=lambda n: (n[0], n[2], n[1], n[3]))
