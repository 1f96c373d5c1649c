"""`prepare`: splits, bad input, the output layout, and re-runs that reuse what is done."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

from perceiver_music.cli import main
from perceiver_music.config import PrepareConfig
from perceiver_music.data.prepare import prepare
from perceiver_music.tokens.performance import BOS, EOS, PerformanceTokenizer

from conftest import write_midi

TOK = PerformanceTokenizer()


def good_midi(path, seed: int):
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.integers(0, 5000, 30))
    notes = [
        (int(s), int(s) + int(rng.integers(10, 400)), int(rng.integers(40, 90)), int(rng.integers(20, 120)))
        for s in starts
    ]
    return write_midi(path, notes, pedals=[(100, 127), (1500, 0)])


@pytest.fixture
def mixed_folder(tmp_path):
    """Good files mixed with every kind of bad one."""
    root = tmp_path / "midi"
    (root / "sub" / "deeper").mkdir(parents=True)
    good = [
        good_midi(root / "a.mid", 1),
        good_midi(root / "sub" / "b.MIDI", 2),
        good_midi(root / "sub" / "deeper" / "c.mid", 3),
    ]
    for i in range(4, 12):
        good.append(good_midi(root / f"g{i}.mid", i))
    data = good[0].read_bytes()
    (root / "zero.mid").write_bytes(b"")
    (root / "truncated.mid").write_bytes(data[: len(data) // 2])
    (root / "sub" / "notmidi.mid").write_text("this is a text file\n")
    corrupt = bytearray(data)
    corrupt[14:18] = b"XXXX"  # the first track chunk's tag
    (root / "corrupt.mid").write_bytes(bytes(corrupt))
    write_midi(root / "sub" / "nonotes.mid", [], pedals=[(0, 127)])
    (root / "readme.txt").write_text("not a MIDI suffix: ignored")
    bad = {"zero.mid", "truncated.mid", "sub/notmidi.mid", "corrupt.mid", "sub/nonotes.mid"}
    return root, good, bad


def load_split(out, split):
    return np.load(out / f"{split}.npy"), np.load(out / f"{split}.index.npy")


def test_mixed_folder_keeps_every_good_file_and_reports_every_bad_one(mixed_folder, tmp_path):
    root, good, bad = mixed_folder
    out = tmp_path / "data"
    result = prepare(root, out, PrepareConfig(workers=2), progress=False)
    assert result.usable == len(good)
    assert {p for p, _ in result.skipped} == bad
    reasons = dict(result.skipped)
    assert "empty file" in reasons["zero.mid"]
    assert "corrupt" in reasons["truncated.mid"]
    assert "not a MIDI file" in reasons["sub/notmidi.mid"]
    assert reasons["sub/nonotes.mid"] == "no notes"
    with open(out / "skipped.csv", newline="") as f:
        assert {row["path"]: row["reason"] for row in csv.DictReader(f)} == reasons

    # Every good file's tokens are in its split, exactly, framed by BOS/EOS, never mixed.
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == TOK.vocab.size
    by_path = {p["path"]: p for p in meta["pieces"]}
    for path in good:
        rel = path.relative_to(root).as_posix()
        piece = by_path[rel]
        tokens, index = load_split(out, piece["split"])
        row = [list(r) for r in index].index([piece["offset"], piece["length"]])
        assert row >= 0
        ids = tokens[piece["offset"] : piece["offset"] + piece["length"]]
        assert ids[0] == BOS and ids[-1] == EOS
        assert np.array_equal(ids[1:-1], TOK.encode(path))
    for split in ("train", "valid", "test"):
        tokens, index = load_split(out, split)
        assert tokens.dtype == np.uint16
        assert index[:, 1].sum() == len(tokens)
        assert np.array_equal(index[:, 0], np.concatenate([[0], np.cumsum(index[:, 1])[:-1]]))


def test_cli_exit_status(mixed_folder, tmp_path, capsys):
    root, good, bad = mixed_folder
    assert main(["prepare", str(root), "--out", str(tmp_path / "d1"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"Prepared {len(good)} pieces" in out and "zero.mid: empty file" in out

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for name in ("zero.mid", "truncated.mid", "corrupt.mid"):
        shutil.copy(root / name, only_bad / name)
    assert main(["prepare", str(only_bad), "--out", str(tmp_path / "d2"), "--quiet"]) == 1
    assert "no usable MIDI file" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d3")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_rerun_reuses_unchanged_files_and_rereads_changed_ones(mixed_folder, tmp_path):
    root, good, bad = mixed_folder
    out = tmp_path / "data"
    first = prepare(root, out, PrepareConfig(workers=1), progress=False)
    assert first.encoded == len(good) + len(bad) and first.reused == 0
    before = {s: load_split(out, s)[0].copy() for s in ("train", "valid", "test")}

    second = prepare(root, out, PrepareConfig(workers=1), progress=False)
    assert second.encoded == 0 and second.reused == len(good) + len(bad)
    for s in before:
        assert np.array_equal(load_split(out, s)[0], before[s])

    # Change one file, add one, remove one: only the changed and new files are read again.
    good_midi(good[0], 99)
    os.utime(good[0], ns=(1, 1))
    good_midi(root / "new.mid", 100)
    good[1].unlink()
    third = prepare(root, out, PrepareConfig(workers=1), progress=False)
    assert third.encoded == 2
    assert third.usable == len(good)
    meta = json.loads((out / "meta.json").read_text())
    piece = next(p for p in meta["pieces"] if p["path"] == "a.mid")
    tokens, _ = load_split(out, piece["split"])
    assert np.array_equal(
        tokens[piece["offset"] + 1 : piece["offset"] + piece["length"] - 1], TOK.encode(good[0])
    )
    assert all(p["path"] != "sub/b.MIDI" for p in meta["pieces"])


def test_asap_split_keeps_each_piece_folder_in_one_split(tmp_path):
    root = tmp_path / "asap"
    rows = []
    for piece in range(30):
        for performer in range(3):
            rel = f"Composer/Work{piece}/P{performer}.mid"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            good_midi(root / rel, piece * 3 + performer)
            rows.append({"folder": f"Composer/Work{piece}", "midi_performance": rel})
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["folder", "midi_performance"])
        writer.writeheader()
        writer.writerows(rows)
    result = prepare(root, tmp_path / "data", PrepareConfig(workers=1), progress=False)
    assert result.split_method == "ASAP piece folder"
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    split_of_folder: dict[str, set] = {}
    for p in meta["pieces"]:
        split_of_folder.setdefault(p["path"].rsplit("/", 1)[0], set()).add(p["split"])
    assert all(len(s) == 1 for s in split_of_folder.values())
    assert {next(iter(s)) for s in split_of_folder.values()} == {"train", "valid", "test"}


def test_maestro_csv_split(tmp_path):
    root = tmp_path / "maestro"
    (root / "2004").mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train", "validation", "test", "train"]):
        rel = f"2004/f{i}.midi"
        good_midi(root / rel, i)
        rows.append({"midi_filename": rel, "split": split})
    with open(root / "maestro-v3.0.0.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["midi_filename", "split"])
        writer.writeheader()
        writer.writerows(rows)
    prepare(root, tmp_path / "data", PrepareConfig(workers=1), progress=False)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert [p["split"] for p in meta["pieces"]] == ["train", "valid", "test", "train"]
    assert meta["label_source"] is None and all(p["label"] is None for p in meta["pieces"])


def test_maestro_composers_become_labels(tmp_path):
    root = tmp_path / "maestro"
    (root / "2004").mkdir(parents=True)
    rows = []
    for i, composer in enumerate(["Frédéric Chopin", "Franz Liszt", "Frédéric Chopin", ""]):
        good_midi(root / f"2004/f{i}.midi", i)
        rows.append({"canonical_composer": composer, "midi_filename": f"2004/f{i}.midi", "split": "train"})
    with open(root / "maestro-v3.0.0.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["canonical_composer", "midi_filename", "split"])
        writer.writeheader()
        writer.writerows(rows)
    result = prepare(root, tmp_path / "data", PrepareConfig(workers=1), progress=False)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert [p["label"] for p in meta["pieces"]] == ["Frédéric Chopin", "Franz Liszt", "Frédéric Chopin", None]
    assert meta["labels"]["Frédéric Chopin"]["train"] == 2 and set(meta["labels"]) == {
        "Frédéric Chopin",
        "Franz Liszt",
    }
    assert "1 of 4 files have no label" in result.summary() and "Frédéric Chopin 2" in result.summary()


def test_a_user_labels_csv(tmp_path, capsys):
    root = tmp_path / "midi"
    root.mkdir()
    for i in range(3):
        good_midi(root / f"p{i}.mid", i)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\np0.mid,calm\np2.mid,wild\nnot-there.mid,calm\n")
    out = tmp_path / "data"
    assert main(["prepare", str(root), "--out", str(out), "--labels", str(labels), "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert {p["path"]: p["label"] for p in meta["pieces"]} == {
        "p0.mid": "calm",
        "p1.mid": None,
        "p2.mid": "wild",
    }
    assert meta["label_source"] == str(labels)
    for bad, message in [
        ("path;label\np0.mid;x\n", "needs a header with columns path,label"),
        (None, "cannot read"),
    ]:
        target = tmp_path / "bad.csv"
        target.unlink(missing_ok=True)
        if bad is not None:
            target.write_text(bad)
        assert (
            main(["prepare", str(root), "--out", str(tmp_path / "d2"), "--labels", str(target), "--quiet"])
            == 2
        )
        err = capsys.readouterr().err
        assert message in err and "bad.csv" in err
        assert not (tmp_path / "d2").exists()  # nothing written


def test_hash_split_is_stable_and_roughly_proportional(tmp_path):
    from perceiver_music.data.prepare import assign_splits

    rels = [f"dir{i // 10}/file{i}.mid" for i in range(2000)]
    cfg = PrepareConfig(valid_fraction=0.1, test_fraction=0.2)
    splits, method, _ = assign_splits(tmp_path, rels, cfg)
    assert method == "hash of path"
    assert splits == assign_splits(tmp_path, list(reversed(rels)), cfg)[0]
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "valid", "test")}
    assert 150 < counts["valid"] < 250 and 330 < counts["test"] < 470


def test_prepare_all_asap(asap_dir, tmp_path):
    result = prepare(asap_dir, tmp_path / "asap", PrepareConfig(workers=2), progress=False)
    assert result.usable == 1067 and not result.skipped
    assert result.split_method == "ASAP piece folder"
    assert min(result.pieces.values()) > 50
    # Composers from metadata.csv: ASAP's folders are Composer/Work/...
    meta = json.loads((tmp_path / "asap" / "meta.json").read_text())
    assert all(p["label"] == p["path"].split("/")[0] for p in meta["pieces"])
    assert {"Bach", "Beethoven", "Chopin", "Liszt", "Schubert"} <= set(meta["labels"])
    assert sum(sum(c.values()) for c in meta["labels"].values()) == 1067


def test_no_midi_or_not_a_folder_writes_nothing(tmp_path, capsys):
    empty, text_only = tmp_path / "empty", tmp_path / "text"
    empty.mkdir()
    text_only.mkdir()
    (text_only / "readme.txt").write_text("no MIDI here")
    one = good_midi(tmp_path / "one.mid", 1)
    for source, message in [
        (empty, f"{empty}: no MIDI files (.mid, .midi) found; nothing written"),
        (text_only, f"{text_only}: no MIDI files (.mid, .midi) found; nothing written"),
        (one, f"{one}: not a folder; prepare reads a folder of MIDI files (`tokenize` reads single files)"),
    ]:
        out = tmp_path / "out"
        assert main(["prepare", str(source), "--out", str(out), "--quiet"]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Prepared" not in captured.out
        assert not out.exists()


def test_only_bad_files_write_nothing(mixed_folder, tmp_path, capsys):
    root, _, _ = mixed_folder
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    for name in ("zero.mid", "truncated.mid", "corrupt.mid", "sub/notmidi.mid"):
        shutil.copy(root / name, only_bad / name.replace("/", "_"))
    out = tmp_path / "out"
    assert main(["prepare", str(only_bad), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no usable MIDI file: none of the 4 could be used (corrupt.mid: corrupt MIDI" in err
    assert "and 1 more); nothing written" in err
    assert not out.exists()


def test_empty_valid_or_test_split_is_warned_about(tmp_path, capsys):
    root = tmp_path / "midi"
    root.mkdir()
    good_midi(root / "a.mid", 1)
    assert main(["prepare", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    empty = [s for s in ("valid", "test") if meta["counts"][s]["pieces"] == 0]
    assert empty  # one piece fills one split
    for split in empty:
        assert f"warning: the {split} split is empty (1 piece in all, split by hash of path)" in err
