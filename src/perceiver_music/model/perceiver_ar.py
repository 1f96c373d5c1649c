"""Perceiver AR, with the PerceiverS multi-scale cross-attention cascade (DESIGN.md section 5).

The last N input positions are the latents. Each latent's query starts from its own token's
embedding and cross-attends to every input up to and including its own position (the causal
mask is aligned to the END of the input), with a query residual. PerceiverS cascades several
cross-attention layers: layer i's queries are layer i-1's output, and layer i sees either all
inputs ("full") or only a window of the W inputs ending at each query (scale_mode "relative";
"absolute": the last W inputs of the window, the same for every query). A stack of causal
self-attention layers over the N latents follows, then a final norm and the logits.

During training a random subset of the prefix (the non-latent inputs) can be dropped before
cross-attention (prefix dropout): it regularises and saves compute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perceiver_music.config import ModelConfig
from perceiver_music.model.attention import (
    CrossAttentionBlock,
    Rotary,
    SelfAttentionBlock,
    attention_mask,
    causal_mask,
)
from perceiver_music.model.base import TokenModel
from perceiver_music.tokens.performance import PAD


class PerceiverAR(TokenModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(D // cfg.heads, cfg.rotary_fraction, cfg.rotary_base)
        self.windows = cfg.window_sizes()
        self.cross = nn.ModuleList(
            CrossAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in self.windows
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size)
        self.init_weights()

    def forward(self, tokens: Tensor, positions: Tensor, num_latents: int | None = None) -> Tensor:
        """tokens, positions [B, L] -> logits [B, N, vocab] for the last N positions."""
        B, L = tokens.shape
        N = min(num_latents or self.cfg.num_latents, L)
        pad = tokens == PAD  # [B, L]
        x = self.embed_dropout(self.embed(tokens))  # [B, L, D]
        h, q_pos, q_pad = x[:, -N:], positions[:, -N:], pad[:, -N:]  # the latents
        if self.training and self.cfg.prefix_dropout > 0 and L > N:
            x, positions, pad = drop_prefix(x, positions, pad, N, self.cfg.prefix_dropout)
        q_angles = self.rotary.angles(q_pos)
        k_angles = self.rotary.angles(positions)  # [B, 1, K, rot/2] each, sliced per scale

        for block, window in zip(self.cross, self.windows):
            keep = x.shape[1] if window is None else self._keys_needed(x.shape[1], N, window)
            k, v = block.keys_values(x[:, -keep:], self.rotary, tuple(a[:, :, -keep:] for a in k_angles))
            relative = window if self.cfg.scale_mode == "relative" else None
            mask = attention_mask(q_pos, positions[:, -keep:], pad[:, -keep:], q_pad, relative)
            h = self.run_block(block, h, k, v, mask, self.rotary, q_angles)

        mask = causal_mask(q_pos, q_pad)  # over the latents
        for block in self.blocks:
            h = self.run_block(block, h, mask, self.rotary, q_angles)
        return self.head(self.norm(h))

    def _keys_needed(self, K: int, N: int, window: int) -> int:
        """How many trailing inputs a windowed layer can see: for relative windows the N queries
        reach back window - 1 inputs before the first latent; absolute windows are the last W."""
        if self.cfg.scale_mode == "relative":
            return min(K, N + window - 1)
        return min(K, window)


def drop_prefix(x: Tensor, positions: Tensor, pad: Tensor, num_latents: int, rate: float):
    """Keep a random subset (the same size for every row) of the inputs before the latents.

    x [B, L, D], positions and pad [B, L] -> the same with L' = N + kept prefix inputs, order kept.
    """
    B, L, D = x.shape
    P = L - num_latents
    keep = P - int(P * rate)
    idx = torch.rand(B, P, device=x.device).topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep]
    x = torch.cat([x[:, :P].gather(1, idx[..., None].expand(-1, -1, D)), x[:, P:]], dim=1)
    positions = torch.cat([positions[:, :P].gather(1, idx), positions[:, P:]], dim=1)
    pad = torch.cat([pad[:, :P].gather(1, idx), pad[:, P:]], dim=1)
    return x, positions, pad
