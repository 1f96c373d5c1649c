"""Priors over audio codes: prepare-codes, the top prior and upsamplers trained by `train`, the
codebook mask, exact cached sampling on codes, and audio generation from a PRIORS_DIR."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from perceiver_music.audio.codec import CodecRun
from perceiver_music.audio.codes import (
    FIRST_CODE,
    CodebookMask,
    UpsamplerWindows,
    codes_meta,
    collate_upsampler,
    frame_steps,
    ids_of,
    level_dir,
    prepare_codes,
)
from perceiver_music.audio.data import AudioData, prepare_audio
from perceiver_music.audio.generate import PriorsError, generate_audio, load_priors, write_priors
from perceiver_music.audio.upsampler import conditioner_margin
from perceiver_music.checkpoint import load_model
from perceiver_music.cli import main
from perceiver_music.config import AudioPrepareConfig, ConfigError, PrepareConfig, load_config
from perceiver_music.data.windows import TokenData, WindowDataset
from perceiver_music.evaluate.likelihood import evaluate_likelihood
from perceiver_music.sample import CachedStream, ReferenceStream, SamplingConfig, generate
from perceiver_music.tokens.performance import BOS, EOS
from perceiver_music.train import train
from test_audio_codec import SR, TINY_TRAIN, tones

REPO = Path(__file__).resolve().parents[1]

RVQ = ["codec.quantizer=rvq", "codec.levels=1", "codec.downs_t=[1]", "codec.strides_t=[8]"]
RVQ += ["codec.multipliers=[1]", "codec.codebooks=3"]
TINY_PRIOR = [
    "model.max_len=48",
    "model.num_latents=16",
    "model.width=16",
    "model.heads=2",
    "model.layers=1",
    "model.scales=[full]",
    "model.dropout=0.0",
    "model.vocab_size=19",  # 3 + 16 codes
    "model.condition=[]",  # untimed here; the timing tests add it back
    "train.steps=2",
    "train.batch_size=2",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.eval_windows=2",
    "train.threads=1",
    "train.warmup_steps=0",
    "train.log_every=1",
]
TINY_UPSAMPLER = [o for o in TINY_PRIOR if not o.startswith(("model.num_latents", "model.scales"))]
TINY_UPSAMPLER += ["model.num_latents=48", "codes.cond_depth=2"]


def _codec(data: Path, run: Path, *extra: str) -> Path:
    cfg = load_config(
        "vqvae_tiny", [*TINY_TRAIN, "train.steps=2", "train.eval_every=2", "train.ckpt_every=2", *extra]
    )
    train(cfg, data, run, progress=False)
    return run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """Audio data, a 2-level codec, its codes, a top prior and an upsampler (2 steps each)."""
    root = tmp_path_factory.mktemp("priors")
    wav = root / "wav"
    wav.mkdir()
    for i in range(5):
        sf.write(wav / f"p{i}.wav", tones(1.5, seed=i), SR, subtype="PCM_16")
    split = PrepareConfig(valid_fraction=0.3, test_fraction=0.2)
    prepare_audio(wav, root / "data", AudioPrepareConfig(sample_rate=SR), split, progress=False)
    codec = _codec(root / "data", root / "codec")
    prepare_codes(root / "data", CodecRun.load(codec), root / "codes", codec_path=codec, progress=False)
    top = root / "top"
    train(load_config("prior_tiny", TINY_PRIOR), level_dir(root / "codes", 1), top, progress=False)
    up = root / "up0"
    train(load_config("upsampler_tiny", TINY_UPSAMPLER), level_dir(root / "codes", 0), up, progress=False)
    write_priors(root / "priors", "../codec", "../top", {0: "../up0"})
    return {
        "root": root,
        "wav": wav,
        "data": root / "data",
        "codec": codec,
        "codes": root / "codes",
        "top": top,
        "up": up,
    }


# ----------------------------------------------------------------------------- prepare-codes


def test_prepare_codes_writes_every_level_as_token_data(work):
    run = CodecRun.load(work["codec"])
    audio = AudioData(work["data"], "train")
    for level in (0, 1):
        data = TokenData(level_dir(work["codes"], level), "train")
        meta = data.meta
        assert meta["kind"] == "codes" and meta["vocab_size"] == FIRST_CODE + 16
        assert meta["codec"]["weights"] == run.digest and meta["codec"]["level"] == level
        assert meta["codec"]["upper"] == ("level1" if level == 0 else None)
        assert data.paths == audio.paths and len(data) == len(audio) > 0
        for i in range(len(data)):
            piece = np.asarray(data.piece(i), np.int64)
            codes = run.encode_array(audio.clip(i))[level]
            assert piece[0] == BOS and piece[-1] == EOS
            assert np.array_equal(piece[1:-1], codes[0] + FIRST_CODE)
    # Level 0 has 4 frames per level-1 frame (hops 4 and 16), piece by piece.
    lower, upper = (TokenData(level_dir(work["codes"], lv), "train") for lv in (0, 1))
    assert all(lower.index[i, 1] - 2 == 4 * (upper.index[i, 1] - 2) for i in range(len(lower)))


def test_prepare_codes_reuses_unchanged_files_and_recodes_changed_ones(work, tmp_path):
    shutil.copytree(work["wav"], tmp_path / "wav")
    split = PrepareConfig(valid_fraction=0.3, test_fraction=0.2)
    prepare_audio(
        tmp_path / "wav", tmp_path / "data", AudioPrepareConfig(sample_rate=SR), split, progress=False
    )
    run = CodecRun.load(work["codec"])
    first = prepare_codes(tmp_path / "data", run, tmp_path / "codes", progress=False)
    assert first.reused == 0
    again = prepare_codes(tmp_path / "data", run, tmp_path / "codes", progress=False)
    assert again.reused == 5 and "reused 5" in again.summary()
    for level in (0, 1):
        for s in ("train", "valid", "test"):
            a, b = (np.load(level_dir(d, level) / f"{s}.npy") for d in (work["codes"], tmp_path / "codes"))
            assert np.array_equal(a, b)
    # One recording changed: it alone is coded again, and its new codes are the ones kept.
    sf.write(tmp_path / "wav" / "p2.wav", tones(1.5, seed=99), SR, subtype="PCM_16")
    prepare_audio(
        tmp_path / "wav", tmp_path / "data", AudioPrepareConfig(sample_rate=SR), split, progress=False
    )
    changed = prepare_codes(tmp_path / "data", run, tmp_path / "codes", progress=False)
    assert changed.reused == 4
    for s in ("train", "valid", "test"):
        data, audio = TokenData(level_dir(tmp_path / "codes", 0), s), AudioData(tmp_path / "data", s)
        for i, path in enumerate(data.paths):
            want = run.encode_array(audio.clip(i))[0][0] + FIRST_CODE
            assert np.array_equal(np.asarray(data.piece(i), np.int64)[1:-1], want), path
    # Another codec's folder is never reused from.
    other = _codec(tmp_path / "data", tmp_path / "codec2", "train.seed=7")
    fresh = prepare_codes(tmp_path / "data", CodecRun.load(other), tmp_path / "codes", progress=False)
    assert fresh.reused == 0


def test_prepare_codes_flattens_residual_codebooks_into_their_own_id_ranges(work, tmp_path):
    codec = _codec(work["data"], tmp_path / "rvq", *RVQ)
    run = CodecRun.load(codec)
    assert (
        main(
            [
                "prepare-codes",
                str(work["data"]),
                "--codec",
                str(codec),
                "--out",
                str(tmp_path / "codes"),
                "--quiet",
            ]
        )
        == 0
    )
    data = TokenData(level_dir(tmp_path / "codes", 0), "train")
    assert data.meta["vocab_size"] == FIRST_CODE + 3 * 16 and data.meta["codec"]["codebooks"] == 3
    piece = np.asarray(data.piece(0), np.int64)[1:-1]
    codes = run.encode_array(AudioData(work["data"], "train").clip(0))[0]  # [3, T]
    assert len(piece) == 3 * codes.shape[1]
    k = np.arange(len(piece)) % 3  # frame-major: codebook k at every third id
    assert np.all((piece >= FIRST_CODE + 16 * k) & (piece < FIRST_CODE + 16 * (k + 1)))
    assert np.array_equal(piece, ids_of(codes, 16))
    assert np.array_equal(piece[3:6], codes[:, 1] + FIRST_CODE + 16 * np.arange(3))


def test_prepare_codes_refuses_what_it_cannot_read(work, tmp_path, capsys):
    midi_like = tmp_path / "midi"
    midi_like.mkdir()
    (midi_like / "meta.json").write_text(json.dumps({"kind": "midi"}))
    for folder, message in [
        (tmp_path / "nothing", "no meta.json; prepare-codes reads a folder made by `prepare-audio`"),
        (midi_like, "prepare-codes reads a folder made by `prepare-audio`"),
        (level_dir(work["codes"], 0), "codes already (made by `prepare-codes`)"),
    ]:
        assert (
            main(["prepare-codes", str(folder), "--codec", str(work["codec"]), "--out", str(tmp_path / "o")])
            == 2
        )
        assert message in capsys.readouterr().err
    args = ["prepare-codes", str(work["data"]), "--codec", str(work["codec"]), "--out", str(tmp_path / "o")]
    assert main([*args, "--level", "5"]) == 2
    assert "--level 5: the codec has levels 0..1" in capsys.readouterr().err
    assert main([*args[:3], str(work["top"]), *args[4:]]) == 2  # a prior is not a codec
    assert "not an audio codec" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


def test_train_records_the_codec_and_refuses_augmentation_on_codes(work, tmp_path):
    _, cfg = load_model(work["top"])
    meta = codes_meta(level_dir(work["codes"], 1))
    assert (
        cfg.codes.codec == meta["codec"]["weights"] and cfg.codes.level == 1 and cfg.codes.cardinality == 16
    )
    with pytest.raises(ConfigError, match="cannot be transposed or time-stretched"):
        train(
            load_config("prior_tiny", [*TINY_PRIOR, "data.transpose=3"]),
            level_dir(work["codes"], 1),
            tmp_path / "a",
        )
    with pytest.raises(ConfigError, match="the top level of its codec"):
        train(load_config("upsampler_tiny", TINY_UPSAMPLER), level_dir(work["codes"], 1), tmp_path / "b")
    with pytest.raises(
        ConfigError, match="vocabulary of 19 ids .* model.vocab_size is 515: set model.vocab_size=19"
    ):
        cfg = load_config("prior_tiny", [o for o in TINY_PRIOR if "vocab" not in o])
        train(cfg, level_dir(work["codes"], 1), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"model.condition \(style\) conditions MIDI models only"):
        train(
            load_config("prior_tiny", [*TINY_PRIOR, "model.condition=[timing,style]"]),
            level_dir(work["codes"], 1),
            tmp_path / "d",
        )
    with pytest.raises(ConfigError, match=r"no training piece has a label \(prepare-audio --splits-from"):
        train(  # these recordings came with no composer
            load_config("prior_tiny", [*TINY_PRIOR, "model.condition=[timing,label]"]),
            level_dir(work["codes"], 1),
            tmp_path / "d2",
        )
    with pytest.raises(ConfigError, match=r"model.condition \(timing\) .* an upsampler none"):
        train(
            load_config("upsampler_tiny", [*TINY_UPSAMPLER, "model.condition=[timing]"]),
            level_dir(work["codes"], 0),
            tmp_path / "e",
        )


def test_frame_steps_move_time_once_a_frame_is_complete():
    steps = frame_steps(3, 16, 51)  # 3 residual codebooks of 16: ids 3-18, 19-34, 35-50
    assert steps[:35].sum() == 0 and bool((steps[35:51] == 1).all())
    ids = np.array([BOS, 3, 19, 35, 18, 34, 50, EOS])  # BOS, two frames, EOS
    assert np.cumsum(steps[ids]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert frame_steps(1, 16, 19)[3:].sum() == 16 and frame_steps(1, 16, 19)[:3].sum() == 0


def test_timing_windows_on_codes_count_frames(work):
    """Jukebox's timing on the top level: a window's elapsed time is its codes' frames over the
    frame rate, from the piece's start; the total is the piece's frames."""
    from perceiver_music.data.windows import Conditions

    data = TokenData(level_dir(work["codes"], 1), "train")
    rate = data.meta["codec"]["frame_rate"]
    cfg = load_config("prior_tiny", [*TINY_PRIOR, "model.condition=[timing]"])
    windows = WindowDataset(data, cfg.data, 48, 16, train=False, conditions=Conditions(timing=True))
    seen = 0
    for i in range(len(windows)):
        w = windows[i]
        length = int(data.index[w.piece, 1])
        assert w.total == pytest.approx((length - 2) / rate)  # BOS and EOS take no time
        real = w.inputs != 0
        # the input at piece position p (BOS at 0) is through frame p: p / rate, capped at EOS
        expected = np.minimum(w.positions[real], length - 2) / rate
        assert np.allclose(w.elapsed[real], expected)
        seen += int(w.positions[real].max() > 48)
    assert seen > 0  # windows deep inside a piece, whose inputs start after its BOS


def test_evaluate_gives_nll_per_level_on_code_data(work, tmp_path, capsys):
    for run, level in ((work["top"], 1), (work["up"], 0)):
        result = evaluate_likelihood(run, level_dir(work["codes"], level), "train", progress=False)
        data = TokenData(level_dir(work["codes"], level), "train")
        assert result.tokens == int((data.index[:, 1] - 1).sum())  # every id after BOS, once
        assert 0 < result.nats_per_token < 2 * np.log(19)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--ckpt",
        str(work["up"]),
        "--data",
        str(level_dir(work["codes"], 0)),
        "--split",
        "train",
    ]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "likelihood.json").read_text())["tokens"] == result.tokens
    # A PRIORS_DIR: every level at once, bits per second of audio beside bits per code.
    out = tmp_path / "levels"
    args_priors = ["evaluate", "--ckpt", str(work["root"] / "priors"), "--data", str(work["codes"])]
    assert main([*args_priors, "--split", "train", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "levels.json").read_text())["levels"]
    assert [r["level"] for r in rows] == [1, 0] and rows[1]["codes"] == result.tokens
    assert rows[0]["bits_per_second"] == pytest.approx(rows[0]["bits_per_code"] * 500)  # 500 frames/s
    assert (out / "level0" / "likelihood.json").is_file() and "| 0 |" in (out / "levels.md").read_text()
    # A model is scored only on its own codec's level.
    bad = [*args[:4], str(level_dir(work["codes"], 1)), *args[5:], "--out", str(out)]
    assert main(bad) == 2
    assert "codes of level 1 of codec" in capsys.readouterr().err


def test_upsampler_windows_condition_exactly_as_the_whole_piece(work):
    """A training window's upper codes (its frames plus the conditioner's margin) give every
    input the vector the whole upper piece gives it: what the sampler sees."""
    model, cfg = load_model(work["up"])
    lower = TokenData(level_dir(work["codes"], 0), "train")
    upper = TokenData(level_dir(work["codes"], 1), "train")
    windows = WindowDataset(lower, cfg.data, cfg.model.max_len, cfg.model.num_latents, train=True, seed=3)

    def vectors(margin=None):
        ds = UpsamplerWindows(windows, upper, cfg.codes)
        if margin is not None:
            ds.margin = margin
        items = [ds[i] for i in range(24)]
        batch = collate_upsampler(items)
        with model.conditioned(batch["upper"], batch["upper_valid"], batch["first_upper"]):
            got = model.embed_inputs(batch["inputs"], batch["positions"])
        want = []
        for w in items:
            whole = torch.as_tensor(np.asarray(upper.piece(w.piece)[1:-1], np.int64) - FIRST_CODE)[None]
            with model.conditioned(whole):
                want.append(
                    model.embed_inputs(torch.as_tensor(w.inputs)[None], torch.as_tensor(w.positions)[None])
                )
        return got, torch.cat(want)

    got, want = vectors()
    assert conditioner_margin(cfg.codes) > 2
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # Without the margin the window's edges see zero padding the piece does not have.
    got, want = vectors(margin=0)
    assert not torch.allclose(got, want, atol=1e-5)
    # The conditioning reaches the model: other upper codes, other logits.
    x = torch.as_tensor(np.asarray(lower.piece(0)[:48], np.int64))[None]  # the piece's start
    pos = torch.arange(48)[None]
    u = torch.randint(0, 16, (1, 40))
    with torch.no_grad():
        a = model(
            x,
            pos,
            upper=u,
            upper_valid=torch.ones_like(u, dtype=torch.bool),
            first_upper=torch.zeros(1, dtype=torch.long),
        )
        b = model(
            x,
            pos,
            upper=(u + 1) % 16,
            upper_valid=torch.ones_like(u, dtype=torch.bool),
            first_upper=torch.zeros(1, dtype=torch.long),
        )
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- sampling


def _steps(model, prompt, n, use_cache, mask_args, **conditioning):
    """Logits at every step and the sampled ids of n steps with the codebook mask."""
    stream = (CachedStream if use_cache else ReferenceStream)(
        model, prompt, prompt.shape[1] + n, None, **conditioning
    )
    mask = CodebookMask(*mask_args)
    gen = torch.Generator().manual_seed(0)
    logits, ids = [stream.current.clone()], []
    from perceiver_music.sample import sample_next

    for i in range(n):
        token = sample_next(stream.current, SamplingConfig(keyboard=False), gen, mask)
        mask.update(token)
        ids.append(token)
        if i < n - 1:
            logits.append(stream.append(token).clone())
    return torch.stack(logits), torch.stack(ids, 1)


def test_cached_sampling_on_codes_equals_the_reference_past_the_context(work):
    """Top prior (Perceiver AR, refills and sliding past max_len) with 3 residual codebooks,
    and the upsampler (conditioned Transformer band): logits allclose at every step, the same
    ids, each in its codebook's range."""
    torch.manual_seed(0)
    cfg = load_config("prior_tiny", [*TINY_PRIOR, "model.vocab_size=51"])  # 3 codebooks of 16
    from perceiver_music.model import build_model

    prior = build_model(cfg.model).eval()
    cfg.codes.codebooks, cfg.codes.cardinality = 3, 16
    prompt = torch.tensor([[BOS, 3, 19, 35, 4, 20]])  # BOS and two frames
    n = 3 * cfg.model.max_len  # far past the context, through many refills
    with torch.no_grad():
        a, ids_a = _steps(prior, prompt, n, True, (cfg.codes, 51, prompt.shape[1]))
        b, ids_b = _steps(prior, prompt, n, False, (cfg.codes, 51, prompt.shape[1]))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.equal(ids_a, ids_b)
    k = (torch.arange(prompt.shape[1], prompt.shape[1] + n) - 1) % 3
    assert torch.all((ids_a[0] >= 3 + 16 * k) & (ids_a[0] < 3 + 16 * (k + 1)))

    model, ucfg = load_model(work["up"])
    upper = torch.randint(0, 16, (1, 60))
    prompt = torch.tensor([[BOS, 5, 6]])
    with torch.no_grad(), model.conditioned(upper):
        a, ids_a = _steps(model, prompt, 150, True, (ucfg.codes, 19, 3))
        b, ids_b = _steps(model, prompt, 150, False, (ucfg.codes, 19, 3))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.equal(ids_a, ids_b) and bool((ids_a >= FIRST_CODE).all())
    # generate() with the mask: the same with and without the cache, never a special id.
    with torch.no_grad(), model.conditioned(upper):
        rows = [
            generate(model, prompt, 100, SamplingConfig(keyboard=False), seed=1, use_cache=c, stop_at_eos=False,
                     logits_mask=CodebookMask(ucfg.codes, 19, 3))[0]
            for c in (True, False)
        ]  # fmt: skip
    assert torch.equal(rows[0], rows[1]) and len(rows[0]) == 103 and bool((rows[0][3:] >= FIRST_CODE).all())


def test_cached_sampling_on_codes_stays_exact_under_timing_conditioning():
    """A top prior told the length (3 residual codebooks, so time moves at every third id):
    cached logits allclose to the reference at every step, past max_len and through refills,
    from a prompt cut out of a piece (start_seconds); and the timing reaches the logits."""
    from perceiver_music.model import build_model
    from perceiver_music.model.conditioning import Cond

    torch.manual_seed(0)
    cfg = load_config("prior_tiny", [*TINY_PRIOR, "model.vocab_size=51", "model.condition=[timing]"])
    prior = build_model(cfg.model).eval()
    with torch.no_grad():  # its outputs start at zero (a no-op): give the timing something to say
        for p in prior.conditioner.parameters():
            p.normal_(0, 1.0)
    cfg.codes.codebooks, cfg.codes.cardinality = 3, 16
    seconds = torch.as_tensor(frame_steps(3, 16, 51) / 50.0)  # 50 frames a second
    prompt = torch.tensor([[3, 19, 35, 4, 20, 36]])  # two frames from inside a piece
    n = 3 * cfg.model.max_len

    def run(use_cache, total):
        cond = Cond(total=torch.tensor([total]))
        return _steps(prior, prompt, n, use_cache, (cfg.codes, 51, 0), cond=cond, token_seconds=seconds,
                      start_seconds=4.0)  # fmt: skip

    with torch.no_grad():
        a, ids_a = run(True, 10.0)
        b, ids_b = run(False, 10.0)
        c, _ = run(True, 600.0)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.equal(ids_a, ids_b)
    assert not torch.allclose(a[0], c[0], atol=1e-3)  # another length, other logits


def test_generate_audio_tells_a_timing_prior_the_whole_length(work, tmp_path, monkeypatch):
    """A top prior trained with model.condition=[timing] samples told prompt + continuation,
    exactly with and without the cache; generate.json says what it was told."""
    import perceiver_music.audio.generate as audio_generate

    told_to = []

    def recording(model, prompt, n, *args, conditions=None, **kwargs):
        told_to.append((model.cfg.arch, conditions))
        return generate(model, prompt, n, *args, conditions=conditions, **kwargs)

    monkeypatch.setattr(audio_generate, "generate", recording)
    top = tmp_path / "top_timing"
    train(load_config("prior_tiny", [*TINY_PRIOR, "model.condition=[timing]"]), level_dir(work["codes"], 1), top,
          progress=False)  # fmt: skip
    write_priors(tmp_path / "priors", str(work["codec"]), str(top), {0: str(work["up"])})
    prompt = work["wav"] / "p1.wav"
    runs = [
        generate_audio(tmp_path / "priors", tmp_path / f"g{c}", 0.2, prompt=prompt, seed=4, use_cache=c,
                       progress=False, png=False)
        for c in (True, False)
    ]  # fmt: skip
    run = CodecRun.load(work["codec"])
    cx, cy = (run.load_codes(r.codes_files[0])[0] for r in runs)
    assert all(np.array_equal(cx[lv], cy[lv]) for lv in (0, 1))
    told = json.loads((tmp_path / "gTrue" / "generate.json").read_text())["total_seconds_told"]
    assert told == pytest.approx(cx[1].shape[1] / run.cfg.sample_rate * run.model.hops[-1])  # 1.5 s + 0.2 s
    assert told == pytest.approx(1.7, abs=0.01)
    # The top prior's sampler got the length and the codes' clock; the upsampler nothing.
    (arch, timing), (up_arch, none) = told_to[:2]
    assert arch == "perceiver_ar" and up_arch == "upsampler" and none is None
    assert timing.total_seconds == pytest.approx(told)
    # The context is BOS + the prompt's 750 frames cut to max_len ids: the frames dropped came first.
    rate = run.cfg.sample_rate / run.model.hops[-1]
    assert timing.start_seconds == pytest.approx((1 + 1.5 * rate - 48 - 1) / rate)
    assert np.allclose(timing.id_seconds, frame_steps(1, 16, 19) * run.model.hops[-1] / run.cfg.sample_rate)


def test_a_top_prior_conditioned_on_composers_generates_as_asked(work, tmp_path, monkeypatch, capsys):
    """Codes whose recordings carry a composer (prepare-audio --splits-from MIDI with labels):
    a top prior with model.condition=[timing, label] keeps the label set, `--composer` picks one
    (guidance mixes in the unconditioned logits); an unknown composer, a composer for a prior
    without labels and --style are refused before sampling, with the reason."""
    import perceiver_music.audio.generate as audio_generate

    codes = tmp_path / "codes"
    shutil.copytree(work["codes"], codes)
    meta_path = level_dir(codes, 1) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for i, piece in enumerate(meta["pieces"]):
        piece["label"] = ["Chopin", "Liszt"][i % 2]
    meta_path.write_text(json.dumps(meta))
    top = tmp_path / "top_label"
    train(load_config("prior_tiny", [*TINY_PRIOR, "model.condition=[timing,label]"]), level_dir(codes, 1), top,
          progress=False)  # fmt: skip
    _, cfg = load_model(top)
    assert sorted(cfg.model.labels) == ["Chopin", "Liszt"]
    write_priors(tmp_path / "priors", str(work["codec"]), str(top), {0: str(work["up"])})

    told_to = []

    def recording(model, prompt, n, *args, conditions=None, **kwargs):
        told_to.append(conditions)
        return generate(model, prompt, n, *args, conditions=conditions, **kwargs)

    monkeypatch.setattr(audio_generate, "generate", recording)
    out = tmp_path / "out"
    assert main(["generate", "--ckpt", str(tmp_path / "priors"), "--seconds", "0.1", "--out", str(out), "--quiet",
                 "--composer", "liszt", "--guidance", "2"]) == 0  # fmt: skip
    assert told_to[0].label == 1 + cfg.model.labels.index("Liszt") and told_to[0].guidance == 2.0
    settings = json.loads((out / "generate.json").read_text())
    assert settings["composer"] == "liszt" and settings["guidance"] == 2.0
    assert len(sf.read(out / "sample_00.wav")[0]) == int(0.1 * SR)

    bad = ["generate", "--seconds", "0.1", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*bad, "--ckpt", str(tmp_path / "priors"), "--composer", "Mozart"]) == 2
    assert "--composer 'Mozart' is not one the model knows; it knows: " in capsys.readouterr().err
    assert main([*bad, "--ckpt", str(work["root"] / "priors"), "--composer", "Liszt"]) == 2
    assert "this model is not conditioned on composers" in capsys.readouterr().err
    assert main([*bad, "--ckpt", str(tmp_path / "priors"), "--style", str(work["wav"] / "p0.wav")]) == 2
    assert "audio priors take --composer" in capsys.readouterr().err
    assert main([*bad, "--ckpt", str(tmp_path / "priors"), "--guidance", "-1"]) == 2
    assert "--guidance must be >= 0" in capsys.readouterr().err
    assert len(told_to) == 2 and not (tmp_path / "o").exists()  # nothing sampled for the refused ones

    # The studio offers the top prior's composers, and its job asks for one.
    from perceiver_music.studio import Job, Studio, model_info

    info = model_info(tmp_path / "priors")
    assert sorted(info.labels) == ["Chopin", "Liszt"] and not info.style
    before = len(told_to)
    Studio(info, tmp_path / "studio", tmp_path / "priors").generate(
        Job(seconds=0.1, composer="Chopin", guidance=1.5, top_p=1.0)
    )
    top_told = told_to[before]  # the top prior first, then the upsampler (told nothing)
    assert top_told.label == 1 + cfg.model.labels.index("Chopin") and top_told.guidance == 1.5
    jobs = sorted((tmp_path / "studio" / "jobs").iterdir())
    with pytest.raises(ValueError, match="--composer 'Mozart' is not one the model knows"):
        Studio(info, tmp_path / "studio", tmp_path / "priors").generate(Job(seconds=0.1, composer="Mozart"))
    assert sorted((tmp_path / "studio" / "jobs").iterdir()) == jobs  # refused before a folder is made


def test_generate_audio_continues_a_prompt_keeping_it_sample_for_sample(work, tmp_path, capsys):
    prompt = work["wav"] / "p0.wav"
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", str(work["root"] / "priors"), "--prompt", str(prompt), "--seconds", "0.25",
                 "--out", str(out), "--quiet", "--seed", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "1.50 s of prompt + 0.25 s generated" in printed and "s of audio per second" in printed
    original, sr = sf.read(prompt, dtype="int16")
    audio, sr2 = sf.read(out / "sample_00.wav", dtype="int16")
    assert sr == sr2 == SR and len(audio) == len(original) + SR // 4
    assert np.array_equal(audio[: len(original)], original)  # the prompt, bit for bit
    assert json.loads((out / "generate.json").read_text())["sampling"]["top_p"] == 1.0  # codes: no nucleus
    assert np.abs(audio[len(original) :]).max() > 0
    run = CodecRun.load(work["codec"])
    codes, _ = run.load_codes(out / "sample_00.codes.npz")
    prompt_codes = run.encode_array(original.astype(np.float32) / 32768)
    for level in (0, 1):
        t = prompt_codes[level].shape[1]
        assert np.array_equal(codes[level][:, :t], prompt_codes[level])  # each level continues its own codes
        assert codes[level].shape[1] == t + {1: 125, 0: 500}[level]  # ceil(0.25 s x 500) top frames x 4
    settings = json.loads((out / "generate.json").read_text())
    assert (
        settings["decoded_level"] == 0
        and settings["prompt_seconds"] == 1.5
        and settings["total_seconds_told"] is None  # a top prior without timing is told nothing
        and (out / "sample_00.png").is_file()
    )

    # Unconditional, two samples, without the cache: the same codes as with it.
    a = generate_audio(work["root"] / "priors", tmp_path / "a", 0.1, num=2, seed=5, progress=False, png=False)
    b = generate_audio(
        work["root"] / "priors",
        tmp_path / "b",
        0.1,
        num=2,
        seed=5,
        use_cache=False,
        progress=False,
        png=False,
    )
    for x, y in zip(a.codes_files, b.codes_files):
        cx, cy = run.load_codes(x)[0], run.load_codes(y)[0]
        assert all(np.array_equal(cx[lv], cy[lv]) for lv in (0, 1))
    assert a.speed > 0 and len(sf.read(a.audio_files[1])[0]) == int(0.1 * SR)
    # Jukebox's windows for the upsampler (200 level-0 frames in windows adding 24 each):
    # exact with and without the cache too, the top level untouched, the prompt kept.
    hop = [
        generate_audio(work["root"] / "priors", tmp_path / f"h{c}", 0.1, prompt=prompt, seed=5, use_cache=c,
                       progress=False, png=False, hop_fraction=0.5)
        for c in (True, False)
    ]  # fmt: skip
    cx, cy = (run.load_codes(h.codes_files[0])[0] for h in hop)
    assert all(np.array_equal(cx[lv], cy[lv]) for lv in (0, 1))
    assert cx[0].shape[1] == prompt_codes[0].shape[1] + 200
    assert np.array_equal(cx[0][:, : prompt_codes[0].shape[1]], prompt_codes[0])
    assert json.loads((tmp_path / "hTrue" / "generate.json").read_text())["hop_fraction"] == 0.5

    # --no-upsample: the top level sampled as with the upsampler (same seed, same codes), then
    # decoded directly, at the top level's length in samples; the prompt still bit for bit.
    assert main(["generate", "--ckpt", str(work["root"] / "priors"), "--prompt", str(prompt), "--seconds", "0.25",
                 "--out", str(tmp_path / "top"), "--quiet", "--seed", "3", "--no-upsample"]) == 0  # fmt: skip
    top_only, _ = sf.read(tmp_path / "top" / "sample_00.wav", dtype="int16")
    assert len(top_only) == len(audio) and np.array_equal(top_only[: len(original)], original)
    assert not np.array_equal(top_only, audio)  # level 1 decoded, not level 0
    top_codes, _ = run.load_codes(tmp_path / "top" / "sample_00.codes.npz")
    assert set(top_codes) == {1} and np.array_equal(top_codes[1], codes[1])
    settings = json.loads((tmp_path / "top" / "generate.json").read_text())
    assert (
        settings["decoded_level"] == 1
        and settings["upsampled"] is False
        and list(settings["levels"]) == ["1"]
    )


def test_bad_priors_and_prompts_are_refused_before_sampling(work, tmp_path, capsys):
    priors = work["root"] / "priors"
    gen = ["generate", "--ckpt", str(priors), "--seconds", "0.2", "--out", str(tmp_path / "o")]
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not samples")
    other_rate = tmp_path / "fast.wav"
    sf.write(other_rate, tones(0.5, 16000), 16000)
    for args, message in [
        ([*gen, "--prompt", str(not_audio)], "not audio that libsndfile can read"),
        ([*gen, "--prompt", str(other_rate)], "a prompt at 16000 Hz; this codec works at 8000 Hz"),
        (
            [*gen[:-2], "--out", str(tmp_path / "o"), "--prompt", str(tmp_path / "none.wav")],
            "no such prompt file",
        ),
        (gen[:3] + gen[5:], "takes --seconds S"),
        ([*gen, "--hop-fraction", "1.5"], "--hop-fraction must be in (0, 1], got 1.5"),
        ([*gen, "--hop-fraction", "0.5", "--no-upsample"], "--no-upsample skips them"),
    ]:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    # Priors of another codec mixed in: a second codec (other weights) with the first's top prior.
    other = _codec(work["data"], tmp_path / "codec2", "train.seed=7")
    write_priors(tmp_path / "mixed", str(other), str(work["top"]), {0: str(work["up"])})
    with pytest.raises(PriorsError, match="trained on codes of another codec .*cannot be mixed"):
        load_priors(tmp_path / "mixed")
    write_priors(tmp_path / "swapped", str(work["codec"]), str(work["up"]), {0: str(work["top"])})
    with pytest.raises(PriorsError, match="trained on level 0 codes, not level 1"):
        load_priors(tmp_path / "swapped")
    write_priors(tmp_path / "gap", str(work["codec"]), str(work["top"]), {5: str(work["up"])})
    with pytest.raises(PriorsError, match="without a gap"):
        load_priors(tmp_path / "gap")
    assert main(["generate", "--ckpt", str(work["top"]), "--out", str(tmp_path / "o"), "--no-render"]) == 2
    assert "not MIDI: generate audio with --ckpt PRIORS_DIR" in capsys.readouterr().err
    # The bundled MIDI model has no levels to skip.
    assert main(["generate", "--out", str(tmp_path / "o"), "--tokens", "4", "--no-upsample"]) == 2
    assert "--no-upsample are for audio priors" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "priors.json").write_text("{")
    assert (
        main(["generate", "--ckpt", str(tmp_path / "broken"), "--seconds", "1", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "priors.json: not a priors file" in capsys.readouterr().err


def test_the_bundle_recipe_makes_the_model_generate_audio_uses(work, tmp_path, monkeypatch, capsys):
    """recipes/bundle_audio_model.py copies the codec and priors of a PRIORS_DIR into the package
    (checkpoint folders, relative paths) with a card of what was measured; `generate --audio`
    then samples from it with no --ckpt."""
    import importlib.util

    from perceiver_music import checkpoint
    from perceiver_music.audio.generate import priors_likelihood

    spec = importlib.util.spec_from_file_location(
        "bundle_audio_model", REPO / "recipes" / "bundle_audio_model.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    runs = tmp_path / "runs"
    write_priors(runs / "priors", str(work["codec"]), str(work["top"]), {0: str(work["up"])})
    rows = priors_likelihood(runs / "priors", work["codes"], "valid", runs / "eval", progress=False)
    generate_audio(runs / "priors", runs / "generated", 0.1, seed=1, progress=False)
    bundle = tmp_path / "bundled_audio"
    monkeypatch.setattr(recipe, "BUNDLED_AUDIO", bundle)
    follows = {  # as bench/audio_continuation.py writes it
        "recordings": 2,
        "settings": {"prompt_seconds": 5.0, "seconds": 4.0},
        "mean": {
            "continued": {"chroma_cosine": 0.8123, "mel_db_distance": 3.21},
            "unprompted": {"chroma_cosine": 0.6012, "mel_db_distance": 7.5},
            "prompt_itself": {"chroma_cosine": 0.9, "mel_db_distance": 2.0},
        },
    }
    (runs / "continuation.json").write_text(json.dumps(follows))
    assert recipe.main(["--runs", str(runs), "--data", str(work["root"])]) == 0
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "2 held-out recordings, 5 s of" in card and "| continued from the prompt | 0.812 | 3.21 |" in card
    assert "CC BY-NC-SA 4.0" in card and "| upsampler to level 0 | `up0/` | upsampler," in card
    assert all(f"{r['nats_per_code']:.4f}" in card for r in rows)  # NLL per level, as measured
    assert "s of audio per second" in card and (bundle / "generated.png").is_file()
    assert json.loads((bundle / "priors.json").read_text()) == {
        "codec": "codec",
        "top": "top",
        "upsamplers": {"0": "up0"},
    }
    assert (bundle / "top" / "model.safetensors").read_bytes() == (
        work["top"] / "best" / "model.safetensors"
    ).read_bytes()

    monkeypatch.setattr(checkpoint, "BUNDLED_AUDIO", bundle)
    out = tmp_path / "out"
    assert main(["generate", "--audio", "--seconds", "0.1", "--out", str(out), "--quiet", "--seed", "2"]) == 0
    assert len(sf.read(out / "sample_00.wav")[0]) == int(0.1 * SR)
    assert json.loads((out / "generate.json").read_text())["priors"] == str(bundle)

    # What a user is told instead of a traceback.
    bad = ["generate", "--seconds", "0.1", "--out", str(tmp_path / "o")]
    assert main([*bad, "--audio", "--ckpt", str(runs / "priors")]) == 2
    assert "--audio is the bundled audio model" in capsys.readouterr().err
    assert main([*bad, "--prompt", str(work["wav"] / "p0.wav"), "--no-render"]) == 2  # the MIDI model
    assert (
        "a recording, and this model writes MIDI: continue it as audio with --audio"
        in capsys.readouterr().err
    )
    monkeypatch.setattr(checkpoint, "BUNDLED_AUDIO", tmp_path / "nothing")
    assert main([*bad, "--audio"]) == 2
    assert "no bundled audio model in this installation" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert recipe.main(["--runs", str(tmp_path / "nothing"), "--data", str(work["root"])]) == 1
    assert "run recipes/audio_model.sh first" in capsys.readouterr().err


def test_the_studio_continues_a_recording_with_an_audio_model(work, tmp_path):
    """`studio --ckpt PRIORS_DIR` (or --audio): the page's prompt is a recording at the codec's
    rate, continued as audio; a MIDI file, another rate or too long a length are refused."""
    import importlib.util

    from perceiver_music.studio import Job, Studio, UploadError, model_info

    info = model_info(work["root"] / "priors")
    assert info.sample_rate == SR and "level 0: upsampler" in info.card
    studio = Studio(info, tmp_path / "out", work["root"] / "priors")
    prompt = work["wav"] / "p0.wav"
    shown, png = studio.preview(prompt)
    assert shown.seconds == pytest.approx(1.5) and png.read_bytes()[:4] == b"\x89PNG"
    result = studio.generate(Job(prompt=prompt, seconds=0.1, num=2, top_p=1.0, seed=1))
    original, _ = sf.read(prompt, dtype="int16")
    for wav in result.audio_files:
        audio, _ = sf.read(wav, dtype="int16")
        assert len(audio) == len(original) + int(0.1 * SR) and np.array_equal(
            audio[: len(original)], original
        )
    assert result.out_dir.is_relative_to((tmp_path / "out" / "jobs").resolve())
    # The page's "upsample" box, unticked: the top level decoded directly, the prompt still kept.
    assert info.upsamplers
    top = studio.generate(Job(prompt=prompt, seconds=0.1, top_p=1.0, seed=1, upsample=False))
    settings = json.loads((top.out_dir / "generate.json").read_text())
    assert settings["upsampled"] is False and settings["decoded_level"] == 1
    audio, _ = sf.read(top.audio_files[0], dtype="int16")
    assert np.array_equal(audio[: len(original)], original)
    midi = tmp_path / "notes.mid"
    midi.write_bytes(b"MThd")
    other = tmp_path / "fast.wav"
    sf.write(other, tones(0.5, 16000), 16000)
    for job, message in [
        (Job(prompt=midi, seconds=0.1), "this is an audio model; its prompt is a recording"),
        (Job(prompt=other, seconds=0.1), f"a recording at 16000 Hz; this model works at {SR} Hz"),
        (Job(seconds=100), "an audio model generates up to 60 s here"),
    ]:
        with pytest.raises((UploadError, ValueError), match=message):
            studio.generate(job)
    if importlib.util.find_spec("gradio") is not None:
        from perceiver_music.studio import build_app

        app = build_app(studio)
        props = {c["props"].get("elem_id"): c["props"] for c in app.config["components"]}
        assert ".mid" not in props["prompt"]["file_types"] and props["seconds"]["maximum"] == 60


def test_the_audio_card_tells_how_a_branched_runs_rate_went(tmp_path):
    """A prior trained in stages (`train --branch`: a held rate, then a decay branched off it)
    gets each stage on its card, oldest first, from the runs' branch.json and config.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bundle_audio_model", REPO / "recipes" / "bundle_audio_model.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    def run(name, train, branch=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"train": train}))
        if branch:
            (tmp_path / name / "branch.json").write_text(json.dumps(branch))
        return tmp_path / name

    base = {"lr": 5e-4, "min_lr": 5e-5}
    run("top", {**base, "schedule": "cosine", "steps": 2300, "decay_steps": 0})
    run("long", {**base, "schedule": "wsd", "steps": 20000, "decay_steps": 2000},
        {"source": str(tmp_path / "top" / "checkpoints" / "step_0002300"), "step": 2300})  # fmt: skip
    last = run("decay", {**base, "schedule": "wsd", "steps": 4250, "decay_steps": 500},
               {"source": str(tmp_path / "long" / "checkpoints" / "step_0003750"), "step": 3750})  # fmt: skip
    assert recipe._schedule(last, 4250) == (
        "`top` steps 0-2,300 (cosine, 0.0005 to 5e-05), then `long` steps 2,300-3,750 (held at 0.0005), "
        "then `decay` steps 3,750-4,250 (decayed to 5e-05 from step 3,750)"
    )
    assert recipe._schedule(tmp_path / "top", 2300) == "`top` steps 0-2,300 (cosine, 0.0005 to 5e-05)"


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("basic_pitch", "onnxruntime", "librosa")),
    reason="needs the transcribe extra (basic-pitch, librosa)",
)
def test_the_upsampler_bench_hears_the_true_top_level_upsampled(work, tmp_path, monkeypatch):
    """bench/audio_upsampler.py: the bottom level sampled given a recording's true top codes,
    beside the recording itself (identical to itself: cosine 1, 0 dB), its true bottom codes and
    its top level decoded alone; a PRIORS_DIR without an upsampler is refused."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench"))  # it reads audio_continuation's measures
    spec = importlib.util.spec_from_file_location("audio_upsampler", REPO / "bench" / "audio_upsampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "up.json"
    args = ["--data", str(work["data"]), "--splits", "train", "--files", "2", "--start", "0"]
    bench.main(
        [
            "--priors",
            str(work["root"] / "priors"),
            *args,
            "--prompt-seconds",
            "0.25",
            "--seconds",
            "1",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        assert row["truth"]["chroma_cosine"] == pytest.approx(1.0) and row["truth"]["mel_db_distance"] == 0.0
        assert (
            row["true bottom codes"]["mel_db_distance"] > 0
            and row["upsampled from the true top"]["mel_db_distance"] > 0
        )
        assert all(row[k]["notes"] >= 0 for k in bench.KINDS)
    summary = report["sum_and_mean"]
    assert summary["truth"]["notes"] == sum(r["truth"]["notes"] for r in report["rows"])
    write_priors(tmp_path / "top_only", str(work["codec"]), str(work["top"]), {})
    with pytest.raises(SystemExit, match="no upsampler to measure"):
        bench.main(["--priors", str(tmp_path / "top_only"), *args])
