"""Conditioning (label, timing, style, keyboard): the windows carry the right conditions, a conditioned
model starts as the unconditioned one, cached generation stays exact under every condition and
under guidance, and a run can branch into a conditioned one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perceiver_music.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PrepareConfig,
    TokenizerConfig,
    load_config,
)
from perceiver_music.data.prepare import prepare
from perceiver_music.data.windows import Conditions, TokenData, WindowDataset
from perceiver_music.model import build_model
from perceiver_music.model.conditioning import Cond
from perceiver_music.sample import CachedStream, ReferenceStream, generate
from perceiver_music.sample import Conditions as SampleConditions
from perceiver_music.tokens.performance import BOS, PAD, Vocab
from perceiver_music.train import branch_chain, train
from test_train import TINY as TRAIN_TINY

from conftest import random_pieces

V = 391
VOCAB = Vocab(TokenizerConfig())
ARCHS = {
    "perceiver_ar": dict(arch="perceiver_ar", scales=["full"]),
    "perceivers": dict(arch="perceiver_ar", scales=["full", 6]),
    "transformer": dict(arch="transformer", num_latents=24),
}
ALL = ["label", "timing", "style", "keyboard"]


def tiny(condition=ALL, randomize=True, **kw):
    base = dict(vocab_size=V, max_len=24, num_latents=8, width=32, heads=4, layers=2, dropout=0.0, z_loss=0.0)
    base.update(kw)
    cfg = ModelConfig(**base, condition=list(condition), labels=["A", "B"], style_len=16, style_width=16)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if randomize and model.conditioner is not None:  # as if trained: conditioning changes the logits
        with torch.no_grad():
            for p in model.conditioner.parameters():
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cond")
    midi = random_pieces(root / "midi", 10, seed=3, notes=150, span_ms=30_000, length_ms=250)
    csv = root / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"p{i}.mid,{'AB'[i % 2]}\n" for i in range(9)))  # p9: none
    prepare(
        midi,
        root / "data",
        PrepareConfig(workers=1, split="hash", valid_fraction=0.2),
        labels=csv,
        progress=False,
    )
    return root / "data"


def windows(data_dir, split="train", train=True, **conditions):
    data = TokenData(data_dir, split)
    c = Conditions(**{"labels": ["A", "B"], "timing": True, "style_len": 32, **conditions})
    return data, WindowDataset(data, DataConfig(), 64, 16, train=train, seed=1, conditions=c)


def test_windows_carry_label_timing_and_a_reference_outside_the_window(labelled_data):
    data, ds = windows(labelled_data, train=False)
    sps = data.tokenizer.steps_per_second
    plain = WindowDataset(data, DataConfig(), 64, 16, train=False)
    seen_reference = 0
    for i in range(len(ds)):
        w, u = ds[i], plain[i]
        assert np.array_equal(w.inputs, u.inputs) and np.array_equal(w.targets, u.targets)
        tokens = np.asarray(data.piece(w.piece), np.int64)
        label = data.labels[w.piece]
        assert w.label == ({"A": 1, "B": 2}[label] if label else 0)
        assert w.total == pytest.approx(VOCAB.shift_steps(tokens).sum() / sps)
        # Elapsed time through each input: the piece's own clock, not the window's.
        end = w.positions[-1] + 1
        assert w.elapsed[-1] == pytest.approx(VOCAB.shift_steps(tokens[:end]).sum() / sps, abs=1e-3)
        assert np.all(w.elapsed[w.inputs == PAD] == 0)
        ref = w.reference[w.reference != PAD]
        if len(ref):
            seen_reference += 1
            starts = [
                s for s in range(len(tokens) - len(ref) + 1) if np.array_equal(tokens[s : s + len(ref)], ref)
            ]
            window_lo = end + 1 - 65  # inputs and the final target: tokens[end - 64 : end + 1]
            assert any(s + len(ref) <= window_lo or s >= end + 1 for s in starts), "the reference overlaps"
    assert seen_reference > 0


def test_training_windows_drop_each_condition_at_its_rate_and_keep_the_token_stream(labelled_data):
    data, kept = windows(labelled_data)
    _, dropped = windows(labelled_data, label_dropout=1, timing_dropout=1, style_dropout=1)
    plain = WindowDataset(data, DataConfig(), 64, 16, train=True, seed=1)
    labelled = 0
    for i in range(40):
        a, b, u = kept[i], dropped[i], plain[i]
        assert np.array_equal(a.inputs, u.inputs) and np.array_equal(b.inputs, u.inputs)
        assert b.label == 0 and b.total == 0 and np.all(b.reference == PAD)
        assert np.array_equal(a.elapsed, b.elapsed)  # time elapsed is read from the tokens: never dropped
        labelled += a.label > 0
        assert a.total > 0
    assert labelled > 20
    _, joint = windows(
        labelled_data, label_dropout=0, timing_dropout=0, style_dropout=0, condition_dropout=0.5
    )
    told_nothing = [
        w.label == 0 and w.total == 0 and np.all(w.reference == PAD)
        for w in map(joint.__getitem__, range(60))
    ]
    told_all = [w.total > 0 for w in map(joint.__getitem__, range(60))]
    assert 15 < sum(told_nothing) < 45 and sum(told_nothing) + sum(told_all) == 60  # all or nothing


@pytest.mark.parametrize("name", ARCHS)
def test_a_new_conditioned_model_computes_what_the_unconditioned_one_does(name):
    cond_model = tiny(randomize=False, **ARCHS[name])
    plain = build_model(ModelConfig(**{**cond_model.cfg.__dict__, "condition": []})).eval()
    plain.load_state_dict(
        {k: v for k, v in cond_model.state_dict().items() if not k.startswith("conditioner.")}
    )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, V, (2, 24), generator=g)
    positions = torch.arange(24).expand(2, 24)
    cond = Cond(
        label=torch.tensor([1, 2]),
        total=torch.tensor([30.0, 0.0]),
        elapsed=torch.rand(2, 24, generator=g) * 30,
        reference=torch.randint(3, V, (2, 16), generator=g),
        keyboard=torch.where(
            torch.rand(2, 24, 128, generator=g) < 0.1, torch.rand(2, 24, 128, generator=g), -1.0
        ),
    )
    with torch.no_grad():
        assert torch.equal(cond_model(tokens, positions, cond=cond), plain(tokens, positions))
        trained = tiny(**ARCHS[name])  # conditioning weights away from zero: it matters
        silent = Cond(keyboard=torch.full_like(cond.keyboard, -1.0))  # told nothing, no key down
        assert not torch.allclose(
            trained(tokens, positions, cond=cond), trained(tokens, positions, cond=silent)
        )


def test_the_time_left_resolves_the_last_seconds_of_a_piece():
    """Two moments in the fraction's last bucket (the last 1/64 of a 650 s piece, 10 s) and in
    one elapsed bucket: timing alone cannot tell them apart, the time left can; past the end
    counts as at it."""
    from perceiver_music.model.conditioning import Conditioner

    elapsed = torch.tensor([[641.0, 649.9, 650.0, 660.0]])
    cond = Cond(total=torch.tensor([650.0]), elapsed=elapsed)
    for remaining in (False, True):
        cfg = ModelConfig(vocab_size=V, width=32, heads=4, condition=["timing"], timing_remaining=remaining)
        conditioner = Conditioner(cfg)
        out = conditioner(cond, 1, 4, "cpu")[0]  # [4, D]
        assert remaining != torch.allclose(out[0], out[1])
        assert torch.equal(out[2], out[3])  # at the end and past it: the same
        conditioner.zero_outputs()
        assert torch.count_nonzero(conditioner(cond, 1, 4, "cpu")) == 0  # starts as a no-op
    with pytest.raises(ConfigError, match="timing_remaining"):
        ModelConfig(condition=["label"], timing_remaining=True)


def _forced_with_time(g, rows, steps):
    """Random tokens with plenty of TIME_SHIFTs, so the elapsed time moves."""
    forced = torch.randint(3, V, (rows, steps), generator=g)
    shifts = torch.randint(VOCAB.time_shift, VOCAB.time_shift + 100, (rows, steps), generator=g)
    return torch.where(torch.rand(rows, steps, generator=g) < 0.4, shifts, forced)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize(
    "condition",
    [["label"], ["timing"], ["style"], ["keyboard"], ALL, "remaining", "keyboard_logits", "style_logits"],
)
def test_cached_logits_equal_the_reference_under_conditioning(name, condition):
    remaining = condition == "remaining"  # all of them, the time left included
    direct = condition == "keyboard_logits"  # all of them, the keyboard read into the logits too
    styled = condition == "style_logits"  # all of them, the style vector read into the logits too
    model = tiny(
        ALL if remaining or direct or styled else condition,
        timing_remaining=remaining,
        keyboard_logits=direct,
        style_logits=styled,
        **ARCHS[name],
    )
    g = torch.Generator().manual_seed(7)
    prompt = _forced_with_time(g, 2, 13)
    prompt[:, 0] = BOS
    forced = _forced_with_time(g, 2, 60)  # past max_len (24), through refills
    conditions = SampleConditions(
        label=2, total_seconds=40.0, style=torch.randn(16, generator=g), start_seconds=3.0
    )
    cond = conditions.cond(2, "cpu")
    kw = {"cond": cond, "token_seconds": conditions.token_seconds(V, "cpu"), "start_seconds": 3.0}
    kw["tokenizer"] = TokenizerConfig()
    total = 13 + 60
    with torch.no_grad():
        cached, ref = CachedStream(model, prompt, total, **kw), ReferenceStream(model, prompt, total, **kw)
        unconditioned = copy.deepcopy(model)  # all conditioning weights at zero: a no-op
        with torch.no_grad():
            for p in unconditioned.conditioner.parameters():
                p.zero_()
        plain = CachedStream(unconditioned, prompt, total, **kw)
        assert torch.allclose(cached.current, ref.current, atol=1e-4)
        differs = False
        for i in range(59):
            a, b, c = cached.append(forced[:, i]), ref.append(forced[:, i]), plain.append(forced[:, i])
            assert torch.allclose(a, b, atol=1e-4), (i, (a - b).abs().max())
            differs |= not torch.allclose(a, c, atol=1e-3)
        assert differs  # the conditions did reach the model
    assert cached.elapsed[0, -2] == pytest.approx(
        3.0
        + float(
            conditions.token_seconds(V, "cpu")[prompt[0]].sum()
            + conditions.token_seconds(V, "cpu")[forced[0, :59]].sum()
        )
    )


@pytest.mark.parametrize("name", ARCHS)
def test_guided_generation_is_the_same_with_and_without_the_cache(name):
    model = tiny(**ARCHS[name])
    prompt = torch.full((2, 1), BOS)
    c = SampleConditions(label=1, total_seconds=20.0, style=torch.randn(16), guidance=2.5)
    rows = [generate(model, prompt, 50, seed=3, use_cache=cache, conditions=c) for cache in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*rows))
    unguided = generate(model, prompt, 50, seed=3, conditions=SampleConditions(label=1, total_seconds=20.0))
    assert any(not torch.equal(a, b) for a, b in zip(rows[0], unguided))


def test_guidance_mixes_conditioned_and_unconditioned_logits():
    """guidance 0 samples exactly what the unconditioned model would; 1 what the conditioned one would."""
    model = tiny()
    prompt = torch.full((2, 1), BOS)
    given = dict(label=2, total_seconds=15.0, style=torch.randn(16))
    nothing = generate(model, prompt, 40, seed=5, conditions=SampleConditions())
    g0 = generate(model, prompt, 40, seed=5, conditions=SampleConditions(**given, guidance=0.0))
    assert all(torch.equal(a, b) for a, b in zip(nothing, g0))
    g1 = generate(model, prompt, 40, seed=5, conditions=SampleConditions(**given, guidance=1.0))
    assert any(not torch.equal(a, b) for a, b in zip(nothing, g1))
    with pytest.raises(ValueError, match="guidance"):
        SampleConditions(guidance=-1)


TINY = [
    *TRAIN_TINY,
    "model.style_len=32",
    "model.style_width=16",
    "train.eval_windows=4",
    "train.log_every=1",
    "train.eval_every=100",
    "train.ckpt_every=3",
]


@pytest.mark.parametrize(
    "source, target, learns, extra",
    [
        ("[]", "[label, timing, style]", "label", []),
        ("[label, timing, style]", "[label, timing, style, keyboard]", "keyboard", []),
        ("[label, timing]", "[label, timing]", "remaining", ["model.timing_remaining=true"]),
        ("[label, keyboard]", "[label, keyboard]", "on_held", ["model.keyboard_logits=true"]),
        ("[label, style]", "[label, style]", "style_logits", ["model.style_logits=true"]),
    ],
)
def test_a_run_branches_into_a_conditioned_one_exactly(
    labelled_data, tmp_path, source, target, learns, extra
):
    """The branch's first step is the source run's own next step (the conditioning it adds
    starts as a no-op and the windows are the same); then it learns its conditioning."""
    whole = train(
        load_config("debug", [*TINY, "train.steps=8", f"model.condition={source}"]),
        labelled_data,
        tmp_path / "plain",
        progress=False,
    )
    assert whole.step == 8
    cfg = load_config("debug", [*TINY, "train.steps=8", f"model.condition={target}", *extra])
    train(
        cfg,
        labelled_data,
        tmp_path / "cond",
        progress=False,
        branch=tmp_path / "plain" / "checkpoints" / "step_0000006",
    )
    log = lambda run: {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    plain, cond = log(tmp_path / "plain"), log(tmp_path / "cond")
    assert sorted(cond) == list(range(1, 9))  # the source's log up to the branch, then its own
    assert cond[7]["loss"] == plain[7]["loss"]
    saved = json.loads((tmp_path / "cond" / "config.json").read_text())["model"]
    assert saved["condition"] == target.strip("[]").split(", ") and saved["labels"] == ["A", "B"]
    from perceiver_music.checkpoint import load_model

    model, _ = load_model(tmp_path / "cond" / "checkpoints" / "step_0000008")
    learned = getattr(model.conditioner, learns)
    learned = getattr(learned, "weight", learned).detach()
    assert float(learned.abs().sum()) > 0  # it has started to learn
    # The model card tells the stages apart.
    stages = _script("recipes/bundle_model.py")._stages(tmp_path / "cond", 8, saved["condition"])
    before = "unconditioned" if source == "[]" else "conditioned on " + source.strip("[]")
    assert f"steps 0-6 {before}; steps 6-8 conditioned on {target.strip('[]')}" in stages
    # and names the model settings a stage changed
    setting = extra[0].split("=")[0] if extra else None
    note = f" ({setting} False -> True)" if setting else ""
    assert stages.endswith(f"steps 6-8 conditioned on {target.strip('[]')}{note}")
    record = json.loads((tmp_path / "cond" / "branch.json").read_text())
    (tmp_path / "cond" / "branch.json").write_text(json.dumps({**record, "note": "new windows"}))
    again = _script("recipes/bundle_model.py")._stages(tmp_path / "cond", 8, saved["condition"])
    assert again.endswith(f"steps 6-8 conditioned on {target.strip('[]')} (new windows)")


def test_fine_tuning_may_add_conditioning_the_source_lacks_and_start_parts_afresh(labelled_data, tmp_path):
    """--init from a model without style_logits: every tensor of the source is loaded, the new
    ones start as a no-op; dropping conditioning the source has is refused; train.reinit starts
    the parameters it names from a fresh initialisation."""
    from perceiver_music.checkpoint import load_model

    source = tmp_path / "source"
    train(
        load_config("debug", [*TINY, "train.steps=2", "model.condition=[label, style]"]),
        labelled_data,
        source,
        progress=False,
    )
    frozen = ["train.steps=1", "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0"]
    cfg = load_config("debug", [*TINY, *frozen, "model.condition=[label, style]", "model.style_logits=true"])
    train(cfg, labelled_data, tmp_path / "tuned", progress=False, init=source)
    before, _ = load_model(source / "checkpoints" / "step_0000002")
    after, saved = load_model(tmp_path / "tuned" / "checkpoints" / "step_0000001")
    assert saved.model.style_logits and float(after.conditioner.style_logits.weight.abs().max()) < 1e-6
    new = after.state_dict()
    for name, a in before.state_dict().items():
        assert torch.allclose(a, new[name], rtol=0, atol=1e-8), name
    fewer = load_config("debug", [*TINY, *frozen, "model.condition=[label]"])
    with pytest.raises(ConfigError, match=r"--init: .* is another model \(model.condition="):
        train(fewer, labelled_data, tmp_path / "fewer", progress=False, init=source)

    # train.reinit: the style encoder starts afresh (a fresh model's weights), the rest is loaded.
    reinit = [*TINY, *frozen, "model.condition=[label, style]", "train.reinit=[conditioner.style_encoder]"]
    train(load_config("debug", reinit), labelled_data, tmp_path / "reinit", progress=False, init=source)
    again, _ = load_model(tmp_path / "reinit" / "checkpoints" / "step_0000001")
    scratch = load_config("debug", [*TINY, *frozen, "model.condition=[label, style]"])
    train(scratch, labelled_data, tmp_path / "scratch", progress=False)  # a fresh model, kept so by lr 1e-12
    fresh = load_model(tmp_path / "scratch" / "checkpoints" / "step_0000001")[0].state_dict()
    for name, a in again.state_dict().items():
        want = fresh[name] if name.startswith("conditioner.style_encoder") else before.state_dict()[name]
        assert torch.allclose(a, want, rtol=0, atol=1e-8), name
    assert not torch.allclose(
        again.conditioner.style_encoder.embed.weight, before.conditioner.style_encoder.embed.weight
    )
    for extra, message in [
        (["train.reinit=[conditioner.styl_encoder]"], "no parameter named conditioner.styl_encoder"),
    ]:
        with pytest.raises(ConfigError, match=message):
            train(
                load_config("debug", [*reinit, *extra]),
                labelled_data,
                tmp_path / "typo",
                progress=False,
                init=source,
            )
    with pytest.raises(ConfigError, match="train.reinit names parameters that --init should not load"):
        train(load_config("debug", reinit), labelled_data, tmp_path / "noinit", progress=False)


def test_a_decay_branched_off_a_held_run_continues_it_exactly(labelled_data, tmp_path):
    """schedule=wsd: a run held at its rate, and a decay branched off it at step 6, whose first
    step is the held run's own and whose rate then falls to min_lr; the card names the decay."""
    held = [*TINY, "train.schedule=wsd", "train.warmup_steps=2", "train.lr=1e-3", "train.min_lr=1e-4"]
    train(load_config("debug", [*held, "train.steps=8"]), labelled_data, tmp_path / "held", progress=False)
    cfg = load_config("debug", [*held, "train.steps=10", "train.decay_steps=4"])
    train(
        cfg,
        labelled_data,
        tmp_path / "decay",
        progress=False,
        branch=tmp_path / "held" / "checkpoints" / "step_0000006",
    )
    rows = lambda run: map(json.loads, (run / "log.jsonl").read_text().splitlines())
    log = lambda run: {r["step"]: r for r in rows(run) if r["kind"] == "train"}
    a, b = log(tmp_path / "held"), log(tmp_path / "decay")
    assert b[7]["loss"] == a[7]["loss"] and b[7]["lr"] == a[7]["lr"] == 1e-3
    lrs = [b[s]["lr"] for s in range(7, 11)]
    assert all(x > y for x, y in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-4, abs=3e-4)
    chain = branch_chain(tmp_path / "decay")  # oldest first, each with the record that made it
    assert [run for run, _ in chain] == [tmp_path / "held", tmp_path / "decay"]
    assert chain[0][1] is None and chain[1][1]["step"] == 6
    stages = _script("recipes/bundle_model.py")._stages(tmp_path / "decay", 10, [])
    assert stages.startswith("- trained in stages") and "steps 0-6 unconditioned; " in stages
    assert stages.endswith(
        "steps 6-10 unconditioned (learning rate decayed linearly to 0.0001 over steps 6-10)"
    )


def test_branch_refuses_a_checkpoint_of_another_model(labelled_data, tmp_path):
    from perceiver_music.checkpoint import CheckpointError

    train(load_config("debug", [*TINY, "train.steps=3"]), labelled_data, tmp_path / "plain", progress=False)
    wider = load_config("debug", [*TINY, "train.steps=6", "model.width=64", "model.condition=[label]"])
    with pytest.raises(CheckpointError, match="not the model of this config"):
        train(wider, labelled_data, tmp_path / "w", progress=False, branch=tmp_path / "plain")


@pytest.fixture(scope="module")
def conditioned_run(labelled_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cond_run") / "run"
    cfg = load_config("debug", [*TINY, "train.steps=2", "model.condition=[label, timing, style, keyboard]"])
    train(cfg, labelled_data, run, progress=False)
    return run


def test_generate_with_composer_style_guidance_and_a_length(conditioned_run, labelled_data, tmp_path):
    from perceiver_music.generate import generate_midi, style_embedding

    midi = labelled_data.parent / "midi"
    a, b = (
        style_embedding(midi / "p0.mid", conditioned_run),
        style_embedding(midi / "p1.mid", conditioned_run),
    )
    assert a.shape == (16,) and not np.allclose(a, b)
    out = tmp_path / "gen"
    result = generate_midi(
        conditioned_run, out, num=2, seconds=3.0, composer="b", style=midi / "p0.mid", guidance=2.0,
        render=False, progress=False,
    )  # fmt: skip
    settings = json.loads((out / "generate.json").read_text())
    assert settings["composer"] == "b" and settings["guidance"] == 2.0
    assert settings["total_seconds_told"] == pytest.approx(3.0)
    # Told 3 s, a timing-conditioned piece may run on (up to 1.25 x) to reach its ending.
    assert all(s <= 3.0 * 1.25 + 5.5 for s in result.seconds)
    # Its own stop reason: ran to the ending's limit without ending, not "reached --seconds".
    assert set(result.stopped) <= {"eos", "grace"} and settings["stopped"] == result.stopped
    mixed = generate_midi(
        conditioned_run, tmp_path / "mix", tokens=20, style=0.5 * a + 0.5 * b, render=False, progress=False
    )
    assert mixed.generated_tokens == [20]


def test_the_endings_bench_compares_told_and_untold_under_one_limit(conditioned_run, tmp_path):
    bench = _script("bench/conditioning_music.py")
    out = tmp_path / "bench"
    assert (
        bench.main(
            ["endings", "--ckpt", str(conditioned_run), "--out", str(out), "--num", "2", "--targets", "2"]
        )
        == 0
    )
    told = json.loads((out / "endings" / "cond_2" / "generate.json").read_text())
    untold = json.loads((out / "endings" / "untold_2" / "generate.json").read_text())
    assert told["total_seconds_told"] == pytest.approx(2.0) and untold["total_seconds_told"] == 0.0
    assert set(untold["stopped"]) <= {"eos", "grace"}  # the same limit: 1.25 x the target, not cut at it
    rows = json.loads((out / "endings.json").read_text())["rows"]
    assert set(rows) == {"conditioned (told the length) @ 2", "the same model, not told the length @ 2"}
    assert "| the same model, not told the length | 2 s |" in (out / "endings.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--composer", "Bach"], "'Bach' is not one the model knows; it knows: A, B"),
        (["--guidance", "-1", "--composer", "A"], "--guidance must be >= 0"),
        (["--guidance", "2"], "--guidance needs something to guide towards"),
        (["--style", "NOTE"], "not a MIDI file"),
        (["--style", "EMPTY"], "the reference has no notes"),
        (["--style", "MISSING"], "no such file"),
    ],
)
def test_generate_refuses_bad_conditioning_before_the_model_loads(
    conditioned_run, tmp_path, capsys, args, message
):
    from perceiver_music.cli import main

    from conftest import write_midi

    (tmp_path / "note.mid").write_text("not midi at all")
    write_midi(tmp_path / "empty.mid", [])
    names = {
        "NOTE": tmp_path / "note.mid",
        "EMPTY": tmp_path / "empty.mid",
        "MISSING": tmp_path / "missing.mid",
    }
    args = [str(names.get(a, a)) for a in args]
    code = main(
        ["generate", "--ckpt", str(conditioned_run), "--out", str(tmp_path / "o"), "--tokens", "5", *args]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unconditioned_model_refuses_conditioning(tiny_run, tmp_path, capsys):
    from perceiver_music.cli import main

    for flag, value, message in [("--composer", "Chopin", "composers"), ("--style", __file__, "a reference")]:
        assert (
            main(["generate", "--ckpt", str(tiny_run / "run"), "--out", str(tmp_path / "o"), flag, value])
            == 2
        )
        assert f"not conditioned on {message}" in capsys.readouterr().err


def test_likelihood_of_a_conditioned_model_told_and_not(conditioned_run, labelled_data):
    from perceiver_music.evaluate.likelihood import evaluate_likelihood

    plain = evaluate_likelihood(conditioned_run, labelled_data, "valid", progress=False)
    told = evaluate_likelihood(conditioned_run, labelled_data, "valid", progress=False, told=True)
    assert plain.tokens == told.tokens > 0
    assert np.isfinite(plain.nats_per_token) and plain.nats_per_token != told.nats_per_token


def _script(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, Path(__file__).parents[1] / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_conditioning_bench_measures_every_condition_and_the_card_shows_it(
    conditioned_run, labelled_data, tmp_path
):
    bench = _script("bench/conditioning.py")
    out = tmp_path / "eval" / "conditioning" / "conditioning.json"
    args = [
        "--ckpt",
        str(conditioned_run),
        "--data",
        str(labelled_data),
        "--split",
        "valid",
        "--windows",
        "6",
    ]
    assert bench.main([*args, "--baseline", str(conditioned_run), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    told = [
        "nothing",
        "composer: true",
        "composer: wrong",
        "length: true",
        "style: own piece",
        "style: other piece",
    ]
    assert set(told) <= set(record["nll"])
    eos = record["eos_at_end"]  # the model is timing-conditioned: P(EOS) where each piece ends
    assert eos["pieces"] == len(TokenData(labelled_data, "valid")) > 0
    assert all(0 < eos[k]["mean"] < 1 and 0 < eos[k]["median"] < 1 for k in ("told the length", "not told"))
    # The baseline's row names its budget: the fixture's run trained 2 steps.
    assert [k for k in record["nll"] if k.startswith("unconditioned")] == ["unconditioned baseline (2 steps)"]
    assert all(np.isfinite(v) for v in record["nll"].values())
    # A wrong composer is never the true one: the next label in the list.
    assert bench._other_piece_order(np.array([3, 3, 5])).tolist() == [2, 2, 0]
    recipe = _script("recipes/bundle_model.py")
    model = json.loads((conditioned_run / "config.json").read_text())["model"]
    section = "\n".join(recipe._conditioning(tmp_path / "eval", model))
    assert "`--composer` takes: A, B." in section
    assert f"| composer: wrong | {record['nll']['composer: wrong']:.4f} |" in section
    # At each piece's start: one window per piece, only its first num_latents targets.
    start = tmp_path / "eval" / "conditioning" / "conditioning_start.json"
    assert bench.main([*args, "--at", "start", "--head", "4", "--out", str(start)]) == 0
    at_start = json.loads(start.read_text())
    pieces = TokenData(labelled_data, "valid")
    num_latents = json.loads((conditioned_run / "config.json").read_text())["model"]["num_latents"]
    assert at_start["at"] == "start" and at_start["windows"] == len(pieces)
    assert at_start["targets"] == sum(min(num_latents, len(pieces.piece(i)) - 1) for i in range(len(pieces)))
    # ... and each piece's first 4 tokens alone: the same conditions, a different average
    assert num_latents > 4 and at_start["head"] == 4 and set(at_start["nll_head"]) == set(at_start["nll"])
    assert all(np.isfinite(v) for v in at_start["nll_head"].values())
    assert at_start["nll_head"] != at_start["nll"] and record["nll_head"] == {}
    section = "\n".join(recipe._conditioning(tmp_path / "eval", model))
    nothing = f"| nothing | {record['nll']['nothing']:.4f} | {at_start['nll']['nothing']:.4f} |"
    assert "| told | anywhere | piece start |" in section and nothing in section


def test_the_studio_offers_a_conditioned_models_composers_and_style(conditioned_run, tiny_run):
    from perceiver_music.studio import model_info

    info = model_info(conditioned_run)
    assert info.labels == ["A", "B"] and info.style is True
    plain = model_info(tiny_run / "run")
    assert plain.labels == [] and plain.style is False


def test_composer_references_are_excerpts_of_the_generated_length_spread_over_performances(tmp_path):
    from perceiver_music.tokens.performance import PerformanceTokenizer

    from conftest import write_midi

    bench = _script("bench/conditioning_music.py")
    # A 30 s performance and a 6 s one: ten notes a second, 1 ms ticks.
    long = [(t, t + 80, 60 + (t // 100) % 12, 70) for t in range(0, 30_000, 100)]
    short = [(t, t + 80, 48, 70) for t in range(0, 6_000, 100)]
    write_midi(tmp_path / "long.mid", long)
    write_midi(tmp_path / "short.mid", short)
    midis = [tmp_path / "long.mid", tmp_path / "short.mid"]

    every = bench.excerpt_set(midis, tmp_path / "all", seconds=5.0)
    names = sorted(p.name for p in every.iterdir())
    assert len(names) == 6 + 2  # 30 s and 6 s cut into 5 s spans (the short one's last has 10 notes)
    assert sum(n.startswith("000_long") for n in names) == 6

    few = bench.excerpt_set(midis, tmp_path / "few", seconds=5.0, limit=4)
    picked = sorted(p.name for p in few.iterdir())
    assert len(picked) == 4 and any(n.startswith("001_short") for n in picked)  # spread over both
    tok = PerformanceTokenizer()
    for path in few.iterdir():
        notes = tok.midi_to_notes(path)
        seconds = (notes.end.max() - notes.start.min()) / tok.cfg.steps_per_second
        assert notes.start.min() < 0.2 * tok.cfg.steps_per_second and seconds <= 5.0 + 0.1


def test_style_vectors_are_normalised_after_pooling():
    """Two performances' style vectors differ at the scale of a LayerNorm's output, however long
    the reference: pooling normalised positions instead shrinks them ~1/sqrt(R) or more, and a
    trained model learned to ignore vectors that small."""
    from perceiver_music.model.conditioning import StyleEncoder

    torch.manual_seed(0)
    S = 32
    encoder = StyleEncoder(ModelConfig(vocab_size=V, condition=["style"], style_width=S, dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(1)
    # Two "performances" of different events (ids 3-130 and 260-390).
    refs = torch.stack(
        [torch.randint(3, 130, (400,), generator=gen), torch.randint(260, V, (400,), generator=gen)]
    )
    with torch.no_grad():
        a, b = encoder(refs)
        padded = encoder(torch.cat([refs[:1], torch.full((1, 100), PAD)], 1))[0]
    assert float(a.std()) == pytest.approx(1.0, rel=0.05)  # a LayerNorm's output (gain 1, bias 0)
    assert float((a - b).norm()) > 0.5 * S**0.5
    torch.testing.assert_close(padded, a, rtol=0, atol=1e-5)  # PAD positions are not pooled


def test_style_logits_bias_every_position_of_a_styled_row_alike_and_no_other_row():
    """model.style_logits: one bias over the vocabulary per row, from its style vector; a row
    without a style gets none. It reads the vector through its own LayerNorm, so an encoder whose
    last gain training turned down (the bundled model's went to 0.006) still steers."""
    model = tiny(["style"], style_logits=True)
    c = model.conditioner
    g = torch.Generator().manual_seed(2)
    refs = torch.randint(3, V, (3, 16), generator=g)
    refs[2] = PAD  # no reference: no style
    cond = Cond(reference=refs)
    with torch.no_grad():
        c.style_encoder.norm.bias.zero_()
        bias = c.logit_bias(cond, 3, 5, V)  # [3, 1, V]: every position the same
        assert bias.shape == (3, 1, V)
        assert float(bias[0].abs().max()) > 0.1 and not torch.allclose(bias[0], bias[1])
        assert torch.equal(bias[2], torch.zeros(1, V))
        c.style_encoder.norm.weight.mul_(0.05)
        now = c.logit_bias(cond, 3, 5, V)
        torch.testing.assert_close(now[:2], bias[:2], rtol=1e-2, atol=1e-2)
        # The model adds it to its logits: the same styled row with the bias zeroed differs by it.
        tokens = torch.randint(3, V, (3, 24), generator=g)
        positions = torch.arange(24).expand(3, -1)
        with_bias = model(tokens, positions, cond=cond)
        c.style_logits.weight.zero_()
        torch.testing.assert_close(with_bias - model(tokens, positions, cond=cond), now.expand(-1, 8, -1))


def test_the_style_contrast_teaches_the_encoder_to_tell_pieces_apart():
    """style_contrast_loss: a reference must pick out its own window among the batch's. Trained
    on it alone, an encoder comes to place two parts of one piece nearer each other than parts of
    different pieces (each "piece" here draws its events from its own part of the vocabulary);
    rows without a reference are left out, and two rows of one piece are not negatives."""
    from perceiver_music.model.conditioning import StyleEncoder, style_contrast_loss

    torch.manual_seed(0)
    encoder = StyleEncoder(ModelConfig(vocab_size=V, condition=["style"], style_width=16, dropout=0.0))
    g = torch.Generator().manual_seed(3)

    def part(pieces):  # [B, 24] tokens of each piece's own range of ids, and a few shared ones
        lo = 3 + pieces * 40
        own = lo[:, None] + torch.randint(0, 40, (len(pieces), 24), generator=g)
        shared = torch.randint(3, V, (len(pieces), 24), generator=g)
        return torch.where(torch.rand(len(pieces), 24, generator=g) < 0.8, own, shared)

    def spread():  # mean cosine of two parts of one piece, minus that of two different pieces
        with torch.no_grad():
            pieces = torch.arange(8)
            a = torch.nn.functional.normalize(encoder(part(pieces)), dim=-1)
            b = torch.nn.functional.normalize(encoder(part(pieces)), dim=-1)
            sim = a @ b.T
            return float(sim.diag().mean() - sim[~torch.eye(8, dtype=torch.bool)].mean())

    before = spread()
    opt = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        pieces = torch.randperm(8, generator=g)[:6]
        loss = style_contrast_loss(encoder, part(pieces), part(pieces), pieces)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert spread() > before + 0.3

    pieces = torch.tensor([0, 1, 1, 2])
    refs, wins = part(pieces), part(pieces)
    with torch.no_grad():
        full = style_contrast_loss(encoder, refs, wins, pieces)
        refs[3] = PAD  # no reference: the row is left out
        assert float(style_contrast_loss(encoder, refs, wins, pieces)) != pytest.approx(float(full))
        torch.testing.assert_close(
            style_contrast_loss(encoder, refs, wins, pieces),
            style_contrast_loss(encoder, refs[:3], wins[:3], pieces[:3]),
        )
        # rows 1 and 2 are one piece: each is scored against the other pieces' windows only
        ref = torch.nn.functional.normalize(encoder(refs[:3]), dim=-1)
        win = torch.nn.functional.normalize(encoder(wins[:3]), dim=-1)
        sim = ref @ win.T / 0.1
        keep = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
        sim = sim.masked_fill(~keep, float("-inf"))
        want = 0.5 * (
            torch.nn.functional.cross_entropy(sim, torch.arange(3))
            + torch.nn.functional.cross_entropy(sim.T, torch.arange(3))
        )
        torch.testing.assert_close(style_contrast_loss(encoder, refs[:3], wins[:3], pieces[:3]), want)
        assert (
            float(style_contrast_loss(encoder, refs[:1], wins[:1], pieces[:1])) == 0.0
        )  # nothing to contrast


def test_training_with_the_style_contrast_logs_it_and_needs_a_style(labelled_data, tmp_path):
    run = tmp_path / "contrast"
    cfg = load_config(
        "debug",
        [
            *TINY,
            "train.steps=3",
            "train.log_every=1",
            "model.condition=[style]",
            "train.style_contrast=0.5",
            "train.style_dropout=0.0",
            "train.condition_dropout=0.0",
        ],
    )
    train(cfg, labelled_data, run, progress=False)
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    logged = [r["style_contrast"] for r in rows if r.get("kind") == "train"]
    assert len(logged) == 3 and all(v > 0 for v in logged)
    assert "style_contrast" in (run / "log.csv").read_text().splitlines()[0]
    with pytest.raises(ConfigError, match="train.style_contrast trains the style encoder"):
        train(
            load_config("debug", [*TINY, "train.style_contrast=0.5", "model.condition=[label]"]),
            labelled_data,
            tmp_path / "x",
            progress=False,
        )
    with pytest.raises(ConfigError, match="train.style_contrast must be >= 0"):
        load_config("debug", ["train.style_contrast=-1"])
