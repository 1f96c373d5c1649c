"""Cached generation is exact: at every step its logits equal the no-cache reference's, across
refills and after the sequence outgrows max_len, for every architecture. Sampling controls."""

from __future__ import annotations

import pytest
import torch

from perceiver_music.config import ModelConfig
from perceiver_music.model import build_model
from perceiver_music.model.base import autocast
from perceiver_music.sample import (
    CachedStream,
    KeyboardMask,
    ReferenceStream,
    SamplingConfig,
    generate,
    sample_next,
)
from perceiver_music.tokens.performance import BOS, EOS, PAD

V = 391
ARCHS = {
    "perceiver_ar": dict(arch="perceiver_ar", scales=["full"]),
    "perceivers": dict(arch="perceiver_ar", scales=["full", 6]),
    "perceivers_3_scales": dict(arch="perceiver_ar", scales=[4, "full", 9]),
    "transformer": dict(arch="transformer", num_latents=24),
}


def tiny(**kw):
    base = dict(vocab_size=V, max_len=24, num_latents=8, width=32, heads=4, layers=2, dropout=0.0, z_loss=0.0)
    base.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**base)).eval()


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("prompt_len", [1, 13, 40])
def test_cached_logits_equal_the_reference_at_every_step(name, prompt_len):
    model = tiny(**ARCHS[name])
    g = torch.Generator().manual_seed(prompt_len)
    steps = 70  # past max_len (24) and through several refills (8 latents, refill 4)
    total = prompt_len + steps
    prompt = torch.randint(3, V, (2, prompt_len), generator=g)
    prompt[:, 0] = BOS
    forced = torch.randint(3, V, (2, steps), generator=g)
    with torch.no_grad():
        cached, ref = CachedStream(model, prompt, total), ReferenceStream(model, prompt, total)
        assert torch.allclose(cached.current, ref.current, atol=1e-4)
        refills = 0
        for i in range(steps - 1):
            before = cached.first
            a, b = cached.append(forced[:, i]), ref.append(forced[:, i])
            refills += cached.first != before
            assert torch.allclose(a, b, atol=1e-4), (i, (a - b).abs().max())
    assert cached.length == total - 1 > model.cfg.max_len
    if model.cfg.arch == "perceiver_ar":
        assert refills >= 2


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_generation_stays_close_to_float32_and_to_its_reference(name):
    """bf16: matrix products in bf16 (autocast), caches and attention in float32."""
    model = tiny(**ARCHS[name])
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (2, 13), generator=g)
    forced = torch.randint(3, V, (2, 40), generator=g)  # past max_len, through refills
    with torch.no_grad():
        streams = {}
        for precision in ("fp32", "bf16"):
            with autocast("cpu", precision):
                c, r = CachedStream(model, prompt, 54), ReferenceStream(model, prompt, 54)
                streams[precision] = [(c.current, r.current)] + [(c.append(t), r.append(t)) for t in forced.T]
        caches = c.cache["cross"] + c.cache["self"] if model.cfg.arch == "perceiver_ar" else c.cache
        assert all(kv.k.dtype == torch.float32 for kv in caches)
    scale = max(a.abs().max() for a, _ in streams["fp32"])
    for (a32, _), (a16, r16) in zip(streams["fp32"], streams["bf16"]):
        assert a16.dtype == torch.bfloat16  # the bf16 path did run ...
        assert (a16.float() - a32).abs().max() < 0.02 * scale  # ... and lost only bf16 rounding
        assert (a16.float() - r16.float()).abs().max() < 0.02 * scale
    assert any(
        not torch.equal(a16.float(), a32) for (a32, _), (a16, _) in zip(streams["fp32"], streams["bf16"])
    )


def test_bf16_generate_and_bad_precision():
    model = tiny()
    prompt = torch.full((1, 1), BOS)
    out = generate(model, prompt, 20, SamplingConfig(temperature=0), stop_at_eos=False, precision="bf16")
    assert len(out[0]) == 21
    with pytest.raises(ValueError, match="precision must be one of"):
        generate(model, prompt, 5, precision="fp16")


def test_refill_size_is_configurable_and_checked():
    model = tiny()
    prompt = torch.full((1, 1), BOS)
    with torch.no_grad():
        for refill in (1, 3, 8):
            c, r = CachedStream(model, prompt, 40, refill), ReferenceStream(model, prompt, 40, refill)
            for t in range(30):
                assert torch.allclose(
                    c.append(torch.tensor([3 + t])), r.append(torch.tensor([3 + t])), atol=1e-4
                )
        with pytest.raises(ValueError, match="refill must be in 1..num_latents"):
            CachedStream(model, prompt, 40, refill=9)


def test_generate_with_and_without_cache_agree():
    model = tiny(scales=["full", 6])
    prompt = torch.full((3, 1), BOS)
    a = generate(model, prompt, 60, SamplingConfig(temperature=1.0), seed=5, stop_at_eos=False)
    b = generate(
        model, prompt, 60, SamplingConfig(temperature=1.0), seed=5, use_cache=False, stop_at_eos=False
    )
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(len(x) == 61 and x[0] == BOS for x in a)
    assert not torch.equal(a[0], a[1])  # the batch rows are different samples
    c = generate(model, prompt, 60, SamplingConfig(temperature=1.0), seed=6, stop_at_eos=False)
    assert not torch.equal(a[0], c[0])


def test_generation_stops_at_eos():
    model = tiny()
    with torch.no_grad():
        model.head.bias[EOS] = 50.0  # make EOS overwhelmingly likely
    out = generate(model, torch.full((2, 1), BOS), 30, SamplingConfig(), seed=0)
    assert [len(x) for x in out] == [2, 2] and all(x[-1] == EOS for x in out)


def test_sampling_controls():
    logits = torch.log(torch.tensor([[0.0, 0.0, 0.05, 0.5, 0.3, 0.15]]).clamp_min(1e-12)).repeat(2000, 1)
    logits[:, BOS] = 10.0  # BOS and PAD are never sampled, however likely
    g = torch.Generator().manual_seed(0)
    greedy = sample_next(logits, SamplingConfig(temperature=0))
    assert (greedy == 3).all()
    top2 = sample_next(logits, SamplingConfig(top_k=2), g)  # among samplable tokens: BOS is out first
    assert set(top2.tolist()) == {3, 4}
    nucleus = sample_next(logits, SamplingConfig(top_p=0.75), g)  # 0.5 + 0.3 reaches 0.75
    assert set(nucleus.tolist()) == {3, 4}
    minp = sample_next(logits, SamplingConfig(min_p=0.35), g)  # keep p >= 0.175
    assert set(minp.tolist()) == {3, 4}
    anything = sample_next(logits, SamplingConfig(), g)
    assert set(anything.tolist()) == {2, 3, 4, 5} and PAD not in anything.tolist()
    share = (anything == 3).float().mean().item()
    assert 0.45 < share < 0.55


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(min_p=1.0), "min_p"),
    ],
)
def test_invalid_sampling_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kw)


# ----------------------------------------------------------------------------- keyboard mask

ON, OFF, SHIFT, VELOCITY = 3, 131, 259, 359  # NOTE_ON 0, NOTE_OFF 0, TIME_SHIFT 1, VELOCITY 1


def _validity(row):
    """(stray NOTE_OFFs, re-struck NOTE_ONs, NOTE_ONs outside 21..108, EOS while sounding, notes
    of no length) of a row, counted by a plain loop over the tokens (independent of the
    vectorised code under test)."""
    sounding = [0] * 128
    struck_now: set[int] = set()
    stray = restruck = outside = eos_sounding = instant = 0
    for t in row.tolist():
        if ON <= t < OFF:
            p = t - ON
            restruck += sounding[p] > 0
            outside += not 21 <= p <= 108
            sounding[p] += 1
            struck_now.add(p)
        elif OFF <= t < SHIFT:
            p = t - OFF
            stray += sounding[p] == 0
            instant += sounding[p] > 0 and p in struck_now
            sounding[p] = max(0, sounding[p] - 1)
        elif SHIFT <= t < VELOCITY:
            struck_now.clear()
        elif t == EOS:
            eos_sounding += any(sounding)
    return stray, restruck, outside, eos_sounding, instant


def test_keyboard_mask_starts_from_the_prompt_as_the_decoder_counts():
    # pitch 60 struck twice and released once (still sounding), 62 released without being struck
    # (stray, ignored), 64 struck and released; pitch 10 is below the piano but in the prompt.
    prompt = torch.tensor([[BOS, ON + 60, ON + 60, OFF + 60, OFF + 62, ON + 64, SHIFT, OFF + 64, ON + 10]])
    mask = KeyboardMask(prompt)
    assert mask.sounding[0, 60] == 1 and mask.sounding[0, 10] == 1
    assert mask.sounding[0].sum() == 2
    logits = mask.apply(torch.zeros(1, V))
    blocked = torch.isinf(logits[0])
    assert blocked[ON + 60] and blocked[ON + 10] and not blocked[ON + 64] and not blocked[ON + 21]
    assert blocked[ON + 109] and not blocked[ON + 108]  # above the piano
    assert not blocked[ON + 20]  # below it, but the prompt's own pitch widened the range to 10 ...
    assert blocked[ON + 9]  # ... and no further
    assert torch.isinf(KeyboardMask(prompt[:, :4]).apply(torch.zeros(1, V))[0, ON + 20])  # without 10
    assert not blocked[OFF + 60] and blocked[OFF + 62] and blocked[OFF + 64]
    assert blocked[OFF + 10]  # sounding, but struck at this very instant: a note of no length
    assert blocked[EOS]  # notes are sounding
    assert not blocked[SHIFT:].any()  # time shifts and velocities are always possible
    mask.update(torch.tensor([OFF + 60]))
    mask.update(torch.tensor([OFF + 10]))
    mask.update(torch.tensor([OFF + 70]))  # stray: changes nothing
    assert mask.sounding.sum() == 0 and not torch.isinf(mask.apply(torch.zeros(1, V))[0, EOS])


def test_a_key_struck_at_this_instant_cannot_be_released_until_time_moves():
    """No note of no length (none in the data), so release mode cannot loop OFF, ON, OFF, ON
    without time passing."""
    prompt = torch.tensor([[BOS, ON + 60, SHIFT, ON + 62]])  # 62 struck now, 60 earlier
    for release in (True, False):
        mask = KeyboardMask(prompt, release=release)
        blocked = torch.isinf(mask.apply(torch.zeros(1, V))[0])
        assert blocked[OFF + 62] and not blocked[OFF + 60] and blocked[ON + 62] and blocked[ON + 60]
        mask.update(torch.tensor([OFF + 60]))
        mask.update(torch.tensor([ON + 60]))  # re-attacked at this instant: not releasable either
        mask.update(torch.tensor([VELOCITY]))  # a velocity does not move time
        assert torch.isinf(mask.apply(torch.zeros(1, V))[0, [OFF + 60, OFF + 62]]).all()
        mask.update(torch.tensor([SHIFT + 4]))
        assert not torch.isinf(mask.apply(torch.zeros(1, V))[0, [OFF + 60, OFF + 62]]).any()


def test_release_gives_a_restrikes_probability_to_the_keys_release():
    prompt = torch.tensor([[BOS, ON + 60, SHIFT]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, V, generator=g)
    released = KeyboardMask(prompt).apply(logits.clone())
    dropped = KeyboardMask(prompt, release=False).apply(logits.clone())
    assert torch.isinf(released[0, ON + 60]) and torch.isinf(dropped[0, ON + 60])
    restrike = torch.logaddexp(logits[0, ON + 60], logits[0, OFF + 60])
    # Pitch 60 is the only key down, so it also takes all of EOS's probability.
    assert torch.allclose(released[0, OFF + 60], torch.logaddexp(restrike, logits[0, EOS]))
    assert dropped[0, OFF + 60] == logits[0, OFF + 60]
    assert torch.isinf(released[0, EOS]) and torch.isinf(dropped[0, EOS])
    # Nothing else moves: the other keys' events, time shifts and velocities are as given.
    keep = torch.ones(V, dtype=torch.bool)
    keep[[OFF + 60]] = False
    assert torch.equal(released[0, keep], dropped[0, keep])
    # Two keys down: EOS's probability is shared in proportion to their releases' own.
    two = KeyboardMask(torch.tensor([[BOS, ON + 60, ON + 62, SHIFT]]))
    out = two.apply(logits.clone())
    p_in, p_out = logits[0].softmax(-1), out[0].softmax(-1)  # out: impossible events gone
    before = torch.stack([p_in[ON + 60] + p_in[OFF + 60], p_in[ON + 62] + p_in[OFF + 62]])
    total = p_in[[ON + 60, OFF + 60, ON + 62, OFF + 62, EOS]].sum()
    assert torch.allclose(
        torch.stack([p_out[OFF + 60], p_out[OFF + 62]]) / p_out[[OFF + 60, OFF + 62]].sum(),
        before / before.sum(),
    )
    kept = torch.isfinite(out[0])
    assert torch.allclose(
        p_out[[OFF + 60, OFF + 62]].sum(),
        total / (p_in[kept].sum() - p_in[[OFF + 60, OFF + 62]].sum() + total),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="restrike"):
        SamplingConfig(restrike="again")


def test_masked_generation_has_no_impossible_events_and_unmasked_does():
    model = tiny(scales=["full", 6])
    prompt = torch.full((4, 1), BOS)
    masked = generate(model, prompt, 150, SamplingConfig(), seed=3, stop_at_eos=False)
    free = generate(model, prompt, 150, SamplingConfig(keyboard=False), seed=3, stop_at_eos=False)
    assert all(_validity(row) == (0, 0, 0, 0, 0) for row in masked)
    # An untrained model emits note events at random: the mask is what removed them.
    stray, restruck, outside, _, _ = (sum(x) for x in zip(*(_validity(row) for row in free)))
    assert stray > 10 and outside > 5


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("restrike", ["release", "drop"])
def test_masked_generation_is_the_same_with_and_without_the_cache(name, restrike):
    """Past max_len and through refills, with a prompt whose notes are still sounding."""
    model = tiny(**ARCHS[name])
    prompt = torch.tensor([[BOS, ON + 60, SHIFT, ON + 64, SHIFT + 9]]).expand(2, -1)
    kw = dict(sampling=SamplingConfig(top_p=0.95, restrike=restrike), seed=11, stop_at_eos=False)
    a = generate(model, prompt, 60, **kw)
    b = generate(model, prompt, 60, use_cache=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(len(x) == 65 and _validity(x) == (0, 0, 0, 0, 0) for x in a)


def test_bad_pitch_range_is_refused():
    with pytest.raises(ValueError, match="pitch_range"):
        SamplingConfig(pitch_range=(90, 30))
    with pytest.raises(ValueError, match="pitch_range"):
        SamplingConfig(pitch_range=(0, 128))
