"""Attention building blocks shared by Perceiver AR, PerceiverS and the Transformer baseline.

Attention goes through `scaled_dot_product_attention` with boolean masks built from absolute
positions; rotary encoding turns a fraction of each head's dimensions by absolute position in
the piece, so a key computed once never needs re-rotating.

Shapes: B batch, Q queries, K keys, D width, H heads, E = D / H head dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Rotary(nn.Module):
    """Rotary position encoding on the first `fraction` of each head's dimensions.

    Angles are computed in float64: pieces run past 100,000 tokens, where float32 positions
    times frequencies lose the precision the rotation needs.
    """

    def __init__(self, head_dim: int, fraction: float = 0.5, base: float = 10000.0):
        super().__init__()
        self.rot_dim = int(head_dim * fraction) // 2 * 2
        inv_freq = base ** (-torch.arange(0, self.rot_dim, 2, dtype=torch.float64) / max(self.rot_dim, 1))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, rot_dim / 2] in float32."""
        angle = positions.to(torch.float64)[..., None] * self.inv_freq.to(positions.device)
        return angle.cos().float()[:, None], angle.sin().float()[:, None]

    def rotate(self, x: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        """x [B, H, T, E] -> the same with its first rot_dim dims rotated."""
        if self.rot_dim == 0:
            return x
        cos, sin = (t.to(x.dtype) for t in cos_sin)
        half = self.rot_dim // 2
        x1, x2, rest = x[..., :half], x[..., half : self.rot_dim], x[..., self.rot_dim :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def causal_mask(pos: Tensor, pad: Tensor) -> Tensor | None:
    """Self-attention mask over consecutive positions: None (plainly causal) without padding."""
    return attention_mask(pos, pos, pad, pad) if bool(pad.any()) else None


def attention_mask(
    q_pos: Tensor, k_pos: Tensor, k_pad: Tensor, q_pad: Tensor | None = None, window: int | None = None
) -> Tensor:
    """Boolean mask [B, 1, Q, K]: True where query may attend key.

    A query sees the non-padding keys at or before its own position, and with `window` only
    those in (q - window, q]. A padding query sees every key: its output is never used, and a
    row with nothing to attend would be NaN.
    """
    kp, qp = k_pos[:, None, :], q_pos[:, :, None]  # [B, 1, K], [B, Q, 1]
    mask = (kp <= qp) & ~k_pad[:, None, :]
    if window is not None:
        mask &= kp > qp - window
    if q_pad is not None:
        mask |= q_pad[:, :, None]
    return mask[:, None]


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float = 0.0, causal: bool = False
) -> Tensor:
    """scaled_dot_product_attention; q [B, H, Q, E], k and v [B, H, K, E] -> [B, H, Q, E].

    Generation under bf16 autocast keeps its caches in float32 (`KVCache`), so new queries
    (bf16) meet float32 keys: attention then runs in float32, outside autocast. Attention of a
    few queries is bound by reading the cache, and on CPU the float32 kernel reads it several
    times faster than the bf16 one (which autocast would pick after casting the whole cache).
    """
    if q.dtype != k.dtype:
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


class MLP(nn.Module):
    """Squared-ReLU MLP (Perceiver AR, Primer)."""

    def __init__(self, width: int, ratio: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(width, width * ratio)
        self.down = nn.Linear(width * ratio, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.relu(self.up(x)).square()))


@dataclass
class KVCache:
    """Keys and values of one attention layer during generation, by position: the slot of
    position p is p - base. Rotary is applied before caching (by absolute position), so a
    cached key never changes."""

    k: Tensor  # [B, H, capacity, E]
    v: Tensor
    base: int = 0

    @classmethod
    def empty(
        cls, batch: int, heads: int, capacity: int, head_dim: int, like: Tensor, base: int = 0
    ) -> KVCache:
        shape = (batch, heads, capacity, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape), base)

    def write(self, start: int, k: Tensor, v: Tensor) -> None:
        i = start - self.base
        self.k[:, :, i : i + k.shape[2]] = k
        self.v[:, :, i : i + v.shape[2]] = v

    def keep_from(self, lo: int, end: int) -> None:
        """Drop positions before lo (positions lo..end-1 move to the front), making room."""
        i, n = lo - self.base, end - lo
        if i > 0:
            self.k[:, :, :n] = self.k[:, :, i : i + n].clone()  # clone: the ranges overlap
            self.v[:, :, :n] = self.v[:, :, i : i + n].clone()
            self.base = lo

    def read(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions lo..hi-1."""
        return self.k[:, :, lo - self.base : hi - self.base], self.v[:, :, lo - self.base : hi - self.base]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rotary: Rotary,
        cos_sin,
        cache: KVCache | None = None,
        start: int = 0,
        lo: int = 0,
    ) -> Tensor:
        """x [B, T, D] -> [B, T, D]. mask None with as many keys as queries means plainly causal.

        With a cache, x holds positions start..start+T-1: their keys and values are written
        to it, and the queries attend to the cached positions lo..start+T-1.
        """
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, E]
        q, k = rotary.rotate(q, cos_sin), rotary.rotate(k, cos_sin)
        if cache is not None:
            cache.write(start, k, v)
            k, v = cache.read(lo, start + T)
        p = self.dropout if self.training else 0.0
        causal = mask is None and k.shape[2] == T
        o = attend(q, k, v, mask, p, causal)
        return self.resid_dropout(self.out(o.transpose(1, 2).reshape(B, T, D)))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def keys_values(self, kv: Tensor, rotary: Rotary, k_cos_sin) -> tuple[Tensor, Tensor]:
        """Projected inputs [B, K, 2D] -> rotated keys and values, each [B, H, K, E] (what a
        cache keeps)."""
        B, K, D2 = kv.shape
        k, v = kv.view(B, K, 2, self.heads, D2 // (2 * self.heads)).permute(2, 0, 3, 1, 4)
        return rotary.rotate(k, k_cos_sin), v

    def forward(self, x_q: Tensor, k: Tensor, v: Tensor, mask: Tensor, rotary: Rotary, q_cos_sin) -> Tensor:
        B, Q, D = x_q.shape
        q = rotary.rotate(self.q(x_q).view(B, Q, self.heads, D // self.heads).transpose(1, 2), q_cos_sin)
        p = self.dropout if self.training else 0.0
        o = attend(q, k, v, mask, p)
        return self.resid_dropout(self.out(o.transpose(1, 2).reshape(B, Q, D)))


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm causal self-attention + MLP, each with a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rotary: Rotary,
        cos_sin,
        cache: KVCache | None = None,
        start: int = 0,
        lo: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, rotary, cos_sin, cache, start, lo)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Queries attend to the inputs, with a query residual, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.q_norm = nn.LayerNorm(width)
        self.kv_norm = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def kv_table(self, embedding: Tensor) -> Tensor:
        """Token embeddings [V, D] -> every token's projected key and value [V, 2D].

        An input's key and value depend on its token alone (positions enter only through
        rotary, applied after the projection), so projecting the vocabulary once and looking
        the inputs up replaces a [L, D] x [D, 2D] product per sequence by a [V, D] x [D, 2D] one
        per step: most of the cost of a long context, in training and in generation."""
        return self.attn.kv(self.kv_norm(embedding))

    def keys_values(self, tokens: Tensor, table: Tensor, rotary: Rotary, k_cos_sin) -> tuple[Tensor, Tensor]:
        """Input tokens [B, K] -> rotated keys and values, each [B, H, K, E]."""
        return self.attn.keys_values(F.embedding(tokens, table), rotary, k_cos_sin)

    def forward(self, x_q: Tensor, k: Tensor, v: Tensor, mask: Tensor, rotary: Rotary, q_cos_sin) -> Tensor:
        x = x_q + self.attn(self.q_norm(x_q), k, v, mask, rotary, q_cos_sin)
        return x + self.mlp(self.norm2(x))
