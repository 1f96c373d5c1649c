"""The one progress bar every command uses (prepare, train, generate, evaluate, render).

On a terminal it is tqdm's bar, redrawn at most ten times a second. Anywhere else (CI, nohup,
a log file) tqdm would append every redraw, carriage return and all: there the bar writes one
plain line every LOG_INTERVAL_S seconds instead, and its last state when it closes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 10.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """A stream for tqdm that turns each redraw into one line of its own."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress(tqdm):
    def finish(self) -> None:
        """Close the bar as complete: work that ends before its planned total (a piece that
        reaches EOS, files found already done) reads 100 %, not where it stopped."""
        if not self.disable and self.total is not None and self.n < self.total:
            self.total = self.n
        self.close()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str,
    enabled: bool = True,
    initial: float = 0,
    **kwargs: Any,
) -> Progress:
    """A bar on standard error; `enabled=False` gives one that shows nothing."""
    terminal = sys.stderr.isatty()
    return Progress(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not enabled,
        file=sys.stderr if terminal else _Lines(sys.stderr),
        dynamic_ncols=terminal,
        mininterval=0.1 if terminal else LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S * 2,
        **kwargs,
    )
