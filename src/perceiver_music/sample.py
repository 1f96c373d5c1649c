"""Sampling, and the cache that makes long generation fast and exact (DESIGN.md section 6).

What the model computes once a piece outgrows max_len: the latent at position q cross-attends
to the inputs in (q - max_len, q] (scale windows relative to q as well), and each latent
self-attends to the latents since the last refill. A refill happens when the latents since
the last one would exceed num_latents: the newest `refill` positions (num_latents / 2 by
default) become the latents, and their self-attention is recomputed in one pass.

Two streams compute exactly that:

* `ReferenceStream` (--no-cache): a full forward for every token, over the last
  max_len + k - 1 inputs with k latents, with band masks.
* `CachedStream`: cross-attention keys/values of each input are computed once, rotary
  by absolute position so they never change; latent self-attention keys/values are kept
  since the last refill; one new token costs one latent.

Their logits agree (allclose) at every step, across refills and past max_len; the tests
check this for every architecture. The Transformer baseline has no latents: every position
attends to (p - max_len, p], and its cache holds every position's keys/values.

A conditioned model (model/conditioning.py) is told its `Conditions` by both streams alike:
the fixed ones once, and the time elapsed through each position as the tokens come, so the
two stay equal. Classifier-free guidance runs each sample twice in one batch, conditioned and
not, and samples from uncond + guidance * (cond - uncond).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from perceiver_music.config import TokenizerConfig
from perceiver_music.generate_settings import PIANO, check_sampling
from perceiver_music.model.base import TokenModel, autocast
from perceiver_music.model.conditioning import Cond
from perceiver_music.tokens.performance import (
    BOS,
    EOS,
    NOTE_OFF,
    NOTE_ON,
    NUM_PITCHES,
    PAD,
    Vocab,
    keyboard_state,
    note_events,
)

_LAYOUT = Vocab(TokenizerConfig())  # for note_events: its note ids are any tokenizer's
RESTRIKE = ("release", "drop")


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * max p
    # Zero probability for events that never occur in performances (see KeyboardMask).
    keyboard: bool = True
    pitch_range: tuple[int, int] = PIANO  # NOTE_ONs outside it are masked (widened by the prompt)
    # What the mask does with the probability of re-striking a sounding pitch: "release" gives
    # it to that pitch's NOTE_OFF (a performance re-attacks a held key by releasing it first),
    # "drop" spreads it over every possible event.
    restrike: str = "release"

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.pitch_range)
        if self.restrike not in RESTRIKE:
            raise ValueError(f"restrike must be one of {', '.join(RESTRIKE)}, got {self.restrike!r}")


@dataclass
class Conditions:
    """What a conditioned model generates under (every row alike); the defaults ask for nothing."""

    label: int = 0  # 1 + index into the model's cfg.labels; 0: no label
    total_seconds: float = 0.0  # the piece's length, prompt included; 0: not given
    style: Tensor | None = None  # [style_width] a style vector (generate.style_embedding)
    guidance: float = 1.0  # 1: conditioned logits only; 0: unconditioned; > 1: pushed further
    start_seconds: float = 0.0  # time before the prompt's first token (a prompt cut from a piece)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # how far each token moves time
    # [V] seconds each token id moves time, for tokens whose clock is not the tokenizer's
    # TIME_SHIFTs (audio codes: audio.codes.frame_steps / frame rate)
    id_seconds: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.guidance >= 0 or np.isinf(self.guidance):
            raise ValueError(f"guidance must be >= 0 and finite, got {self.guidance}")
        if self.total_seconds < 0 or self.start_seconds < 0:
            raise ValueError("total_seconds and start_seconds must be >= 0")

    def given(self) -> bool:
        return self.label > 0 or self.total_seconds > 0 or self.style is not None

    def cond(self, batch: int, device, null: bool = False) -> Cond:
        """The fixed part of a batch's Cond (elapsed comes from the stream); null: nothing given."""
        style = None if null or self.style is None else self.style.to(device).float().expand(batch, -1)
        return Cond(
            label=torch.full((batch,), 0 if null else self.label, dtype=torch.long, device=device),
            total=torch.full((batch,), 0.0 if null else self.total_seconds, device=device),
            style=style,
            has_style=None if style is None else torch.ones(batch, dtype=torch.bool, device=device),
        )

    def token_seconds(self, vocab_size: int, device) -> Tensor:
        """[V] seconds each token id moves time forward."""
        if self.id_seconds is not None:
            if len(self.id_seconds) != vocab_size:
                raise ValueError(f"id_seconds has {len(self.id_seconds)} ids, the model {vocab_size}")
            return torch.as_tensor(self.id_seconds, dtype=torch.float64, device=device)
        steps = Vocab(self.tokenizer).shift_steps(np.arange(vocab_size))
        return torch.as_tensor(steps / self.tokenizer.steps_per_second, dtype=torch.float64, device=device)


def sample_next(
    logits: Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    keyboard: KeyboardMask | None = None,
) -> Tensor:
    """logits [B, V] -> next tokens [B]. PAD and BOS are never sampled; with `keyboard`,
    neither are the events it rules out."""
    logits = logits.float().clone()
    logits[:, [PAD, BOS]] = float("-inf")
    if keyboard is not None:
        keyboard.apply(logits)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.min_p > 0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, 0.0)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= cfg.top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


class KeyboardMask:
    """Per batch row, which pitches are sounding, and the events that are impossible given that.

    A NOTE_OFF of a silent pitch, a NOTE_ON of a sounding one, EOS while a note sounds, a
    NOTE_ON outside the pitch range and a NOTE_OFF of a key struck at the same instant (no
    TIME_SHIFT between: a note of no length) all have probability zero in performance data (in
    ASAP's 2.85 M training notes: no stray NOTE_OFF, 3 re-struck NOTE_ONs, every pitch in
    21..108, no note of no length), so masking them removes only events the decoder would have
    to repair. The state starts
    from the prompt, counted as the decoder counts it, and follows each sampled token; it
    depends only on the tokens, so cached and uncached generation see the same mask.

    release: the probability of a NOTE_ON of a sounding pitch goes to that pitch's NOTE_OFF
    (before temperature and the other filters) instead of to every possible event. A model
    that wants a held key struck again meant a re-attack, which a performance writes as the
    release and then the strike; spread over everything else, that probability mostly starts
    other notes, and the keys held keep adding up. Likewise EOS while keys are down goes to
    their NOTE_OFFs (a performance ends by releasing them), so a piece can reach its end.
    """

    def __init__(
        self,
        prompt: Tensor,
        pitch_range: tuple[int, int] = PIANO,
        release: bool = True,
        tokenizer: TokenizerConfig | None = None,
    ):
        self.release = release
        vocab = Vocab(tokenizer or TokenizerConfig())
        self.shifts = (vocab.time_shift, vocab.velocity)  # the ids that move time
        B = prompt.shape[0]
        rows = [note_events(row.cpu().numpy(), _LAYOUT) for row in prompt]
        self.sounding = torch.as_tensor(
            np.stack([ev.sounding_at_end() for ev in rows]), dtype=torch.int32, device=prompt.device
        )  # [B, 128]
        # Keys struck since time last moved: the prompt's NOTE_ONs after its last TIME_SHIFT.
        self.struck = torch.zeros(B, NUM_PITCHES, dtype=torch.bool, device=prompt.device)
        for b, row in enumerate(prompt.cpu().numpy()):
            moved = np.flatnonzero((row >= self.shifts[0]) & (row < self.shifts[1]))
            tail = row[moved[-1] + 1 :] if len(moved) else row
            self.struck[b, tail[(tail >= NOTE_ON) & (tail < NOTE_OFF)] - NOTE_ON] = True
        lo, hi = pitch_range
        played = [ev.pitch[ev.on] for ev in rows if ev.on.any()]
        if played:  # a prompt's own pitches are never refused
            lo, hi = min(lo, int(min(p.min() for p in played))), max(hi, int(max(p.max() for p in played)))
        self.outside = torch.ones(NUM_PITCHES, dtype=torch.bool, device=prompt.device)
        self.outside[lo : hi + 1] = False
        self.rows = torch.arange(B, device=prompt.device)

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, V] with the impossible events at -inf (in place)."""
        sounding = self.sounding > 0  # [B, 128]
        releasable = sounding & ~self.struck
        if self.release:
            on, off = logits[:, NOTE_ON : NOTE_ON + NUM_PITCHES], logits[:, NOTE_OFF : NOTE_OFF + NUM_PITCHES]
            off.copy_(torch.where(releasable, torch.logaddexp(on, off), off))
            # Ending while keys are down: EOS's probability goes to their releases, in proportion
            # to each one's own (each logit + log(1 + p(EOS) / p(releases))).
            held = off.masked_fill(~releasable, float("-inf")).logsumexp(-1, keepdim=True)  # [B, 1]
            boost = F.softplus(logits[:, EOS : EOS + 1] - held)
            off.copy_(torch.where(releasable, off + boost, off))
        logits[:, NOTE_ON : NOTE_ON + NUM_PITCHES].masked_fill_(sounding | self.outside, float("-inf"))
        logits[:, NOTE_OFF : NOTE_OFF + NUM_PITCHES].masked_fill_(~releasable, float("-inf"))
        logits[:, EOS].masked_fill_(sounding.any(-1), float("-inf"))
        return logits

    def update(self, token: Tensor) -> None:
        """Follow tokens [B] (a stray NOTE_OFF, possible with the mask off, changes nothing)."""
        on = (token >= NOTE_ON) & (token < NOTE_OFF)
        off = (token >= NOTE_OFF) & (token < NOTE_OFF + NUM_PITCHES)
        pitch = torch.where(on, token - NOTE_ON, token - NOTE_OFF).clamp(0, NUM_PITCHES - 1)
        count = self.sounding[self.rows, pitch] + on.int() - off.int()
        self.sounding[self.rows, pitch] = count.clamp_min(0)
        moved = (token >= self.shifts[0]) & (token < self.shifts[1])
        self.struck &= ~moved[:, None]
        self.struck[self.rows, pitch] |= on


class _Stream:
    """Logits for the next token of a growing batch of sequences (all the same length)."""

    def __init__(
        self,
        model: TokenModel,
        prompt: Tensor,
        total: int,
        refill: int | None,
        cond: Cond | None = None,
        token_seconds: Tensor | None = None,
        start_seconds: float = 0.0,
        tokenizer: TokenizerConfig | None = None,
    ):
        """cond: the fixed conditions of each row, for a conditioned model; token_seconds [V]:
        how far each token id moves time, for one conditioned on timing (the stream then
        tracks the time elapsed through every position, from start_seconds). A model
        conditioned on the keyboard gets its state through every position (tokenizer: how
        far each token moves time)."""
        tokenizer = tokenizer or TokenizerConfig()
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError("the prompt must be [batch, length >= 1] tokens (start from BOS)")
        self.model, self.total = model, total
        self.cfg = model.cfg
        self.perceiver = self.cfg.arch == "perceiver_ar"
        N = self.cfg.num_latents
        self.refill_size = refill or max(1, N // 2)
        if not 1 <= self.refill_size <= N:
            raise ValueError(f"refill must be in 1..num_latents ({N}), got {refill}")
        self.tokens = prompt.new_zeros(prompt.shape[0], total)
        self.tokens[:, : prompt.shape[1]] = prompt
        self.length = prompt.shape[1]
        # The first latent of the current latent set (Perceiver AR).
        self.first = 0 if self.length <= N else self.length - self.refill_size
        self.cond, self.token_seconds, self.elapsed = cond, token_seconds, None
        if cond is not None and token_seconds is not None:
            self.elapsed = torch.zeros(prompt.shape[0], total, dtype=torch.float64, device=prompt.device)
            self.elapsed[:, : self.length] = start_seconds + token_seconds[prompt].cumsum(1)
        self.keyboard = None
        if self.cfg.conditioned_on("keyboard"):  # the tokens give it: a model always gets it
            self.cond = cond or Cond()
            self._start_keyboard(prompt, total, tokenizer)

    def _start_keyboard(self, prompt: Tensor, total: int, tokenizer: TokenizerConfig) -> None:
        """The keyboard state through the prompt, as training counts it (keyboard_state), then
        followed token by token: each pitch's onset time and whether it sounds."""
        vocab = Vocab(tokenizer)
        B, P = prompt.shape
        held = np.stack([keyboard_state(row.cpu().numpy(), vocab) for row in prompt])  # [B, P, 128]
        self.keyboard = torch.full((B, total, NUM_PITCHES), -1.0, device=prompt.device)
        self.keyboard[:, :P] = torch.as_tensor(held, device=prompt.device)
        self.move = Conditions(tokenizer=tokenizer).token_seconds(self.cfg.vocab_size, prompt.device)  # [V]
        self.now = self.move[prompt].sum(1)  # [B] seconds through the prompt
        last = self.keyboard[:, P - 1].double()
        self.sounding = last >= 0  # [B, 128]
        self.onset = torch.where(self.sounding, self.now[:, None] - last, 0.0)  # [B, 128]

    def _follow_keyboard(self, token: Tensor) -> None:
        """The keyboard state after tokens [B], at the position just appended."""
        self.now = self.now + self.move[token]
        on = (token >= NOTE_ON) & (token < NOTE_OFF)
        off = (token >= NOTE_OFF) & (token < NOTE_OFF + NUM_PITCHES)
        pitch = torch.where(on, token - NOTE_ON, token - NOTE_OFF).clamp(0, NUM_PITCHES - 1)[
            :, None
        ]  # [B, 1]
        # Gather-where-scatter: no boolean indexing, so no host sync and nothing sized by the data.
        was = self.sounding.gather(1, pitch)[:, 0]
        self.sounding.scatter_(1, pitch, (on | (was & ~off))[:, None])
        onset = torch.where(on, self.now, self.onset.gather(1, pitch)[:, 0])
        self.onset.scatter_(1, pitch, onset[:, None])
        self.keyboard[:, self.length] = (self.now[:, None] - self.onset).masked_fill_(~self.sounding, -1.0)

    def _cond(self, lo: int, hi: int) -> Cond | None:
        """The conditions of positions lo..hi-1."""
        if self.cond is None or (self.elapsed is None and self.keyboard is None):
            return self.cond
        return self.cond.with_positions(
            None if self.elapsed is None else self.elapsed[:, lo:hi].float(),
            None if self.keyboard is None else self.keyboard[:, lo:hi],
        )

    def _advance(self) -> bool:
        """Account for the position just appended; True when it starts a refill."""
        q = self.length - 1
        if self.perceiver and q - self.first + 1 > self.cfg.num_latents:
            self.first = q + 1 - self.refill_size
            return True
        return False

    def append(self, token: Tensor) -> Tensor:
        if self.length >= self.total:
            raise ValueError(f"the stream holds at most {self.total} tokens")
        self.tokens[:, self.length] = token
        if self.elapsed is not None:
            self.elapsed[:, self.length] = self.elapsed[:, self.length - 1] + self.token_seconds[token]
        if self.keyboard is not None:
            self._follow_keyboard(token)
        self.length += 1
        return self._logits_after_append(self._advance())


class ReferenceStream(_Stream):
    """No cache: a full forward per token over exactly what the latents may see."""

    def __init__(self, model, prompt, total, refill=None, **conditioning):
        super().__init__(model, prompt, total, refill, **conditioning)
        self.current = self._forward()

    def _forward(self) -> Tensor:
        T, band = self.length, self.cfg.max_len
        if self.perceiver:
            lo = max(0, self.first - band + 1)
            k = T - self.first
        else:
            lo, k = 0, 1
        tokens = self.tokens[:, lo:T]
        positions = torch.arange(lo, T, device=tokens.device).expand_as(tokens)
        return self.model(tokens, positions, num_latents=k, band=band, cond=self._cond(lo, T))[:, -1]

    def _logits_after_append(self, refilled: bool) -> Tensor:
        self.current = self._forward()
        return self.current


class CachedStream(_Stream):
    def __init__(self, model, prompt, total, refill=None, **conditioning):
        super().__init__(model, prompt, total, refill, **conditioning)
        like = next(model.parameters())
        # Input keys/values are kept for at most two context windows: older positions are
        # dropped (moved out) once no latent can see them, so memory follows the context, not
        # the length of the piece.
        self.capacity = min(total, max(prompt.shape[1], 2 * (self.cfg.max_len + self.cfg.num_latents)))
        self.cache = model.new_cache(prompt.shape[0], self.capacity, like)
        T = self.length
        if self.perceiver:
            model.cache_inputs(self.tokens[:, :T], 0, self.cache)
            self.current = self._refill()
        else:
            self.current = model.cached_logits(
                self.tokens[:, :T], 0, self.cache, self.cfg.max_len, self._cond(0, T)
            )[:, -1]

    def _refill(self) -> Tensor:
        latents = self.tokens[:, self.first : self.length]
        cond = self._cond(self.first, self.length)
        return self.model.latent_logits(latents, self.first, self.cache, self.cfg.max_len, True, cond)[:, -1]

    def _logits_after_append(self, refilled: bool) -> Tensor:
        q = self.length - 1
        new = self.tokens[:, q : q + 1]
        input_caches = self.cache["cross"] if self.perceiver else self.cache
        if q - input_caches[0].base >= self.capacity:
            # The oldest input any latent from now on can see: the band of the first latent.
            oldest = max(0, (self.first if self.perceiver else q) - self.cfg.max_len + 1)
            for kv in input_caches:
                kv.keep_from(oldest, q)
        cond = self._cond(q, q + 1)
        if not self.perceiver:
            self.current = self.model.cached_logits(new, q, self.cache, self.cfg.max_len, cond)[:, -1]
        else:
            self.model.cache_inputs(new, q, self.cache)
            if refilled:
                self.current = self._refill()
            else:
                self.current = self.model.latent_logits(new, q, self.cache, self.cfg.max_len, False, cond)[
                    :, -1
                ]
        return self.current


@torch.no_grad()
def generate(
    model: TokenModel,
    prompt: Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    seed: int | None = 0,
    use_cache: bool = True,
    refill: int | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[int], None] | None = None,
    stop: Callable[[Tensor], Tensor] | None = None,
    precision: str = "auto",
    conditions: Conditions | None = None,
    logits_mask: KeyboardMask | None = None,
    tokenizer: TokenizerConfig | None = None,
) -> list[Tensor]:
    """Continue each row of prompt [B, P] by up to max_new_tokens tokens.

    Returns one tensor per row: the prompt and its continuation, which ends at its first EOS
    (included) when stop_at_eos, or at the first token for which `stop(tokens [B]) -> [B]
    bool` holds. `on_token(n)` is called after each step (for progress bars).

    precision: "fp32", "bf16" (matrix products in bf16 under autocast; the caches and
    attention stay float32) or "auto" (bf16 on GPU, fp32 on CPU). One autocast context spans
    the whole generation, so each weight is cast to bf16 once, not once per token (autocast
    keeps those copies for parameters that require grad, as a loaded model's do).

    conditions: for a conditioned model (ignored by others); with guidance other than 1, each
    row is computed twice (conditioned and not) in one batch of 2B.
    logits_mask: an object with `apply(logits [B, V])` and `update(tokens [B])`, like
    KeyboardMask, used instead of it (audio codes: audio.codes.CodebookMask).
    tokenizer: which ids are TIME_SHIFTs, for the keyboard mask (default: conditions' or the
    default tokenizer's).
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    with autocast(prompt.device, precision):
        return _generate(
            model, prompt, max_new_tokens, sampling, seed, use_cache, refill, stop_at_eos, on_token, stop,
            conditions, logits_mask, tokenizer,
        )  # fmt: skip


def _stream_conditioning(
    model: TokenModel, conditions: Conditions | None, batch: int, device
) -> tuple[dict, bool]:
    """(the streams' conditioning keywords, whether rows are doubled for guidance)."""
    if model.cfg.arch not in ("perceiver_ar", "transformer") or not model.cfg.condition:
        return {}, False
    conditions = conditions or Conditions()
    guided = conditions.guidance != 1 and conditions.given()
    cond = conditions.cond(batch, device)
    if guided:
        null = conditions.cond(batch, device, null=True)
        cond = Cond(
            label=torch.cat([cond.label, null.label]),
            total=torch.cat([cond.total, null.total]),
            style=None if cond.style is None else torch.cat([cond.style, cond.style]),
            has_style=None if cond.style is None else torch.arange(2 * batch, device=device) < batch,
        )
    keywords = {"cond": cond, "tokenizer": conditions.tokenizer}
    if model.cfg.conditioned_on("timing"):
        keywords["token_seconds"] = conditions.token_seconds(model.cfg.vocab_size, device)
        keywords["start_seconds"] = conditions.start_seconds
    return keywords, guided


def _generate(
    model,
    prompt,
    max_new_tokens,
    sampling,
    seed,
    use_cache,
    refill,
    stop_at_eos,
    on_token,
    stop,
    conditions,
    logits_mask,
    tokenizer,
):
    sampling = sampling or SamplingConfig()
    model.eval()
    generator = torch.Generator(device=prompt.device)
    if seed is not None:
        generator.manual_seed(seed)
    B, P = prompt.shape
    keywords, guided = _stream_conditioning(model, conditions, B, prompt.device)
    rows = torch.cat([prompt, prompt]) if guided else prompt  # [2B, P]: conditioned, then not
    stream = (CachedStream if use_cache else ReferenceStream)(
        model, rows, P + max_new_tokens, refill, **keywords
    )
    g = conditions.guidance if guided else 1.0

    def mixed(logits: Tensor) -> Tensor:
        if not guided:
            return logits
        c, u = logits[:B].float(), logits[B:].float()
        return u + g * (c - u)

    end = torch.full((B,), P + max_new_tokens, dtype=torch.long)  # each row's length
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    keyboard = logits_mask
    if keyboard is None and sampling.keyboard:
        tokenizer = tokenizer or (conditions.tokenizer if conditions is not None else None)
        keyboard = KeyboardMask(prompt, sampling.pitch_range, sampling.restrike == "release", tokenizer)
    logits = mixed(stream.current)
    for i in range(max_new_tokens):
        token = sample_next(logits, sampling, generator, keyboard)
        if keyboard is not None:
            keyboard.update(token)
        finished = torch.zeros_like(done)
        if stop_at_eos:
            finished |= token == EOS
        if stop is not None:
            finished |= stop(token)
        end[(finished & ~done).cpu()] = P + i + 1
        done |= finished
        if on_token is not None:
            on_token(i + 1)
        both = torch.cat([token, token]) if guided else token
        if bool(done.all()) or i == max_new_tokens - 1:
            stream.tokens[:, stream.length] = both
            stream.length += 1
            break
        logits = mixed(stream.append(both))
    return [stream.tokens[b, : min(int(end[b]), stream.length)].clone() for b in range(B)]
