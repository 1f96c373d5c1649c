"""A trained VQ-VAE run as codecs: one `AudioCodec` per level, files in and out.

Long files are encoded and decoded in chunks of `codec.chunk_seconds`, each read with a margin
of the network's receptive field either side and only its centre kept, so the codes equal
those of encoding the file whole while memory stays bounded by the chunk size. The input is
read and resampled block by block (audio.data.stream_audio), the output written the same way.

A codes file (`encode`) is a .npz: `level{l}` uint16 [K, T] for each level, and `meta` (JSON:
the codec's layout, a digest of its weights, the source and its length in samples).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from perceiver_music.audio.data import AudioError, stream_audio
from perceiver_music.audio.vqvae import VQVAE
from perceiver_music.codec import Codec, CodecError
from perceiver_music.config import CodecConfig


@dataclass(frozen=True)
class Layout:
    """What codes mean: two codecs with the same layout can read each other's codes."""

    sample_rate: int
    hops: tuple[int, ...]
    l_bins: int
    codebooks: int


def load_vqvae(run: str | os.PathLike, device: str = "cpu") -> tuple[VQVAE, CodecConfig, str]:
    """(model in eval mode, its codec config, digest of its weights) from a run or checkpoint."""
    from perceiver_music import checkpoint as ckpt_io

    ckpt = ckpt_io.resolve(run)
    config = ckpt_io.read_config(ckpt / "config.json")
    if config.model.arch != "vqvae":
        raise CodecError(run, f"a {config.model.arch} model, not an audio codec (model.arch: vqvae)")
    model = VQVAE(config.codec)
    weights = ckpt / "model.safetensors"
    ckpt_io.load_weights(model, weights, ckpt / "config.json")  # checksum, finite, shapes: one clear line
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()[:16]
    return model.to(device).eval(), config.codec, digest


class CodecRun:
    """Every level of a trained VQ-VAE; `level(l)` is that level as a Codec."""

    def __init__(self, model: VQVAE, cfg: CodecConfig, digest: str = ""):
        self.model, self.cfg, self.digest = model, cfg, digest
        self.device = next(model.parameters()).device
        top = model.hops[-1]
        self.chunk = max(1, round(cfg.chunk_seconds * cfg.sample_rate / top)) * top
        self.margin = max(lv.encode_margin for lv in model.levels)
        self.margin = math.ceil(self.margin / top) * top
        self.layout = Layout(cfg.sample_rate, tuple(model.hops), cfg.l_bins, cfg.codebooks)

    @classmethod
    def load(cls, run: str | os.PathLike, device: str = "cpu") -> CodecRun:
        return cls(*load_vqvae(run, device))

    @property
    def levels(self) -> int:
        return len(self.model.hops)

    def level(self, level: int) -> AudioCodec:
        return AudioCodec(self, level)

    # ------------------------------------------------------------------ encoding

    def _segments(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, int, int]]:
        """(samples, lead, keep): chunk after chunk of the stream with `margin` context either
        side (less at the edges), `lead` samples of context before the `keep` to encode. The
        stream is zero-padded to a whole number of top-level frames."""
        top, chunk, margin = self.model.hops[-1], self.chunk, self.margin
        buf, buf_start, start = np.zeros(0, np.float32), 0, 0
        for block in blocks:
            buf = np.concatenate([buf, block])
            while buf_start + len(buf) >= start + chunk + margin:
                lo = max(0, start - margin)
                yield buf[lo - buf_start : start + chunk + margin - buf_start], start - lo, chunk
                start += chunk
                drop = max(0, start - margin) - buf_start
                buf, buf_start = buf[drop:], buf_start + drop
        total = buf_start + len(buf)
        padded = math.ceil(total / top) * top
        buf = np.concatenate([buf, np.zeros(padded - total, np.float32)])
        while start < padded:
            lo, hi = max(0, start - margin), min(padded, start + chunk + margin)
            yield buf[lo - buf_start : hi - buf_start], start - lo, min(chunk, padded - start)
            start += chunk

    def encode_stream(self, blocks: Iterable[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Audio blocks at the codec's rate -> (codes [K, T_l] per level, samples read)."""
        parts: list[list[np.ndarray]] = [[] for _ in range(self.levels)]
        samples = 0

        def counted():
            nonlocal samples
            for b in blocks:
                samples += len(b)
                yield b

        for seg, lead, keep in self._segments(counted()):
            x = torch.from_numpy(np.ascontiguousarray(seg))[None].to(self.device)
            for level, hop in enumerate(self.model.hops):
                codes = self.model.encode(x, level)[0]  # [K, F]
                parts[level].append(codes[:, lead // hop : (lead + keep) // hop].cpu().numpy())
        codes = [np.concatenate(p, 1) if p else np.zeros((self.cfg.codebooks, 0), np.int64) for p in parts]
        return codes, samples

    def encode_array(self, audio: np.ndarray) -> list[np.ndarray]:
        """Mono float audio at the codec's rate -> codes [K, T_l] per level."""
        step = self.chunk
        blocks = (np.asarray(audio[i : i + step], np.float32) for i in range(0, len(audio), step))
        return self.encode_stream(blocks)[0]

    def encode_file(self, path: str | os.PathLike) -> tuple[list[np.ndarray], int]:
        """A file (any rate, any channels) -> codes per level and its length in samples."""
        try:
            return self.encode_stream(stream_audio(path, self.cfg.sample_rate))
        except AudioError as e:
            raise CodecError(path, e.reason) from None

    # ------------------------------------------------------------------ decoding

    def decode_chunks(self, codes: np.ndarray, level: int) -> Iterator[np.ndarray]:
        """Codes [k, T] (k <= K) of one level -> audio, chunk after chunk."""
        hop = self.model.hops[level]
        frames = self.chunk // hop
        margin = self.model.levels[level].decode_margin
        total = codes.shape[1]
        for f0 in range(0, total, frames):
            lo, hi = max(0, f0 - margin), min(total, f0 + frames + margin)
            c = torch.from_numpy(np.ascontiguousarray(codes[:, lo:hi], np.int64))[None].to(self.device)
            y = self.model.decode(c, level)[0].float().cpu().numpy()
            keep = min(frames, total - f0)
            yield y[(f0 - lo) * hop : (f0 - lo + keep) * hop]

    def decode_array(self, codes: np.ndarray, level: int) -> np.ndarray:
        chunks = list(self.decode_chunks(codes, level))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    # ------------------------------------------------------------------ codes files

    def save_codes(
        self,
        path: str | os.PathLike,
        codes: list[np.ndarray] | dict[int, np.ndarray],
        samples: int,
        source: str,
    ) -> Path:
        """Codes of every level (a list), or of some ({level: codes}), as a codes file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layout": asdict(self.layout), "weights": self.digest, "samples": samples, "source": source}
        levels = codes.items() if isinstance(codes, dict) else enumerate(codes)
        arrays = {f"level{lv}": c.astype(np.uint16) for lv, c in levels}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        return path

    def load_codes(self, path: str | os.PathLike) -> tuple[dict[int, np.ndarray], dict]:
        """A codes file -> ({level: codes [K, T]}, meta), checked against this codec."""
        path = Path(path)
        if not path.is_file():
            raise CodecError(path, "no such file")
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                codes = {int(k[5:]): f[k] for k in f.files if k.startswith("level")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, EOFError):
            raise CodecError(path, "not a codes file (a .npz written by `perceiver-music encode`)") from None
        theirs = Layout(**{**meta["layout"], "hops": tuple(meta["layout"]["hops"])})
        if theirs != self.layout:
            raise CodecError(
                path,
                f"made by a different codec ({_describe(theirs)}); this one is {_describe(self.layout)}",
            )
        for level, c in codes.items():
            if level >= self.levels:
                raise CodecError(path, f"level {level} does not exist in this codec ({self.levels} levels)")
            self.level(level).check_codes(c, f"{path} (level {level})")
        return {lv: c.astype(np.int64) for lv, c in codes.items()}, meta

    def decode_to_file(
        self, codes: np.ndarray, level: int, path: str | os.PathLike, samples: int | None = None
    ) -> Path:
        """Write the audio of one level's codes to a WAV/FLAC file, chunk by chunk."""
        import soundfile as sf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        left = samples if samples is not None else codes.shape[1] * self.model.hops[level]
        with sf.SoundFile(str(path), "w", self.cfg.sample_rate, 1, subtype="PCM_16") as f:
            for chunk in self.decode_chunks(codes, level):
                chunk = chunk[:left]
                left -= len(chunk)
                f.write(np.clip(chunk, -1.0, 1.0))
        return path


def _describe(layout: Layout) -> str:
    return f"{layout.sample_rate} Hz, hops {list(layout.hops)}, {layout.codebooks} codebook(s) of {layout.l_bins} codes"


class AudioCodec(Codec):
    """One level of a VQ-VAE run as a Codec: codes [K, T] at sample_rate / hop frames/s."""

    def __init__(self, run: CodecRun, level: int):
        if not 0 <= level < run.levels:
            raise CodecError(None, f"level {level} does not exist ({run.levels} levels)")
        self.run, self.level = run, level
        self.hop = run.model.hops[level]
        self.num_codebooks = run.cfg.codebooks
        self.cardinality = run.cfg.l_bins
        self.sample_rate = run.cfg.sample_rate
        self.frame_rate = run.cfg.sample_rate / self.hop

    @property
    def bitrate(self) -> float:
        return self.frame_rate * self.num_codebooks * math.log2(self.cardinality)

    def encode_file(self, path: str | os.PathLike) -> np.ndarray:
        return self.run.encode_file(path)[0][self.level]

    def decode_file(self, codes: np.ndarray, path: str | os.PathLike) -> Path:
        return self.run.decode_to_file(self.check_codes(codes, path), self.level, path)
