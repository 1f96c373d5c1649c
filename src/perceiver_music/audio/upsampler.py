"""Upsamplers: a prior over one level's codes conditioned on the codes of the level above.

Jukebox (section 4) generates the top level first, then each lower level given the one above
through a conditioner: an embedding of the upper codes, a stack of dilated residual
convolutions and a transposed convolution up to the lower level's rate, once per stride
between the levels; its output is added to the lower level's input embeddings.

    upper codes [B, U] -> embed [B, D, U] -> (res stack, transposed conv x s) per stride
                       -> LayerNorm -> one vector per lower frame [B, U x ratio, D]

The prior is the Transformer baseline (`Upsampler` overrides only `embed_inputs`), so every
position gets its frame's vector, in the full forward and in the cached one alike: the
sampler's sliding-window cache (sample.py) stays exact. The vector of a token at position p
is that of lower frame (p - frame0_position) // K, where frame0_position is the position of
frame 0's first code (1 after BOS; K codebooks per frame).

The conditioner is not causal (the upper codes are all known before the lower level is
sampled), and it is computed over a span of upper frames: the whole upper sequence when
sampling, a window around the lower window's frames in training. Activations outside the
piece are zeroed after every layer, as zero padding of the whole sequence would have them,
so a span with `margin` frames of context either side gives exactly the whole piece's vectors.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perceiver_music.audio.vqvae import _dilations, _res_stack
from perceiver_music.config import CodesConfig, ConfigError, ModelConfig
from perceiver_music.model.transformer import Transformer

FIRST_CODE = 3  # token ids 0, 1, 2 are PAD, BOS, EOS; codes start here


class UpperConditioner(nn.Module):
    def __init__(self, upper_bins: int, width: int, strides: list[int], depth: int, growth: int):
        super().__init__()
        if upper_bins < 1 or not strides:
            raise ConfigError(
                "an upsampler needs the level above (codes.upper_cardinality, codes.upper_strides): "
                "train it on a level below the top of `prepare-codes` data"
            )
        self.strides = list(strides)
        self.ratio = math.prod(strides)
        self.embed = nn.Embedding(upper_bins, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.stacks = nn.ModuleList(_res_stack(width, depth, 1.0, growth, reverse=True) for _ in strides)
        self.ups = nn.ModuleList(nn.ConvTranspose1d(width, width, 2 * s, s, s // 2) for s in strides)
        self.norm = nn.LayerNorm(width)

    def forward(self, codes: Tensor, valid: Tensor) -> Tensor:
        """Upper codes [B, U] (valid [B, U]: inside the piece) -> vectors [B, U x ratio, D],
        zero outside the piece."""
        mask = valid[:, None].to(self.embed.weight.dtype)  # [B, 1, U]
        x = self.embed(codes.clamp(0, self.embed.num_embeddings - 1)).transpose(1, 2) * mask
        for stack, up, s in zip(self.stacks, self.ups, self.strides):
            for block in stack:
                x = block(x) * mask
            mask = mask.repeat_interleave(s, dim=-1)
            x = up(x) * mask
        return self.norm(x.transpose(1, 2)) * mask.transpose(1, 2)


def conditioner_margin(codes: CodesConfig) -> int:
    """Upper frames either side of a frame whose codes can reach its vectors: each dilated
    conv reaches its dilation at its own rate, each transposed conv one input frame."""
    reach, rate = 1.0, 1
    for s in codes.upper_strides:
        reach += sum(_dilations(codes.cond_depth, codes.cond_dilation_growth, True)) / rate + 1
        rate *= s
    return math.ceil(reach)


@dataclass
class Conditioning:
    """Vectors [B or 1, F, D] of lower frames first_frame .. first_frame + F - 1 (first_frame
    [B or 1]), for tokens whose frame 0 starts at `frame0_position`."""

    vectors: Tensor
    first_frame: Tensor
    frame0_position: int = 1


class Upsampler(Transformer):
    """The Transformer baseline over one level's codes plus Jukebox's conditioner."""

    def __init__(self, cfg: ModelConfig, codes: CodesConfig):
        super().__init__(cfg)
        self.codes = codes
        self.upper_conditioner = UpperConditioner(
            codes.upper_cardinality,
            cfg.width,
            codes.upper_strides,
            codes.cond_depth,
            codes.cond_dilation_growth,
        )
        self.condition: Conditioning | None = None

    @contextlib.contextmanager
    def conditioned(
        self,
        upper: Tensor,
        valid: Tensor | None = None,
        first_upper: Tensor | int = 0,
        frame0_position: int = 1,
    ):
        """Within the block, tokens are conditioned on upper codes [B or 1, U] (upper frames
        first_upper .. first_upper + U - 1; `valid` marks those inside the piece)."""
        if valid is None:
            valid = torch.ones_like(upper, dtype=torch.bool)
        first = torch.as_tensor(first_upper, device=upper.device).reshape(-1) * self.upper_conditioner.ratio
        before = self.condition
        self.condition = Conditioning(self.upper_conditioner(upper, valid), first, frame0_position)
        try:
            yield self
        finally:
            self.condition = before

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        num_latents: int | None = None,
        band: int | None = None,
        cond=None,
        upper: Tensor | None = None,
        upper_valid: Tensor | None = None,
        first_upper: Tensor | None = None,
    ) -> Tensor:
        """As Transformer.forward; with `upper` (a training window's upper codes, see
        audio.codes.UpsamplerWindows) conditioned on them, else on those of `conditioned`."""
        if upper is None:
            return super().forward(tokens, positions, num_latents, band, cond)
        with self.conditioned(upper, upper_valid, 0 if first_upper is None else first_upper):
            return super().forward(tokens, positions, num_latents, band, cond)

    def embed_inputs(self, tokens: Tensor, positions: Tensor) -> Tensor:
        c = self.condition
        if c is None:
            raise RuntimeError(
                "an upsampler runs conditioned on the level above: use `with model.conditioned(...)`"
            )
        B, L = tokens.shape
        vectors = c.vectors.expand(B, -1, -1)
        F = vectors.shape[1]
        frame = torch.div(positions - c.frame0_position, self.codes.codebooks, rounding_mode="floor")
        frame = frame - c.first_frame.reshape(-1, 1)
        ok = (tokens >= FIRST_CODE) & (frame >= 0) & (frame < F)
        index = frame.clamp(0, F - 1)[..., None].expand(B, L, vectors.shape[2])
        return self.embed(tokens) + vectors.gather(1, index) * ok[..., None].to(vectors.dtype)
