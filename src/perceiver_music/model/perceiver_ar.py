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

An input's cross-attention key and value depend only on its token: there is no absolute
position embedding, and rotary turns keys after the projection. So each cross-attention layer
projects the vocabulary once ([V, 2D], `CrossAttentionBlock.kv_table`) and the inputs look
their rows up: with V = 391 and contexts of thousands, the projection of every input, the
largest cost that grows with the context, becomes a gather. Embedding dropout therefore acts
on the latents' query stream only; the inputs are regularised by prefix dropout and attention
dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perceiver_music.config import ModelConfig
from perceiver_music.model.attention import (
    CrossAttentionBlock,
    KVCache,
    Rotary,
    SelfAttentionBlock,
    attention_mask,
    causal_mask,
)
from perceiver_music.model.base import TokenModel
from perceiver_music.model.conditioning import Cond, Conditioner
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
        # Last, so an unconditioned model's parameters keep their order (`train --branch`).
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

        cond: what the rows are conditioned on (its `elapsed` aligned with tokens); it joins the
        latents' query stream only (model/conditioning.py).

        band: generation past max_len (DESIGN.md section 6). Every cross-attention layer then
        sees, for the latent at q, only the inputs in (q - band, q], windows relative to each
        query (a `full` layer's window is the band itself).
        """
        B, L = tokens.shape
        N = min(num_latents or self.cfg.num_latents, L)
        pad = tokens == PAD  # [B, L]
        h = self.embed_dropout(self.embed(tokens[:, -N:]))  # [B, N, D] the latents
        if self.conditioner is not None:
            cond = self.conditioner.resolve(cond)  # one style encoding for queries and logits
            h = h + self.conditioner(cond, B, N, tokens.device)
        q_pos, q_pad = positions[:, -N:], pad[:, -N:]
        if self.training and self.cfg.context_dropout > 0 and L > N:
            # rows drawn here see only their latent part: their prefix is masked like padding
            blind = torch.rand(B, 1, device=tokens.device) < self.cfg.context_dropout  # [B, 1]
            pad = pad | (blind & (torch.arange(L, device=tokens.device) < L - N))  # [B, L]
        if self.training and self.cfg.prefix_dropout > 0 and L > N:
            tokens, positions, pad = drop_prefix(tokens, positions, pad, N, self.cfg.prefix_dropout)
        q_angles = self.rotary.angles(q_pos)
        k_angles = self.rotary.angles(positions)  # [B, 1, K, rot/2] each, sliced per scale

        for block, window in zip(self.cross, self.windows):
            relative, absolute = self._window(window, band)
            K = tokens.shape[1]
            keep = min(K, N + relative - 1) if relative else min(K, absolute) if absolute else K
            table = block.kv_table(self.embed.weight)
            angles = tuple(a[:, :, -keep:] for a in k_angles)
            k, v = block.keys_values(tokens[:, -keep:], table, self.rotary, angles)
            mask = attention_mask(q_pos, positions[:, -keep:], pad[:, -keep:], q_pad, relative)
            h = self.run_block(block, h, k, v, mask, self.rotary, q_angles)

        mask = causal_mask(q_pos, q_pad)  # over the latents
        for block in self.blocks:
            h = self.run_block(block, h, mask, self.rotary, q_angles)
        return self.output(h, cond)

    def _window(self, window: int | None, band: int | None) -> tuple[int | None, int | None]:
        """(relative, absolute) window of a cross-attention layer. A relative window of W lets the
        N queries reach back W - 1 inputs before the first latent; an absolute one is the last W
        inputs. In generation (band) every window is relative and at most the band."""
        if band is not None:
            return (band if window is None else min(window, band)), None
        if window is None:
            return None, None
        return (window, None) if self.cfg.scale_mode == "relative" else (None, window)

    # ------------------------------------------------------------------ cached generation
    # sample.py drives these: inputs' cross-attention keys/values are cached once per position;
    # the latents' self-attention keys/values are cached since the last refill.

    def new_cache(self, batch: int, total: int, like: Tensor) -> dict[str, list]:
        E = self.cfg.width // self.cfg.heads
        heads = self.cfg.heads
        return {
            "cross": [KVCache.empty(batch, heads, total, E, like) for _ in self.cross],
            "self": [KVCache.empty(batch, heads, self.cfg.num_latents, E, like) for _ in self.blocks],
            "tables": [block.kv_table(self.embed.weight) for block in self.cross],  # once per stream
        }

    def cache_inputs(self, tokens: Tensor, start: int, cache: dict) -> None:
        """Cross-attention keys/values of tokens [B, T] at positions start..start+T-1."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        angles = self.rotary.angles(positions)
        for block, table, kv in zip(self.cross, cache["tables"], cache["cross"]):
            kv.write(start, *block.keys_values(tokens, table, self.rotary, angles))

    def latent_logits(
        self, tokens: Tensor, start: int, cache: dict, band: int, refill: bool, cond: Cond | None = None
    ) -> Tensor:
        """Logits [B, T, vocab] of latents tokens [B, T] at positions start..start+T-1, whose
        inputs are already cached. refill: they start a new latent cache (self-attention over
        them only); otherwise T = 1 and the latent joins those cached since the last refill.
        cond.elapsed ends with these T positions."""
        B, T = tokens.shape
        q_pos = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        q_angles = self.rotary.angles(q_pos)
        h = self.embed(tokens)
        if self.conditioner is not None:
            cond = self.conditioner.resolve(cond)  # one style encoding for queries and logits
            h = h + self.conditioner(cond, B, T, tokens.device)
        for block, window, kv in zip(self.cross, self.windows, cache["cross"]):
            w, _ = self._window(window, band)
            lo = max(0, start - w + 1)
            k, v = kv.read(lo, start + T)
            mask = None
            if T > 1:  # each latent has its own band; a single one sees all it is given
                k_pos = torch.arange(lo, start + T, device=tokens.device).expand(B, -1)
                mask = attention_mask(q_pos, k_pos, torch.zeros_like(k_pos, dtype=torch.bool), None, w)
            h = block(h, k, v, mask, self.rotary, q_angles)
        for block, kv in zip(self.blocks, cache["self"]):
            if refill:
                kv.base = start
            h = block(h, None, self.rotary, q_angles, kv, start, kv.base)
        return self.output(h, cond)


def drop_prefix(tokens: Tensor, positions: Tensor, pad: Tensor, num_latents: int, rate: float):
    """Keep a random subset (the same size for every row) of the inputs before the latents.

    tokens, positions and pad [B, L] -> the same with L' = N + kept prefix inputs, order kept.
    """
    B, L = tokens.shape
    P = L - num_latents
    keep = P - int(P * rate)
    idx = torch.rand(B, P, device=tokens.device).topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep]
    return tuple(torch.cat([t[:, :P].gather(1, idx), t[:, P:]], dim=1) for t in (tokens, positions, pad))
