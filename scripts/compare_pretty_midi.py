"""How many notes symusic and pretty_midi read differently from the same MIDI files.

Where overlapping notes of one pitch make a file ambiguous, the two parsers pair note-ons with
note-offs differently. This counts the notes (pitch, start, end to 0.1 ms, non-drum tracks)
that pretty_midi reads and symusic does not, with times from the same tempo map.

    pip install pretty_midi
    python scripts/compare_pretty_midi.py [FOLDER]     # default: ../shared/data/asap
"""

from __future__ import annotations

import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from perceiver_music.tokens.performance import _tick_to_seconds, load_score


def differing_notes(path: Path) -> tuple[int, int]:
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(str(path))
    theirs = Counter(
        (n.pitch, round(n.start, 4), round(n.end, 4))
        for i in pm.instruments
        if not i.is_drum
        for n in i.notes
    )
    score = load_score(path)
    to_sec = _tick_to_seconds(score)
    ours: Counter = Counter()
    for track in score.tracks:
        if track.is_drum:
            continue
        nt = track.notes.numpy()
        on = nt["time"].astype(np.int64)
        start, end = to_sec(on), to_sec(on + nt["duration"])
        ours.update(zip(nt["pitch"].tolist(), np.round(start, 4).tolist(), np.round(end, 4).tolist()))
    return sum((theirs - ours).values()), sum(theirs.values())


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "asap"
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    with Pool() as pool:
        counts = pool.map(differing_notes, files, chunksize=8)
    differ = sum(d for d, _ in counts)
    total = sum(n for _, n in counts)
    files_differing = sum(d > 0 for d, _ in counts)
    print(
        f"{differ} of {total} notes differ ({100 * differ / max(total, 1):.2f} %), "
        f"in {files_differing} of {len(files)} files"
    )


if __name__ == "__main__":
    main()
