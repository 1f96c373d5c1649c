"""Rendering: piano-roll data and images, BS.1770 loudness, fluidsynth audio, folders of files."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perceiver_music import render
from perceiver_music.render import (
    RenderError,
    find_soundfont,
    integrated_loudness,
    normalize,
    note_name,
    piano_roll,
    render_audio,
    render_files,
    roll_data,
)
from perceiver_music.tokens.performance import MidiError, load_score

from conftest import write_midi

APT = "apt-get install fluidsynth fluid-soundfont-gm"
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_SOUNDFILE = importlib.util.find_spec("soundfile") is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="scipy missing: pip install -e '.[audio]'")
needs_audio_extra = pytest.mark.skipif(
    not (HAS_SCIPY and HAS_SOUNDFILE), reason="scipy/soundfile missing: pip install -e '.[audio]'"
)
needs_fluidsynth = pytest.mark.skipif(
    not render.rendering_available(), reason=f"fluidsynth or a soundfont missing: sudo {APT}"
)


@pytest.fixture
def a4(tmp_path) -> Path:
    """One A4 (440 Hz) of exactly 1 s at velocity 100."""
    return write_midi(tmp_path / "a4.mid", notes=[(0, 1000, 69, 100)])


@pytest.fixture
def corrupt(tmp_path) -> Path:
    path = tmp_path / "corrupt.mid"
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\x00\x00\xff\xff\x90")
    return path


@pytest.fixture
def fake_soundfont(tmp_path) -> Path:
    path = tmp_path / "fake.sf2"
    path.write_bytes(b"RIFF\x04\x00\x00\x00sfbk")
    return path


def test_import_is_light():
    # `perceiver-music render` must start fast: no torch, and plotting/audio packages on use only.
    code = (
        "import sys, perceiver_music.render; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'scipy', 'soundfile') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- piano roll


def _tempo_change_midi(path: Path) -> Path:
    """120 bpm, then 60 bpm from tick 960 (1 s); 480 ticks per quarter; a drum track and a
    second track whose pedal overlaps the first one's."""
    return write_midi(
        path,
        notes=[(0, 480, 60, 80), (480, 1440, 67, 50), (960, 1440, 64, 100)],
        pedals=[(240, 127), (720, 0), (1200, 100)],  # down 0.25-0.75 s; down 1.5 s to the end
        tempos=((0, 500_000), (960, 1_000_000)),
        tracks=[([(1440, 1680, 72, 30)], [(100, 64), (300, 63)])],  # 2.0-2.5 s; pedal 1/9.6-0.3125 s
        drum_notes=[(0, 480, 36, 90)],
    )


def test_roll_data_is_in_seconds_after_the_tempo_map(tmp_path):
    notes, pedal = roll_data(_tempo_change_midi(tmp_path / "t.mid"))
    expected = [[0.0, 0.5, 60, 80], [0.5, 2.0, 67, 50], [1.0, 2.0, 64, 100], [2.0, 2.5, 72, 30]]
    np.testing.assert_allclose(notes, expected, rtol=0, atol=1e-12)
    # Overlapping spans of two tracks merge; the pedal left down ends with the piece (2.5 s).
    np.testing.assert_allclose(pedal, [[100 / 960, 0.75], [1.5, 2.5]], rtol=0, atol=1e-12)


def test_roll_data_with_sustain_holds_notes_as_the_tokenizer_does(tmp_path):
    notes, pedal = roll_data(_tempo_change_midi(tmp_path / "t.mid"), sustain=True)
    expected = [[0.0, 0.75, 60, 80], [0.5, 2.5, 67, 50], [1.0, 2.5, 64, 100], [2.0, 2.5, 72, 30]]
    np.testing.assert_allclose(notes, expected, rtol=0, atol=1e-12)
    assert len(pedal) == 2


def test_roll_data_accepts_scores_in_ticks_and_seconds(tmp_path):
    path = _tempo_change_midi(tmp_path / "t.mid")
    from_path = roll_data(path)
    score = load_score(path)
    np.testing.assert_array_equal(roll_data(score).notes, from_path.notes)
    np.testing.assert_array_equal(roll_data(score).pedal, from_path.pedal)
    np.testing.assert_allclose(roll_data(score.to("second")).notes, from_path.notes, atol=2e-3)


def test_roll_data_of_an_empty_file(tmp_path):
    notes, pedal = roll_data(write_midi(tmp_path / "empty.mid"))
    assert notes.shape == (0, 4) and pedal.shape == (0, 2)


@pytest.mark.parametrize(("pitch", "name"), [(60, "C4"), (69, "A4"), (21, "A0"), (108, "C8"), (61, "C#4")])
def test_note_name(pitch, name):
    assert note_name(pitch) == name


def _red_pixels(image: np.ndarray) -> int:
    """Pixels of the boundary's crimson, antialiased or not; viridis and greys have no red."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int((r - np.maximum(g, b) > 0.3).sum())


def test_piano_roll_png(tmp_path):
    import matplotlib.image

    midi = _tempo_change_midi(tmp_path / "t.mid")
    out = piano_roll(midi, tmp_path / "rolls" / "t.png")
    image = matplotlib.image.imread(out)
    # 2.5 s and 13 pitch rows: the smallest figure, 8 x 4 in at 100 dpi.
    assert image.shape == (400, 800, 4)
    assert image[..., :3].std() > 0.05  # something was drawn
    assert _red_pixels(image) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.png"]  # no temporary left behind

    with_boundary = matplotlib.image.imread(piano_roll(load_score(midi), tmp_path / "b.png", boundary=1.25))
    assert with_boundary.shape == (400, 800, 4)
    assert _red_pixels(with_boundary) > 100  # the prompt | continuation line and labels


def test_piano_roll_grows_with_the_length_of_the_piece(tmp_path):
    import matplotlib.image

    midi = write_midi(tmp_path / "long.mid", notes=[(0, 500, 40, 60), (1_199_000, 1_200_000, 90, 120)])
    image = matplotlib.image.imread(piano_roll(midi, tmp_path / "long.png", dpi=50))
    width, height = render.figure_size(1200.0, 51)
    assert width == 28.0  # 20 minutes: the widest figure
    assert image.shape[:2] == (round(height * 50), round(width * 50))


def test_piano_roll_refuses_bad_input(tmp_path, corrupt):
    with pytest.raises(MidiError, match="corrupt.mid"):
        piano_roll(corrupt, tmp_path / "x.png")
    with pytest.raises(ValueError, match="boundary"):
        piano_roll(
            write_midi(tmp_path / "ok.mid", notes=[(0, 10, 60, 60)]), tmp_path / "x.png", boundary=-1.0
        )
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- loudness


def _sine(amplitude: float, seconds: float, rate: int, freq: float = 1000.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)


@needs_scipy
def test_k_weighting_matches_the_bs1770_table_at_48khz():
    table = [
        [1.53512485958697, -2.69169618940638, 1.19839281085285, 1.0, -1.69065929318241, 0.73248077421585],
        [1.0, -2.0, 1.0, 1.0, -1.99004745483398, 0.99007225036621],
    ]
    np.testing.assert_allclose(render.k_weighting_sos(48000), table, rtol=0, atol=1e-9)


@needs_scipy
@pytest.mark.parametrize("rate", [44100, 48000])
def test_loudness_of_a_1khz_sine(rate):
    # BS.1770: a full-scale 1 kHz sine in one channel reads -3.01 LUFS; channels add power.
    mono = _sine(1.0, 3.0, rate)
    assert integrated_loudness(mono, rate) == pytest.approx(-3.01, abs=0.1)
    assert integrated_loudness(np.stack([mono, mono], axis=1), rate) == pytest.approx(0.0, abs=0.1)
    assert integrated_loudness(0.1 * mono, rate) == pytest.approx(-23.01, abs=0.1)
    assert integrated_loudness(mono[: rate // 5], rate) == pytest.approx(-3.01, abs=0.1)  # < one block


@needs_scipy
def test_loudness_gates():
    rate = 48000
    assert integrated_loudness(np.zeros((rate, 2)), rate) == -math.inf
    assert integrated_loudness(np.zeros((0, 2)), rate) == -math.inf
    assert integrated_loudness(_sine(10 ** (-75 / 20), 2.0, rate), rate) == -math.inf  # absolute gate
    loud = _sine(0.5, 4.0, rate)
    quiet = _sine(0.001, 4.0, rate)  # 54 dB down: below the relative gate
    both = np.concatenate([loud, quiet])
    assert integrated_loudness(both, rate) == pytest.approx(integrated_loudness(loud, rate), abs=0.2)


@needs_scipy
def test_normalize_sets_loudness_and_caps_the_peak():
    rate = 48000
    x = np.stack([_sine(0.3, 2.0, rate)] * 2, axis=1)
    y, levels = normalize(x, rate, -20.0)
    assert integrated_loudness(y, rate) == pytest.approx(-20.0, abs=0.01)
    assert levels.loudness == pytest.approx(-20.0, abs=0.01) and not levels.peak_limited

    # A sine at 0 LUFS stereo would peak at 0 dBFS: the gain stops at -1 dBFS peak instead.
    y, levels = normalize(x, rate, 0.0)
    assert levels.peak_limited
    assert 20 * np.log10(np.abs(y).max()) == pytest.approx(-1.0, abs=1e-4)
    assert integrated_loudness(y, rate) == pytest.approx(levels.loudness, abs=0.01)
    assert levels.loudness == pytest.approx(-1.0, abs=0.1)

    silence, levels = normalize(np.zeros((rate, 2)), rate, -16.0)
    assert not silence.any() and levels.loudness == -math.inf and not levels.peak_limited


# ----------------------------------------------------------------------------- tools and errors


def test_find_soundfont_explicit_and_environment(tmp_path, monkeypatch, fake_soundfont):
    monkeypatch.delenv(render.SOUNDFONT_ENV, raising=False)
    assert find_soundfont(fake_soundfont) == fake_soundfont
    with pytest.raises(RenderError, match=APT) as e:
        find_soundfont(tmp_path / "missing.sf2")
    assert "missing.sf2" in str(e.value)
    not_a_font = tmp_path / "text.sf2"
    not_a_font.write_text("hello")
    with pytest.raises(RenderError, match="not a SoundFont"):
        find_soundfont(not_a_font)

    monkeypatch.setenv(render.SOUNDFONT_ENV, str(fake_soundfont))
    assert find_soundfont() == fake_soundfont
    monkeypatch.setenv(render.SOUNDFONT_ENV, str(tmp_path / "gone.sf2"))
    with pytest.raises(RenderError, match=render.SOUNDFONT_ENV):
        find_soundfont()


def test_find_soundfont_searches_known_places(tmp_path, monkeypatch, fake_soundfont):
    monkeypatch.delenv(render.SOUNDFONT_ENV, raising=False)
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    (fonts / "a.sf2").write_text("not a soundfont")  # skipped
    (fonts / "b.sf2").write_bytes(fake_soundfont.read_bytes())
    (fonts / "c.sf2").write_bytes(fake_soundfont.read_bytes())
    monkeypatch.setattr(render, "SOUNDFONT_CANDIDATES", [str(tmp_path / "none.sf2"), str(fonts / "*.sf2")])
    assert find_soundfont() == fonts / "b.sf2"

    monkeypatch.setattr(render, "SOUNDFONT_CANDIDATES", [str(tmp_path / "nowhere" / "*.sf2")])
    with pytest.raises(RenderError, match=APT) as e:
        find_soundfont()
    assert "--soundfont" in str(e.value)
    assert not render.rendering_available()


def test_missing_fluidsynth_is_reported_before_any_work(tmp_path, monkeypatch, a4, fake_soundfont):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert not render.fluidsynth_available() and not render.rendering_available(fake_soundfont)
    with pytest.raises(RenderError, match=APT):
        render_audio(a4, tmp_path / "a4.wav", soundfont=fake_soundfont)
    with pytest.raises(RenderError, match=APT):
        render_files([a4], tmp_path / "out", soundfont=fake_soundfont)
    assert not (tmp_path / "a4.wav").exists() and not (tmp_path / "out").exists()


def test_render_audio_refuses_bad_arguments_and_bad_midi(tmp_path, a4, corrupt):
    with pytest.raises(RenderError, match=r"\.wav or \.flac"):
        render_audio(a4, tmp_path / "a4.mp3")
    with pytest.raises(RenderError, match="sample rate"):
        render_audio(a4, tmp_path / "a4.wav", sample_rate=1000)
    with pytest.raises(RenderError, match="tail"):
        render_audio(a4, tmp_path / "a4.wav", tail=-1.0)
    with pytest.raises(MidiError, match="corrupt.mid"):
        render_audio(corrupt, tmp_path / "c.wav")
    with pytest.raises(MidiError, match="nope.mid"):
        render_audio(tmp_path / "nope.mid", tmp_path / "c.wav")


def _fake_fluidsynth(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir()
    exe = bin_dir / "fluidsynth"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)


@needs_audio_extra
def test_fluidsynth_failure_names_the_file_and_its_message(tmp_path, monkeypatch, a4, fake_soundfont):
    args = tmp_path / "args.txt"
    _fake_fluidsynth(
        tmp_path / "bin", f'for a in "$@"; do echo "$a"; done > {args}\necho "boom: bad" >&2\nexit 3\n'
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RenderError, match="boom: bad") as e:
        render_audio(a4, tmp_path / "a4.wav", soundfont=fake_soundfont, sample_rate=22050)
    assert str(a4) in str(e.value)
    argv = args.read_text().split("\n")
    for flag in ("-ni", "-F", "-T", "-g"):
        assert flag in argv
    assert argv[argv.index("-r") + 1] == "22050" and argv[argv.index("-T") + 1] == "wav"
    # The soundfont, then the MIDI as fluidsynth plays it: a copy cut after the music, in the work dir.
    assert argv[-3] == str(fake_soundfont.resolve())
    assert Path(argv[-2]).is_absolute() and Path(argv[-2]).name == "a4.mid" and argv[-2] != str(a4.resolve())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # work dir removed


# ----------------------------------------------------------------------------- audio


def _read(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    return soundfile.read(path, always_2d=True)


def _dominant_frequency(samples: np.ndarray, rate: int) -> float:
    mono = samples.mean(axis=1)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
@needs_audio_extra
@needs_fluidsynth
def test_render_one_a4(tmp_path, a4, suffix):
    import soundfile

    out = render_audio(a4, tmp_path / f"a4{suffix}", sample_rate=22050, tail=2.0)
    info = soundfile.info(out)
    assert (info.format, info.subtype, info.channels) == (suffix[1:].upper(), "PCM_16", 2)
    x, rate = _read(out)
    assert rate == 22050
    assert 1.0 <= len(x) / rate < 1.0 + 2.0
    assert _dominant_frequency(x, rate) == pytest.approx(440.0, abs=3.0)
    peak_db = 20 * np.log10(np.abs(x).max())
    assert peak_db <= -1.0
    # One piano note at -16 LUFS peaks near -3 dBFS: the loudness target is met, not capped.
    assert integrated_loudness(x, rate) == pytest.approx(-16.0, abs=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a4.mid", out.name])


@needs_audio_extra
@needs_fluidsynth
def test_a_release_cut_by_the_tail_limit_fades_out(tmp_path, a4):
    x, rate = _read(render_audio(a4, tmp_path / "a4.wav", sample_rate=16000, tail=0.05))
    assert len(x) == round(1.05 * rate)  # the release lasts longer than 50 ms
    assert np.abs(x[-rate // 1000 :]).max() < 0.01 < np.abs(x[-rate // 10 :]).max()


@needs_audio_extra
@needs_fluidsynth
def test_render_loud_target_is_peak_limited_and_silence_stays_silent(tmp_path, a4):
    report = render_files([a4], tmp_path / "out", audio_format="flac", png=False, loudness=-3.0)
    (out,) = report.written
    assert out == tmp_path / "out" / "a4.flac" and not report.failed
    x, rate = _read(out)
    assert 20 * np.log10(np.abs(x).max()) == pytest.approx(-1.0, abs=0.01)
    levels = report.levels[out]
    assert levels.peak_limited and levels.loudness < -4.0
    assert integrated_loudness(x, rate) == pytest.approx(levels.loudness, abs=0.05)

    silent = render_audio(write_midi(tmp_path / "silent.mid"), tmp_path / "silent.wav")
    x, rate = _read(silent)
    assert rate == 44100 and 0 < len(x) <= rate // 2
    assert np.isfinite(x).all() and not x.any()


@needs_audio_extra
@needs_fluidsynth
def test_a_soundfont_fluidsynth_cannot_load_is_an_error(tmp_path, a4):
    # fluidsynth exits 0, rendering with its default soundfont or none, when ours fails to load.
    truncated = tmp_path / "truncated.sf2"
    with open(find_soundfont(), "rb") as f:
        truncated.write_bytes(f.read(100_000))
    with pytest.raises(RenderError, match="could not load the soundfont") as e:
        render_audio(a4, tmp_path / "a4.wav", soundfont=truncated)
    assert "a4.mid" in str(e.value) and "truncated.sf2" in str(e.value)
    assert not (tmp_path / "a4.wav").exists()


# ----------------------------------------------------------------------------- many files


def test_render_files_piano_rolls_of_a_folder(tmp_path, corrupt):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    write_midi(src / "a.mid", notes=[(0, 500, 60, 80)])
    write_midi(src / "a.midi", notes=[(0, 500, 62, 80)])
    write_midi(src / "sub" / "a.mid", notes=[(0, 500, 64, 80)])
    (src / "sub" / "bad.mid").write_bytes(corrupt.read_bytes())
    (src / "notes.txt").write_text("not MIDI, not looked at")

    report = render_files([src, tmp_path / "missing.mid"], tmp_path / "out", audio_format=None)
    out = tmp_path / "out"
    assert sorted(report.written) == [out / "a-2.png", out / "a.png", out / "sub" / "a.png"]
    assert all(p.is_file() for p in report.written)
    failed = dict(report.failed)
    assert set(failed) == {src / "sub" / "bad.mid", tmp_path / "missing.mid"}
    assert "corrupt MIDI" in failed[src / "sub" / "bad.mid"]
    assert "no such file" in failed[tmp_path / "missing.mid"]


@needs_audio_extra
@needs_fluidsynth
def test_render_files_audio_and_rolls_with_a_bad_file(tmp_path, a4, corrupt):
    report = render_files([a4, corrupt], tmp_path / "out", audio_format="wav", sample_rate=16000)
    assert sorted(p.name for p in report.written) == ["a4.png", "a4.wav"]
    assert [(p, "corrupt" in reason) for p, reason in report.failed] == [(corrupt, True)]
    assert _read(tmp_path / "out" / "a4.wav")[1] == 16000


def test_render_files_needs_something_to_do(tmp_path, a4):
    with pytest.raises(ValueError, match="nothing to render"):
        render_files([a4], tmp_path / "out", audio_format=None, png=False)
    with pytest.raises(RenderError, match="wav or .flac"):
        render_files([a4], tmp_path / "out", audio_format="mp3")
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------- absurd lengths


SLOWEST = 16_777_215  # microseconds per quarter: the largest tempo a MIDI file can hold
LATE = 8_003_000  # ticks, at 480 per quarter and the slowest tempo: 77.7 hours
HOURS_77 = LATE * SLOWEST / 480 / 1e6  # seconds


@pytest.fixture
def absurd(tmp_path) -> Path:
    """A file whose last note starts 77.7 hours in (a MIDI delta holds at most 2^28 ticks, so
    the length comes from the slowest tempo)."""
    notes = [(0, 20, 60, 80), (LATE, LATE + 20, 62, 80)]
    return write_midi(tmp_path / "absurd.mid", notes=notes, tempos=((0, SLOWEST),))


def _never_synthesize(*args, **kwargs):
    raise AssertionError("fluidsynth must not run")


def test_absurd_lengths_are_refused_before_anything_is_drawn_or_synthesised(tmp_path, absurd, monkeypatch):
    monkeypatch.setattr(render, "_synthesize", _never_synthesize)
    with pytest.raises(MidiError, match=r"absurd.mid: lasts 77.7 hours, longer than the limit of 1.0 hours"):
        piano_roll(absurd, tmp_path / "a.png")
    with pytest.raises(MidiError, match="--max-seconds"):
        render_audio(
            absurd, tmp_path / "a.wav", soundfont=find_soundfont() if render.rendering_available() else None
        )
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.wav").exists()
    # The bound can be raised (or lifted), and the roll of 77.7 hours is drawn.
    assert piano_roll(absurd, tmp_path / "a.png", max_seconds=None, dpi=20).is_file()


def test_a_folder_with_an_absurd_file_still_renders_the_others(tmp_path, absurd, monkeypatch):
    good = write_midi(tmp_path / "good.mid", notes=[(0, 500, 60, 80)])
    report = render_files([absurd, good], tmp_path / "out", audio_format=None)
    assert report.written == [tmp_path / "out" / "good.png"]
    assert [p for p, _ in report.failed] == [absurd] and "lasts 77.7 hours" in report.failed[0][1]
    report = render_files([absurd], tmp_path / "out", audio_format=None, max_seconds=HOURS_77 + 10)
    assert report.written == [tmp_path / "out" / "absurd.png"] and report.failed == []


def test_render_of_empty_folders_and_files_without_notes_says_so(tmp_path, capsys):
    from perceiver_music.cli import main

    (tmp_path / "empty").mkdir()
    silent = write_midi(tmp_path / "silent.mid", pedals=[(0, 127), (1000, 0)])
    out = str(tmp_path / "out")
    assert main(["render", str(tmp_path / "empty"), "--out", out, "--format", "none", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: no .mid or .midi files in this folder" in err
    assert "nothing was rendered" in err
    assert main(["render", str(silent), "--out", out, "--format", "none", "--quiet"]) == 1
    assert f"{silent}: no notes: nothing to render" in capsys.readouterr().err
    good = write_midi(tmp_path / "good.mid", notes=[(0, 500, 60, 80)])
    assert main(["render", str(silent), str(good), "--out", out, "--format", "none", "--quiet"]) == 0
    assert "no notes" in capsys.readouterr().err
    assert sorted(p.name for p in Path(out).iterdir()) == ["good.png"]


def test_render_max_seconds_on_the_command_line(tmp_path, absurd, capsys):
    from perceiver_music.cli import main

    out = str(tmp_path / "out")
    assert main(["render", str(absurd), "--out", out, "--format", "none", "--quiet"]) == 1
    assert "lasts 77.7 hours" in capsys.readouterr().err
    assert (
        main(["render", str(absurd), "--out", out, "--format", "none", "--quiet", "--max-seconds", "3e5"])
        == 0
    )
    with pytest.raises(SystemExit):
        main(["render", str(absurd), "--out", out, "--max-seconds", "-1"])
    assert "must be a positive number of seconds" in capsys.readouterr().err


@needs_audio_extra
@needs_fluidsynth
def test_events_long_after_the_music_are_not_synthesised(tmp_path, monkeypatch):
    """A controller 10 minutes after a 1 s piece: fluidsynth renders seconds, not 10 minutes."""
    from symusic import ControlChange

    midi = write_midi(tmp_path / "late.mid", notes=[(0, 1000, 69, 100)])
    score = load_score(midi)
    score.tracks[0].controls.append(ControlChange(600_000, 7, 100))
    score.dump_midi(str(midi))
    synthesized = []
    real = render._synthesize

    def measured(*args, **kwargs):
        samples = real(*args, **kwargs)
        synthesized.append(len(samples) / 16000)
        return samples

    monkeypatch.setattr(render, "_synthesize", measured)
    render_audio(midi, tmp_path / "late.wav", sample_rate=16000)
    assert synthesized and synthesized[0] < 1 + 3 + render.FLUIDSYNTH_PAD_SECONDS, synthesized


def test_a_render_that_cannot_fit_on_the_disk_is_refused(tmp_path, a4, monkeypatch, fake_soundfont):
    monkeypatch.setattr(render, "_fluidsynth", lambda: "/bin/false")
    monkeypatch.setattr(render, "_require_audio_packages", lambda need_scipy: None)
    monkeypatch.setattr(render, "_synthesize", _never_synthesize)
    monkeypatch.setattr(render.shutil, "disk_usage", lambda path: shutil_usage(free=1_000_000))
    with pytest.raises(
        RenderError, match=r"a4.mid needs about 0.00 GB of temporary space .* 0.00 GB are free"
    ):
        render_audio(a4, tmp_path / "a4.wav", soundfont=fake_soundfont)


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=free, used=0, free=free)
