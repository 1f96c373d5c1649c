"""`perceiver-music evaluate`: likelihood of a checkpoint, and the metric suite on folders."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from perceiver_music.checkpoint import load_model
from perceiver_music.cli import main
from perceiver_music.config import DataConfig
from perceiver_music.data.windows import TokenData, WindowDataset
from perceiver_music.evaluate.likelihood import evaluate_likelihood, piece_nll
from perceiver_music.evaluate.sets import evaluate_sets
from perceiver_music.train import evaluate_windows

from conftest import random_pieces, write_midi

# ---------------------------------------------------------------- sets


def test_set_evaluation_writes_the_table_plots_and_json(tmp_path, capsys):
    ref = random_pieces(tmp_path / "ref", 5, seed=1)
    near = random_pieces(tmp_path / "near", 4, seed=2)
    far = random_pieces(tmp_path / "far", 4, low=90, high=100, seed=3)
    write_midi(tmp_path / "far" / "silent.mid", [])  # a file with no notes: excluded, reported
    (tmp_path / "far" / "broken.mid").write_bytes(b"MThd garbage")
    out = tmp_path / "out"
    rc = main(["evaluate", "--generated", str(near), str(far), "--reference", str(ref), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "Table I" in printed.out and "2 file(s) excluded" in printed.err
    result = json.loads((out / "metrics.json").read_text())
    assert result["sets"]["reference"]["pieces"] == 5 and result["sets"]["far"]["pieces"] == 4
    reasons = {e["path"]: e["reason"] for e in result["sets"]["far"]["excluded"]}
    assert reasons["silent.mid"] == "no notes" and "broken.mid" in reasons
    for m in ("PC", "PR", "PCH"):
        assert result["metrics"]["near"][m]["overlap"] > result["metrics"]["far"][m]["overlap"], m
    table = (out / "table.md").read_text()
    assert "| PC/seg |" in table and "near KLD" in table and "far OA" in table
    assert "nan" not in table.lower() and "silent.mid: no notes" in table
    assert (out / "plots" / "overview.png").stat().st_size > 10_000
    assert (out / "plots" / "PC_per_seg.png").is_file() and (out / "repetition.png").is_file()
    with np.load(out / "features.npz") as f:
        assert f["near/PCH/seg"].shape == (4, 64 * 12)
    with np.load(out / "distances.npz") as d:
        assert d["near/PC/intra_reference"].shape == (10,) and d["far/NLTM/inter"].shape == (20,)
        assert d["near/PR/intra_generated"].shape == (6,)
        assert d["far/PR/inter"].mean() == pytest.approx(result["metrics"]["far"]["PR"]["inter"]["mean"])


def test_set_evaluation_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    ref = random_pieces(tmp_path / "ref", 3)
    one = random_pieces(tmp_path / "one", 1, seed=5)
    silent = tmp_path / "silent"
    silent.mkdir()
    write_midi(silent / "a.mid", [])
    write_midi(silent / "b.mid", [])

    def run(*args):
        rc = main(["evaluate", *args, "--out", str(tmp_path / "out")])
        return rc, capsys.readouterr().err

    rc, err = run("--generated", str(empty), "--reference", str(ref))
    assert rc == 2 and f"{empty}: no MIDI files" in err
    rc, err = run("--generated", str(ref), "--reference", str(one))
    assert rc == 2 and "reference set needs at least 2" in err
    rc, err = run("--generated", str(silent), "--reference", str(ref))
    assert rc == 2 and "found 0" in err and "a.mid: no notes" in err
    rc, err = run("--generated", str(tmp_path / "missing"), "--reference", str(ref))
    assert rc == 2 and "no such folder" in err
    rc, err = run("--generated", str(ref))
    assert rc == 2 and "--reference" in err
    rc, err = run("--generated", str(ref), "--reference", str(ref), "--ckpt", "x")
    assert rc == 2 and "either" in err
    # One generated piece is enough: it has no intra-set distances, and the table says so.
    rc, _ = run("--generated", str(one), "--reference", str(ref))
    assert rc == 0 and "n/a (one piece)" in (tmp_path / "out" / "table.md").read_text()


def test_set_evaluation_does_not_import_torch(tmp_path):
    ref = random_pieces(tmp_path / "ref", 3)
    code = (
        "import sys; from perceiver_music.cli import main; "
        f"rc = main(['evaluate', '--generated', {str(ref)!r}, '--reference', {str(ref)!r}, "
        f"'--out', {str(tmp_path / 'o')!r}, '--no-plots']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---------------------------------------------------------------- likelihood


def test_likelihood_matches_the_training_validation_tiling(tiny_run):
    """With stride = num_latents the windows are the validation tiling train.py uses."""
    model, config = load_model(tiny_run / "run")
    data = TokenData(tiny_run / "data", "valid")
    windows = WindowDataset(
        data, DataConfig(segmentation="effective"), config.model.max_len, config.model.num_latents, False
    )
    expected, count = evaluate_windows(
        model, windows, np.arange(len(windows)), 4, torch.device("cpu"), "fp32"
    )
    result = evaluate_likelihood(tiny_run / "run", tiny_run / "data", "valid", progress=False)
    assert result.tokens == count == int(data.index[:, 1].sum()) - len(data)  # every token but BOS
    assert result.nats_per_token == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_token == pytest.approx(expected / math.log(2), rel=1e-5)


def test_likelihood_stride_gives_each_token_more_context(tiny_run):
    model, config = load_model(tiny_run / "run")
    tokens = np.asarray(TokenData(tiny_run / "data", "valid").piece(0), np.int64)
    L, N = config.model.max_len, config.model.num_latents
    assert len(tokens) > 2 * L  # long enough for context to be cut
    coarse = piece_nll(model, tokens, L, N, N, 8, "cpu")
    fine = piece_nll(model, tokens, L, N, 1, 8, "cpu")
    # Stride 1: token t is scored with tokens max(0, t - L) .. t - 1 before it, computed directly.
    for t in (1, 5, L // 2, L + 3, len(tokens) - 1):
        window = tokens[max(0, t - L) : t]
        inputs = torch.from_numpy(window)[None]
        positions = torch.arange(t - len(window), t)[None]
        with torch.no_grad():
            logits = model(inputs, positions, N)[0, -1]
        assert fine[t - 1] == pytest.approx(
            -torch.log_softmax(logits, -1)[tokens[t]].item(), rel=1e-4, abs=1e-5
        )
    # For the first N - 1 targets both tilings' latents start at the piece's first token (PAD
    # before it is masked), so the numbers agree. Later, a Perceiver AR latent also sees the
    # latents before it in its window, which differ between the tilings, and so may the numbers.
    np.testing.assert_allclose(fine[: N - 1], coarse[: N - 1], rtol=1e-4, atol=1e-5)
    assert not np.isnan(fine).any() and not np.isnan(coarse).any()


def test_likelihood_command_writes_buckets(tiny_run, tmp_path, capsys):
    out = tmp_path / "lik"
    args = ["evaluate", "--ckpt", str(tiny_run / "run"), "--data", str(tiny_run / "data"), "--split", "valid"]
    assert main([*args, "--out", str(out), "--buckets", "32,100", "--quiet"]) == 0
    assert "nats/token" in capsys.readouterr().out
    result = json.loads((out / "likelihood.json").read_text())
    assert [b["label"] for b in result["buckets"]] == ["0-31", "32-99", "100+"]
    assert sum(b["tokens"] for b in result["buckets"]) == result["tokens"]
    assert result["buckets"][0]["tokens"] == 31 * result["pieces"]  # positions 1..31 of every piece
    weighted = sum(b["nats_per_token"] * b["tokens"] for b in result["buckets"]) / result["tokens"]
    assert weighted == pytest.approx(result["nats_per_token"], rel=1e-9)
    assert (out / "likelihood.md").is_file() and (out / "likelihood.png").is_file()

    assert main([*args, "--out", str(out), "--stride", "99"]) == 2
    assert "--stride must be in 1..16" in capsys.readouterr().err
    assert (
        main(["evaluate", "--ckpt", str(tiny_run / "run"), "--data", str(tmp_path), "--out", str(out)]) == 2
    )
    assert "not a prepared data folder" in capsys.readouterr().err
    assert main([*args[:3], "--data", str(tiny_run / "data"), "--split", "nope", "--out", str(out)]) == 2


def test_transformer_likelihood_is_independent_of_the_stride_within_a_window(tiny_run, tmp_path):
    """A Transformer's prediction depends only on the tokens before it, so while the whole
    prefix fits in the window every stride must give the same number for every token."""
    from perceiver_music.config import load_config
    from perceiver_music.train import train

    cfg = load_config(
        "debug",
        [
            "model.arch=transformer",
            "model.max_len=64",
            "model.num_latents=64",
            "model.width=32",
            "model.layers=1",
        ]
        + ["train.steps=2", "train.batch_size=2"],
    )
    train(cfg, tiny_run / "data", tmp_path / "tf", progress=False)
    model, config = load_model(tmp_path / "tf")
    tokens = np.asarray(TokenData(tiny_run / "data", "valid").piece(0), np.int64)
    a = piece_nll(model, tokens, 64, 16, 16, 4, "cpu")
    b = piece_nll(model, tokens, 64, 5, 5, 4, "cpu")
    np.testing.assert_allclose(a[:63], b[:63], rtol=1e-4, atol=1e-5)
    result = evaluate_likelihood(tmp_path / "tf", tiny_run / "data", "valid", stride=16, progress=False)
    assert result.tokens == int(TokenData(tiny_run / "data", "valid").index[:, 1].sum()) - result.pieces


def test_sets_of_real_performances(asap_dir, tmp_path):
    """Performances of the same Bach fugue against other Bach fugues, and Chopin etudes against
    those fugues: the same-composer set must sit closer on pitch-class content and pitch range."""
    fugues = sorted((asap_dir / "Bach" / "Fugue").rglob("*.mid"))
    etudes = sorted((asap_dir / "Chopin").rglob("*.mid"))
    assert len(fugues) >= 12 and len(etudes) >= 6
    for folder, files in (("ref", fugues[::2][:8]), ("bach", fugues[1::2][:6]), ("chopin", etudes[:6])):
        (tmp_path / folder).mkdir()
        for i, f in enumerate(files):
            (tmp_path / folder / f"{i}_{f.name}").symlink_to(f)
    out = tmp_path / "out"
    result = evaluate_sets([tmp_path / "bach", tmp_path / "chopin"], tmp_path / "ref", out, plots=False)
    m = result["metrics"]
    assert m["bach"]["PCH"]["inter"]["mean"] < m["chopin"]["PCH"]["inter"]["mean"]
    assert m["bach"]["PCH"]["overlap"] > m["chopin"]["PCH"]["overlap"]
    assert "nan" not in (out / "table.md").read_text().lower()
    assert all(s["pieces"] == n for s, n in zip(result["sets"].values(), (8, 6, 6)))


# ---------------------------------------------------------------- event validity

ON, OFF, SHIFT = 3, 131, 259  # NOTE_ON 0, NOTE_OFF 0, TIME_SHIFT 1


def test_event_validity_is_counted_on_the_emitted_tokens_after_the_prompt(tmp_path):
    from perceiver_music.evaluate.validity import piece_validity
    from perceiver_music.tokens.performance import PerformanceTokenizer

    tok = PerformanceTokenizer()
    second = SHIFT + 99  # TIME_SHIFT of 100 steps
    prompt = [1, ON + 60, SHIFT + 9, OFF + 62]  # a stray NOTE_OFF inside the prompt: not counted
    cont = [
        OFF + 60,  # closes the prompt's note: valid
        OFF + 60,  # stray
        ON + 64,
        ON + 64,  # re-struck
        SHIFT + 9,
        OFF + 64,  # closes the first 64 (FIFO); the second stays open, 6.1 s before the end
        *[second] * 6,
        ON + 67,  # open too, but struck 0.1 s before the end: cut by the end, not by the cap
        ON + 69,
        SHIFT + 9,
    ]
    ids = np.array(prompt + cont)
    folder = tmp_path / "gen"
    folder.mkdir()
    tok.decode_to_midi(ids, folder / "sample_00.mid")
    np.save(folder / "sample_00.tokens.npy", ids.astype(np.uint16))
    (folder / "generate.json").write_text(json.dumps({"prompt_tokens": len(prompt)}))
    v = piece_validity(tok, folder / "sample_00.mid", tok.midi_to_notes(folder / "sample_00.mid"))
    assert v.from_tokens
    assert (v.note_ons, v.note_offs, v.stray_offs, v.restruck_ons) == (4, 3, 1, 1)
    assert v.capped == 1 and v.notes == 4


def test_event_validity_of_midi_without_tokens_counts_notes_lasting_the_cap(tmp_path):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir()
    gen.mkdir()
    write_midi(ref / "a.mid", [(0, 5000, 60, 80), (100, 400, 62, 80), (200, 300, 64, 80)])
    write_midi(ref / "b.mid", [(0, 300, 60, 80), (100, 4990, 62, 80)])
    write_midi(gen / "c.mid", [(0, 5000, 60, 80), (0, 5000, 61, 80)])
    result = evaluate_sets([gen], ref, tmp_path / "out", plots=False)
    v = result["sets"]["reference"]["validity"]
    assert v["source"] == "MIDI" and v["capped"] == 1 and v["notes"] == 5
    assert v["stray_off_rate"] == 0 and v["restruck_on_rate"] == 0
    assert v["note_seconds_mean"] == pytest.approx((5.0 + 0.3 + 0.1 + 0.3 + 4.89) / 5)
    assert result["sets"]["gen"]["validity"]["capped_share"] == 1.0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## Event validity" in table and "| gen | MIDI | 0.0 % | 0.0 % | 100.0 % |" in table


def test_the_set_spread_bench_scores_a_set_as_evaluate_does(tmp_path):
    """bench/set_spread.py puts real excerpt sets beside generated ones: its figures for a set
    must be those `evaluate --generated` reports, and an excerpt keeps the notes that start in
    its span, whole, from time 0."""
    import importlib.util
    from pathlib import Path

    from perceiver_music.evaluate.sets import load_set, write_excerpt
    from perceiver_music.tokens.performance import PerformanceTokenizer

    spec = importlib.util.spec_from_file_location(
        "set_spread", Path(__file__).parents[1] / "bench/set_spread.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ref = random_pieces(tmp_path / "ref", 4, seed=1)
    gen = random_pieces(tmp_path / "gen", 3, seed=2, length_ms=900, low=60, high=96)
    reported = evaluate_sets([gen], ref, tmp_path / "eval", plots=False)
    row = bench.score(load_set(gen), load_set(ref))
    assert row["NLH"] == pytest.approx(reported["metrics"]["gen"]["NLH"]["overlap"])
    assert row["note_seconds_mean"] == pytest.approx(reported["sets"]["gen"]["validity"]["note_seconds_mean"])
    assert row["note_seconds_mean"] == pytest.approx(0.9, abs=0.011)

    tok = PerformanceTokenizer()
    steps = tok.midi_to_notes(ref / "p0.mid")
    lo = int(steps.start[10])
    assert write_excerpt(tok, steps, lo, 500, tmp_path / "cut.mid")
    cut = tok.midi_to_notes(tmp_path / "cut.mid")
    inside = (steps.start >= lo) & (steps.start < lo + 500)
    assert cut.start.min() == 0 and len(cut) == inside.sum()
    assert sorted(cut.end - cut.start) == sorted((steps.end - steps.start)[inside])
    assert not write_excerpt(tok, steps, int(steps.end.max()) + 10, 500, tmp_path / "none.mid")
    name, lo_bar, hi_bar = bench.parse_bar("NLH=0.7:")
    assert bench.passes({"NLH": 0.71}, [(name, lo_bar, hi_bar)]) and not bench.passes(
        {"NLH": 0.69}, [(name, lo_bar, hi_bar)]
    )
