"""Check that PerformanceTokenizer produces exactly the events of Magenta's note_seq.

For every MIDI file under a folder the score is read once with symusic (our `load_score`), and
the very notes and sustain-pedal events that our encoder uses are handed to note_seq as a
`NoteSequence`: one `instrument` per non-drum track (its index), CC64 events as
`control_changes`, and times exact: the integers of our tick -> time map (`_tick_to_time`, in
units of 1 / (1e6 * ticks per quarter) s; a double holds them exactly below 2**53), so that
note_seq's sustain pass compares exact times. Its quantiser, int(t * steps + 0.5), is run
on those exact times as rationals (`exact_quantize_to_step`, patched in for the float one),
which is the rounding the tokenizer does. note_seq's own pipeline then runs on it:

    sequences_lib.apply_sustain_control_changes(ns)
    sequences_lib.quantize_note_sequence_absolute(ns, steps_per_second)
    performance_lib.Performance(quantized, num_velocity_bins=..., max_shift_steps=...)

and its events, written as our readable names ('NOTE_ON:60', 'TIME_SHIFT:12', ...), are
compared with `tok.vocab.names(tok.encode(path))`. MIDI parsing itself (symusic vs pretty_midi)
is deliberately left out of the comparison.

note_seq must never be installed into the project's venv; use a separate one:

    python3 -m venv /tmp/nsvenv
    /tmp/nsvenv/bin/pip install note-seq==0.0.5 symusic numpy pyyaml

Run (from the repository root):

    PYTHONPATH=src /tmp/nsvenv/bin/python scripts/check_note_seq.py [FOLDER] [--limit N]
        [--workers N] [--context N] [--quiet]

FOLDER defaults to ../shared/data/asap beside the repository. The exit status is 0 when every file is identical.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from fractions import Fraction
from multiprocessing import Pool
from pathlib import Path

warnings.filterwarnings("ignore", message="Couldn't find ffmpeg")  # pydub, imported by note_seq

import numpy as np  # noqa: E402
from note_seq import performance_lib, sequences_lib  # noqa: E402
from note_seq.protobuf import music_pb2  # noqa: E402

from perceiver_music.tokens.performance import (  # noqa: E402
    PerformanceTokenizer,
    _tick_to_time,
    load_score,
)

MIDI_SUFFIXES = (".mid", ".midi")
SUSTAIN = 64
# Units per second of the file being compared (one file at a time per process).
_units_per_second = 1


def exact_quantize_to_step(unquantized_time, steps_per_second, quantize_cutoff=sequences_lib.QUANTIZE_CUTOFF):
    """note_seq's quantize_to_step, int(seconds * steps + 1 - cutoff), in exact rationals on
    times given in integer units of 1 / _units_per_second s."""
    seconds = Fraction(int(unquantized_time), _units_per_second)
    return math.floor(seconds * steps_per_second + 1 - Fraction(quantize_cutoff))


sequences_lib.quantize_to_step = exact_quantize_to_step


def score_to_note_sequence(score) -> tuple[music_pb2.NoteSequence, int]:
    """The notes and CC64 events our encoder reads, as an unquantised NoteSequence with exact
    integer times, and the units per second of those times.

    Mirrors `score_to_notes`: drum tracks are skipped, a negative duration counts as zero.
    CC64 events of non-drum tracks without notes are kept too, as note_seq's MIDI import would
    keep them (they can only move the end of the piece, to which note_seq extends notes still
    held by the pedal).
    """
    to_time, units = _tick_to_time(score)

    def to_sec(ticks: np.ndarray) -> np.ndarray:
        t = to_time(ticks)
        if len(t) and t.max() >= 2**53:
            raise ValueError("times beyond 2**53 units cannot be handed to note_seq exactly")
        return t.astype(np.float64)

    ns = music_pb2.NoteSequence()
    ns.ticks_per_quarter = int(score.ticks_per_quarter)
    for index, track in enumerate(score.tracks):
        if track.is_drum:
            continue
        nt = track.notes.numpy()
        on_tick = nt["time"].astype(np.int64)
        start = to_sec(on_tick)
        end = to_sec(on_tick + np.maximum(nt["duration"].astype(np.int64), 0))
        for s, e, p, v in zip(start.tolist(), end.tolist(), nt["pitch"].tolist(), nt["velocity"].tolist()):
            ns.notes.add(
                start_time=s, end_time=e, pitch=p, velocity=v, instrument=index, program=int(track.program)
            )
        cc = track.controls.numpy()
        sustain = cc["number"] == SUSTAIN
        cc_time = to_sec(cc["time"][sustain].astype(np.int64))
        for t, value in zip(cc_time.tolist(), cc["value"][sustain].tolist()):
            ns.control_changes.add(time=t, control_number=SUSTAIN, control_value=value, instrument=index)
    ns.total_time = max((n.end_time for n in ns.notes), default=0.0)
    return ns, units


def note_seq_names(ns: music_pb2.NoteSequence, tok: PerformanceTokenizer) -> list[str]:
    """note_seq's sustain, quantisation and performance encoding, as our event names."""
    cfg = tok.cfg
    sustained = sequences_lib.apply_sustain_control_changes(ns, sustain_control_number=SUSTAIN)
    quantized = sequences_lib.quantize_note_sequence_absolute(sustained, cfg.steps_per_second)
    perf = performance_lib.Performance(
        quantized, num_velocity_bins=cfg.velocity_bins, max_shift_steps=cfg.max_shift_steps
    )
    kinds = {
        performance_lib.PerformanceEvent.NOTE_ON: "NOTE_ON",
        performance_lib.PerformanceEvent.NOTE_OFF: "NOTE_OFF",
        performance_lib.PerformanceEvent.TIME_SHIFT: "TIME_SHIFT",
        performance_lib.PerformanceEvent.VELOCITY: "VELOCITY",
    }
    return [f"{kinds[e.event_type]}:{e.event_value}" for e in perf]


def step_at(names: list[str], pos: int) -> int:
    """The time step (sum of TIME_SHIFTs) at position `pos` of an event list."""
    return sum(int(n.partition(":")[2]) for n in names[:pos] if n.startswith("TIME_SHIFT"))


def compare_file(path: str, context: int = 6) -> dict:
    """Encode one file both ways; the result describes the first difference, if any."""
    global _units_per_second
    tok = PerformanceTokenizer()
    try:
        score = load_score(path)
        ours = tok.vocab.names(tok.encode(path))
        ns, _units_per_second = score_to_note_sequence(score)
        theirs = note_seq_names(ns, tok)
    except Exception as e:  # a file that either side cannot handle is reported, not fatal
        return {"path": path, "status": "error", "error": f"{type(e).__name__}: {e}"}
    if ours == theirs:
        return {"path": path, "status": "same", "events": len(ours)}
    pos = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    lo = max(pos - context, 0)
    return {
        "path": path,
        "status": "diff",
        "pos": pos,
        "ours_len": len(ours),
        "theirs_len": len(theirs),
        "step": step_at(ours, pos),
        "seconds": step_at(ours, pos) / tok.cfg.steps_per_second,
        "ours": ours[lo : pos + context + 1],
        "theirs": theirs[lo : pos + context + 1],
        "ctx_start": lo,
    }


def _compare(args: tuple[str, int]) -> dict:
    return compare_file(*args)


def midi_files(folder: Path, limit: int | None) -> list[str]:
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
    return files[:limit] if limit is not None else files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "folder",
        nargs="?",
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "asap",
        type=Path,
    )
    ap.add_argument("--limit", type=int, default=None, help="check only the first N files (sorted by path)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: CPUs)")
    ap.add_argument("--context", type=int, default=6, help="events shown either side of a difference")
    ap.add_argument("--quiet", action="store_true", help="print only differing files and the summary")
    args = ap.parse_args(argv)

    files = midi_files(args.folder, args.limit)
    if not files:
        print(f"no MIDI files under {args.folder}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    jobs = [(f, args.context) for f in files]
    if args.workers > 1:
        with Pool(args.workers) as pool:
            results = pool.map(_compare, jobs, chunksize=4)
    else:
        results = [_compare(j) for j in jobs]

    counts = {"same": 0, "diff": 0, "error": 0}
    for r in results:
        counts[r["status"]] += 1
        rel = os.path.relpath(r["path"], args.folder)
        if r["status"] == "same":
            if not args.quiet:
                print(f"same   {rel} ({r['events']} events)")
        elif r["status"] == "error":
            print(f"ERROR  {rel}: {r['error']}")
        else:
            print(
                f"DIFF   {rel}: first difference at event {r['pos']} (step {r['step']}, {r['seconds']:.2f} s);"
                f" lengths ours {r['ours_len']}, note_seq {r['theirs_len']}"
            )
            print(f"         from event {r['ctx_start']}:")
            print(f"         ours:     {' '.join(r['ours'])}")
            print(f"         note_seq: {' '.join(r['theirs'])}")
    print(
        f"\n{counts['same']} of {len(results)} files identical, {counts['diff']} differ, "
        f"{counts['error']} errors ({time.perf_counter() - t0:.1f} s)"
    )
    return 0 if counts["same"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
