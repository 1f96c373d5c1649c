"""The command line: tokenize output, module entry point, and a start-up without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from perceiver_music.cli import main
from perceiver_music.render import rendering_available
from perceiver_music.tokens.performance import PerformanceTokenizer

from conftest import write_midi


def test_tokenize_folder_to_json(tmp_path, capsys):
    root = tmp_path / "midi"
    (root / "sub").mkdir(parents=True)
    write_midi(root / "a.mid", [(0, 500, 60, 80)])
    write_midi(root / "sub" / "b.mid", [(0, 100, 62, 100)])
    (root / "sub" / "bad.mid").write_text("nope")
    assert main(["tokenize", str(root)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data == {
        "a.mid": ["VELOCITY:20", "NOTE_ON:60", "TIME_SHIFT:50", "NOTE_OFF:60"],
        "sub/b.mid": ["VELOCITY:25", "NOTE_ON:62", "TIME_SHIFT:10", "NOTE_OFF:62"],
    }
    assert "bad.mid: not a MIDI file" in captured.err

    out = tmp_path / "ids.json"
    assert main(["tokenize", str(root / "a.mid"), str(root / "sub"), "--ids", "--out", str(out)]) == 0
    ids = json.loads(out.read_text())
    vocab = PerformanceTokenizer().vocab
    assert [vocab.event_name(i) for i in ids["a.mid"]] == data["a.mid"]
    assert set(ids) == {"a.mid", "b.mid"}


def test_tokenize_only_bad_input_fails(tmp_path, capsys):
    (tmp_path / "x.mid").write_bytes(b"")
    assert main(["tokenize", str(tmp_path / "x.mid"), str(tmp_path / "missing.mid")]) == 1
    err = capsys.readouterr().err
    assert "x.mid: empty file" in err and "missing.mid: no such file or folder" in err


def test_module_entry_point_and_no_torch_import(tmp_path):
    write_midi(tmp_path / "a.mid", [(0, 500, 60, 80)])
    code = (
        "import sys; from perceiver_music.cli import main; "
        f"rc = main(['tokenize', {str(tmp_path / 'a.mid')!r}, '--out', {str(tmp_path / 'o.json')!r}]); "
        f"main(['prepare', {str(tmp_path)!r}, '--out', {str(tmp_path / 'data')!r}, '--quiet']); "
        f"main(['render', {str(tmp_path / 'a.mid')!r}, '--out', {str(tmp_path / 'r')!r}, '--format', 'none']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "r" / "a.png").is_file()
    done = subprocess.run([sys.executable, "-m", "perceiver_music", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "prepare" in done.stdout and "tokenize" in done.stdout


def crimson_pixels(png) -> int:
    """Pixels in the boundary line's colour (crimson: strong red, little green or blue)."""
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    return int(((rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.25) & (rgb[..., 2] < 0.35)).sum())


def test_render_command(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_midi(tmp_path / "in" / "a.mid", [(0, 500, 60, 80)])
    (tmp_path / "in" / "bad.mid").write_bytes(b"MThd nonsense")
    out = tmp_path / "out"
    assert main(["render", str(tmp_path / "in"), "--out", str(out), "--format", "none", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert str(out / "a.png") in captured.out and "bad.mid" in captured.err
    assert main(["render", str(tmp_path / "in" / "bad.mid"), "--out", str(out), "--format", "none"]) == 1
    marked = tmp_path / "marked"
    assert (
        main(
            [
                "render",
                str(tmp_path / "in" / "a.mid"),
                "--out",
                str(marked),
                "--format",
                "none",
                "--boundary",
                "0.25",
            ]
        )
        == 0
    )
    assert crimson_pixels(marked / "a.png") > 50 and crimson_pixels(out / "a.png") == 0  # the line
    assert (
        main(["render", str(tmp_path / "in"), "--out", str(out), "--format", "none", "--boundary", "-1"]) == 2
    )
    assert "boundary must be" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "in"), "--out", str(out), "--loudness", "loud"]) == 2
    assert "--loudness must be a number" in capsys.readouterr().err
    if rendering_available():
        assert main(["render", str(tmp_path / "in" / "a.mid"), "--out", str(out), "--no-png", "--quiet"]) == 0
        assert (out / "a.wav").read_bytes()[:4] == b"RIFF"
    assert (
        main(["render", str(tmp_path / "in"), "--out", str(out), "--soundfont", str(tmp_path / "x.sf2")]) == 2
    )
    assert "x.sf2" in capsys.readouterr().err


def test_tokenize_without_any_midi_is_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["tokenize", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: no .mid or .midi files found" in err
    assert "error: no MIDI file to tokenize in:" in err
    assert main(["tokenize", str(tmp_path / "missing")]) == 2


@pytest.fixture
def data_folder(tmp_path):
    """Just enough of a prepared folder for the argument checks (they come before any model)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    for split in ("train", "valid"):
        (data / f"{split}.npy").write_bytes(b"")
    return data


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "nosuch"], "no split 'nosuch' (it has: train, valid)"),
        (["--split", "test"], "no split 'test' (it has: train, valid)"),
        (["--split", "valid", "--buckets", "abc"], "--buckets must be increasing positive token positions"),
        (["--split", "valid", "--buckets", "100,50"], "(got '100,50')"),
        (["--split", "valid", "--stride", "0"], "--stride must be a positive number (got 0)"),
        (["--split", "valid", "--batch-size", "-1"], "--batch-size must be a positive number (got -1)"),
    ],
)
def test_evaluate_rejects_bad_arguments_with_a_message(data_folder, tmp_path, capsys, extra, message):
    args = [
        "evaluate",
        "--ckpt",
        str(tmp_path / "run"),
        "--data",
        str(data_folder),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Errno" not in err and "Traceback" not in err
