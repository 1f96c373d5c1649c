"""`perceiver-music generate`: files written, prompts, lengths, and bad input refused early."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from perceiver_music import checkpoint
from perceiver_music.cli import main
from perceiver_music.generate import prompt_tokens
from perceiver_music.render import rendering_available
from perceiver_music.tokens.performance import BOS, EOS, PerformanceTokenizer

from conftest import write_midi

TOK = PerformanceTokenizer()


def time_steps(ids) -> int:
    """Total TIME_SHIFT steps of a token sequence, counted here independently of the package."""
    v = TOK.vocab
    return sum(int(t) - v.time_shift + 1 for t in ids if v.time_shift <= t < v.velocity)


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run / "run"


def test_unconditional_batch(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run_dir),
                "--out",
                str(out),
                "--num",
                "2",
                "--tokens",
                "150",
                "--quiet",
                "--no-render",
                "--seed",
                "3",
                "--top-k",
                "40",
            ]
        )
        == 0
    )
    settings = json.loads((out / "generate.json").read_text())
    assert settings["files"] == ["sample_00.mid", "sample_01.mid"]
    assert settings["sampling"]["top_k"] == 40 and settings["seed"] == 3 and settings["prompt_tokens"] == 1
    assert settings["sampling"]["keyboard"] is True and settings["sampling"]["pitch_range"] == [21, 108]
    for name, n, kept in zip(settings["files"], settings["generated_tokens"], settings["token_files"]):
        assert 1 <= n <= 150
        ids = np.load(out / kept)  # the emitted tokens, BOS first, which the MIDI was decoded from
        assert ids[0] == BOS and len(ids) == n + 1
        notes = TOK.decode_notes(ids[ids > 2])
        assert np.array_equal(TOK.midi_to_notes(out / name).pitch, notes.pitch)  # a readable MIDI file
    assert "tokens/s" in capsys.readouterr().out


def test_keyboard_mask_option(run_dir, tmp_path):
    """Masked by default; --no-keyboard-mask lets the untrained model emit stray NOTE_OFFs."""
    from perceiver_music.tokens.performance import note_events

    strays = {}
    for flag in ([], ["--no-keyboard-mask"]):
        out = tmp_path / ("free" if flag else "masked")
        args = ["generate", "--ckpt", str(run_dir), "--out", str(out), "--num", "4", "--tokens", "200"]
        assert main([*args, "--quiet", "--no-render", "--seed", "1", "--pitch-range", "40-90", *flag]) == 0
        rows = [np.load(f) for f in sorted(out.glob("*.tokens.npy"))]
        events = [note_events(r.astype(np.int64), TOK.vocab) for r in rows]
        strays[bool(flag)] = sum(int(ev.stray_off.sum()) for ev in events)
        if not flag:
            assert all(((ev.pitch[ev.on] >= 40) & (ev.pitch[ev.on] <= 90)).all() for ev in events)
    assert strays[False] == 0 and strays[True] > 0


def test_same_seed_same_music_with_and_without_cache(run_dir, tmp_path):
    args = ["generate", "--ckpt", str(run_dir), "--tokens", "120", "--quiet", "--seed", "7", "--no-render"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--no-cache"]) == 0
    assert (tmp_path / "a" / "sample_00.mid").read_bytes() == (tmp_path / "b" / "sample_00.mid").read_bytes()


def test_bf16_precision_runs_and_is_recorded(run_dir, tmp_path):
    out = tmp_path / "bf16"
    args = ["generate", "--ckpt", str(run_dir), "--tokens", "60", "--quiet", "--no-render"]
    assert main([*args, "--out", str(out), "--precision", "bf16", "--temperature", "0"]) == 0
    settings = json.loads((out / "generate.json").read_text())
    assert settings["precision"] == "bf16" and settings["generated_tokens"][0] >= 1
    TOK.encode(out / "sample_00.mid")


def test_continuing_a_prompt_keeps_it(run_dir, tmp_path, capsys):
    prompt = write_midi(tmp_path / "prompt.mid", [(0, 300, 60, 80), (300, 600, 64, 80), (600, 900, 67, 80)])
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run_dir),
                "--out",
                str(out),
                "--prompt",
                str(prompt),
                "--tokens",
                "40",
                "--quiet",
            ]
        )
        == 0
    )
    original = TOK.vocab.names(TOK.encode(prompt))
    continued = TOK.vocab.names(TOK.encode(out / "sample_00.mid"))
    assert continued[: len(original) - 1] == original[:-1]  # the prompt's events come first
    # The piano roll (the prompt's end marked at 0.9 s, its last note-off) and, where FluidSynth
    # is installed, the audio are written beside the MIDI and listed.
    settings = json.loads((out / "generate.json").read_text())
    assert settings["prompt_seconds"] == 0.9
    assert (out / "sample_00.png").stat().st_size > 5_000
    printed = capsys.readouterr().out
    assert str(out / "sample_00.png") in printed
    if rendering_available():
        assert settings["rendered"] == ["sample_00.png", "sample_00.wav"]
        assert (out / "sample_00.wav").read_bytes()[:4] == b"RIFF"


def test_long_prompts_are_trimmed_and_seconds_taken_from_the_end(tmp_path):
    notes = [(i * 100, i * 100 + 50, 60 + i % 12, 80) for i in range(200)]  # 20 s, ~800 tokens
    path = write_midi(tmp_path / "long.mid", notes)
    ids, notes_out, _ = prompt_tokens(TOK, path, context=64)
    assert len(ids) == 64 and ids[0] != BOS and "trimmed to its last 64 tokens" in notes_out[0]
    ids, _, _ = prompt_tokens(TOK, path, context=10_000, last_tokens=100)
    assert len(ids) == 100
    ids, notes_out, start = prompt_tokens(TOK, path, context=10_000, last_seconds=2.0)
    steps = time_steps(ids)
    assert 195 <= steps <= 200 and "last 2 s" in notes_out[0]
    full, _, whole_start = prompt_tokens(TOK, path, context=10_000)
    assert full[0] == BOS and len(full) == len(TOK.encode(path)) + 1
    # Where the kept part starts in its piece: what conditioning on timing is told.
    assert whole_start == 0.0 and start == pytest.approx((time_steps(full) - steps) / 100)


def test_length_in_seconds(run_dir, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run_dir),
                "--out",
                str(out),
                "--seconds",
                "3",
                "--quiet",
                "--num",
                "3",
                "--no-render",
            ]
        )
        == 0
    )
    for name in json.loads((out / "generate.json").read_text())["files"]:
        ids = TOK.encode(out / name)
        steps = time_steps(ids)
        assert steps <= 300 + 100  # stops at the first time shift reaching 3 s (or at EOS)


def test_bad_input_is_refused_before_any_work(run_dir, tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    cases = [
        (["--ckpt", missing, "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--ckpt", missing, "--temperature", "-1"], "temperature must be >= 0"),
        (["--ckpt", missing, "--num", "0"], "--num must be at least 1"),
        (["--ckpt", missing, "--seconds", "-2"], "--seconds must be positive"),
        (["--ckpt", missing, "--pitch-range", "high"], "--pitch-range must be LOW-HIGH"),
        (["--ckpt", missing, "--pitch-range", "90-30"], "pitch_range must be two pitches"),
        (["--ckpt", missing, "--prompt", str(tmp_path / "nope.mid")], "no such prompt file"),
        (["--ckpt", missing], "no checkpoint here"),
    ]
    for extra, message in cases:
        assert main(["generate", "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
        assert message in capsys.readouterr().err, extra
    (tmp_path / "text.mid").write_text("hello")
    write_midi(tmp_path / "empty.mid", [])
    for name, message in [("text.mid", "not a MIDI file"), ("empty.mid", "the prompt has no notes")]:
        assert (
            main(
                [
                    "generate",
                    "--ckpt",
                    str(run_dir),
                    "--out",
                    str(tmp_path / "o"),
                    "--quiet",
                    "--prompt",
                    str(tmp_path / name),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert message in err and name in err


def test_without_ckpt_the_bundled_model_is_used(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "BUNDLED", tmp_path / "nothing")
    assert main(["generate", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no bundled model in this installation" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "BUNDLED", run_dir / "best")
    out = tmp_path / "bundled"
    assert main(["generate", "--out", str(out), "--tokens", "30", "--quiet", "--no-render"]) == 0
    settings = json.loads((out / "generate.json").read_text())
    assert settings["checkpoint"] == "bundled"
    assert settings["sampling"] == {
        **settings["sampling"],
        "top_p": 1.0,
        "temperature": 1.0,
        "keyboard": True,
    }
    TOK.encode(out / "sample_00.mid")


def _sampler(pattern: list[int]):
    """A stand-in for sample.generate that writes `pattern` over and over, honouring the length,
    the stop rule and the progress callback as the real one does: generate_midi's own logic
    (length in seconds, the safety cap, the report) is what is tested."""
    import torch

    def fake(model, batch, max_new_tokens, sampling, *, on_token, stop, **kw):
        rows = []
        for row in batch:
            new = []
            for i in range(max_new_tokens):
                token = pattern[i % len(pattern)]
                new.append(token)
                if on_token is not None:
                    on_token(i + 1)
                if token == EOS or (stop is not None and bool(stop(torch.tensor([token]))[0])):
                    break
            rows.append(torch.cat([row, torch.tensor(new, dtype=row.dtype)]))
        return rows

    return fake


def test_seconds_gives_the_seconds_asked_for(run_dir, tmp_path, monkeypatch, capsys):
    from perceiver_music import generate as gen

    v = TOK.vocab
    dense = [v.parse("NOTE_ON:60"), v.parse("TIME_SHIFT:2"), v.parse("NOTE_OFF:60")]  # 150 tokens/s
    monkeypatch.setattr(gen, "generate", _sampler(dense))
    result = gen.generate_midi(run_dir, tmp_path / "o", seconds=30, progress=False, render=False)
    assert 29.9 <= result.seconds[0] <= 30.1, result.seconds
    assert time_steps(TOK.encode(result.midi_files[0])) >= 2990
    assert result.stopped == ["seconds"] and result.warnings == []


def test_the_safety_cap_is_reported_when_it_binds(run_dir, tmp_path, monkeypatch, capsys):
    from perceiver_music import generate as gen
    from perceiver_music.generate_settings import token_cap

    stuck = [TOK.vocab.parse("VELOCITY:20"), TOK.vocab.parse("NOTE_ON:60")]  # time never moves
    monkeypatch.setattr(gen, "generate", _sampler(stuck))
    out = tmp_path / "o"
    assert main(["generate", "--ckpt", str(run_dir), "--out", str(out), "--seconds", "2", "--no-render"]) == 0
    captured = capsys.readouterr()
    assert f"sample_00.mid: cut at the safety cap of {token_cap(2):,} tokens after 0.0 s" in captured.err
    assert "(cut at the safety cap)" in captured.out
    saved = json.loads((out / "generate.json").read_text())
    assert saved["stopped"] == ["tokens"] and "safety cap" in saved["notes"][-1]
    # The progress bar, on a log rather than a terminal: plain lines, the last one complete.
    bar = [line for line in captured.err.splitlines() if line.startswith("generate")]
    assert bar and "\r" not in captured.err and f"{token_cap(2)}tok" in bar[-1].replace(" ", "")


def test_a_bar_that_stops_early_reads_complete(run_dir, tmp_path, monkeypatch, capsys):
    from perceiver_music import generate as gen

    monkeypatch.setattr(gen, "generate", _sampler([TOK.vocab.parse("NOTE_ON:60")] * 46 + [EOS]))
    result = gen.generate_midi(run_dir, tmp_path / "o", tokens=100, progress=True, render=False)
    assert result.stopped == ["eos"] and result.generated_tokens == [47]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "100%" in last and "47/47" in last, last


def test_every_setting_is_checked_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    cases = [
        (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
        (["--temperature", "nan"], "temperature must be >= 0 and finite, got nan"),
        (["--min-p", "1"], "min_p must be in [0, 1), got 1.0"),
        (["--seconds", "inf"], "--seconds must be positive, got inf"),
        (["--seconds", "1e9"], "--seconds must be at most"),
        (["--tokens", "0"], "--tokens must be at least 1, got 0"),
        (["--refill", "0"], "--refill must be at least 1, got 0"),
        (["--prompt-seconds", "-1"], "--prompt-seconds must be positive, got -1.0"),
    ]
    code = (
        "import sys; from perceiver_music.cli import main; "
        f"rc = main(['generate', '--out', {str(tmp_path / 'o')!r}, *sys.argv[1:]]); "
        "print(rc, 'torch' in sys.modules)"
    )
    for args, message in cases:
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert out.stdout.split() == ["2", "False"], (args, out.stdout, out.stderr)
        assert message in out.stderr, (args, out.stderr)


def test_refill_beyond_the_latents_is_one_line(run_dir, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(run_dir), "--out", str(tmp_path / "o"), "--refill", "999"]) == 2
    assert "--refill must be at most the model's num_latents (16), got 999" in capsys.readouterr().err
