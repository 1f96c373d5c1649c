"""`perceiver-music` command line: each subcommand is a thin call into a library function.

Commands that need no model (tokenize, prepare) import neither torch nor the model code, so
they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perceiver_music import __version__


def _fail(message: str, code: int = 2) -> int:
    print(f"perceiver-music: error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace):
    from perceiver_music.config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "overrides", None) or [])


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Readable events (or ids) for each MIDI file, as JSON {relative path: [events]}."""
    from perceiver_music.data.prepare import MIDI_SUFFIXES, find_midi
    from perceiver_music.tokens.performance import MidiError, PerformanceTokenizer

    cfg = _load(args)
    tok = PerformanceTokenizer(cfg.tokenizer)
    result: dict[str, list] = {}
    errors = 0
    for given in args.paths:
        root = Path(given)
        if root.is_dir():
            pairs = [(f, f.relative_to(root).as_posix()) for f in find_midi(root)]
            if not pairs:
                print(f"{root}: no .mid or .midi files found", file=sys.stderr)
        elif root.exists():
            if root.suffix.lower() not in MIDI_SUFFIXES:
                print(f"note: {root} has no .mid/.midi suffix; reading it as MIDI anyway", file=sys.stderr)
            pairs = [(root, root.name)]
        else:
            print(f"{root}: no such file or folder", file=sys.stderr)
            errors += 1
            continue
        for path, rel in pairs:
            try:
                ids = tok.encode(path)
            except MidiError as e:
                print(f"{path}: {e.reason}", file=sys.stderr)
                errors += 1
                continue
            result[rel] = ids.tolist() if args.ids else tok.vocab.names(ids)
    # One file per line: readable, and still one JSON document.
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items())
    text = "{\n" + body + "\n}" if result else "{}"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {len(result)} files' tokens to {args.out}", file=sys.stderr)
    else:
        print(text)
    if errors and not result:
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from perceiver_music.data.prepare import prepare

    cfg = _load(args)
    if args.workers is not None:
        cfg.prepare.workers = args.workers
    if args.split is not None:
        cfg.prepare.split = args.split
    try:
        result = prepare(args.midi_dir, args.out, cfg.prepare, cfg.tokenizer, progress=not args.quiet)
    except FileNotFoundError as e:
        return _fail(str(e))
    print(result.summary())
    if result.usable == 0:
        return _fail(f"no usable MIDI file found under {args.midi_dir}", 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perceiver-music",
        description="Long-context music generation with Perceiver AR and PerceiverS.",
    )
    parser.add_argument("--version", action="version", version=f"perceiver-music {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="a shipped config name (e.g. debug) or a YAML file")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="section.key=value",
            help="dotted config overrides, e.g. tokenizer.max_note_seconds=10",
        )

    p = sub.add_parser(
        "tokenize",
        help="show the performance events of MIDI files",
        description="Print each MIDI file's performance events as JSON "
        "{path relative to the folder given: [events]}.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="MIDI files or folders (recursed)")
    p.add_argument("--out", help="write the JSON here instead of standard output")
    p.add_argument("--ids", action="store_true", help="token ids instead of readable events")
    p.add_argument("--config", help="a shipped config name or a YAML file (tokenizer section)")
    p.set_defaults(func=cmd_tokenize, overrides=[])

    p = sub.add_parser(
        "prepare",
        help="turn a folder of MIDI into training data",
        description="Tokenize every MIDI file under MIDI_DIR into per-split token "
        "arrays, an index, meta.json and a report of skipped files.",
    )
    p.add_argument("midi_dir", metavar="MIDI_DIR")
    p.add_argument("--out", required=True, metavar="DATA_DIR")
    p.add_argument("--workers", type=int, help="processes (default: one per core)")
    p.add_argument(
        "--split",
        choices=["auto", "maestro", "asap", "hash"],
        help="how to split (default auto: MAESTRO CSV, ASAP metadata, else hash)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config(p)
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from perceiver_music.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # e.g. `perceiver-music tokenize ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
