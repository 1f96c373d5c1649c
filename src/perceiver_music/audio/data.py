"""Audio data: reading and resampling files, `prepare-audio`, and training crops.

Output layout of `prepare_audio` (the MIDI layout of data/prepare.py, samples for tokens):

    DATA_DIR/
      train.npy  valid.npy  test.npy        int16 mono PCM at meta["sample_rate"], files back to back
      train.index.npy ...                   int64 [files, 2]: (offset, length) in samples
      meta.json                             "kind": "audio", sample rate, counts, every file, every skip
      skipped.csv                           path, reason: each file that was not used

Files are read through libsndfile (soundfile: WAV, FLAC, OGG, MP3), downmixed to mono and
resampled with soxr. Re-running reuses every file whose size and modification time are
unchanged. This module does not import torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perceiver_music.config import AudioPrepareConfig, PrepareConfig
from perceiver_music.data.prepare import (
    SPLITS,
    csv_row,
    file_stamp,
    hash_split,
    progress_files,
    skipped_lines,
)
from perceiver_music.files import atomic_save_npy, atomic_write_text

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3")
FORMAT_VERSION = 1
BLOCK_SECONDS = 30.0  # files are read and resampled in blocks of this length


class AudioError(ValueError):
    """An audio file that cannot be used, with the file and the reason."""

    def __init__(self, source: str | os.PathLike, reason: str):
        self.source, self.reason = str(source), reason
        super().__init__(f"{source}: {reason}")


def find_audio(root: Path) -> list[Path]:
    """All audio files under root (recursive), sorted by relative path."""
    files = [p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def audio_info(path: str | os.PathLike):
    """soundfile's header of a file, or AudioError (empty, not audio)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "no such file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(path, f"not audio that libsndfile can read ({_short(e)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "no audio frames")
    if info.format in ("WAV", "WAVEX"):
        missing = _wav_missing_bytes(path)
        if missing:
            raise AudioError(
                path, f"truncated: the WAV header promises {missing} more bytes of audio than the file holds"
            )
    return info


def _wav_missing_bytes(path: Path) -> int:
    """Bytes of the `data` chunk that a WAV file's header declares but the file lacks
    (libsndfile quietly reads a cut WAV as a shorter one)."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) not in (b"RIFF", b"RF64") or len(f.read(8)) < 8:
            return 0
        while True:
            head = f.read(8)
            if len(head) < 8:
                return 0
            name, length = head[:4], struct.unpack("<I", head[4:])[0]
            if name == b"data":
                if length == 0xFFFFFFFF:  # RF64 / streamed: the size lives elsewhere
                    return 0
                return max(0, f.tell() + length - size)
            f.seek(length + (length & 1), 1)


def stream_audio(
    path: str | os.PathLike, sample_rate: int, block_seconds: float = BLOCK_SECONDS
) -> Iterator[np.ndarray]:
    """Mono float32 blocks of a file at `sample_rate`, read and resampled incrementally, so a
    long file never sits in memory whole. Raises AudioError for unreadable or cut files."""
    import soundfile as sf
    import soxr

    path = Path(path)
    info = audio_info(path)
    block = max(1, int(block_seconds * info.samplerate))
    resampler = (
        None
        if info.samplerate == sample_rate
        else soxr.ResampleStream(info.samplerate, sample_rate, 1, "float32")
    )
    read = 0
    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                data = f.read(block, dtype="float32", always_2d=True)
                read += len(data)
                last = len(data) < block
                mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
                out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
                if len(out):
                    yield np.ascontiguousarray(out, np.float32)
                if last:
                    break
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(path, f"unreadable after {read} of {info.frames} frames ({_short(e)})") from None
    # libsndfile reads what a cut file holds and stops: the header says how much there was to be.
    if read < info.frames:
        raise AudioError(path, f"truncated: the header promises {info.frames} frames, the file holds {read}")


def read_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """A whole file as mono float32 at `sample_rate`."""
    blocks = list(stream_audio(path, sample_rate))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> Path:
    """Write mono float audio (clipped to [-1, 1]); the format follows the suffix (wav, flac)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def _short(e: Exception) -> str:
    return str(e).split("\n")[0].strip()


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


# ----------------------------------------------------------------------------- prepare-audio


@dataclass
class AudioPrepareResult:
    out_dir: Path
    files: dict[str, int]  # split -> files
    seconds: dict[str, float]  # split -> seconds of audio
    sample_rate: int
    skipped: list[tuple[str, str]]  # (path, reason)
    split_method: str
    reused: int
    read: int
    elapsed: float
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        lines = [
            f"Prepared {self.usable} audio files at {self.sample_rate} Hz into {self.out_dir} "
            f"(splits by {self.split_method}):",
            f"  {'split':<6} {'files':>7} {'hours':>8}",
        ]
        for s in SPLITS:
            lines.append(f"  {s:<6} {self.files[s]:>7} {self.seconds[s] / 3600:>8.2f}")
        lines.append(
            f"  read {self.read} files, reused {self.reused} from the previous run, in {self.elapsed:.1f} s"
        )
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(skipped_lines(self.skipped))
        return "\n".join(lines)


def _load_one(path: Path, rel: str, cfg: AudioPrepareConfig) -> np.ndarray:
    """A file as int16 PCM, or AudioError with the reason it is skipped."""
    info = audio_info(path)
    if info.duration > cfg.max_seconds:
        raise AudioError(
            rel, f"absurdly long: {info.duration / 3600:.1f} h (audio.max_seconds={cfg.max_seconds:g})"
        )
    audio = read_audio(path, cfg.sample_rate)
    seconds = len(audio) / cfg.sample_rate
    if seconds < cfg.min_seconds:
        raise AudioError(rel, f"too short: {seconds:.2f} s (audio.min_seconds={cfg.min_seconds:g})")
    peak = float(np.abs(audio).max())
    if peak <= 10 ** (cfg.silence_db / 20):
        level = 20 * np.log10(max(peak, 1e-10))
        raise AudioError(rel, f"silent: peak {level:.0f} dBFS (audio.silence_db={cfg.silence_db:g})")
    return to_pcm16(audio)


def splits_from_midi(midi_data: Path) -> dict[str, tuple[str, str | None]]:
    """A MIDI data folder's (split, label) of each piece, by path without suffix (a rendering
    of `a/b.mid` is `a/b.wav`), so audio rendered from MIDI keeps the MIDI's test pieces in
    test, and its composer."""
    meta_path = midi_data / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{midi_data}: no meta.json (--splits-from wants a folder made by `prepare`)")
    meta = json.loads(meta_path.read_text())
    return {
        str(Path(p["path"]).with_suffix("")): (p["split"], p.get("label")) for p in meta.get("pieces", [])
    }


def _previous_run(out: Path, sample_rate: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return {}, {}
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "audio" or meta.get("format_version") != FORMAT_VERSION:
            return {}, {}
        if meta.get("sample_rate") != sample_rate:
            return {}, {}
        arrays = {s: np.load(out / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    except (OSError, ValueError, KeyError):
        return {}, {}
    records = {p["path"]: p for p in meta.get("pieces", [])}
    records.update({s["path"]: s for s in meta.get("skipped", []) if "stamp" in s})
    return records, arrays


def prepare_audio(
    audio_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: AudioPrepareConfig | None = None,
    split: PrepareConfig | None = None,
    splits_from: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> AudioPrepareResult:
    """Every audio file under `audio_dir` as mono int16 PCM per split in `out_dir`.

    Bad files are skipped with their reason, never fatal. Splits: those of `splits_from` (a
    MIDI data folder) where a file matches one of its pieces, else a stable hash of the path.
    """
    t0 = time.perf_counter()
    cfg, split = cfg or AudioPrepareConfig(), split or PrepareConfig()
    root, out = Path(audio_dir), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    listed = splits_from_midi(Path(splits_from)) if splits_from is not None else {}
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()

    files = find_audio(root)
    rels = [f.relative_to(root).as_posix() for f in files]
    notes: list[str] = []
    match = {rel: listed.get(str(Path(rel).with_suffix(""))) for rel in rels}
    split_of = {rel: m[0] if m else hash_split(rel, split) for rel, m in match.items()}
    if splits_from is not None:
        method = f"the MIDI data in {splits_from}"
        unmatched = sum(m is None for m in match.values())
        if unmatched:
            notes.append(f"{unmatched} files match no MIDI piece there and were split by hash of their path")
    else:
        method = "hash of path"
    previous, old_arrays = _previous_run(out, cfg.sample_rate)

    stamps = {rel: file_stamp(f) for f, rel in zip(files, rels)}
    results: dict[str, np.ndarray | str] = {}  # rel -> PCM, or the reason it was skipped
    reused = 0
    for f, rel in progress_files(list(zip(files, rels)), len(files), progress, "prepare-audio"):
        old = previous.get(rel)
        if old is not None and old.get("stamp") == stamps[rel]:
            reused += 1
            if "reason" in old:
                results[rel] = old["reason"]
            else:
                arr = old_arrays[old["split"]]
                results[rel] = np.array(arr[old["offset"] : old["offset"] + old["length"]])
            continue
        try:
            results[rel] = _load_one(f, rel, cfg)
        except AudioError as e:
            results[rel] = e.reason
        except Exception as e:  # never lose the run to one file; name what happened
            results[rel] = f"unexpected error: {type(e).__name__}: {e}"

    pieces, skipped = [], []
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    offsets = dict.fromkeys(SPLITS, 0)
    for rel in rels:
        pcm = results[rel]
        if isinstance(pcm, str):
            skipped.append({"path": rel, "reason": pcm, "stamp": stamps[rel]})
            continue
        s = split_of[rel]
        seconds = len(pcm) / cfg.sample_rate
        pieces.append(
            {
                "path": rel,
                "split": s,
                "offset": offsets[s],
                "length": len(pcm),
                "seconds": round(seconds, 3),
                "label": match[rel][1] if match[rel] else None,  # the MIDI piece's (composer)
                "stamp": stamps[rel],
            }
        )
        chunks[s].append(pcm)
        offsets[s] += len(pcm)

    counts = {s: sum(p["split"] == s for p in pieces) for s in SPLITS}
    seconds = {s: float(sum(p["seconds"] for p in pieces if p["split"] == s)) for s in SPLITS}
    del old_arrays  # release the memory maps before the files they map are replaced
    for s in SPLITS:
        pcm = np.concatenate(chunks[s]) if chunks[s] else np.zeros(0, np.int16)
        index = np.array([[p["offset"], p["length"]] for p in pieces if p["split"] == s], np.int64)
        atomic_save_npy(out / f"{s}.npy", pcm)
        atomic_save_npy(out / f"{s}.index.npy", index.reshape(-1, 2))
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "audio",
        "source": str(root.resolve()),
        "sample_rate": cfg.sample_rate,
        "audio": {
            "min_seconds": cfg.min_seconds,
            "max_seconds": cfg.max_seconds,
            "silence_db": cfg.silence_db,
        },
        "split_method": method,
        "counts": {
            s: {"files": counts[s], "samples": offsets[s], "seconds": round(seconds[s], 1)} for s in SPLITS
        },
        "pieces": pieces,
        "skipped": skipped,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    lines = ["path,reason"] + [csv_row(s["path"], s["reason"]) for s in skipped]
    atomic_write_text(out / "skipped.csv", "\n".join(lines) + "\n")
    return AudioPrepareResult(
        out_dir=out,
        files=counts,
        seconds=seconds,
        sample_rate=cfg.sample_rate,
        skipped=[(s["path"], s["reason"]) for s in skipped],
        split_method=method,
        reused=reused,
        read=len(files) - reused,
        elapsed=time.perf_counter() - t0,
        notes=notes,
    )


# ----------------------------------------------------------------------------- training crops


class AudioData:
    """One split of a prepared audio folder, memory-mapped int16."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{data_dir}: no meta.json; run `perceiver-music prepare-audio` first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("kind") != "audio":
            raise ValueError(
                f"{data_dir}: MIDI token data, not audio (made by `prepare`, not `prepare-audio`)"
            )
        self.sample_rate = int(self.meta["sample_rate"])
        self.pcm = np.load(data_dir / f"{split}.npy", mmap_mode="r")
        self.index = np.load(data_dir / f"{split}.index.npy")
        self.paths = [p["path"] for p in self.meta["pieces"] if p["split"] == split]

    def __len__(self) -> int:
        return len(self.index)

    def clip(self, i: int, start: int = 0, length: int | None = None) -> np.ndarray:
        """float32 samples of file i from `start`, `length` of them (to its end when None)."""
        offset, n = (int(v) for v in self.index[i])
        end = n if length is None else min(n, start + length)
        return self.pcm[offset + start : offset + end].astype(np.float32) / 32767.0


class AudioWindows:
    """Crops of `length` samples; `ds[i]` is float32 [length] (zero-padded past a file's end).

    train=True: crop i is random, from an RNG seeded by (seed, i), files drawn in proportion to
    their length, so the stream is the same on every run and resume is exact.
    train=False: consecutive crops tiling every file, in a fixed order.
    """

    def __init__(self, data: AudioData, length: int, train: bool, seed: int = 0):
        self.data, self.length, self.train, self.seed = data, length, train, seed
        lengths = data.index[:, 1] if len(data) else np.zeros(0, np.int64)
        self._cum = np.cumsum(np.maximum(lengths - length, 0) + 1)
        self._tiles = np.array(
            [
                (i, s)
                for i, n in enumerate(lengths.tolist())
                for s in range(0, max(n - length, 0) + 1, length)
            ],
            np.int64,
        ).reshape(-1, 2)

    def __len__(self) -> int:
        if not self.train:
            return len(self._tiles)
        return int(self._cum[-1]) if len(self._cum) else 0

    def __getitem__(self, i: int) -> np.ndarray:
        if self.train:
            if len(self._cum) == 0:
                raise IndexError("no audio in this split")
            rng = np.random.default_rng([self.seed, int(i)])
            k = int(rng.integers(self._cum[-1]))
            f = int(np.searchsorted(self._cum, k, side="right"))
            start = k - (int(self._cum[f - 1]) if f else 0)
        else:
            f, start = (int(v) for v in self._tiles[i])
        out = np.zeros(self.length, np.float32)
        clip = self.data.clip(f, start, self.length)
        out[: len(clip)] = clip
        return out
