"""`transcribe`: rendered piano audio back to the notes it was rendered from."""

import importlib.util

import numpy as np
import pytest

from perceiver_music import render
from perceiver_music.cli import main

from conftest import write_midi

HAVE_BASIC_PITCH = all(importlib.util.find_spec(m) for m in ("basic_pitch", "onnxruntime"))
needs_basic_pitch = pytest.mark.skipif(
    not HAVE_BASIC_PITCH, reason="the transcribe extra is not installed (scripts/setup.sh installs it)"
)

# A slow line of single notes over four octaves: each should come back at its pitch and onset.
NOTES = [(i * 500, i * 500 + 400, p, 90) for i, p in enumerate([48, 55, 60, 64, 67, 72, 76, 84])]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if not render.rendering_available():
        pytest.skip("fluidsynth or a soundfont missing")
    root = tmp_path_factory.mktemp("transcribe")
    write_midi(root / "line.mid", NOTES)
    report = render.render_files([root / "line.mid"], root / "wav", png=False, sample_rate=22050)
    assert report.written and not report.failed
    return root / "wav" / "line.wav"


@needs_basic_pitch
def test_rendered_notes_come_back_at_their_pitch_and_onset(rendered, tmp_path):
    from symusic import Score

    assert main(["transcribe", str(rendered), "--out", str(tmp_path)]) == 0
    score = Score(str(tmp_path / "line.mid"), ttype="second")
    got = sorted((n.time, n.pitch) for t in score.tracks for n in t.notes)
    for start, _end, pitch, _v in NOTES:
        hits = [t for t, p in got if p == pitch and abs(t - start / 1000) < 0.06]
        assert hits, f"pitch {pitch} at {start / 1000:.2f} s not transcribed: {got}"
    # A few overtones may come back as extra notes, but not a wall of them.
    assert len(got) <= 2 * len(NOTES)


@needs_basic_pitch
def test_bad_files_are_reported_and_the_good_one_still_transcribed(rendered, tmp_path, capsys):
    import soundfile as sf

    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    x, sr = sf.read(rendered)
    sf.write(tmp_path / "whole.flac", x, sr)
    (tmp_path / "cut.flac").write_bytes((tmp_path / "whole.flac").read_bytes()[:20_000])  # cut mid-stream
    out = tmp_path / "out"
    code = main(
        [
            "transcribe",
            str(tmp_path / "cut.flac"),
            str(tmp_path / "empty.wav"),
            str(tmp_path / "text.wav"),
            str(rendered),
            str(tmp_path / "whole.flac"),  # line.wav's twin under another name: its own MIDI
            str(tmp_path / "whole.flac"),  # the same name again: it would overwrite, so refused
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "empty.wav: empty file (0 bytes)" in captured.err
    assert "text.wav: not audio that libsndfile can read" in captured.err
    assert "cut.flac: unreadable after" in captured.err and "Traceback" not in captured.err
    assert (out / "line.mid").is_file() and not (out / "text.mid").exists()
    assert "line.mid" in captured.out and "notes from" in captured.out
    assert (out / "whole.mid").is_file()
    assert "whole.mid is " in captured.err and "transcription already: give it another name" in captured.err


@needs_basic_pitch
def test_nothing_transcribed_and_bad_thresholds_exit_2(tmp_path, capsys):
    (tmp_path / "text.wav").write_text("not audio")
    assert main(["transcribe", str(tmp_path / "text.wav"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing was transcribed" in capsys.readouterr().err
    assert (
        main(
            ["transcribe", str(tmp_path / "text.wav"), "--out", str(tmp_path / "o"), "--onset-threshold", "2"]
        )
        == 2
    )
    assert "--onset-threshold must be between 0 and 1" in capsys.readouterr().err


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_basic_pitch(name, *args, **kwargs):
        if name.split(".")[0] == "basic_pitch":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_basic_pitch)
    sound = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(sound, np.zeros(2205, dtype=np.float32), 22050)
    assert main(["transcribe", str(sound), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "transcribe needs basic-pitch and onnxruntime" in err and "--no-deps basic-pitch" in err
