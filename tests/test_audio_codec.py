"""The audio codec: EMA codebooks and restarts, residual VQ, the VQ-VAE, chunked coding, the
codec interface, metrics, training with exact resume, and the encode/decode commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from perceiver_music.audio.codec import CodecRun
from perceiver_music.audio.data import prepare_audio
from perceiver_music.audio.metrics import codebook_usage, mel_distance, si_sdr, spectral_convergence_db
from perceiver_music.audio.quantize import EMACodebook, VectorQuantizer
from perceiver_music.audio.vqvae import VQVAE, UpsampleConv
from perceiver_music.cli import main
from perceiver_music.codec import Codec, CodecError, MidiCodec
from perceiver_music.config import AudioPrepareConfig, CodecConfig, PrepareConfig, load_config
from perceiver_music.train import train

from conftest import write_midi

SR = 8000
# Two levels of hop 4 and 16, width 8: a forward pass on a second of audio takes milliseconds.
TINY_CODEC = dict(
    sample_rate=SR,
    sample_length=1024,
    levels=2,
    downs_t=[1, 1],
    strides_t=[4, 4],
    emb_width=8,
    l_bins=16,
    width=8,
    depth=2,
    multipliers=[1, 1],
    stft_sizes=[256, 128],
    stft_hops=[64, 32],
    stft_windows=[256, 128],
    linf_k=64,
    chunk_seconds=0.25,
)
TINY_TRAIN = [f"codec.{k}={json.dumps(v)}" for k, v in TINY_CODEC.items()] + [
    "train.batch_size=2",
    "train.eval_windows=2",
    "train.log_every=1",
    "train.threads=1",
    "train.warmup_steps=0",
]


def tones(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Decaying sine tones: audio with structure a codec can learn."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = np.zeros_like(t)
    for k in range(int(seconds * 4)):
        f = 110 * 2 ** (rng.integers(0, 36) / 12)
        onset = k * 0.25
        x += (t >= onset) * np.sin(2 * np.pi * f * t) * np.exp(-4 * np.clip(t - onset, 0, None))
    return (0.2 * x).astype(np.float32)


# ----------------------------------------------------------------------------- quantizers


def test_ema_codes_converge_to_the_means_of_their_clusters():
    torch.manual_seed(0)
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    book = EMACodebook(4, 2, mu=0.9, restarts=False)
    book.initialize(means + 0.5 * torch.randn(4, 2).clamp(-1, 1))  # near, not on, the means
    book.train()
    for _ in range(120):  # 0.9 ** 120: the starting points are forgotten
        x = means.repeat(64, 1) + 0.1 * torch.randn(256, 2)
        codes, q = book(x)
    # Each code ends at its cluster's mean (the EMA of the batch means), not where it started.
    got = book.codebook[book.nearest(means)]
    assert torch.allclose(got, means, atol=0.03), got
    assert sorted(book.nearest(means).tolist()) == [0, 1, 2, 3]


def test_a_dead_code_is_restarted_onto_an_encoder_output_only_with_restarts_on():
    for restarts in (True, False):
        torch.manual_seed(1)
        book = EMACodebook(4, 2, mu=0.99, restarts=restarts)
        far = torch.tensor([100.0, 100.0])
        # Nothing is near code 3: its EMA count falls below 1 at the first step.
        start = torch.stack(
            [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 1.0]), far]
        )
        book.initialize(start)  # (in a random order: put them back in this one)
        book.codebook.copy_(start)
        book.k_sum.copy_(start)
        book.train()
        x = torch.randn(32, 2)
        book(x)
        if restarts:
            # The dead code now sits exactly on one of the batch's vectors.
            assert (book.codebook[3] - x).abs().sum(1).min() < 1e-6
        else:
            assert torch.equal(book.codebook[3], far)
        assert book.k_elem[3] < 1.0


def test_nearest_is_the_code_at_the_least_euclidean_distance():
    g = torch.Generator().manual_seed(0)
    book = EMACodebook(64, 8)
    book.codebook.copy_(torch.randn(64, 8, generator=g))
    x = 3 * torch.randn(500, 8, generator=g)
    assert torch.equal(book.nearest(x), torch.cdist(x, book.codebook).argmin(1))
    assert torch.equal(book.nearest(book.codebook[[5, 9, 63]] + 1e-3), torch.tensor([5, 9, 63]))


def test_usage_counts_live_codes():
    book = EMACodebook(8, 2)
    book.initialize(torch.randn(8, 2))
    book.k_elem[:] = torch.tensor([2.0, 1.5, 1.0, 0.99, 0.5, 0.0, 3.0, 0.2])
    assert book.usage().item() == pytest.approx(4 / 8)


def test_residual_codebooks_quantize_what_the_earlier_ones_left():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, codebooks=3, mu=0.9)
    vq.train()
    for _ in range(20):
        vq(torch.randn(512, 4))
    vq.eval()
    x = torch.randn(1000, 4)
    codes = vq.encode(x)
    assert codes.shape == (1000, 3)
    errors = [(x - vq.decode(codes[:, :k])).pow(2).mean().item() for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2], errors
    # The second codebook's codes are those of the first codebook's residual.
    residual = x - vq.books[0].lookup(codes[:, 0])
    assert torch.equal(codes[:, 1], vq.books[1].nearest(residual))


def test_quantizer_dropout_trains_later_codebooks_on_fewer_examples():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, codebooks=3, mu=0.5, dropout=1.0)
    vq.train()
    x = torch.randn(400, 2)
    examples = torch.arange(400) // 10  # 40 examples of 10 vectors
    out = vq(x, examples)
    counts = [b.k_elem.sum().item() for b in vq.books]  # EMA of the vectors each book saw
    assert counts[0] > counts[1] > counts[2], counts
    # An example that kept k codebooks is the sum of exactly its first k codes.
    assert out.codes.shape == (400, 3)


# ----------------------------------------------------------------------------- the model


def tiny_model(**changes) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(CodecConfig(**{**TINY_CODEC, **changes}))


def test_vqvae_shapes_hops_and_loss_terms():
    model = tiny_model()
    assert model.hops == [4, 16]
    x = torch.from_numpy(np.stack([tones(0.128, seed=s) for s in range(2)]))  # 1024 samples
    out = model(x)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    for level in (0, 1):
        codes = model.encode(x, level)
        assert codes.shape == (2, 1, 1024 // model.hops[level])
        assert model.decode(codes, level).shape == (2, 1024)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("stride", [3, 4, 8, 32])
def test_the_decoders_upsampling_is_the_transposed_convolution(stride, monkeypatch):
    torch.manual_seed(stride)
    monkeypatch.setattr(UpsampleConv, "FOLD_FROM_STRIDE", 2)  # the folded form at every stride
    up = UpsampleConv(5, 7, stride)
    x = torch.randn(3, 5, 41, requires_grad=True)
    want = torch.nn.functional.conv_transpose1d(x, up.weight, up.bias, stride, stride // 2)
    got = up(x)
    assert got.shape == want.shape == (3, 7, (41 + 1) * stride - 2 * (stride // 2))  # 41 x stride if even
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, up.weight, up.bias]),
                    torch.autograd.grad(want.square().sum(), [x, up.weight, up.bias])):  # fmt: skip
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # the parameters of nn.ConvTranspose1d, under the same names: checkpoints load either way
    plain = torch.nn.ConvTranspose1d(5, 7, 2 * stride, stride, stride // 2)
    plain.load_state_dict(up.state_dict())
    assert torch.allclose(plain(x), got, atol=1e-5)


def test_decoder_dilations_are_the_encoders_reversed():
    model = tiny_model(depth=3, dilation_growth_rate=3)
    from perceiver_music.audio.vqvae import ResBlock

    dilations = lambda seq: [m.net[1].dilation[0] for m in seq.modules() if isinstance(m, ResBlock)]
    level = model.levels[0]  # one downsampling step: one residual stack each way
    assert dilations(level.encoder) == [1, 3, 9]
    assert dilations(level.decoder) == [9, 3, 1]


@pytest.mark.parametrize("quantizer", ["vq", "rvq"])
def test_chunked_coding_equals_coding_the_whole_signal(quantizer):
    changes = (
        {
            "quantizer": "rvq",
            "codebooks": 2,
            "levels": 1,
            "downs_t": [2],
            "strides_t": [4],
            "multipliers": [1],
        }
        if quantizer == "rvq"
        else {}
    )
    model = tiny_model(**changes).eval()
    run = CodecRun(model, model.cfg)
    x = tones(1.3)  # several chunks of 0.25 s, and a ragged end
    top = model.hops[-1]
    padded = np.zeros(-(-len(x) // top) * top, np.float32)
    padded[: len(x)] = x
    whole = torch.from_numpy(padded)[None]
    chunked = run.encode_array(x)
    for level in range(len(model.hops)):
        expect = model.encode(whole, level)[0].numpy()
        assert np.array_equal(chunked[level], expect)
        decoded = run.decode_array(chunked[level], level)
        reference = model.decode(torch.from_numpy(expect)[None], level)[0].numpy()
        np.testing.assert_allclose(decoded, reference, atol=1e-5)


# ----------------------------------------------------------------------------- the interface


class _Toy(Codec):
    num_codebooks, cardinality = 3, 10

    def encode_file(self, path):
        raise NotImplementedError

    def decode_file(self, codes, path):
        raise NotImplementedError


def test_ids_are_frame_major_with_one_id_range_per_codebook():
    codec = _Toy()
    codes = np.array([[1, 2], [3, 4], [5, 9]])
    ids = codec.to_ids(codes)
    assert ids.tolist() == [1, 13, 25, 2, 14, 29]
    assert np.array_equal(codec.from_ids(ids), codes)
    assert codec.vocab_size == 30 and codec.codebook_range(2) == (20, 30)
    with pytest.raises(CodecError, match="outside codebook 1's range"):
        codec.from_ids(np.array([1, 3, 25]))  # 3 is codebook 0's range, at codebook 1's place
    with pytest.raises(CodecError, match="not whole frames"):
        codec.from_ids(np.array([1, 13]))
    with pytest.raises(CodecError, match="out of range"):
        codec.to_ids(np.array([[1], [2], [10]]))


def test_the_midi_tokenizer_is_a_codec(tmp_path):
    midi = write_midi(tmp_path / "a.mid", [(0, 500, 60, 80), (250, 900, 64, 70)])
    codec = MidiCodec()
    codes = codec.encode_file(midi)
    assert codes.shape[0] == 1 and codec.frame_rate is None
    codec.decode_ids(codec.to_ids(codes), tmp_path / "b.mid")
    assert np.array_equal(codec.encode_file(tmp_path / "b.mid"), codes)
    with pytest.raises(CodecError, match="x.mid"):
        codec.encode_file(tmp_path / "x.mid")


def test_audio_codec_level_round_trip_through_files(tmp_path):
    model = tiny_model().eval()
    run = CodecRun(model, model.cfg)
    wav = tmp_path / "t.wav"
    sf.write(wav, np.stack([tones(0.7, 16000), tones(0.7, 16000, seed=1)], 1), 16000)  # stereo, another rate
    level = run.level(1)
    assert level.frame_rate == SR / 16 and level.num_codebooks == 1 and level.cardinality == 16
    codes = level.encode_file(wav)
    assert codes.shape == (1, -(-int(0.7 * SR) // 16))
    out = level.decode_file(codes, tmp_path / "t.level1.wav")
    audio, sr = sf.read(out)
    assert sr == SR and len(audio) == codes.shape[1] * 16
    assert np.array_equal(level.from_ids(level.to_ids(codes)), codes)


# ----------------------------------------------------------------------------- metrics


def test_signal_metrics_on_known_answers():
    x = torch.from_numpy(tones(1.0))[None]
    assert spectral_convergence_db(x, x).item() < -100
    assert spectral_convergence_db(x, torch.zeros_like(x)).item() == pytest.approx(0.0, abs=1e-4)
    assert spectral_convergence_db(x, 0.9 * x).item() == pytest.approx(20 * np.log10(0.1), abs=1e-3)
    assert mel_distance(x, x, SR).item() == pytest.approx(0.0, abs=1e-6)
    assert mel_distance(x, 0.5 * x, SR).item() > mel_distance(x, 0.9 * x, SR).item() > 0
    assert si_sdr(x, 3.0 * x).item() > 80  # scale-invariant
    noisy = x + 0.1 * x.std() * torch.randn_like(x)
    assert si_sdr(x, noisy).item() == pytest.approx(20, abs=1.0)
    assert codebook_usage(np.array([0, 1, 2, 3]), 8) == {"perplexity": pytest.approx(4.0), "share_used": 0.5}


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    wav = _mk(root / "wav")
    for i in range(6):
        sf.write(wav / f"p{i}.wav", tones(1.5, seed=i), SR)
    split = PrepareConfig(valid_fraction=0.3, test_fraction=0.2)
    prepare_audio(wav, root / "data", AudioPrepareConfig(sample_rate=SR), split, progress=False)
    return root / "data"


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def codec_config(*extra: str):
    return load_config("vqvae_tiny", [*TINY_TRAIN, *extra])


def test_codec_training_resumes_exactly(audio_data, tmp_path):
    # A constant learning rate, so that a 2-step run is the start of a 4-step one.
    codec_config = lambda *extra: globals()["codec_config"]("train.min_lr=1e-3", "train.lr=1e-3", *extra)
    straight = train(
        codec_config("train.steps=4", "train.ckpt_every=2", "train.eval_every=2"),
        audio_data,
        tmp_path / "a",
        progress=False,
    )
    train(
        codec_config("train.steps=2", "train.ckpt_every=2", "train.eval_every=2"),
        audio_data,
        tmp_path / "b",
        progress=False,
    )
    resumed = train(
        codec_config("train.steps=4", "train.ckpt_every=2", "train.eval_every=2"),
        audio_data,
        tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert straight.step == resumed.step == 4
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_0000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert a.keys() == b.keys() and any("codebook" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    valid = [r for r in log if r["kind"] == "valid"]
    assert {"val_loss", "val_sc_db_l0", "val_sc_db_l1", "usage"} <= set(valid[-1])
    assert (
        (tmp_path / "b" / "log.csv")
        .read_text()
        .splitlines()[0]
        .endswith("val_loss,val_sc_db,usage,samples_per_s")
    )


def test_training_lowers_the_codec_loss(audio_data, tmp_path):
    result = train(
        codec_config("train.steps=30", "train.eval_every=30", "train.ckpt_every=30", "train.lr=3e-3"),
        audio_data,
        tmp_path / "r",
        progress=False,
    )
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
    assert result.score_name == "validation loss"


def test_a_codec_config_refuses_midi_data_and_the_wrong_rate(audio_data, tmp_path):
    from perceiver_music.config import ConfigError
    from perceiver_music.data.prepare import prepare

    write_midi(_mk(tmp_path / "midi") / "a.mid", [(0, 500, 60, 80)])
    prepare(tmp_path / "midi", tmp_path / "mdata", PrepareConfig(workers=1), progress=False)
    with pytest.raises(ConfigError, match="prepare-audio"):
        train(codec_config("train.steps=1"), tmp_path / "mdata", tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="audio data"):
        train(load_config("debug", ["train.steps=1"]), audio_data, tmp_path / "r3", progress=False)
    with pytest.raises(ConfigError, match="codec.sample_rate"):
        train(
            codec_config("train.steps=1", "codec.sample_rate=16000"),
            audio_data,
            tmp_path / "r2",
            progress=False,
        )


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def codec_run(audio_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("codec") / "run"
    train(
        codec_config("train.steps=2", "train.eval_every=2", "train.ckpt_every=2"),
        audio_data,
        run,
        progress=False,
    )
    return run


def test_encode_decode_and_evaluate_commands(codec_run, audio_data, tmp_path, capsys):
    wav = tmp_path / "in.flac"
    sf.write(wav, tones(0.9, 22050), 22050)
    assert main(["encode", "--codec", str(codec_run), str(wav), "--out", str(tmp_path / "codes")]) == 0
    codes_file = tmp_path / "codes" / "in.codes.npz"
    assert main(["decode", "--codec", str(codec_run), str(codes_file), "--out", str(tmp_path / "dec")]) == 0
    for level in (0, 1):
        audio, sr = sf.read(tmp_path / "dec" / f"in.level{level}.wav")
        assert sr == SR and len(audio) == int(0.9 * SR)
    assert (
        main(
            [
                "evaluate",
                "--codec",
                str(codec_run),
                "--data",
                str(audio_data),
                "--split",
                "train",
                "--out",
                str(tmp_path / "ev"),
                "--clips",
                "2",
                "--clip-seconds",
                "0.5",
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "ev" / "codec_eval.json").read_text())
    assert [lv["level"] for lv in result["levels"]] == [0, 1]
    assert result["levels"][1]["bitrate_bps"] == pytest.approx(SR / 16 * 4)
    assert (tmp_path / "ev" / "plots" / "clip0.png").is_file()
    assert "spectral conv." in capsys.readouterr().out


def test_bad_input_to_encode_and_decode_names_the_file(codec_run, tmp_path, capsys):
    (tmp_path / "text.wav").write_text("not audio at all")
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "good.wav", tones(1.0), SR)
    data = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 3])
    code = main(
        [
            "encode",
            "--codec",
            str(codec_run),
            *(str(tmp_path / n) for n in ("text.wav", "empty.wav", "cut.wav")),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "text.wav: not audio" in err and "empty.wav: empty file" in err and "cut.wav: truncated" in err
    assert "Traceback" not in err

    assert (
        main(["encode", "--codec", str(codec_run), str(tmp_path / "good.wav"), "--out", str(tmp_path / "c")])
        == 0
    )
    good = tmp_path / "c" / "good.codes.npz"
    with np.load(good) as f:
        meta, level0, level1 = str(f["meta"]), f["level0"], f["level1"]
    np.savez(tmp_path / "range.npz", meta=np.array(meta), level0=level0, level1=np.full_like(level1, 40))
    other = json.loads(meta)
    other["layout"]["l_bins"] = 2048
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps(other)), level0=level0, level1=level1)
    code = main(
        [
            "decode",
            "--codec",
            str(codec_run),
            str(tmp_path / "range.npz"),
            str(tmp_path / "other.npz"),
            str(tmp_path / "text.wav"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "range.npz (level 1): codes out of range: 40..40, this codec has 16 codes" in err
    assert "other.npz: made by a different codec (8000 Hz, hops [4, 16], 1 codebook(s) of 2048 codes)" in err
    assert "text.wav: not a codes file" in err
    assert (
        main(["encode", "--codec", str(tmp_path), str(tmp_path / "good.wav"), "--out", str(tmp_path / "c")])
        == 2
    )
    assert "--codec:" in capsys.readouterr().err


def test_a_midi_run_is_not_a_codec(tmp_path, capsys):
    run = tmp_path / "midi_run" / "best"
    run.mkdir(parents=True)
    shutil.copy(
        Path(__file__).resolve().parents[1] / "src/perceiver_music/bundled/config.json", run / "config.json"
    )
    (run / "model.safetensors").write_bytes(b"")
    assert main(["encode", "--codec", str(run), "x.wav", "--out", str(tmp_path)]) == 2
    assert "not an audio codec" in capsys.readouterr().err


@pytest.mark.slow
def test_codec_trains_under_ddp_with_two_processes(audio_data, tmp_path):
    """torchrun, 2 CPU processes (gloo): with the EMA statistics all-reduced and restarts
    broadcast in the codebooks, the run steps, validates and checkpoints both processes."""
    import os
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "perceiver_music",
            "train",
            "--config",
            "vqvae_tiny",
            "--data",
            str(audio_data),
            "--out",
            str(tmp_path / "ddp"),
            "--quiet",
            *TINY_TRAIN,
            "train.steps=2",
            "train.eval_every=2",
            "train.ckpt_every=2",
            "train.batch_size=1",
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "valid"] == [2]
    assert all(np.isfinite(r["loss"]) for r in log if r["kind"] == "train")
    assert (tmp_path / "ddp" / "checkpoints" / "step_0000002" / "rng_rank1.safetensors").is_file()


def test_shipped_presets():
    jukebox = load_config("vqvae_jukebox")
    model = VQVAE(jukebox.codec)
    assert jukebox.model.arch == "vqvae" and jukebox.codec.sample_rate == 44100
    assert model.hops == [8, 32, 128] and jukebox.codec.l_bins == 2048
    # The bottom level twice as wide and deep as the others (Jukebox's multipliers 2, 1, 1).
    widths = [lv.encoder[0].out_channels for lv in model.levels]
    stacks = [len(lv.encoder[1]) for lv in model.levels]
    assert widths == [64, 32, 32] and stacks == [8, 4, 4]
    tiny, rvq = load_config("vqvae_tiny"), load_config("rvq_tiny")
    assert tiny.codec.hop_lengths() == [8, 32] and tiny.codec.sample_rate == 22050
    assert rvq.codec.quantizer == "rvq" and rvq.codec.codebooks == 4 and rvq.codec.levels == 1


def test_codec_config_errors_name_the_key():
    from perceiver_music.config import ConfigError

    with pytest.raises(ConfigError, match="codec.sample_length .* multiple of the top hop"):
        load_config("vqvae_tiny", ["codec.sample_length=1000"])
    with pytest.raises(ConfigError, match="rvq works at one level"):
        load_config("vqvae_tiny", ["codec.quantizer=rvq", "codec.codebooks=2"])
    with pytest.raises(ConfigError, match="one entry per level"):
        load_config("vqvae_tiny", ["codec.levels=3"])
