"""Audio codes as token data: `prepare-codes`, the priors' training tasks, the codebook mask.

`prepare_codes` encodes every file of a `prepare-audio` folder with a trained codec, at every
level, into the on-disk format of MIDI `prepare` (data/prepare.py), one folder per level:

    CODES_DIR/level0/ level1/ ...
      train.npy valid.npy test.npy     uint16 ids, files back to back, each BOS codes EOS
      train.index.npy ...              int64 [files, 2]: offset and length
      meta.json                        "kind": "codes", the codec and level, every piece

so `train`, `evaluate --ckpt` and the window sampler read them as they read MIDI tokens. Ids:
0, 1, 2 are PAD, BOS, EOS as for MIDI; a frame of K codebooks is K consecutive ids, codebook k
of code c being 3 + k x cardinality + c (Codec.to_ids shifted past the special ids), so a
level's vocabulary is 3 + K x cardinality.

A lower level's folder names the level above (meta "codec.upper"): an upsampler
(model.arch=upsampler, audio/upsampler.py) trains on windows of the lower level, each with the
upper codes aligned to it (`UpsamplerWindows`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from perceiver_music.audio.upsampler import FIRST_CODE, Upsampler, conditioner_margin
from perceiver_music.config import CodesConfig, Config, ConfigError
from perceiver_music.data.prepare import SPLITS, progress_files
from perceiver_music.data.windows import TokenData, Window, WindowDataset
from perceiver_music.files import atomic_save_npy, atomic_write_text
from perceiver_music.model import build_model
from perceiver_music.tokens.performance import BOS, EOS, PAD
from perceiver_music.train import TokenTask, collate

FORMAT_VERSION = 1


def level_dir(codes_dir: str | os.PathLike, level: int) -> Path:
    return Path(codes_dir) / f"level{level}"


def ids_of(codes: np.ndarray, cardinality: int) -> np.ndarray:
    """Codes [K, T] -> token ids [T x K] (frame-major, codebook k offset by k x cardinality)."""
    offsets = np.arange(codes.shape[0], dtype=np.int64)[:, None] * cardinality
    return (codes.astype(np.int64) + offsets).T.reshape(-1) + FIRST_CODE


def codes_of(ids: np.ndarray, codebooks: int, cardinality: int) -> np.ndarray:
    """Token ids of whole frames [T x K] (no BOS/EOS) -> codes [K, T]."""
    ids = np.asarray(ids, np.int64) - FIRST_CODE
    offsets = np.arange(codebooks, dtype=np.int64)[:, None] * cardinality
    return ids.reshape(-1, codebooks).T - offsets


def codes_meta(data_dir: str | os.PathLike) -> dict | None:
    """The meta.json of a `prepare-codes` level folder, or None for any other folder."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("kind") == "codes" else None


# ----------------------------------------------------------------------------- prepare-codes


@dataclass
class CodesPrepareResult:
    out_dir: Path
    levels: list[int]
    files: dict[str, int]
    frames: dict[int, dict[str, int]]  # level -> split -> frames
    seconds: float
    elapsed: float
    notes: list[str] = field(default_factory=list)
    reused: int = 0  # files whose codes a previous run had written (same audio, same codec)

    def summary(self) -> str:
        total = sum(self.files.values())
        done = f"Encoded {total - self.reused} files" + (f" (reused {self.reused})" if self.reused else "")
        lines = [
            f"{done} ({self.seconds / 3600:.2f} h) at levels "
            f"{', '.join(map(str, self.levels))} into {self.out_dir} in {self.elapsed:.1f} s:",
            f"  {'split':<6} {'files':>7} "
            + " ".join(f"{'level ' + str(lv) + ' frames':>16}" for lv in self.levels),
        ]
        for s in SPLITS:
            frames = " ".join(f"{self.frames[lv][s]:>16,}" for lv in self.levels)
            lines.append(f"  {s:<6} {self.files[s]:>7} {frames}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def prepare_codes(
    data_dir: str | os.PathLike,
    run,
    out_dir: str | os.PathLike,
    levels: list[int] | None = None,
    codec_path: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> CodesPrepareResult:
    """Encode every file of a `prepare-audio` folder with `run` (an audio.codec.CodecRun) into
    one token-data folder per level (all levels unless `levels`)."""
    from perceiver_music.audio.data import AudioData

    t0 = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out_dir)
    if codes_meta(data_dir) is not None:
        raise ConfigError(
            f"{data_dir}: codes already (made by `prepare-codes`); give it the `prepare-audio` folder"
        )
    try:
        splits = {s: AudioData(data_dir, s) for s in SPLITS}
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{data_dir}: no meta.json; prepare-codes reads a folder made by `prepare-audio`"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{e}; prepare-codes reads a folder made by `prepare-audio`") from None
    meta = splits["train"].meta
    if meta["sample_rate"] != run.cfg.sample_rate:
        raise ConfigError(
            f"{data_dir}: audio at {meta['sample_rate']} Hz, but the codec works at {run.cfg.sample_rate} Hz "
            f"(prepare-audio --sample-rate {run.cfg.sample_rate})"
        )
    levels = list(range(run.levels)) if levels is None else levels
    for lv in levels:
        if not 0 <= lv < run.levels:
            raise ConfigError(f"--level {lv}: the codec has levels 0..{run.levels - 1}")
    if progress is None:
        progress = sys.stderr.isatty()

    K, C = run.cfg.codebooks, run.cfg.l_bins
    previous = {lv: _previous_codes(level_dir(out, lv), run.digest, lv) for lv in levels}
    reused = 0
    chunks: dict[int, dict[str, list[np.ndarray]]] = {lv: {s: [] for s in SPLITS} for lv in levels}
    offsets = {lv: dict.fromkeys(SPLITS, 0) for lv in levels}
    pieces: dict[int, list[dict]] = {lv: [] for lv in levels}
    work = [(s, i, path) for s in SPLITS for i, path in enumerate(splits[s].paths)]
    info = {p["path"]: p for p in meta["pieces"]}
    for s, i, path in progress_files(work, len(work), progress, "prepare-codes"):
        stamp = info[path].get("stamp")
        old = [previous[lv].get(path) for lv in levels]
        if stamp is not None and all(o is not None and o[0] == stamp for o in old):
            per_level = [o[1] for o in old]  # the same audio, coded by the same weights
            reused += 1
        else:
            codes = run.encode_array(splits[s].clip(i))
            per_level = [
                np.concatenate([[BOS], ids_of(codes[lv], C), [EOS]]).astype(np.uint16) for lv in levels
            ]
        for lv, ids in zip(levels, per_level):
            pieces[lv].append(
                {
                    "path": path,
                    "split": s,
                    "offset": offsets[lv][s],
                    "length": len(ids),
                    "frames": (len(ids) - 2) // K,
                    "seconds": info[path]["seconds"],
                    "label": info[path].get("label"),
                    "stamp": stamp,  # the audio's, from prepare-audio: a re-run reuses unchanged files
                }
            )
            chunks[lv][s].append(ids)
            offsets[lv][s] += len(ids)

    for lv in levels:
        target = level_dir(out, lv)
        target.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            tokens = np.concatenate(chunks[lv][s]) if chunks[lv][s] else np.zeros(0, np.uint16)
            index = np.array([[p["offset"], p["length"]] for p in pieces[lv] if p["split"] == s], np.int64)
            atomic_save_npy(target / f"{s}.npy", tokens)
            atomic_save_npy(target / f"{s}.index.npy", index.reshape(-1, 2))
        upper = lv + 1 < run.levels
        hop = run.model.hops[lv]
        level_meta = {
            "format_version": FORMAT_VERSION,
            "kind": "codes",
            "source": str(data_dir.resolve()),
            "tokenizer": {},  # no MIDI tokenizer: the codec below says what the ids are
            "vocab_size": FIRST_CODE + K * C,
            "special_tokens": {"PAD": PAD, "BOS": BOS, "EOS": EOS},
            "codec": {
                "run": None if codec_path is None else str(Path(codec_path).resolve()),
                "weights": run.digest,
                "layout": asdict(run.layout),
                "level": lv,
                "levels": run.levels,
                "codebooks": K,
                "cardinality": C,
                "first_code": FIRST_CODE,
                "hop": hop,
                "frame_rate": run.cfg.sample_rate / hop,
                # The level above (for an upsampler): its folder and the strides between them.
                "upper": f"level{lv + 1}" if upper else None,
                "upper_strides": strides_between(run.cfg, lv) if upper else [],
            },
            "split_method": meta.get("split_method"),
            "counts": {
                s: {
                    "pieces": sum(p["split"] == s for p in pieces[lv]),
                    "tokens": offsets[lv][s],
                    "seconds": round(sum(p["seconds"] for p in pieces[lv] if p["split"] == s), 1),
                }
                for s in SPLITS
            },
            "pieces": pieces[lv],
            "skipped": [],
        }
        atomic_write_text(target / "meta.json", json.dumps(level_meta, indent=1))
    notes = [] if levels == list(range(run.levels)) else [f"only level(s) {levels} written"]
    return CodesPrepareResult(
        out,
        levels,
        {s: len(splits[s]) for s in SPLITS},
        {lv: {s: sum(p["frames"] for p in pieces[lv] if p["split"] == s) for s in SPLITS} for lv in levels},
        float(sum(p["seconds"] for p in meta["pieces"])),
        time.perf_counter() - t0,
        notes,
        reused,
    )


def _previous_codes(folder: Path, weights: str, level: int) -> dict[str, tuple[list, np.ndarray]]:
    """path -> (audio stamp, ids) of a level folder an earlier run wrote with the same codec
    weights; empty when there is none, it is another codec's, or it cannot be read."""
    meta = codes_meta(folder)
    if meta is None or meta["codec"].get("weights") != weights or meta["codec"].get("level") != level:
        return {}
    out = {}
    try:
        arrays = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in SPLITS}
        for p in meta["pieces"]:
            if p.get("stamp") is not None:
                ids = np.array(arrays[p["split"]][p["offset"] : p["offset"] + p["length"]])
                if len(ids) == p["length"] and len(ids) >= 2 and ids[0] == BOS and ids[-1] == EOS:
                    out[p["path"]] = (p["stamp"], ids)
    except (OSError, ValueError, KeyError):
        return {}  # damaged: everything is encoded again
    return out


def strides_between(codec_cfg, level: int) -> list[int]:
    """Strides from level+1's frames down to level's: one transposed conv each."""
    return [codec_cfg.strides_t[level + 1]] * codec_cfg.downs_t[level + 1]


def codes_config(meta: dict, current: CodesConfig) -> CodesConfig:
    """The layout of a codes folder as a `codes` section (the conditioner settings kept)."""
    c = meta["codec"]
    upper = c["upper"] is not None
    return replace(
        current,
        codec=c["weights"],
        level=c["level"],
        codebooks=c["codebooks"],
        cardinality=c["cardinality"],
        frame_rate=float(c["frame_rate"]),
        upper_cardinality=c["cardinality"] if upper else 0,
        upper_strides=list(c["upper_strides"]) if upper else [],
    )


def frame_steps(codebooks: int, cardinality: int, vocab_size: int) -> np.ndarray:
    """[vocab_size] frames each id moves time forward: 1 for a code of the last codebook (a
    frame's K codes are consecutive, so time moves once the frame is complete), 0 for the rest.
    The codes' clock for timing conditioning, as TIME_SHIFTs are MIDI's."""
    steps = np.zeros(vocab_size, np.int64)
    last = FIRST_CODE + (codebooks - 1) * cardinality
    steps[last : last + cardinality] = 1
    return steps


# ----------------------------------------------------------------------------- sampling


class CodebookMask:
    """Residual-VQ mode: the token at position p may only be a code of codebook
    (p - frame0_position) % K, so PAD, BOS, EOS and other codebooks' ids get probability zero.
    It depends on the position alone, so the cached and uncached samplers see the same mask;
    it has KeyboardMask's interface (sample.generate's `logits_mask`)."""

    def __init__(self, codes: CodesConfig, vocab_size: int, next_position: int, frame0_position: int = 1):
        K, C = codes.codebooks, codes.cardinality
        self.allowed = torch.zeros(K, vocab_size, dtype=torch.bool)
        for k in range(K):
            self.allowed[k, FIRST_CODE + k * C : FIRST_CODE + (k + 1) * C] = True
        self.K, self.position, self.frame0 = K, next_position, frame0_position

    def codebook(self) -> int:
        return (self.position - self.frame0) % self.K

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed[self.codebook()].to(logits.device)
        return logits.masked_fill_(~allowed, float("-inf"))

    def update(self, token: torch.Tensor) -> None:
        self.position += 1


# ----------------------------------------------------------------------------- training


def check_code_data(cfg: Config, data_dir, meta: dict) -> None:
    """Refuse settings that cannot train on codes; record the data's layout in `cfg.codes`
    (it lands in the run's config.json: what its ids are)."""
    if cfg.data.transpose or cfg.data.stretch:
        raise ConfigError(
            f"{data_dir}: audio codes cannot be transposed or time-stretched: set data.transpose=0 "
            "data.stretch=0 (as the prior_tiny and upsampler_tiny configs do)"
        )
    if cfg.model.arch == "upsampler" and meta["codec"]["upper"] is None:
        raise ConfigError(
            f"{data_dir}: the top level of its codec (level {meta['codec']['level']}); an upsampler "
            "trains on a level below it, the top level takes a prior (model.arch=perceiver_ar)"
        )
    if cfg.model.vocab_size != meta["vocab_size"]:
        raise ConfigError(
            f"{data_dir}: codes of {meta['codec']['codebooks']} codebook(s) of {meta['codec']['cardinality']}, "
            f"a vocabulary of {meta['vocab_size']} ids (3 special + codes), but model.vocab_size is "
            f"{cfg.model.vocab_size}: set model.vocab_size={meta['vocab_size']}"
        )
    cfg.codes = codes_config(meta, cfg.codes)


def make_code_task(cfg: Config, data_dir):
    """train's task for `prepare-codes` data (None: not code data)."""
    meta = codes_meta(data_dir)
    if meta is None:
        if cfg.model.arch == "upsampler":
            raise ConfigError(f"{data_dir}: model.arch=upsampler trains on a level folder of `prepare-codes`")
        return None
    check_code_data(cfg, data_dir, meta)
    # Jukebox's top prior: timing (total length, offset and fraction, read from the codes' clock,
    # frame_steps) and a label (the recording's composer, where prepare-audio had one). A style
    # reference and the keyboard are MIDI's; an upsampler's condition is the level above.
    prior = cfg.model.arch != "upsampler"
    other = [kind for kind in cfg.model.condition if kind not in ("timing", "label") or not prior]
    if other:
        raise ConfigError(
            f"{data_dir}: audio codes; model.condition ({', '.join(other)}) conditions MIDI models only; "
            "a prior over codes takes model.condition=[timing, label], an upsampler none"
        )
    return UpsamplerTask(cfg, data_dir, meta) if cfg.model.arch == "upsampler" else TokenTask(cfg, data_dir)


def _upper_dir(data_dir, meta: dict) -> Path:
    upper = Path(data_dir).parent / meta["codec"]["upper"]
    if codes_meta(upper) is None:
        raise ConfigError(
            f"{data_dir}: the level above ({upper}) is missing; run prepare-codes for every level "
            "(without --level)"
        )
    return upper


@dataclass
class UpsamplerWindow(Window):
    upper: np.ndarray = None  # [span] upper codes around the window (0 outside the piece)
    upper_valid: np.ndarray = None  # [span] inside the piece
    first_upper: int = 0  # upper frame of upper[0] (negative before the piece)


class UpsamplerWindows:
    """Windows of a lower level, each with the codes of the level above that condition it:
    the upper frames its input frames fall in, plus the conditioner's margin either side."""

    def __init__(self, windows: WindowDataset, upper: TokenData, codes: CodesConfig):
        lower = windows.data
        if lower.paths != upper.paths:
            raise ConfigError(f"{upper.split}: the levels' pieces differ; run prepare-codes again")
        self.windows, self.upper, self.codes = windows, upper, codes
        self.ratio = math.prod(codes.upper_strides)
        self.margin = conditioner_margin(codes)
        frames = math.ceil(windows.max_len / codes.codebooks)
        self.span = math.ceil(frames / self.ratio) + 1 + 2 * self.margin + 1

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> UpsamplerWindow:
        w = self.windows[i]
        real = np.flatnonzero(w.inputs != PAD)
        first_frame = max(0, (int(w.positions[real[0]]) - 1) // self.codes.codebooks) if len(real) else 0
        first_upper = first_frame // self.ratio - self.margin
        codes = np.asarray(self.upper.piece(w.piece)[1:-1], np.int64) - FIRST_CODE  # one codebook
        idx = first_upper + np.arange(self.span)
        valid = (idx >= 0) & (idx < len(codes))
        upper = np.where(valid, codes[np.clip(idx, 0, max(len(codes) - 1, 0))] if len(codes) else 0, 0)
        return UpsamplerWindow(**vars(w), upper=upper, upper_valid=valid, first_upper=first_upper)


def collate_upsampler(windows: list[UpsamplerWindow]) -> dict[str, torch.Tensor]:
    batch = collate(windows)
    batch["upper"] = torch.from_numpy(np.stack([w.upper for w in windows]))
    batch["upper_valid"] = torch.from_numpy(np.stack([w.upper_valid for w in windows]))
    batch["first_upper"] = torch.tensor([w.first_upper for w in windows], dtype=torch.long)
    return batch


class UpsamplerTask(TokenTask):
    """Next-code prediction of a lower level, each window with the upper level's codes (the
    batch's extra tensors reach the Upsampler's forward as keyword arguments)."""

    def __init__(self, cfg: Config, data_dir, meta: dict):
        super().__init__(cfg, data_dir)
        upper = _upper_dir(data_dir, meta)
        train_upper = TokenData(upper, "train")
        valid_upper = train_upper if self.no_valid else TokenData(upper, "valid")
        self.train_windows = UpsamplerWindows(self.train_windows, train_upper, cfg.codes)
        self.valid_windows = UpsamplerWindows(self.valid_windows, valid_upper, cfg.codes)
        self.collate = collate_upsampler

    def build(self, cfg: Config, fresh: bool):
        return build_model(cfg.model, cfg.codes)


def piece_conditioning(model, config: Config, data_dir, split: str):
    """For `evaluate --ckpt`: i -> the context in which `model` scores piece i of the split (an
    upsampler conditioned on the whole upper piece; nothing for a prior). Code data of another
    codec or level than the model's is refused (ValueError)."""
    import contextlib

    meta = codes_meta(data_dir)
    if meta is None:
        raise ValueError(
            f"{data_dir}: not audio codes (from `prepare-codes`), but {config.model.arch} models them"
        )
    c = meta["codec"]
    if c["weights"] != config.codes.codec or c["level"] != config.codes.level:
        raise ValueError(
            f"{data_dir}: codes of level {c['level']} of codec {c['weights']}, but the model was trained on "
            f"level {config.codes.level} of codec {config.codes.codec or '(none: MIDI)'}"
        )
    if not isinstance(model, Upsampler):
        return lambda i: contextlib.nullcontext()
    upper = TokenData(_upper_dir(data_dir, meta), split)
    device = next(model.parameters()).device

    @contextlib.contextmanager
    def context(i: int):
        codes = torch.as_tensor(np.asarray(upper.piece(i)[1:-1], np.int64) - FIRST_CODE, device=device)
        with torch.no_grad(), model.conditioned(codes[None]):
            yield

    return context
