"""Folder of MIDI -> token arrays per split, a piece index, meta.json and a skip report.

Output layout (DESIGN.md section 3):

    DATA_DIR/
      train.npy  valid.npy  test.npy        uint16 tokens, pieces back to back (BOS ... EOS)
      train.index.npy ...                   int64 [pieces, 2]: (offset, length) into the tokens
      meta.json                             tokenizer settings, vocab, counts, every piece, every skip
      skipped.csv                           path, reason: each file that was not used

Re-running on the same folder reuses the tokens of every file whose size and modification
time are unchanged (and whose tokenizer settings match), so only new or changed files are read.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perceiver_music.config import PrepareConfig, TokenizerConfig
from perceiver_music.files import atomic_save_npy, atomic_write_text
from perceiver_music.tokens.performance import BOS, EOS, MidiError, PerformanceTokenizer

SPLITS = ("train", "valid", "test")
MIDI_SUFFIXES = (".mid", ".midi")
FORMAT_VERSION = 1


class PrepareError(ValueError):
    """Input that `prepare` cannot make data from: not a folder, no MIDI (exit status 2), or
    MIDI files of which none could be used (exit status 1)."""

    def __init__(self, message: str, exit_status: int = 2):
        super().__init__(message)
        self.exit_status = exit_status


@dataclass
class PrepareResult:
    out_dir: Path
    pieces: dict[str, int]  # split -> pieces
    tokens: dict[str, int]  # split -> tokens
    seconds: dict[str, float]  # split -> hours of music, in seconds
    skipped: list[tuple[str, str]]  # (path, reason)
    split_method: str
    reused: int  # files whose tokens came from the previous run
    encoded: int  # files read this run
    elapsed: float
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. an empty valid or test split
    labels: dict[str, int] = field(default_factory=dict)  # label -> pieces
    label_source: str | None = None

    @property
    def usable(self) -> int:
        return sum(self.pieces.values())

    def summary(self) -> str:
        lines = [f"Prepared {self.usable} pieces into {self.out_dir} (splits by {self.split_method}):"]
        lines.append(f"  {'split':<6} {'pieces':>7} {'tokens':>12} {'hours':>8}")
        for s in SPLITS:
            lines.append(f"  {s:<6} {self.pieces[s]:>7} {self.tokens[s]:>12,} {self.seconds[s] / 3600:>8.2f}")
        lines.append(
            f"  read {self.encoded} files, reused {self.reused} from the previous run, "
            f"in {self.elapsed:.1f} s"
        )
        if self.labels:
            shown = ", ".join(f"{name} {n}" for name, n in sorted(self.labels.items(), key=lambda x: -x[1]))
            lines.append(f"  labels from {self.label_source}: {shown}")
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(skipped_lines(self.skipped))
        return "\n".join(lines)


def skipped_lines(skipped: list[tuple[str, str]], show: int = 20) -> list[str]:
    """The report's list of skipped files (the first `show`) with their reasons."""
    if not skipped:
        return []
    lines = [f"  skipped {len(skipped)} files (reasons in skipped.csv):"]
    lines.extend(f"    {path}: {reason}" for path, reason in skipped[:show])
    if len(skipped) > show:
        lines.append(f"    ... and {len(skipped) - show} more")
    return lines


def find_midi(root: Path) -> list[Path]:
    """All MIDI files under root (recursive), sorted by relative path."""
    files = [p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# ----------------------------------------------------------------------------- splits


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) from a string (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def hash_split(key: str, cfg: PrepareConfig) -> str:
    """A stable split for `key` (a path or piece folder) in the configured proportions."""
    u = _hash_unit(key)
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.valid_fraction:
        return "valid"
    return "train"


def _maestro_csv(root: Path) -> Path | None:
    found = sorted(root.glob("maestro-v*.csv"))
    return found[-1] if found else None


def _asap_metadata(root: Path) -> Path | None:
    path = root / "metadata.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return path if {"folder", "midi_performance"} <= set(header) else None


def assign_splits(
    root: Path, rel_paths: list[str], cfg: PrepareConfig
) -> tuple[dict[str, str], str, list[str]]:
    """rel path -> split, the method used, and notes for the user.

    MAESTRO: its CSV's split column. ASAP: by piece folder (its metadata `folder` column), so a
    composition is never in two splits. Otherwise: a stable hash of the relative path.
    """
    method = cfg.split
    notes: list[str] = []
    maestro, asap = _maestro_csv(root), _asap_metadata(root)
    if method == "auto":
        method = "maestro" if maestro else "asap" if asap else "hash"
    if method == "maestro":
        if not maestro:
            raise FileNotFoundError(f"{root}: split 'maestro' asked for but no maestro-v*.csv there")
        names = {"train": "train", "validation": "valid", "test": "test"}
        with open(maestro, newline="") as f:
            listed = {row["midi_filename"]: names.get(row["split"], "train") for row in csv.DictReader(f)}
        out = {}
        for rel in rel_paths:
            out[rel] = listed.get(rel) or hash_split(rel, cfg)
        unlisted = sum(rel not in listed for rel in rel_paths)
        if unlisted:
            notes.append(f"{unlisted} files not in {maestro.name} were split by hash of their path")
        return out, f"MAESTRO CSV ({maestro.name})", notes
    if method == "asap":
        if not asap:
            raise FileNotFoundError(f"{root}: split 'asap' asked for but no ASAP metadata.csv there")
        with open(asap, newline="") as f:
            folder_of = {row["midi_performance"]: row["folder"] for row in csv.DictReader(f)}
        unlisted = sum(rel not in folder_of for rel in rel_paths)
        if unlisted:
            notes.append(f"{unlisted} files not in metadata.csv were split by their own folder")
        out = {rel: hash_split(folder_of.get(rel, str(Path(rel).parent)), cfg) for rel in rel_paths}
        return out, "ASAP piece folder", notes
    return {rel: hash_split(rel, cfg) for rel in rel_paths}, "hash of path", notes


def assign_labels(
    root: Path, rel_paths: list[str], labels_csv: str | os.PathLike | None = None
) -> tuple[dict[str, str | None], str | None, list[str]]:
    """rel path -> label (the composer, or a user's label; None: unlabelled), where they came
    from, and notes for the user.

    A user CSV (`path,label`, paths relative to the folder) wins; else ASAP's metadata.csv
    (`composer`), else a MAESTRO CSV (`canonical_composer`); else every piece is unlabelled.
    """
    notes: list[str] = []
    if labels_csv is not None:
        listed, source = _read_labels_csv(Path(labels_csv)), str(labels_csv)
    elif (asap := _asap_metadata(root)) is not None and "composer" in _csv_header(asap):
        with open(asap, newline="") as f:
            listed = {row["midi_performance"]: row["composer"] for row in csv.DictReader(f)}
        source = "ASAP metadata.csv (composer)"
    elif (maestro := _maestro_csv(root)) is not None and "canonical_composer" in _csv_header(maestro):
        with open(maestro, newline="") as f:
            listed = {row["midi_filename"]: row["canonical_composer"] for row in csv.DictReader(f)}
        source = f"{maestro.name} (canonical_composer)"
    else:
        return dict.fromkeys(rel_paths), None, notes
    out = {rel: (listed.get(rel) or "").strip() or None for rel in rel_paths}
    unlabelled = sum(v is None for v in out.values())
    if unlabelled:
        notes.append(f"{unlabelled} of {len(rel_paths)} files have no label in {source}")
    return out, source, notes


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _read_labels_csv(path: Path) -> dict[str, str]:
    """A user's `path,label` CSV; PrepareError naming the file when it cannot be used."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"path", "label"} <= set(reader.fieldnames or []):
                raise PrepareError(f"{path}: a labels CSV needs a header with columns path,label")
            return {row["path"]: row["label"] for row in reader if row.get("path")}
    except OSError as e:
        raise PrepareError(f"{path}: cannot read the labels CSV: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"{path}: not a readable CSV ({e})") from None


# ----------------------------------------------------------------------------- encoding


def _encode_one(args: tuple[str, str, dict]) -> tuple[str, np.ndarray | None, str | None, float, int]:
    """Worker: (path, rel, tokenizer settings) -> (rel, tokens or None, reason, seconds, notes)."""
    path, rel, tok_cfg = args
    tok = _worker_tokenizer(tok_cfg)
    try:
        notes = tok.midi_to_notes(path, rel)
        if len(notes) == 0:
            return rel, None, "no notes", 0.0, 0
        ids = tok.encode_notes(notes)
        seconds = float(notes.end.max()) / tok.cfg.steps_per_second
        return rel, ids, None, seconds, len(notes)
    except MidiError as e:
        return rel, None, e.reason, 0.0, 0
    except Exception as e:  # never lose the run to one file; name what happened
        return rel, None, f"unexpected error: {type(e).__name__}: {e}", 0.0, 0


_TOKENIZER_CACHE: dict[str, PerformanceTokenizer] = {}


def _worker_tokenizer(tok_cfg: dict) -> PerformanceTokenizer:
    key = json.dumps(tok_cfg, sort_keys=True)
    if key not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[key] = PerformanceTokenizer(TokenizerConfig(**tok_cfg))
    return _TOKENIZER_CACHE[key]


def file_stamp(path: Path) -> list[int]:
    """Size and modification time: a re-run reuses a file whose stamp is unchanged."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _previous_run(out_dir: Path, tok_cfg: dict) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Pieces and skips of an earlier run with the same tokenizer settings, by relative path."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return {}, {}
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION or meta.get("tokenizer") != tok_cfg:
            return {}, {}
        arrays = {s: np.load(out_dir / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    except (OSError, ValueError, KeyError):
        return {}, {}  # an unreadable earlier run is simply redone
    records = {p["path"]: p for p in meta.get("pieces", [])}
    records.update({s["path"]: s for s in meta.get("skipped", []) if "stamp" in s})
    return records, arrays


def progress_files(items: Iterable, total: int, show: bool, desc: str = "prepare"):
    """A progress bar over files (prepare and prepare-audio)."""
    from perceiver_music.progress import progress_bar

    return progress_bar(items, total=total, desc=desc, unit="file", enabled=show)


def prepare(
    midi_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PrepareConfig | None = None,
    tokenizer: TokenizerConfig | None = None,
    progress: bool | None = None,
    labels: str | os.PathLike | None = None,
) -> PrepareResult:
    """Tokenize every MIDI file under `midi_dir` into per-split arrays in `out_dir`.

    Each piece gets a label (see `assign_labels`; `labels` names a user's path,label CSV).

    Bad files are skipped and reported with their reason; good ones are never lost. Raises
    FileNotFoundError if `midi_dir` does not exist, and PrepareError if it is not a folder, holds
    no MIDI file or no usable one; nothing is written then.
    """
    t0 = time.perf_counter()
    cfg = cfg or PrepareConfig()
    tokenizer = tokenizer or TokenizerConfig()
    root, out = Path(midi_dir), Path(out_dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise PrepareError(
            f"{root}: not a folder; prepare reads a folder of MIDI files (`tokenize` reads single files)"
        )
    if progress is None:
        progress = sys.stderr.isatty()

    files = find_midi(root)
    if not files:
        raise PrepareError(f"{root}: no MIDI files (.mid, .midi) found; nothing written")
    rels = [f.relative_to(root).as_posix() for f in files]
    split_of, method, notes = assign_splits(root, rels, cfg)
    label_of, label_source, label_notes = assign_labels(root, rels, labels)
    notes += label_notes
    tok_cfg = dataclasses.asdict(tokenizer)
    previous, old_arrays = _previous_run(out, tok_cfg)

    results: dict[str, tuple[np.ndarray | None, str | None, float, int]] = {}
    stamps = {rel: file_stamp(f) for f, rel in zip(files, rels)}
    todo = []
    for f, rel in zip(files, rels):
        old = previous.get(rel)
        if old is not None and old.get("stamp") == stamps[rel]:
            if "reason" in old:
                results[rel] = (None, old["reason"], 0.0, 0)
            else:
                arr = old_arrays[old["split"]]
                results[rel] = (
                    np.array(arr[old["offset"] : old["offset"] + old["length"]]),
                    None,
                    old["seconds"],
                    old["notes"],
                )
        else:
            todo.append((str(f), rel, tok_cfg))
    reused = len(results)

    workers = cfg.workers or os.cpu_count() or 1
    if todo:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                chunk = max(1, min(16, len(todo) // (workers * 8)))
                done = pool.map(_encode_one, todo, chunksize=chunk)
                for rel, ids, reason, seconds, n_notes in progress_files(done, len(todo), progress):
                    results[rel] = (_with_bos_eos(ids), reason, seconds, n_notes)
        else:
            for item in progress_files(todo, len(todo), progress):
                rel, ids, reason, seconds, n_notes = _encode_one(item)
                results[rel] = (_with_bos_eos(ids), reason, seconds, n_notes)

    # Assemble in path order so the output does not depend on worker timing.
    pieces, skipped = [], []
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    offsets = dict.fromkeys(SPLITS, 0)
    for rel in rels:
        ids, reason, seconds, n_notes = results[rel]
        if ids is None:
            skipped.append({"path": rel, "reason": reason, "stamp": stamps[rel]})
            continue
        split = split_of[rel]
        pieces.append(
            {
                "path": rel,
                "split": split,
                "offset": offsets[split],
                "length": len(ids),
                "seconds": round(seconds, 3),
                "notes": n_notes,
                "label": label_of[rel],
                "stamp": stamps[rel],
            }
        )
        chunks[split].append(ids)
        offsets[split] += len(ids)

    if not pieces:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise PrepareError(
            f"{root}: no usable MIDI file: none of the {len(skipped)} could be used "
            f"({shown}{more}); nothing written",
            exit_status=1,
        )
    counts = {s: sum(p["split"] == s for p in pieces) for s in SPLITS}
    seconds = {s: float(sum(p["seconds"] for p in pieces if p["split"] == s)) for s in SPLITS}
    warnings = [
        f"the {s} split is empty ({len(pieces)} piece{'s' * (len(pieces) != 1)} in all, split by {method}); "
        f"{'validation loss' if s == 'valid' else 'test evaluation'} will have nothing to read"
        for s in ("valid", "test")
        if counts[s] == 0
    ]
    del old_arrays  # release the memory maps before the files they map are replaced
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        tokens = np.concatenate(chunks[s]) if chunks[s] else np.zeros(0, np.uint16)
        index = np.array([[p["offset"], p["length"]] for p in pieces if p["split"] == s], np.int64)
        atomic_save_npy(out / f"{s}.npy", tokens.astype(np.uint16))
        atomic_save_npy(out / f"{s}.index.npy", index.reshape(-1, 2))

    vocab = PerformanceTokenizer(tokenizer).vocab
    label_counts = {
        name: {s: sum(p["label"] == name and p["split"] == s for p in pieces) for s in SPLITS}
        for name in sorted({p["label"] for p in pieces if p["label"] is not None})
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "source": str(root.resolve()),
        "tokenizer": tok_cfg,
        "vocab_size": vocab.size,
        "special_tokens": {"PAD": 0, "BOS": BOS, "EOS": EOS},
        "split_method": method,
        "counts": {
            s: {"pieces": counts[s], "tokens": offsets[s], "seconds": round(seconds[s], 1)} for s in SPLITS
        },
        "label_source": label_source,
        "labels": label_counts,
        "pieces": pieces,
        "skipped": skipped,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    lines = ["path,reason"] + [csv_row(s["path"], s["reason"]) for s in skipped]
    atomic_write_text(out / "skipped.csv", "\n".join(lines) + "\n")

    return PrepareResult(
        out_dir=out,
        pieces=counts,
        tokens=dict(offsets),
        seconds=seconds,
        skipped=[(s["path"], s["reason"]) for s in skipped],
        split_method=method,
        reused=reused,
        encoded=len(todo),
        elapsed=time.perf_counter() - t0,
        notes=notes,
        warnings=warnings,
        labels={name: sum(c.values()) for name, c in label_counts.items()},
        label_source=label_source,
    )


def _with_bos_eos(ids: np.ndarray | None) -> np.ndarray | None:
    if ids is None:
        return None
    out = np.empty(len(ids) + 2, np.uint16)
    out[0], out[-1] = BOS, EOS
    out[1:-1] = ids
    return out


def csv_row(*fields: str) -> str:
    """One CSV line, quoted as needed (paths may hold commas)."""
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()
