"""prepare-audio: reading, downmixing and resampling, splits, the skip report, re-runs, crops."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from perceiver_music import render
from perceiver_music.audio.data import AudioData, AudioWindows, prepare_audio, read_audio
from perceiver_music.cli import main
from perceiver_music.config import AudioPrepareConfig, PrepareConfig
from perceiver_music.data.prepare import prepare

from conftest import REPO, write_midi


def sine(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    """Good files in several formats and rates, and one of every kind of bad file."""
    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "a.wav", sine(2.0, 22050), 22050)
    sf.write(src / "sub" / "b.flac", np.stack([sine(2.0, 44100), -sine(2.0, 44100)], 1) * 0.5 + 0.1, 44100)
    sf.write(src / "c.ogg", sine(1.5, 16000), 16000)
    (src / "empty.wav").write_bytes(b"")
    (src / "text.mp3").write_text("this is not audio")
    full = src / "a.wav"
    (src / "cut.wav").write_bytes(full.read_bytes()[:20000])
    sf.write(src / "silent.wav", np.zeros(22050 * 2, np.float32), 22050)
    sf.write(src / "short.wav", sine(0.2, 22050), 22050)
    (src / "notes.txt").write_text("ignored: not an audio suffix")
    return src


def test_prepare_audio_reads_resamples_and_skips_with_reasons(folder, tmp_path):
    result = prepare_audio(folder, tmp_path / "data", progress=False)
    reasons = dict(result.skipped)
    assert set(reasons) == {"empty.wav", "text.mp3", "cut.wav", "silent.wav", "short.wav"}
    assert reasons["empty.wav"] == "empty file (0 bytes)"
    assert reasons["text.mp3"].startswith("not audio that libsndfile can read")
    assert reasons["cut.wav"].startswith("truncated:")
    assert reasons["silent.wav"].startswith("silent:")
    assert reasons["short.wav"].startswith("too short: 0.20 s")
    assert result.usable == 3
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["kind"] == "audio" and meta["sample_rate"] == 22050
    lengths = {p["path"]: p["length"] for p in meta["pieces"]}
    # Every file at 22.05 kHz, whatever its own rate: 2 s, 2 s (from 44.1k), 1.5 s (from 16k).
    assert lengths == {"a.wav": 44100, "sub/b.flac": 44100, "c.ogg": 33075}
    b = next(p for p in meta["pieces"] if p["path"] == "sub/b.flac")
    split = AudioData(tmp_path / "data", b["split"])
    clip = split.clip(split.paths.index("sub/b.flac"))
    # Stereo (s + 0.1, -s + 0.1) / 2 downmixed is the constant 0.1; soxr keeps it exactly.
    assert np.abs(clip[2000:-2000] - 0.1).max() < 2e-3
    assert "skipped 5 files" in result.summary()
    assert (tmp_path / "data" / "skipped.csv").read_text().count("\n") == 6


def test_resampling_is_a_real_filter_not_interpolation(tmp_path):
    # A 15 kHz tone is above the 11.025 kHz Nyquist of 22.05 kHz: a resampler removes it,
    # linear interpolation would fold it down to 7.05 kHz.
    sf.write(tmp_path / "hi.wav", sine(1.0, 44100, 15000.0), 44100)
    out = read_audio(tmp_path / "hi.wav", 22050)
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) < 0.01 * 0.3


def test_rerun_reuses_unchanged_files(folder, tmp_path):
    prepare_audio(folder, tmp_path / "data", progress=False)
    again = prepare_audio(folder, tmp_path / "data", progress=False)
    assert again.reused == 8 and again.read == 0 and again.usable == 3
    sf.write(folder / "a.wav", sine(3.0, 22050), 22050)  # changed: read again
    third = prepare_audio(folder, tmp_path / "data", progress=False)
    assert third.read == 1
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert {p["path"]: p["length"] for p in meta["pieces"]}["a.wav"] == 66150
    other_rate = prepare_audio(
        folder, tmp_path / "data", AudioPrepareConfig(sample_rate=16000), progress=False
    )
    assert other_rate.reused == 0


def test_splits_and_labels_follow_the_midi_the_audio_was_rendered_from(tmp_path):
    midi = tmp_path / "midi"
    for name in ("x", "y", "z", "w"):
        write_midi(
            midi / "piece" / f"{name}.mid"
            if (midi / "piece").exists()
            else _mkdir(midi / "piece") / f"{name}.mid",
            [(0, 500, 60, 80)],
        )
    (tmp_path / "labels.csv").write_text(
        "path,label\npiece/x.mid,Chopin\npiece/y.mid,Chopin\npiece/z.mid,Liszt\n"
    )
    prepare(
        midi,
        tmp_path / "mdata",
        PrepareConfig(workers=1, valid_fraction=0.3, test_fraction=0.3),
        progress=False,
        labels=tmp_path / "labels.csv",
    )
    midi_split = {
        p["path"]: p["split"] for p in json.loads((tmp_path / "mdata" / "meta.json").read_text())["pieces"]
    }
    audio = _mkdir(tmp_path / "audio" / "piece")
    for name in ("x", "y", "z", "w"):
        sf.write(audio / f"{name}.wav", sine(1.5, 22050), 22050)
    sf.write(tmp_path / "audio" / "extra.wav", sine(1.5, 22050), 22050)
    result = prepare_audio(
        tmp_path / "audio", tmp_path / "adata", splits_from=tmp_path / "mdata", progress=False
    )
    audio_split = {
        p["path"]: p["split"] for p in json.loads((tmp_path / "adata" / "meta.json").read_text())["pieces"]
    }
    for name in ("x", "y", "z", "w"):
        assert audio_split[f"piece/{name}.wav"] == midi_split[f"piece/{name}.mid"]
    assert any("1 files match no MIDI piece" in n for n in result.notes)
    # The composer comes along (a prior over the codes can be conditioned on it); none where
    # the MIDI had none, or where no MIDI piece matched.
    label = {
        p["path"]: p["label"] for p in json.loads((tmp_path / "adata" / "meta.json").read_text())["pieces"]
    }
    assert label == {
        "piece/x.wav": "Chopin",
        "piece/y.wav": "Chopin",
        "piece/z.wav": "Liszt",
        "piece/w.wav": None,
        "extra.wav": None,
    }


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_training_crops_are_seeded_by_index(folder, tmp_path):
    prepare_audio(
        folder, tmp_path / "data", split=PrepareConfig(valid_fraction=0.0, test_fraction=0.0), progress=False
    )
    data = AudioData(tmp_path / "data", "train")
    a, b = AudioWindows(data, 4096, train=True, seed=3), AudioWindows(data, 4096, train=True, seed=3)
    assert all(np.array_equal(a[i], b[i]) for i in (0, 7, 123))
    assert not np.array_equal(a[0], AudioWindows(data, 4096, train=True, seed=4)[0])
    tiles = AudioWindows(data, 4096, train=False)
    assert len(tiles) == sum(int(n) // 4096 for n in data.index[:, 1]) and tiles[0].shape == (4096,)


def test_prepare_audio_command_reports_and_never_imports_torch(folder, tmp_path):
    code = (
        "import sys; from perceiver_music.cli import main; "
        f"rc = main(['prepare-audio', {str(folder)!r}, '--out', {str(tmp_path / 'd')!r}, '--quiet']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src")}
    )
    assert proc.returncode == 0, proc.stderr
    assert "Prepared 3 audio files at 22050 Hz" in proc.stdout
    assert "cut.wav: truncated" in proc.stdout and "Traceback" not in proc.stderr


def test_prepare_audio_command_bad_folders(tmp_path, capsys):
    assert main(["prepare-audio", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_text("nothing")
    assert main(["prepare-audio", str(tmp_path / "bad"), "--out", str(tmp_path / "d"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "x.wav: not audio" in captured.out and "no usable audio file" in captured.err
    assert (
        main(["prepare-audio", str(tmp_path / "bad"), "--out", str(tmp_path / "d"), "--sample-rate", "10"])
        == 2
    )
    assert "audio.sample_rate" in capsys.readouterr().err


@pytest.mark.skipif(not render.rendering_available(), reason="fluidsynth or a soundfont missing")
def test_rendered_piano_audio_prepares(tmp_path):
    notes = [(i * 250, i * 250 + 400, 48 + (i * 5) % 36, 70 + i % 30) for i in range(12)]
    write_midi(
        tmp_path / "midi" / "p.mid" if (tmp_path / "midi").exists() else _mkdir(tmp_path / "midi") / "p.mid",
        notes,
    )
    report = render.render_files([tmp_path / "midi"], tmp_path / "wav", png=False, sample_rate=44100)
    assert report.written and not report.failed
    result = prepare_audio(tmp_path / "wav", tmp_path / "data", progress=False)
    assert (
        result.usable == 1 and result.seconds["train"] + result.seconds["valid"] + result.seconds["test"] > 3
    )
