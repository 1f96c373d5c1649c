"""The decoder-only Transformer baseline: the same blocks, every position a latent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perceiver_music.config import ModelConfig
from perceiver_music.model.attention import KVCache, Rotary, SelfAttentionBlock, attention_mask, causal_mask
from perceiver_music.model.base import TokenModel
from perceiver_music.model.conditioning import Cond, Conditioner
from perceiver_music.tokens.performance import PAD


class Transformer(TokenModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(D // cfg.heads, cfg.rotary_fraction, cfg.rotary_base)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size)
        self.conditioner = Conditioner(cfg) if cfg.condition else None
        self.init_weights()
        if self.conditioner is not None:
            self.conditioner.zero_outputs()

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        num_latents: int | None = None,
        band: int | None = None,
        cond: Cond | None = None,
    ) -> Tensor:
        """tokens, positions [B, L] -> logits [B, N, vocab] for the last N positions.
        band: generation past max_len; each position attends to (p - band, p] only.
        cond: conditioning added to every position's embedding (its elapsed aligned with tokens)."""
        B, L = tokens.shape
        N = min(num_latents or self.cfg.num_latents, L)
        pad = tokens == PAD
        h = self.embed_dropout(self.embed_inputs(tokens, positions))  # [B, L, D]
        if self.conditioner is not None:
            cond = self.conditioner.resolve(cond)  # one style encoding for queries and logits
            h = h + self.conditioner(cond, B, L, tokens.device)
        angles = self.rotary.angles(positions)
        mask = (
            causal_mask(positions, pad)
            if band is None
            else attention_mask(positions, positions, pad, pad, band)
        )
        for block in self.blocks:
            h = self.run_block(block, h, mask, self.rotary, angles)
        return self.output(h[:, -N:], cond)

    def embed_inputs(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Input embeddings [B, L, D]; a subclass adds conditioning by position (the audio
        upsampler), the same in the full forward and the cached one."""
        return self.embed(tokens)

    # ------------------------------------------------------------------ cached generation

    def new_cache(self, batch: int, total: int, like: Tensor) -> list[KVCache]:
        E = self.cfg.width // self.cfg.heads
        return [KVCache.empty(batch, self.cfg.heads, total, E, like) for _ in self.blocks]

    def cached_logits(
        self, tokens: Tensor, start: int, cache: list[KVCache], band: int, cond: Cond | None = None
    ) -> Tensor:
        """Logits [B, T, vocab] of tokens [B, T] at positions start..start+T-1; earlier
        positions' keys/values come from the cache, these are added to it."""
        B, T = tokens.shape
        positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        angles = self.rotary.angles(positions)
        lo = max(0, start - band + 1)
        mask = None
        if T > 1:
            k_pos = torch.arange(lo, start + T, device=tokens.device).expand(B, -1)
            mask = attention_mask(positions, k_pos, torch.zeros_like(k_pos, dtype=torch.bool), None, band)
        h = self.embed_inputs(tokens, positions)
        if self.conditioner is not None:
            cond = self.conditioner.resolve(cond)  # one style encoding for queries and logits
            h = h + self.conditioner(cond, B, T, tokens.device)
        for block, kv in zip(self.blocks, cache):
            h = block(h, mask, self.rotary, angles, kv, start, lo)
        return self.output(h, cond)
