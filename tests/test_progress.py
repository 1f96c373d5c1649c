"""The shared progress bar: plain lines every few seconds off a terminal, complete when done."""

from __future__ import annotations

import io

from perceiver_music import progress
from perceiver_music.progress import progress_bar


class Clock:
    """tqdm's clock, advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_the_bar_writes_a_line_every_few_seconds(monkeypatch):
    err = io.StringIO()  # not a terminal, like CI, nohup or a log file
    monkeypatch.setattr("sys.stderr", err)
    clock = Clock()
    monkeypatch.setattr("tqdm.std.time", clock)
    bar = progress_bar(total=6000, desc="train", unit="step")
    for _ in range(6000):  # one step every 10 ms: a minute
        clock.now += 0.01
        bar.update(1)
    bar.close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    # One line when it starts, one per LOG_INTERVAL_S, one at the end: not one per update.
    assert len(lines) <= 2 + 60 / progress.LOG_INTERVAL_S, lines
    assert lines[-1].startswith("train: 100%") and "6000/6000" in lines[-1]


def test_a_bar_finished_early_reads_complete(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = progress_bar(total=100, desc="generate", unit="tok")
    bar.update(47)
    bar.finish()
    last = err.getvalue().splitlines()[-1]
    assert "100%" in last and "47/47" in last, last


def test_a_disabled_bar_writes_nothing(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = progress_bar(range(5), desc="x", unit="it", enabled=False)
    assert list(bar) == [0, 1, 2, 3, 4]
    bar.finish()
    assert err.getvalue() == ""
