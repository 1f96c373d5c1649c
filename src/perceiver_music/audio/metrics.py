"""Codec metrics on signals and codes: spectral convergence (Jukebox), multi-scale mel
distance (DAC), SI-SDR, codebook usage and bitrate.

Signals are float32 [T] numpy arrays or [B, T] tensors; lower is better for spectral
convergence and mel distance, higher for SI-SDR.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from perceiver_music.audio.losses import stft_magnitude

# DAC's MelSpectrogramLoss settings (its base config): seven resolutions, log10 magnitudes, L1.
MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_BANDS = (5, 10, 20, 40, 80, 160, 320)


def spectral_convergence_db(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """20 log10(|| |S(x)| - |S(y)| || / || |S(x)| ||) per example [B], S the STFT of Jukebox's
    evaluation (n_fft 2048, hop 256, window 1536). -20 dB: the error is a tenth of the signal."""
    sx, sy = stft_magnitude(x, 2048, 256, 1536), stft_magnitude(y, 2048, 256, 1536)
    ratio = (sx - sy).flatten(1).norm(dim=1) / sx.flatten(1).norm(dim=1).clamp_min(eps)
    return 20 * torch.log10(ratio.clamp_min(eps))


@lru_cache(maxsize=32)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular mel filterbank [n_mels, n_fft // 2 + 1] (HTK mel scale, Slaney area norm)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    edges = hz(np.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(up, down))
    return (weights * (2.0 / (upper - lower))).astype(np.float32)


def mel_distance(x: Tensor, y: Tensor, sample_rate: int) -> Tensor:
    """DAC's multi-scale mel distance per example [B]: over 7 window sizes (hop = window / 4),
    the mean absolute difference of log10 mel magnitudes (clamped at 1e-5), summed."""
    total = torch.zeros(x.shape[0], device=x.device)
    for window, bands in zip(MEL_WINDOWS, MEL_BANDS):
        fb = torch.from_numpy(mel_filters(sample_rate, window, bands)).to(x.device)
        mx = fb @ stft_magnitude(x, window, window // 4, window)
        my = fb @ stft_magnitude(y, window, window // 4, window)
        diff = torch.log10(mx.clamp_min(1e-5)) - torch.log10(my.clamp_min(1e-5))
        total += diff.abs().flatten(1).mean(1)
    return total


def si_sdr(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-distortion ratio of estimate y against reference x, dB [B]."""
    x = x.float() - x.float().mean(1, keepdim=True)
    y = y.float() - y.float().mean(1, keepdim=True)
    scale = (x * y).sum(1, keepdim=True) / x.pow(2).sum(1, keepdim=True).clamp_min(eps)
    target = scale * x
    noise = y - target
    return 10 * torch.log10(target.pow(2).sum(1).clamp_min(eps) / noise.pow(2).sum(1).clamp_min(eps))


def codebook_usage(codes: np.ndarray, bins: int) -> dict[str, float]:
    """Perplexity (exp entropy of the code histogram) and the share of the `bins` codes used."""
    hist = np.bincount(np.asarray(codes).reshape(-1), minlength=bins).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    nz = p[p > 0]
    return {
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "share_used": float((hist > 0).mean()),
    }


def bitrate(frame_rate: float, codebooks: int, bins: int) -> float:
    """Bits per second of a code stream: frames/s x codebooks x log2(bins)."""
    return frame_rate * codebooks * math.log2(bins)
