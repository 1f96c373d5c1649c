"""One interface between files and the token ids a prior models (DESIGN.md sections 8 and 9).

A codec turns a file into codes [K, T] (K codebooks, T frames or events) and back. The MIDI
performance tokenizer is a codec with K = 1 and events instead of frames; an audio codec level
has K >= 1 codebooks per frame at a fixed frame rate. A prior sees one sequence of ids:
`to_ids` flattens codes frame by frame, codebook k taking ids [k * cardinality, (k + 1) *
cardinality) (the layout Perceiver AR used for SoundStream tokens), and `from_ids` undoes it.

This module does not import torch; audio codecs live in perceiver_music.audio.codec.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class CodecError(ValueError):
    """A file or code array a codec cannot use, with the file and the reason."""

    def __init__(self, source: str | os.PathLike | None, reason: str):
        self.source = None if source is None else str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}" if self.source else reason)


class Codec(ABC):
    """Files <-> codes [K, T] <-> ids [T * K]."""

    num_codebooks: int = 1  # K
    cardinality: int  # codes per codebook
    sample_rate: int | None = None  # audio samples per second (None: symbolic)
    frame_rate: float | None = None  # frames per second (None: events, not on a clock)

    @property
    def vocab_size(self) -> int:
        return self.num_codebooks * self.cardinality

    def codebook_range(self, k: int) -> tuple[int, int]:
        """The ids [lo, hi) of codebook k: a sampler masks position t to codebook t % K."""
        return k * self.cardinality, (k + 1) * self.cardinality

    @abstractmethod
    def encode_file(self, path: str | os.PathLike) -> np.ndarray:
        """A file -> codes [K, T] int64."""

    @abstractmethod
    def decode_file(self, codes: np.ndarray, path: str | os.PathLike) -> Path:
        """Codes [K, T] -> a file at `path`; returns the path written."""

    def check_codes(self, codes: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """Codes as int64 [K, T], or CodecError naming what is wrong."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise CodecError(
                source, f"codes of shape {codes.shape}, this codec wants [{self.num_codebooks}, T]"
            )
        if not np.issubdtype(codes.dtype, np.integer):
            raise CodecError(source, f"codes of type {codes.dtype}, not integers")
        if codes.size and (codes.min() < 0 or codes.max() >= self.cardinality):
            raise CodecError(
                source,
                f"codes out of range: {int(codes.min())}..{int(codes.max())}, "
                f"this codec has {self.cardinality} codes per codebook (0..{self.cardinality - 1})",
            )
        return codes.astype(np.int64)

    def to_ids(self, codes: np.ndarray) -> np.ndarray:
        """Codes [K, T] -> ids [T * K], frame-major, codebook k offset by k * cardinality."""
        codes = self.check_codes(codes)
        offsets = np.arange(self.num_codebooks, dtype=np.int64)[:, None] * self.cardinality
        return (codes + offsets).T.reshape(-1)

    def from_ids(self, ids: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """Ids [T * K] -> codes [K, T]; every id must lie in its codebook's range."""
        ids = np.asarray(ids, np.int64)
        k = self.num_codebooks
        if ids.ndim != 1 or len(ids) % k:
            raise CodecError(source, f"{len(ids)} ids are not whole frames of {k} codebooks")
        frames = ids.reshape(-1, k).T
        offsets = np.arange(k, dtype=np.int64)[:, None] * self.cardinality
        codes = frames - offsets
        bad = (codes < 0) | (codes >= self.cardinality)
        if bad.any():
            kk, t = np.argwhere(bad)[0]
            raise CodecError(
                source,
                f"id {int(frames[kk, t])} at frame {int(t)} is outside codebook {int(kk)}'s range "
                f"{self.codebook_range(int(kk))}",
            )
        return codes

    def encode_ids(self, path: str | os.PathLike) -> np.ndarray:
        return self.to_ids(self.encode_file(path))

    def decode_ids(self, ids: np.ndarray, path: str | os.PathLike) -> Path:
        return self.decode_file(self.from_ids(ids), path)


class MidiCodec(Codec):
    """The performance-event tokenizer as a codec: one codebook, its whole vocabulary."""

    def __init__(self, tokenizer=None):
        from perceiver_music.tokens.performance import PerformanceTokenizer

        self.tokenizer = tokenizer or PerformanceTokenizer()
        self.cardinality = self.tokenizer.vocab.size

    def encode_file(self, path: str | os.PathLike) -> np.ndarray:
        from perceiver_music.tokens.performance import MidiError

        try:
            return self.tokenizer.encode(path).astype(np.int64)[None]
        except MidiError as e:
            raise CodecError(path, e.reason) from None

    def decode_file(self, codes: np.ndarray, path: str | os.PathLike) -> Path:
        codes = self.check_codes(codes, path)
        self.tokenizer.decode_to_midi(codes[0], path)
        return Path(path)
