"""Perceiver AR / PerceiverS / Transformer: causality, padding, scales, windows, learning."""

from __future__ import annotations

import pytest
import torch

from perceiver_music.config import ConfigError, ModelConfig
from perceiver_music.model import build_model
from perceiver_music.model.attention import Rotary
from perceiver_music.tokens.performance import PAD

L, N, V = 48, 16, 391

ARCHS = {
    "perceiver_ar": dict(arch="perceiver_ar", scales=["full"]),
    "perceivers": dict(arch="perceiver_ar", scales=["full", 8]),
    "perceivers_absolute": dict(arch="perceiver_ar", scales=["full", 24], scale_mode="absolute"),
    "window_only": dict(arch="perceiver_ar", scales=[6]),
    "transformer": dict(arch="transformer", num_latents=L),
}


def tiny(**kw) -> torch.nn.Module:
    base = dict(vocab_size=V, max_len=L, num_latents=N, width=32, heads=4, layers=2, dropout=0.0, z_loss=0.0)
    base.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**base)).eval()


def batch(b=2, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, V, (b, length), generator=g)
    positions = torch.arange(length).expand(b, -1).clone()
    return tokens, positions


@pytest.mark.parametrize("name", ARCHS)
def test_no_logit_sees_the_future(name):
    model = tiny(**ARCHS[name])
    n = model.cfg.num_latents
    tokens, positions = batch()
    with torch.no_grad():
        ref = model(tokens, positions)
        for t in [L - n, L - n + 3, L - 5, L - 1]:
            changed = tokens.clone()
            changed[:, t + 1 :] = torch.randint(3, V, changed[:, t + 1 :].shape)
            changed[:, t] = (tokens[:, t] + 7 - 3) % (V - 3) + 3  # the token AT t changes too
            out = model(changed, positions)
            j = t - (L - n)  # latent index of position t
            # Logits at position t predict t + 1 from tokens <= t: those before t are unchanged ...
            assert torch.allclose(out[:, :j], ref[:, :j], atol=1e-6), t
            # ... and position t itself does change (the model does look at its own token).
            assert not torch.allclose(out[:, j], ref[:, j], atol=1e-4), t


@pytest.mark.parametrize("name", ARCHS)
def test_left_padding_changes_nothing(name):
    model = tiny(**ARCHS[name])
    n = model.cfg.num_latents
    tokens, positions = batch(length=L - 12)
    padded = torch.cat([torch.full((2, 12), PAD), tokens], dim=1)
    pad_positions = torch.cat([torch.zeros(2, 12, dtype=torch.long), positions], dim=1)
    with torch.no_grad():
        short = model(tokens, positions, num_latents=min(n, L - 12))
        full = model(padded, pad_positions, num_latents=min(n, L - 12))
        # Garbage under the padding mask must not leak either.
        other = model(padded, pad_positions + torch.randint(0, 50, pad_positions.shape) * (padded == PAD))
    assert torch.allclose(short, full, atol=1e-5)
    assert torch.allclose(other[:, -short.shape[1] :], full, atol=1e-5)
    assert torch.isfinite(other).all()  # latents sitting on padding still give finite numbers


def test_perceivers_with_one_full_scale_is_perceiver_ar():
    ar, s = tiny(scales=["full"]), tiny(arch="perceiver_ar", scales=["full"], scale_mode="absolute")
    s.load_state_dict(ar.state_dict())
    tokens, positions = batch()
    with torch.no_grad():
        assert torch.equal(ar(tokens, positions), s(tokens, positions))
    # A window at least as long as the input restricts nothing: [full, W >= L] == [full, full].
    a, b = tiny(scales=["full", "full"]), tiny(scales=["full", L + 5])
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(a(tokens, positions), b(tokens, positions), atol=1e-6)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_a_windowed_layer_cannot_see_further_back(mode):
    W = 6
    model = tiny(scales=[W], num_latents=1, scale_mode=mode)
    tokens, positions = batch()
    with torch.no_grad():
        ref = model(tokens, positions)
        for t in range(L):
            changed = tokens.clone()
            changed[:, t] = (tokens[:, t] + 11 - 3) % (V - 3) + 3
            same = torch.allclose(model(changed, positions), ref, atol=1e-6)
            assert same == (t <= L - 1 - W), t  # the last latent sees exactly (L-1-W, L-1]


def test_relative_windows_follow_each_query():
    W = 6
    model = tiny(scales=[W], num_latents=N)
    tokens, positions = batch()
    with torch.no_grad():
        ref = model(tokens, positions)
        t = L - N - W  # just outside the first latent's window
        changed = tokens.clone()
        changed[:, t] = (tokens[:, t] + 11 - 3) % (V - 3) + 3
        assert torch.allclose(model(changed, positions), ref, atol=1e-6)
        changed[:, t + 1] = (tokens[:, t + 1] + 11 - 3) % (V - 3) + 3
        assert not torch.allclose(model(changed, positions)[:, 0], ref[:, 0], atol=1e-4)


@pytest.mark.parametrize("name", ["perceiver_ar", "perceivers", "transformer"])
def test_any_number_of_latents(name):
    model = tiny(**ARCHS[name])
    tokens, positions = batch()
    with torch.no_grad():
        for n in [1, 2, 7, N, L]:
            out = model(tokens, positions, num_latents=n)
            assert out.shape == (2, n, V) and torch.isfinite(out).all()
        if name != "transformer":  # the last position's prediction depends only on its past
            a = model(tokens, positions, num_latents=3)[:, -1]
            t2 = tokens.clone()
            t2[:, -1] = (tokens[:, -1] + 5 - 3) % (V - 3) + 3
            assert not torch.allclose(a, model(t2, positions, num_latents=3)[:, -1])


@pytest.mark.parametrize("name", ["perceiver_ar", "perceivers", "transformer"])
def test_tiny_model_overfits_one_batch(name):
    model = tiny(**ARCHS[name]).train()
    tokens, positions = batch(b=2, length=L + 1)
    inputs, targets = tokens[:, :-1], tokens[:, -model.cfg.num_latents :]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(model(inputs, positions[:, :-1]), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_prefix_dropout_trains_and_is_off_in_eval():
    model = tiny(prefix_dropout=0.5, scales=["full", 8]).train()
    tokens, positions = batch()
    a, b = model(tokens, positions), model(tokens, positions)
    assert a.shape == (2, N, V) and not torch.allclose(a, b)  # different prefixes dropped
    model.loss(a, tokens[:, -N:]).backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens, positions), model(tokens, positions))


def test_activation_checkpointing_gives_the_same_gradients():
    tokens, positions = batch()
    grads = []
    for ckpt in (False, True):
        model = tiny(scales=["full", 8], checkpoint_activations=ckpt).train()
        model.loss(model(tokens, positions), tokens[:, -N:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_z_loss_adds_to_the_loss():
    tokens, positions = batch()
    plain, with_z = tiny(z_loss=0.0), tiny(z_loss=1e-2)
    with torch.no_grad():
        logits = plain(tokens, positions)
        assert with_z.loss(logits, tokens[:, -N:]) > plain.loss(logits, tokens[:, -N:])
        targets = tokens[:, -N:].clone()
        targets[0] = PAD  # padding targets are ignored
        full = torch.nn.functional.cross_entropy(logits[1], targets[1])
        assert torch.allclose(plain.loss(logits, targets), full)


def test_rotary_is_relative_even_far_into_a_piece():
    """q.k after rotation depends only on the offset, also past 100,000 tokens."""
    rot = Rotary(head_dim=64, fraction=0.5)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 64, generator=g), torch.randn(1, 1, 1, 64, generator=g)

    def score(pq, pk):
        rq = rot.rotate(q, rot.angles(torch.tensor([[pq]])))
        rk = rot.rotate(k, rot.angles(torch.tensor([[pk]])))
        return (rq * rk).sum().item()

    for offset in [0, 1, 17, 500]:
        near = score(10 + offset, 10)
        far = score(250_000 + offset, 250_000)
        assert abs(near - far) < 1e-4 * max(1.0, abs(near)), offset


def test_vocabulary_key_value_table_equals_projecting_every_input():
    """Cross-attention keys/values come from a per-token table; values and gradients must be
    those of projecting each input's embedding, as the model is defined."""
    model = tiny(scales=["full", 8]).train()
    tokens, positions = batch()
    angles = model.rotary.angles(positions)
    for block in model.cross:
        looked_up = block.keys_values(tokens, block.kv_table(model.embed.weight), model.rotary, angles)
        projected = block.attn.keys_values(
            block.attn.kv(block.kv_norm(model.embed(tokens))), model.rotary, angles
        )
        weights = [torch.randn_like(t) for t in looked_up]  # a loss that uses every key and value
        grads = []
        for k, v in (looked_up, projected):
            params = [model.embed.weight, block.kv_norm.weight, block.attn.kv.weight]
            grads.append(torch.autograd.grad((k * weights[0]).sum() + (v * weights[1]).sum(), params))
        for a, b in zip(looked_up, projected):
            assert torch.allclose(a, b, atol=1e-6)
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-5)


def test_context_dropout_hides_the_prefix_of_the_rows_it_draws_and_only_in_training():
    tokens, positions = batch()
    changed = tokens.clone()
    changed[:, : L - N] = torch.randint(3, V, (2, L - N), generator=torch.Generator().manual_seed(1))
    blind = tiny(context_dropout=1.0, scales=["full", 8]).train()
    with torch.no_grad():
        # every row drawn: what came before the latents cannot change the logits
        assert torch.allclose(blind(tokens, positions), blind(changed, positions), atol=1e-6)
        blind.eval()
        assert not torch.allclose(blind(tokens, positions), blind(changed, positions), atol=1e-4)
    # off (the default), training draws no random number for it: the run's stream is unchanged
    plain = tiny(scales=["full", 8]).train()
    torch.manual_seed(3)
    plain(tokens, positions)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), after)
    with pytest.raises(ConfigError, match="context_dropout"):
        ModelConfig(vocab_size=V, max_len=L, num_latents=N, context_dropout=1.5)
    with pytest.raises(ConfigError, match="perceiver_ar"):
        ModelConfig(vocab_size=V, max_len=L, num_latents=L, arch="transformer", context_dropout=0.5)
