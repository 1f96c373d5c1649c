"""Conditioning (DESIGN.md section 8b): a composer label, timing, the style of a performance,
and the state of the keyboard.

All four enter the same way: one vector per position, added to the stream of queries (the
latents' embeddings in Perceiver AR, every position's embedding in the Transformer baseline).
An input's cross-attention key and value stay a function of its token, so Perceiver AR's
per-vocabulary key/value table stays valid; a position's vector depends only on the
sequence's fixed conditions and on the time elapsed through that position's token, which the
sampler knows as it goes, so cached generation stays exact.

* label (Jukebox's artist/genre): a learned embedding per label name; row 0 is "no label".
* timing (Jukebox's total length, offset and fraction): range embeddings of the piece's total
  length, of the time elapsed at the position, and of their ratio. Bucket 0 is "unknown": a
  total left out (timing dropout, or generation without a length) leaves the fraction unknown.
  With `timing_remaining`, also of the time left (total - elapsed), log-spaced like elapsed:
  a countdown that resolves the last seconds, where a piece's ending is played.
* style (the Transformer autoencoder): a small bidirectional Transformer over a reference
  performance's tokens, mean-pooled over its positions to one vector (`StyleEncoder`), then
  projected; a row without a reference gets a learned "no style" vector.
  With `style_logits`, the vector also reaches the output: a learnt bias over the vocabulary
  (the reference's pitches, loudness and spacing), the same at every position of a row. In the
  queries alone it told the model nothing its 2,048-token context did not, and training turned
  the encoder's output down to nothing (own and another piece's style: the same NLL).
* keyboard: which pitches are sounding after each position's token and for how long (the
  tokens say it: `tokens.performance.keyboard_state`), projected from two features per pitch,
  sounding and log(1 + seconds held). It is never dropped and never "told": like elapsed time
  it comes from the tokens, the sampler follows it as it samples, and it spares the model
  rebuilding from attention which of 88 keys are down, the one thing that makes a NOTE_OFF
  or NOTE_ON possible.
  With `keyboard_logits`, the keyboard also reaches the output directly: a learnt logit per
  pitch for each event it makes impossible (NOTE_ON of a key down, NOTE_OFF of a key up or of
  one struck at this instant, EOS while keys are down), added to those events' logits. Through
  the queries alone the model learns these zeros only as far as four layers resolve 88 keys
  (a model of 25 M training tokens still struck a held key in 6 % of its NOTE_ONs); a direct
  term lets it learn them outright, so sampling without `generate`'s mask plays the keyboard
  too. It depends on the tokens only, like the rest, so cached generation stays exact.

The output embeddings, the style projection and both logit terms start at zero, so a
conditioned model starts out computing exactly what the unconditioned model it extends
computes (a run can take conditioning on mid-way, `train --branch` or `--init`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perceiver_music.config import ModelConfig
from perceiver_music.model.attention import Rotary, SelfAttentionBlock
from perceiver_music.tokens.performance import EOS, NOTE_OFF, NOTE_ON, NUM_PITCHES, PAD

MAX_SECONDS = 3600.0  # timing buckets are log-spaced up to an hour; longer is the last bucket
STYLE_HEADS = 4
# Adam moves a parameter about lr per step whatever its gradient, and an impossible event's
# logit has ~10 nats to fall: scaled, the keyboard logits get there in hundreds of steps.
KEYBOARD_LOGIT_SCALE = 10.0


@dataclass
class Cond:
    """What each row of a batch is conditioned on. Every field may be None (nothing given)."""

    label: Tensor | None = None  # [B] long: 1 + index into ModelConfig.labels, 0: no label
    total: Tensor | None = None  # [B] float seconds of the whole piece, <= 0: unknown
    elapsed: Tensor | None = None  # [B, L] float seconds through each position's token
    reference: Tensor | None = None  # [B, R] reference tokens for the style encoder (PAD: none)
    style: Tensor | None = None  # [B, S] style vectors, instead of a reference (generation)
    has_style: Tensor | None = None  # [B] bool: rows whose `style` vector is real (None: all)
    keyboard: Tensor | None = None  # [B, L, 128] seconds each pitch has sounded, -1: silent

    def with_positions(self, elapsed: Tensor | None, keyboard: Tensor | None) -> Cond:
        """The per-position conditions of some positions (those the tokens give)."""
        return replace(self, elapsed=elapsed, keyboard=keyboard)

    def to(self, device) -> Cond:
        return Cond(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


def _to(x: Tensor | None, device) -> Tensor | None:
    return None if x is None else x.to(device)


def _held(cond: Cond | None, length: int) -> Tensor:
    """[B, T, 128] keyboard state of the last T = length positions."""
    if cond is None or cond.keyboard is None:
        raise ValueError("a keyboard-conditioned model needs Cond.keyboard (keyboard_state of its tokens)")
    return cond.keyboard[:, -length:]


def log_bucket(seconds: Tensor, bins: int) -> Tensor:
    """Seconds -> 1..bins, log-spaced (a second early in a piece matters more than late)."""
    x = torch.log1p(seconds.clamp_min(0).float()) / math.log1p(MAX_SECONDS)
    return 1 + (x * bins).long().clamp(0, bins - 1)


def fraction_bucket(elapsed: Tensor, total: Tensor, bins: int) -> Tensor:
    """elapsed [B, T] / total [B] -> 1..bins linearly; 0 where the total is unknown."""
    known = (total > 0)[:, None]
    frac = elapsed.float() / total.float().clamp_min(1e-6)[:, None]
    return torch.where(known, 1 + (frac * bins).long().clamp(0, bins - 1), 0)


class StyleEncoder(nn.Module):
    """Reference tokens [B, R] -> style vectors [B, style_width]: embedding, a few
    bidirectional self-attention layers, mean over the non-PAD positions, LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        S = cfg.style_width
        self.embed = nn.Embedding(cfg.vocab_size, S)
        self.rotary = Rotary(S // STYLE_HEADS, cfg.rotary_fraction, cfg.rotary_base)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(S, STYLE_HEADS, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.style_layers)
        )
        self.norm = nn.LayerNorm(S)

    def forward(self, tokens: Tensor) -> Tensor:
        B, R = tokens.shape
        pad = tokens == PAD  # [B, R]
        positions = torch.arange(R, device=tokens.device).expand(B, R)
        # Bidirectional: every position sees every non-PAD one (a PAD query sees all: no NaN).
        mask = (~pad)[:, None, None, :] | pad[:, None, :, None]  # [B, 1, R, R]
        angles = self.rotary.angles(positions)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, mask, self.rotary, angles)
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # [B, R, 1]
        pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # [B, S]
        # Normalised after the mean, not before: the mean of R unit-scale vectors that point
        # every which way is at most ~1/sqrt(R) as large, so a vector pooled from normalised positions
        # differed from piece to piece by 1 % of a label embedding's spread, and training
        # learned to ignore it (the bundled model's 7,000 steps: own and other style, same NLL).
        return self.norm(pooled)


def style_similarity(reference_vectors: Tensor, window_vectors: Tensor, piece: Tensor) -> Tensor:
    """[N, N] cosine similarity of row i's reference vector to row j's window vector; -inf
    between two different rows of one piece, which are not each other's negatives."""
    ref = F.normalize(reference_vectors.float(), dim=-1)
    own = F.normalize(window_vectors.float(), dim=-1)
    sim = ref @ own.T
    same = piece[:, None] == piece[None, :]
    return sim.masked_fill(same & ~torch.eye(len(piece), dtype=torch.bool, device=sim.device), float("-inf"))


def style_contrast_loss(
    encoder: StyleEncoder, reference: Tensor, window: Tensor, piece: Tensor, temperature: float = 0.1
) -> Tensor:
    """InfoNCE between the style vectors of each row's reference [B, R] and of its window's own
    tokens [B, R]: a reference must pick out its window among the batch's (both directions).

    The prior's loss alone let the encoder's output shrink to a constant (two fine-tunes: the
    spread of its vectors fell from 4.6 to 0.007 in 750 steps), because the long context
    already says most of what a reference could; this term keeps the vector telling pieces
    apart, so that what it carries is there for the prior to use. Rows without a reference are
    left out, and two rows of one piece are not each other's negatives."""
    present = (reference != PAD).any(-1)  # [B]
    if int(present.sum()) < 2:
        return reference.new_zeros((), dtype=torch.float32)
    sim = style_similarity(encoder(reference[present]), encoder(window[present]), piece[present])
    sim = sim / temperature  # [N, N]: row i's reference against every window
    target = torch.arange(len(sim), device=sim.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))


class Conditioner(nn.Module):
    """Cond -> the vector [B, T, D] added to the queries at T positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, bins = cfg.width, cfg.timing_bins
        self.cfg = cfg
        self.label = nn.Embedding(len(cfg.labels) + 1, D) if cfg.conditioned_on("label") else None
        self.style_logits = None
        if cfg.conditioned_on("timing"):
            self.total = nn.Embedding(bins + 1, D)
            self.elapsed = nn.Embedding(bins + 1, D)
            self.fraction = nn.Embedding(bins + 1, D)
            self.remaining = nn.Embedding(bins + 1, D) if cfg.timing_remaining else None
        if cfg.conditioned_on("style"):
            self.style_encoder = StyleEncoder(cfg)
            self.style_proj = nn.Linear(cfg.style_width, D)
            self.no_style = nn.Parameter(torch.zeros(D))
            # its own LayerNorm: the vector at unit scale whatever the encoder's last gain (a
            # model branched into style_logits may have turned that gain down to nearly 0)
            if cfg.style_logits:
                self.style_logit_norm = nn.LayerNorm(cfg.style_width)
                self.style_logits = nn.Linear(cfg.style_width, cfg.vocab_size, bias=False)
        if cfg.conditioned_on("keyboard"):
            self.keyboard = nn.Linear(2 * NUM_PITCHES, D, bias=False)
        if cfg.keyboard_logits:  # zeros: a no-op at first, so a trained model can take it on
            self.on_held = nn.Parameter(torch.zeros(NUM_PITCHES))  # NOTE_ON of a key down
            self.off_silent = nn.Parameter(torch.zeros(NUM_PITCHES))  # NOTE_OFF of a key up
            self.off_struck = nn.Parameter(torch.zeros(NUM_PITCHES))  # NOTE_OFF of one just struck
            self.eos_held = nn.Parameter(torch.zeros(1))  # EOS while a key is down

    def zero_outputs(self) -> None:
        """Start as a no-op (called after the model's own initialisation)."""
        outputs = [
            getattr(self, name, None)
            for name in (
                "label", "total", "elapsed", "fraction", "remaining", "style_proj", "keyboard", "style_logits"
            )
        ]  # fmt: skip
        with torch.no_grad():
            for module in outputs:
                for p in module.parameters() if module is not None else ():
                    p.zero_()

    def style_vectors(self, cond: Cond, batch: int, device) -> tuple[Tensor, Tensor]:
        """(vectors [B, S], present [B] bool) from the given vectors or the reference tokens
        (a row whose reference is all PAD has none)."""
        if cond.style is not None:
            present = cond.has_style
            return cond.style, present if present is not None else torch.ones(
                batch, dtype=torch.bool, device=device
            )
        if cond.reference is not None:
            return self.style_encoder(cond.reference), (cond.reference != PAD).any(-1)
        return torch.zeros(batch, self.cfg.style_width, device=device), torch.zeros(
            batch, dtype=torch.bool, device=device
        )

    def resolve(self, cond: Cond | None) -> Cond | None:
        """`cond` with its reference tokens encoded to style vectors, so that the queries and
        the style logits share one pass of the style encoder."""
        if cond is None or cond.style is not None or cond.reference is None:
            return cond
        if not self.cfg.conditioned_on("style"):
            return cond
        vectors, present = self.style_vectors(cond, cond.reference.shape[0], cond.reference.device)
        return replace(cond, style=vectors, has_style=present, reference=None)

    def forward(self, cond: Cond | None, batch: int, length: int, device) -> Tensor:
        """[B, T, D] for T = length positions whose elapsed times are cond.elapsed[:, -T:]."""
        cond = cond or Cond()
        out = torch.zeros(batch, 1, self.cfg.width, device=device)
        if self.label is not None:
            label = (
                cond.label if cond.label is not None else torch.zeros(batch, dtype=torch.long, device=device)
            )
            out = out + self.label(label)[:, None]
        if self.cfg.conditioned_on("timing"):
            bins = self.cfg.timing_bins
            total = cond.total if cond.total is not None else torch.zeros(batch, device=device)
            known = total > 0
            if cond.elapsed is None:
                elapsed_b = torch.zeros(batch, length, dtype=torch.long, device=device)
                frac_b = left_b = elapsed_b
            else:
                elapsed = cond.elapsed[:, -length:]
                elapsed_b, frac_b = log_bucket(elapsed, bins), fraction_bucket(elapsed, total, bins)
                # past the end (only generation gets there) counts as at it: 0 s left
                left_b = torch.where(known[:, None], log_bucket(total[:, None] - elapsed, bins), 0)
            total_b = torch.where(known, log_bucket(total, bins), 0)
            out = out + self.total(total_b)[:, None] + self.elapsed(elapsed_b) + self.fraction(frac_b)
            if self.remaining is not None:
                out = out + self.remaining(left_b)
        if self.cfg.conditioned_on("style"):
            vectors, present = self.style_vectors(cond, batch, device)
            styled = torch.where(present[:, None], self.style_proj(vectors.to(out.dtype)), self.no_style)
            out = out + styled[:, None]
        if self.cfg.conditioned_on("keyboard"):
            held = _held(cond, length).to(out.dtype)  # [B, T, 128]
            sounding = (held >= 0).to(out.dtype)
            features = torch.cat([sounding, sounding * torch.log1p(held.clamp_min(0))], dim=-1)  # [B, T, 256]
            out = out + self.keyboard(features)
        return out.expand(batch, length, -1) if out.shape[1] == 1 else out

    def logit_bias(self, cond: Cond | None, batch: int, length: int, vocab_size: int) -> Tensor | None:
        """[B, T or 1, vocab] added to the logits of B rows x T = length positions
        (`keyboard_logits`, `style_logits`), or None."""
        bias = self._keyboard_bias(cond, length, vocab_size) if self.cfg.keyboard_logits else None
        if self.style_logits is not None and cond is not None:
            vectors, present = self.style_vectors(cond, batch, self.style_logits.weight.device)
            styled = self.style_logits(self.style_logit_norm(vectors.float())) * present[:, None]  # [B, V]
            bias = styled[:, None] if bias is None else bias + styled[:, None]
        return bias

    def _keyboard_bias(self, cond: Cond | None, length: int, vocab_size: int) -> Tensor:
        held = _held(cond, length).float()  # [B, T, 128] seconds down, -1: up
        down, s = held >= 0, KEYBOARD_LOGIT_SCALE
        zero = held.new_zeros(())
        bias = held.new_zeros(*held.shape[:2], vocab_size)  # [B, T, V]
        bias[..., NOTE_ON : NOTE_ON + NUM_PITCHES] = torch.where(down, s * self.on_held, zero)
        # struck at this instant: held for 0 s (no TIME_SHIFT since its NOTE_ON)
        struck = torch.where(held == 0, s * self.off_struck, zero)
        bias[..., NOTE_OFF : NOTE_OFF + NUM_PITCHES] = torch.where(down, struck, s * self.off_silent)
        bias[..., EOS] = down.any(-1) * (s * self.eos_held)
        return bias
