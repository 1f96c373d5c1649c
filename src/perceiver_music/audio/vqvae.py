"""The Jukebox VQ-VAE (Dhariwal et al. 2020, section 3): one encoder, codebook and decoder per
level, each level compressing the raw audio by its own hop (8, 32, 128 samples in the paper).

    audio [B, T] -> encoder_l -> [B, D, T / hop_l] -> quantizer_l -> codes [B, K, T / hop_l]
                 -> decoder_l -> audio [B, T]

Encoders are strided convolutions (kernel 2s, stride s), each followed by a stack of residual
blocks of dilated 1-D convolutions (dilation growth 3); decoders mirror them with transposed
convolutions and the dilations reversed. Levels do not share weights: each is an autoencoder
of its own, trained on the sum of the levels' losses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from perceiver_music.audio.losses import multispectral_loss, reconstruction_loss, spectral_norms
from perceiver_music.audio.quantize import VectorQuantizer
from perceiver_music.config import CodecConfig


class ResBlock(nn.Module):
    def __init__(self, width: int, hidden: int, dilation: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(width, hidden, 3, padding=dilation, dilation=dilation),
            nn.ReLU(),
            nn.Conv1d(hidden, width, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class UpsampleConv(nn.ConvTranspose1d):
    """The decoders' transposed convolution (kernel 2s, stride s, padding s // 2), computed for
    strides from 8 up as one matrix product and an overlap-add of its two halves. There
    PyTorch's CPU transposed convolution took 1.5-2.5x longer (stride 8 and 32 to the full
    sample rate, most of a decoder's time), while at stride 4 it was the faster. Same
    parameters (checkpoints are interchangeable), same result up to float rounding (tested
    against F.conv_transpose1d)."""

    FOLD_FROM_STRIDE = 8

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, 2 * stride, stride, stride // 2)

    def forward(self, x: Tensor) -> Tensor:
        b, cin, t = x.shape
        s, cout = self.stride[0], self.out_channels
        if s < self.FOLD_FROM_STRIDE:
            return super().forward(x)
        # Each input frame writes 2s samples: the first half at its own s slots, the second
        # half into the next frame's.
        z = (x.transpose(1, 2) @ self.weight.reshape(cin, cout * 2 * s)).view(b, t, cout, 2, s)
        y = z.new_zeros(b, t + 1, cout, s)
        y[:, :t] += z[:, :, :, 0]
        y[:, 1:] += z[:, :, :, 1]
        y = y.permute(0, 2, 1, 3).reshape(b, cout, (t + 1) * s)  # [B, Cout, (T + 1) s]
        p = self.padding[0]
        return y[:, :, p : (t + 1) * s - p] + self.bias[None, :, None]


def _dilations(depth: int, growth: int, reverse: bool) -> list[int]:
    out = [growth**i for i in range(depth)]
    return out[::-1] if reverse else out


def _res_stack(width: int, depth: int, m_conv: float, growth: int, reverse: bool) -> nn.Sequential:
    hidden = max(1, int(width * m_conv))
    return nn.Sequential(*(ResBlock(width, hidden, d) for d in _dilations(depth, growth, reverse)))


class LevelCodec(nn.Module):
    """Encoder and decoder of one level: `downs` = [(down_t, stride_t), ...] of the levels up
    to this one (an encoder of level l downsamples through the blocks of levels 0..l)."""

    def __init__(self, cfg: CodecConfig, level: int):
        super().__init__()
        mult = cfg.multipliers[level]
        width, depth, emb = cfg.width * mult, cfg.depth * mult, cfg.emb_width
        growth, m_conv = cfg.dilation_growth_rate, cfg.m_conv
        self.blocks = list(zip(cfg.downs_t[: level + 1], cfg.strides_t[: level + 1]))
        enc: list[nn.Module] = []
        for i, (down, stride) in enumerate(self.blocks):
            for j in range(down):
                enc.append(
                    nn.Conv1d(
                        1 if i == j == 0 else (emb if j == 0 else width),
                        width,
                        2 * stride,
                        stride,
                        stride // 2,
                    )
                )
                enc.append(_res_stack(width, depth, m_conv, growth, reverse=False))
            enc.append(nn.Conv1d(width, emb, 3, padding=1))
        dec: list[nn.Module] = []
        for i, (down, stride) in reversed(list(enumerate(self.blocks))):
            dec.append(nn.Conv1d(emb, width, 3, padding=1))
            for j in range(down):
                dec.append(_res_stack(width, depth, m_conv, growth, reverse=True))
                out = (emb if i > 0 else width) if j == down - 1 else width
                dec.append(UpsampleConv(width, out, stride))
        dec.append(nn.Conv1d(width, 1, 3, padding=1))
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.hop = math.prod(s**d for d, s in self.blocks)
        rf = self._receptive_field(depth, growth)
        self.encode_margin = math.ceil(rf / self.hop) * self.hop  # samples, a whole number of frames
        self.decode_margin = math.ceil(rf / self.hop) + 1  # frames

    def _receptive_field(self, depth: int, growth: int) -> int:
        """Samples either side of a frame that can reach it (an upper bound; decoder the same)."""
        reach, rate = 0, 1
        for down, stride in self.blocks:
            for _ in range(down):
                reach += stride * rate
                rate *= stride
                reach += sum(_dilations(depth, growth, False)) * rate
            reach += rate
        return reach


class VQVAE(nn.Module):
    """All levels; `forward` is the training loss, `encode` / `decode` the codec."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(LevelCodec(cfg, level) for level in range(cfg.levels))
        self.quantizers = nn.ModuleList(
            VectorQuantizer(
                cfg.l_bins,
                cfg.emb_width,
                cfg.codebooks,
                cfg.mu,
                cfg.restarts,
                cfg.restart_threshold,
                cfg.quantizer_dropout,
            )
            for _ in range(cfg.levels)
        )
        # The data's mean square and spectral norms, set once from training audio before the
        # first step, so the loss terms are of order 1 whatever the level of the recordings.
        self.register_buffer("norm_l2", torch.ones(()))
        self.register_buffer("norm_spec", torch.ones(len(cfg.stft_sizes)))

    @property
    def hops(self) -> list[int]:
        return [lv.hop for lv in self.levels]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_bandwidth(self, x: Tensor) -> None:
        """Normalisers from a batch of training audio x [B, T]."""
        c = self.cfg
        self.norm_l2.copy_(x.float().pow(2).mean().clamp_min(1e-8))
        self.norm_spec.copy_(spectral_norms(x, c.stft_sizes, c.stft_hops, c.stft_windows).clamp_min(1e-8))

    def _quantize(self, level: int, x: Tensor):
        z = self.levels[level].encoder(x[:, None])  # [B, D, F]
        b, d, f = z.shape
        flat = z.transpose(1, 2).reshape(b * f, d)
        examples = torch.arange(b, device=x.device).repeat_interleave(f)
        q = self.quantizers[level](flat, examples)
        return q, q.quantized.reshape(b, f, d).transpose(1, 2), q.codes.reshape(b, f, -1).transpose(1, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x [B, T] (T a multiple of the top hop) -> the loss and per-level terms (detached)."""
        c = self.cfg
        total = torch.zeros((), device=x.device)
        out: dict[str, Tensor] = {}
        for level in range(c.levels):
            q, zq, _ = self._quantize(level, x)
            y = self.levels[level].decoder(zq)[:, 0].float()
            l2, linf = reconstruction_loss(x, y, c.linf_k)
            spec = multispectral_loss(x, y, c.stft_sizes, c.stft_hops, c.stft_windows, self.norm_spec)
            loss = (c.l2 * l2 + c.linf * linf) / self.norm_l2 + c.spectral * spec + c.commit * q.commit
            total = total + loss
            for name, value in (("l2", l2 / self.norm_l2), ("spec", spec), ("commit", q.commit)):
                out[f"{name}_l{level}"] = value.detach()
            out[f"usage_l{level}"] = q.usage.mean()
            out[f"perplexity_l{level}"] = q.perplexity.mean()
        out["loss"] = total
        return out

    @torch.no_grad()
    def encode(self, x: Tensor, level: int) -> Tensor:
        """x [B, T] -> codes [B, K, T / hop] of one level (T a multiple of its hop)."""
        z = self.levels[level].encoder(x[:, None].float())
        b, d, f = z.shape
        codes = self.quantizers[level].encode(z.transpose(1, 2).reshape(b * f, d))
        return codes.reshape(b, f, -1).transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes: Tensor, level: int) -> Tensor:
        """codes [B, k, F] (the first k <= K codebooks) -> audio [B, F * hop]."""
        b, k, f = codes.shape
        z = self.quantizers[level].decode(codes.transpose(1, 2).reshape(b * f, k))
        return self.levels[level].decoder(z.reshape(b, f, -1).transpose(1, 2))[:, 0]
