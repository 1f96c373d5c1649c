"""Bounded fuzzing: random and mutated MIDI bytes through `tokenize` and `prepare`.

Each run happens in a child process with a memory cap and a time limit, so a crash (a signal),
a hang (the limit) or unbounded memory (the cap) fails the test instead of the test run. The
default run is small; `-m slow` runs a longer one.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ASAP, write_midi

MEMORY_CAP = 3 * 1024**3  # bytes of address space for the child


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Mostly in-place byte changes (the file still parses and the bad values reach the
    tokenizer); sometimes structural damage (cuts, inserts, absurd lengths and delta times)."""
    b = bytearray(data)
    if rng.random() < 0.6:
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(14, max(len(b), 15)) % len(b)] = rng.randrange(256)
        return bytes(b)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        p = rng.randrange(max(len(b), 1))
        if op < 0.3:
            del b[p : p + rng.randint(1, 64)]
        elif op < 0.5:
            b[p:p] = rng.randbytes(rng.randint(1, 8))
        elif op < 0.7 and len(b) > 22:
            q = rng.randrange(14, len(b) - 4)
            b[q : q + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"])
        elif op < 0.85:
            b = b[:p]
        else:
            b += rng.randbytes(rng.randint(1, 32))
    return bytes(b)


def seeds(tmp_path: Path) -> list[bytes]:
    out = [
        write_midi(
            tmp_path / "s1.mid", [(0, 500, 60, 80), (200, 900, 64, 50)], pedals=[(0, 127), (700, 0)]
        ).read_bytes(),
        write_midi(
            tmp_path / "s2.mid",
            [(i * 37, i * 37 + 300, 30 + i % 60, 1 + i % 127) for i in range(200)],
            tempos=[(0, 500_000), (900, 250_000), (3000, 1_000_000)],
            tracks=[([(10, 50, 70, 90)], [(5, 100)])],
        ).read_bytes(),
    ]
    if ASAP.is_dir():
        out += [p.read_bytes() for p in sorted(ASAP.rglob("*.mid"))[::200]]
    return out


def run_capped(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    return subprocess.run(
        [sys.executable, "-m", "perceiver_music", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


def fuzz(tmp_path: Path, n_files: int, seed: int) -> None:
    rng = random.Random(seed)
    (tmp_path / "seeds").mkdir()
    corpus = seeds(tmp_path / "seeds")
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for i in range(n_files):
        if i % 10 == 0:
            data = rng.randbytes(rng.randint(0, 2000))  # pure noise, sometimes with a MIDI header
            if i % 20 == 0:
                data = b"MThd" + data
        else:
            data = mutate(rng.choice(corpus), rng)
        (folder / f"f{i:05d}.mid").write_bytes(data)

    done = run_capped(["tokenize", str(folder), "--ids", "--out", str(tmp_path / "t.json")], timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # never a signal, never a traceback
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    tokenized = json.loads((tmp_path / "t.json").read_text()) if done.returncode == 0 else {}
    failed = [line for line in done.stderr.splitlines() if line.startswith(str(folder))]
    assert len(tokenized) + len(failed) == n_files  # every file either tokenized or named with a reason

    done = run_capped(["prepare", str(folder), "--out", str(tmp_path / "data"), "--quiet"], timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode == 0:
        meta = json.loads((tmp_path / "data" / "meta.json").read_text())
        assert len(meta["pieces"]) + len(meta["skipped"]) == n_files
        assert {p["path"] for p in meta["pieces"]} == {k for k, v in tokenized.items() if v}
        assert all(s["reason"] for s in meta["skipped"])
        assert not any(s["reason"].startswith("unexpected error") for s in meta["skipped"])


def test_fuzz_small(tmp_path):
    fuzz(tmp_path, n_files=150, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_long(tmp_path, seed):
    fuzz(tmp_path, n_files=3000, seed=100 + seed)
