"""Vector quantizers with EMA codebooks: Jukebox's bottleneck, and a residual VQ over several.

Shapes: vectors are [N, D] (frames flattened over the batch); codes are [N] or [N, K].

The codebook is not learned by gradient: each training step moves every code towards the
mean of the vectors assigned to it (EMA of the sums `k_sum` and counts `k_elem`, decay mu).
A code whose EMA count falls below `threshold` is dead; with restarts on it is replaced by a
random vector of the batch (Jukebox, section 3.2: "random restarts"), so every code stays in
use. All the state is buffers, so checkpoints carry it and a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Quantized:
    """What a quantizer returns for vectors x [N, D]."""

    quantized: Tensor  # [N, D], with the straight-through gradient to x
    codes: Tensor  # [N, K] int64
    commit: Tensor  # scalar: mean squared distance of x to its (stopped) quantization
    usage: Tensor  # [K] share of each codebook's codes whose EMA count is >= threshold
    perplexity: Tensor  # [K] exp(entropy) of the batch's code histogram


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMACodebook(nn.Module):
    """One codebook of `bins` codes of size `dim`, updated by EMA, with random restarts."""

    def __init__(self, bins: int, dim: int, mu: float = 0.99, restarts: bool = True, threshold: float = 1.0):
        super().__init__()
        self.bins, self.dim, self.mu, self.restarts, self.threshold = bins, dim, mu, restarts, threshold
        self.register_buffer("codebook", torch.zeros(bins, dim))
        self.register_buffer("k_sum", torch.zeros(bins, dim))
        self.register_buffer("k_elem", torch.zeros(bins))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, x: Tensor) -> Tensor:
        """x [N, D] -> the index of each vector's nearest code [N]."""
        x = x.float()
        k = self.codebook
        # |x - k|^2 less |x|^2, which is the same for every code of a row: one fused product
        # instead of three passes over the [N, bins] matrix (most of encoding's time).
        return torch.addmm(k.pow(2).sum(1), x, k.t(), alpha=-2.0).argmin(1)

    def lookup(self, codes: Tensor) -> Tensor:
        return self.codebook[codes]

    def _random_rows(self, x: Tensor) -> Tensor:
        """`bins` vectors drawn from x (tiled when the batch has fewer), the same on every rank."""
        if len(x) < self.bins:
            x = x.repeat((self.bins + len(x) - 1) // len(x), 1)
            x = x + torch.randn_like(x) * 0.01 / self.dim**0.5
        rows = x[torch.randperm(len(x), device=x.device)[: self.bins]].contiguous()
        if _distributed():
            dist.broadcast(rows, 0)
        return rows

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Codes start on random vectors of the first batch x [N, D], each counted once."""
        self.codebook.copy_(self._random_rows(x.float()))
        self.k_sum.copy_(self.codebook)
        self.k_elem.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor) -> None:
        """One EMA step from vectors x [N, D] assigned to `codes` [N]."""
        x = x.float()
        onehot = torch.zeros(self.bins, len(x), device=x.device)
        onehot[codes, torch.arange(len(x), device=x.device)] = 1.0
        counts, sums = onehot.sum(1), onehot @ x
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.k_sum.mul_(self.mu).add_(sums, alpha=1 - self.mu)
        self.k_elem.mul_(self.mu).add_(counts, alpha=1 - self.mu)
        means = self.k_sum / self.k_elem.clamp_min(1e-12)[:, None]
        if self.restarts and len(x):
            alive = (self.k_elem >= self.threshold)[:, None]
            self.codebook.copy_(torch.where(alive, means, self._random_rows(x)))
        else:  # a code nothing has reached keeps its place
            self.codebook.copy_(torch.where(self.k_elem[:, None] > 1e-6, means, self.codebook))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [N, D] -> (nearest codes [N], their vectors [N, D]). In training the EMA moves,
        from the vectors where `keep` [N] (bool) is true (all when None)."""
        if self.training:
            used = x if keep is None else x[keep]
            if not bool(self.initialized) and len(used):
                self.initialize(used)
        codes = self.nearest(x)
        if self.training and bool(self.initialized):
            self.update(used, codes if keep is None else codes[keep])
        return codes, self.lookup(codes)

    def usage(self) -> Tensor:
        return (self.k_elem >= self.threshold).float().mean()


def perplexity(codes: Tensor, bins: int) -> Tensor:
    """exp(entropy) of the histogram of codes [N]: bins if all are used equally, 1 if one is."""
    hist = torch.bincount(codes.reshape(-1), minlength=bins).float()
    p = hist / hist.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class VectorQuantizer(nn.Module):
    """A residual VQ of `codebooks` EMA codebooks (1: Jukebox's plain VQ bottleneck).

    Codebook k quantizes what codebooks 0..k-1 left over; the frame is the sum of their codes.
    Quantizer dropout (training only) keeps, for a `dropout` share of the examples, only the
    first n ~ U{1..K} codebooks, so that decoding from fewer codebooks stays good (SoundStream).
    """

    def __init__(
        self,
        bins: int,
        dim: int,
        codebooks: int = 1,
        mu: float = 0.99,
        restarts: bool = True,
        threshold: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.bins, self.dim, self.dropout = bins, dim, dropout
        self.books = nn.ModuleList(EMACodebook(bins, dim, mu, restarts, threshold) for _ in range(codebooks))

    @property
    def num_codebooks(self) -> int:
        return len(self.books)

    def forward(self, x: Tensor, examples: Tensor | None = None) -> Quantized:
        """x [N, D]; `examples` [N] says which example each vector belongs to (for dropout)."""
        x32 = x.float()
        weight = None  # codebooks used by each vector
        if self.training and self.dropout > 0 and self.num_codebooks > 1 and examples is not None:
            n_ex = int(examples.max()) + 1
            n_keep = torch.randint(1, self.num_codebooks + 1, (n_ex,), device=x.device)
            dropped = torch.rand(n_ex, device=x.device) < self.dropout
            n_keep = torch.where(dropped, n_keep, torch.full_like(n_keep, self.num_codebooks))
            weight = n_keep[examples]
        residual, total, all_codes = x32, torch.zeros_like(x32), []
        for k, book in enumerate(self.books):
            keep = None if weight is None else weight > k
            codes, q = book(residual, keep)
            if keep is not None:
                q = q * keep[:, None]
            total = total + q
            residual = residual - q
            all_codes.append(codes)
        codes = torch.stack(all_codes, 1)
        commit = (x32 - total.detach()).pow(2).mean()
        quantized = x + (total - x32).detach().to(x.dtype)  # straight-through
        usage = torch.stack([b.usage() for b in self.books])
        perp = torch.stack([perplexity(codes[:, k], self.bins) for k in range(self.num_codebooks)])
        return Quantized(quantized, codes, commit, usage, perp)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x [N, D] -> codes [N, K], no EMA update."""
        residual, all_codes = x.float(), []
        for book in self.books:
            codes = book.nearest(residual)
            residual = residual - book.lookup(codes)
            all_codes.append(codes)
        return torch.stack(all_codes, 1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [N, k] (k <= K: the first k codebooks) -> vectors [N, D]."""
        return sum(self.books[k].lookup(codes[:, k]) for k in range(codes.shape[1]))
