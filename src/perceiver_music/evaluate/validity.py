"""Event validity: do a set's note events make sense on a keyboard, and do its notes end?

Per piece, counted on the token stream:

* stray NOTE_OFF: a NOTE_OFF of a pitch that is not sounding (the decoder ignores it);
* re-struck NOTE_ON: a NOTE_ON of a pitch that is already sounding;
* notes ended by the cap: notes whose NOTE_ON is never closed, which the decoder ends after
  `tokenizer.max_note_seconds`.

Performances have essentially none of these, and a model that has not learned which keys are
down makes many: the result is a wall of long held notes. Generated pieces are measured on the
tokens the model emitted (`generate` writes them beside each MIDI as `NAME.tokens.npy`, and the
prompt's length in generate.json), counting only the continuation; a MIDI file without tokens
is measured on its own encoding, where the cap shows as notes lasting exactly the cap.
No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perceiver_music.tokens.performance import Notes, PerformanceTokenizer, note_events

TOKENS_SUFFIX = ".tokens.npy"


@dataclass
class PieceValidity:
    note_ons: int
    note_offs: int
    stray_offs: int
    restruck_ons: int
    capped: int  # notes ended by the max_note_seconds cap
    notes: int
    from_tokens: bool  # measured on the emitted tokens (else on the MIDI's encoding)


def tokens_beside(midi: Path) -> tuple[np.ndarray, int] | None:
    """The token stream `generate` wrote next to a MIDI file and where its continuation starts."""
    path = midi.with_name(midi.name[: -len(midi.suffix)] + TOKENS_SUFFIX)
    if not path.is_file():
        return None
    ids = np.load(path).astype(np.int64)
    start = 0
    settings = midi.parent / "generate.json"
    if settings.is_file():
        try:
            start = int(json.loads(settings.read_text()).get("prompt_tokens", 0))
        except (ValueError, TypeError, AttributeError):
            start = 0
    return ids, min(start, len(ids))


def piece_validity(tok: PerformanceTokenizer, midi: Path, notes: Notes) -> PieceValidity:
    """Validity of one piece; `notes` are its notes in steps as the tokenizer read them."""
    cap = int(round(tok.cfg.max_note_seconds * tok.cfg.steps_per_second))
    found = tokens_beside(midi)
    if found is None:
        ids, start = tok.encode_notes(notes).astype(np.int64), 0
    else:
        ids, start = found
    ev = note_events(ids, tok.vocab)
    new = ev.pos >= start  # the prompt sets the state; only the continuation is counted
    on, off = ev.on & new, ~ev.on & new
    if found is None:
        capped = int(((notes.end - notes.start) == cap).sum())
        n_notes = len(notes)
    else:
        capped, n_notes = _capped(ids, ev, start, cap, tok), int(on.sum())
    return PieceValidity(
        note_ons=int(on.sum()),
        note_offs=int(off.sum()),
        stray_offs=int((ev.stray_off & new).sum()),
        restruck_ons=int((ev.restruck_on & new).sum()),
        capped=capped,
        notes=n_notes,
        from_tokens=found is not None,
    )


def _capped(ids: np.ndarray, ev, start: int, cap: int, tok: PerformanceTokenizer) -> int:
    """Continuation notes the decoder ends by the cap: never closed, and begun at least `cap`
    steps before the stream's end (the others are cut by the end of the piece)."""
    step = np.cumsum(tok.vocab.shift_steps(ids))
    final = int(step[-1]) if len(step) else 0
    begun = ev.pos[ev.unclosed_on & (ev.pos >= start)]
    return int((final - step[begun] >= cap).sum())


def summarise(pieces: list[PieceValidity], notes: list[Notes], sps: int) -> dict:
    """A set's rates (share of all its note events, pooled over pieces) and note summaries."""
    total = {
        k: sum(getattr(p, k) for p in pieces)
        for k in ("note_ons", "note_offs", "stray_offs", "restruck_ons", "capped", "notes")
    }
    lengths = np.concatenate([(n.end - n.start) / sps for n in notes]) if notes else np.zeros(0)
    velocity = np.concatenate([n.velocity for n in notes]).astype(np.float64) if notes else np.zeros(0)

    def share(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "source": "tokens"
        if pieces and all(p.from_tokens for p in pieces)
        else ("MIDI" if not any(p.from_tokens for p in pieces) else "tokens and MIDI"),
        **total,
        "stray_off_rate": share(total["stray_offs"], total["note_offs"]),
        "restruck_on_rate": share(total["restruck_ons"], total["note_ons"]),
        "capped_share": share(total["capped"], total["notes"]),
        "note_seconds_mean": float(lengths.mean()) if len(lengths) else None,
        "note_seconds_median": float(np.median(lengths)) if len(lengths) else None,
        "note_seconds_p90": float(np.percentile(lengths, 90)) if len(lengths) else None,
        "velocity_mean": float(velocity.mean()) if len(velocity) else None,
        "velocity_std": float(velocity.std()) if len(velocity) else None,
    }
