"""Spectral losses of the VQ-VAE (Jukebox, section 3.3): magnitudes at several STFT sizes.

Signals are [B, T] float; everything is computed in float32 (STFTs have no bf16 kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor


def stft_magnitude(x: Tensor, n_fft: int, hop: int, window: int) -> Tensor:
    """|STFT| of x [B, T] -> [B, freqs, frames], a Hann window of `window` samples."""
    win = torch.hann_window(window, device=x.device, dtype=torch.float32)
    # Zero padding at the edges (not reflection): it works for clips shorter than the FFT.
    spec = torch.stft(
        x.float(), n_fft, hop, window, win, center=True, pad_mode="constant", return_complex=True
    )
    return spec.abs()


def spectral_norms(x: Tensor, sizes, hops, windows) -> Tensor:
    """Mean Frobenius norm of |STFT(x)| at each resolution [R]: the loss's normaliser."""
    return torch.stack(
        [stft_magnitude(x, n, h, w).flatten(1).norm(dim=1).mean() for n, h, w in zip(sizes, hops, windows)]
    )


def multispectral_loss(x: Tensor, y: Tensor, sizes, hops, windows, norms: Tensor | None = None) -> Tensor:
    """Mean over resolutions of || |STFT(x)| - |STFT(y)| ||, each divided by `norms` [R] (the
    data's own spectral norm, so the loss does not depend on the level of the audio)."""
    terms = []
    for r, (n, h, w) in enumerate(zip(sizes, hops, windows)):
        diff = stft_magnitude(x, n, h, w) - stft_magnitude(y, n, h, w)
        term = diff.flatten(1).norm(dim=1).mean()
        terms.append(term / norms[r] if norms is not None else term)
    return torch.stack(terms).mean()


def reconstruction_loss(x: Tensor, y: Tensor, linf_k: int) -> tuple[Tensor, Tensor]:
    """(mean squared error, mean of the `linf_k` largest squared errors per example) of [B, T]."""
    err = (x.float() - y.float()).pow(2)
    top = err.topk(min(linf_k, err.shape[1]), dim=1).values.mean()
    return err.mean(), top
