"""The decoder-only Transformer baseline: the same blocks, every position a latent."""

from __future__ import annotations

from torch import Tensor, nn

from perceiver_music.config import ModelConfig
from perceiver_music.model.attention import Rotary, SelfAttentionBlock, causal_mask
from perceiver_music.model.base import TokenModel
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
        self.init_weights()

    def forward(self, tokens: Tensor, positions: Tensor, num_latents: int | None = None) -> Tensor:
        """tokens, positions [B, L] -> logits [B, N, vocab] for the last N positions."""
        N = min(num_latents or self.cfg.num_latents, tokens.shape[1])
        pad = tokens == PAD
        h = self.embed_dropout(self.embed(tokens))  # [B, L, D]
        angles = self.rotary.angles(positions)
        mask = causal_mask(positions, pad)
        for block in self.blocks:
            h = self.run_block(block, h, mask, self.rotary, angles)
        return self.head(self.norm(h[:, -N:]))
