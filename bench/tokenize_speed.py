"""Tokenization throughput: our PerformanceTokenizer against miditok's MIDILike.

Both tokenizers turn the same MIDI files into token ids, starting from the file path, so
both sides include reading and parsing the file (symusic on both sides). Measured, per side:

* wall time over the whole file list, with the same number of worker processes
  (`multiprocessing.Pool.imap` over file paths; `--workers 1` runs in this process);
  the median of `--repeat` passes (3) is reported, all passes are kept in the JSON, and
  the sides take turns within each pass, so a shared machine's changing load hits all alike;
* files/s, and tokens/s where tokens are counted from that side's own output;
* files that raise an error (counted, not fatal; their tokens are not counted).

Every worker builds its tokenizer and encodes one file before the clock starts (warm-up),
and every file is read once beforehand so neither side pays for a cold page cache. As a
reference, the same file list is also timed through `symusic.Score(path)` alone: the parsing
that both sides share, hence a bound on how fast any tokenizer built on symusic can be.

The result is ours/miditok in files/s, checked against the target of at least 20x on
2 workers. Figures, configurations and machine details go to a JSON file.

Run from the repository root:

    python bench/tokenize_speed.py                      # all files under ../shared/data/asap, 2 workers
    python bench/tokenize_speed.py --limit 100 --workers 1 --out /tmp/tokenize.json
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict
from functools import partial
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # so that the package need not be installed

TARGET_RATIO = 20.0  # ours / miditok in files/s ...
TARGET_WORKERS = 2  # ... on 2 cores

# miditok's MIDILike, configured as close as it gets to our 388-event vocabulary. MIDILike
# counts time in beats and ignores tempo (no Tempo tokens here). With 50 positions per beat
# over 2 beats, its TimeShift tokens are 1/50 beat .. 2 beats: 100 values, which at 120 bpm
# are exactly 10 ms .. 1 s, like ours. Every ASAP file has a single tempo: 120 bpm (539
# files), 117 bpm (523: 10.26 ms .. 1.03 s) or 400 bpm (5: 3 ms .. 0.3 s).
MIDITOK_CONFIG = dict(
    pitch_range=(0, 127),  # inclusive in miditok 3.1: 128 NoteOn + 128 NoteOff
    beat_res={(0, 2): 50},
    num_velocities=32,
    special_tokens=["PAD", "BOS", "EOS"],
    use_sustain_pedals=True,  # adds Pedal / PedalOff tokens; note durations stay as played
    use_time_signatures=False,  # default True in miditok; we have no such tokens
    use_pitchdrum_tokens=False,  # default True; no DrumOn / DrumOff tokens
    use_tempos=False,
    use_programs=False,
)
MIDITOK_NOTES = (
    "MIDILike with the config above: 3 specials + 128 NoteOn + 128 NoteOff + 100 TimeShift "
    "(1/50 beat .. 2 beats: 10 ms .. 1 s at 120 bpm, 10.26 ms .. 1.03 s at 117 bpm; tempo is not "
    "tokenized) + 32 Velocity + Pedal + PedalOff. Differences from ours: time is in beats, not "
    "seconds; the sustain pedal becomes Pedal/PedalOff tokens instead of lengthening notes; a "
    "Velocity token follows every NoteOn (ours only when the bin changes); one sequence per track. "
    "Called as tokenizer.encode(path), which reads the file with symusic and preprocesses it."
)
OURS_NOTES = (
    "Magenta performance encoding: 128 NOTE_ON + 128 NOTE_OFF + 100 TIME_SHIFT (10 ms .. 1 s) + "
    "32 VELOCITY (+ PAD/BOS/EOS, not emitted); sustain applied to note durations. Called as "
    "PerformanceTokenizer().encode(path), which reads the file with symusic."
)


# ----------------------------------------------------------------------------- one file, one side
#
# Each side is a pair (make, run): `make()` builds the tokenizer once per process and
# `run(tokenizer, path)` returns the number of tokens it produced for the file.


def make_ours():
    from perceiver_music.tokens.performance import PerformanceTokenizer

    return PerformanceTokenizer()


def run_ours(tokenizer, path: str) -> int:
    return len(tokenizer.encode(path))


def make_miditok():
    from miditok import MIDILike, TokenizerConfig

    return MIDILike(TokenizerConfig(**MIDITOK_CONFIG))


def run_miditok(tokenizer, path: str) -> int:
    out = tokenizer.encode(Path(path))
    seqs = out if isinstance(out, list) else [out]  # one TokSequence per track here
    return sum(len(seq.ids) for seq in seqs)


def make_parse_only():
    from symusic import Score

    return Score


def run_parse_only(score_cls, path: str) -> int:
    score_cls(path)
    return 0


SIDES = {
    "ours": (make_ours, run_ours),
    "miditok": (make_miditok, run_miditok),
    "symusic_parse_only": (make_parse_only, run_parse_only),
}

# Per-process state: side -> (run function, tokenizer). A worker process holds one side;
# with --workers 1 this process holds them all.
_tokenizers: dict[str, tuple] = {}


def _init_worker(side: str, warmup_path: str, ready) -> None:
    make, run = SIDES[side]
    _tokenizers[side] = (run, make())
    with suppress(Exception):  # a file that fails is counted in the timed passes
        run(_tokenizers[side][1], warmup_path)
    ready.wait()  # the clock starts once every worker is warm


def _encode(side: str, path: str) -> tuple[int, str | None]:
    """(tokens, None) or (0, error) for one file."""
    run, tokenizer = _tokenizers[side]
    try:
        return run(tokenizer, path), None
    except Exception as e:  # a failing file is counted, not fatal
        return 0, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- all sides, all files


@contextmanager
def warm_runner(side: str, files: list[str], workers: int, chunksize: int):
    """A function that encodes all `files` with `side` in `workers` warm processes (1: this one)."""
    encode = partial(_encode, side)
    if workers == 1:
        _init_worker(side, files[0], threading.Barrier(1))
        yield lambda: list(map(encode, files))
        return
    ready = mp.Barrier(workers + 1, timeout=300)  # a worker that dies on start-up stops the run
    with mp.Pool(workers, initializer=_init_worker, initargs=(side, files[0], ready)) as pool:
        ready.wait()
        yield lambda: list(pool.imap(encode, files, chunksize=chunksize))


def measure(files: list[str], workers: int, chunksize: int, repeat: int) -> dict:
    """Time every side over `files`, `repeat` passes each: median wall time, files/s, tokens/s, errors.

    The sides take turns within each pass, so that a change in the machine's load during
    the run (it may be shared) reaches all of them alike.
    """
    walls = {side: [] for side in SIDES}
    results = {}
    with ExitStack() as stack:
        runners = {side: stack.enter_context(warm_runner(side, files, workers, chunksize)) for side in SIDES}
        for _ in range(repeat):
            for side, encode_all in runners.items():
                start = time.perf_counter()
                results[side] = encode_all()  # the same in every pass
                walls[side].append(time.perf_counter() - start)
    return {side: summarize(files, walls[side], results[side]) for side in SIDES}


def summarize(files: list[str], walls: list[float], results: list[tuple[int, str | None]]) -> dict:
    wall = statistics.median(walls)
    errors = [(f, err) for f, (_, err) in zip(files, results, strict=True) if err is not None]
    tokens = sum(n for n, _ in results)
    return {
        "files": len(files),
        "errors": len(errors),
        "error_examples": [f"{f}: {err}" for f, err in errors[:5]],
        "wall_s": round(wall, 4),
        "wall_s_all_passes": [round(w, 4) for w in walls],
        "files_per_s": round(len(files) / wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall),
        "tokens_per_file": round(tokens / max(len(files) - len(errors), 1), 1),
    }


# ----------------------------------------------------------------------------- context


def machine_info() -> dict:
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("numpy", "symusic", "miditok"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def configurations() -> dict:
    from perceiver_music.config import TokenizerConfig

    ours, miditok = make_ours(), make_miditok()
    return {
        "ours": {
            "tokenizer": "perceiver_music.tokens.performance.PerformanceTokenizer",
            "config": asdict(TokenizerConfig()),
            "vocab_size": ours.vocab.size,
            "notes": OURS_NOTES,
        },
        "miditok": {
            "tokenizer": "miditok.MIDILike",
            "config": {k: (str(v) if isinstance(v, dict) else v) for k, v in MIDITOK_CONFIG.items()},
            "vocab_size": len(miditok),
            "notes": MIDITOK_NOTES,
        },
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "asap",
        help="folder searched recursively for *.mid (default: ../shared/data/asap)",
    )
    p.add_argument("--limit", type=int, default=None, help="use the first N files (sorted by path)")
    p.add_argument("--workers", type=int, default=2, help="processes per side (1: in this process)")
    p.add_argument(
        "--chunksize",
        type=int,
        default=None,
        help="files per Pool.imap task (default: about 8 per worker, <= 32)",
    )
    p.add_argument("--repeat", type=int, default=3, help="passes over the files per side; median reported")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tokenize.json")
    args = p.parse_args(argv)
    if min(args.workers, args.chunksize or 1, args.repeat, args.limit or 1) < 1:
        p.error("--workers, --chunksize, --repeat and --limit must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = sorted(str(f) for f in args.data.rglob("*.mid"))[: args.limit]
    if not files:
        print(f"no *.mid files under {args.data}", file=sys.stderr)
        return 1
    data_bytes = sum(len(Path(f).read_bytes()) for f in files)  # also warms the page cache

    print(
        f"{len(files)} files ({data_bytes / 1e6:.1f} MB) from {args.data}, "
        f"{args.workers} worker(s), median of {args.repeat} passes"
    )
    machine = machine_info()
    # Big enough chunks to keep the pool's messaging small next to our ~1 ms per file, small
    # enough that the workers finish together: files differ in size by up to 90x.
    chunksize = args.chunksize or max(1, min(32, len(files) // (8 * args.workers)))
    results = measure(files, args.workers, chunksize, args.repeat)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for side, r in results.items():
        print(
            f"  {side:<20} {r['wall_s']:8.2f} s  {r['files_per_s']:9.1f} files/s  "
            f"{r['tokens_per_s']:>11,} tokens/s  {r['errors']} errors"
        )

    ours, theirs = results["ours"], results["miditok"]
    ratio = ours["files_per_s"] / theirs["files_per_s"]
    target = {
        "ratio_files_per_s_at_least": TARGET_RATIO,
        "workers": TARGET_WORKERS,
        "applies": args.workers == TARGET_WORKERS,
        "met": ratio >= TARGET_RATIO,
    }
    report = {
        "benchmark": "MIDI file -> token ids, ours vs miditok MIDILike, same files, same workers",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": {
            "folder": str(args.data),
            "files": len(files),
            "bytes": data_bytes,
            "limit": args.limit,
            "same_file_list_for_both": True,
        },
        "workers": args.workers,
        "chunksize": chunksize,
        "repeat": args.repeat,
        "timing": "median wall time of `repeat` passes over all files, after warm-up; sides alternate",
        "machine": machine,
        "configuration": configurations(),
        "results": results,
        "ratio_ours_over_miditok": {
            "files_per_s": round(ratio, 2),
            "tokens_per_s": round(ours["tokens_per_s"] / max(theirs["tokens_per_s"], 1), 2),
        },
        "parse_share_of_ours": round(results["symusic_parse_only"]["wall_s"] / ours["wall_s"], 3),
        "target": target,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    verdict = "met" if target["met"] else "NOT met"
    note = "" if target["applies"] else f" (target is for {TARGET_WORKERS} workers)"
    print(
        f"ours / miditok: {ratio:.1f}x files/s, {report['ratio_ours_over_miditok']['tokens_per_s']:.1f}x "
        f"tokens/s; target >= {TARGET_RATIO:g}x {verdict}{note}"
    )
    print(f"symusic parsing alone takes {report['parse_share_of_ours']:.0%} of our wall time")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
