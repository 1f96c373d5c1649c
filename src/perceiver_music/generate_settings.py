"""Every setting of `generate`, checked in one place and without torch: the command refuses a
bad one at once, before torch and the model load, and `generate_midi` and `SamplingConfig`
run the same checks for Python callers.

Lengths: `--tokens T` generates at most T tokens per piece; `--seconds S` stops a piece once
its continuation lasts S seconds. A model that stops moving time (notes without time shifts)
would never reach S, so seconds mode also stops at a safety cap of
`CAP_TOKENS_PER_SECOND * S + CAP_EXTRA_TOKENS` tokens: 250 tokens a second, where the densest
10 s of any ASAP performance take 158 and the densest whole performance 95 (45 on average).
A piece cut by the cap is reported.

A model conditioned on timing is told the length asked for, and given up to `ENDING_GRACE`
more to finish its piece: `--seconds 120` asks for an ending near 120 s, not a cut at 120 s.
"""

from __future__ import annotations

import math

from perceiver_music.config import check_precision
from perceiver_music.tokens.performance import NUM_PITCHES

CAP_TOKENS_PER_SECOND = 250
CAP_EXTRA_TOKENS = 1024
MAX_TOKENS = 10_000_000  # per piece: far beyond any piece, well within memory
MAX_SECONDS = (MAX_TOKENS - CAP_EXTRA_TOKENS) // CAP_TOKENS_PER_SECOND
AUDIO_FORMATS = ("wav", "flac")
PIANO = (21, 108)  # A0..C8: the keyboard's pitches, the keyboard mask's default range
# MIDI's default: the model's whole distribution. A nucleus (0.95) helped the bundled model while
# it was undertrained (held chords at temperature 1), but on the model trained to 35 M tokens it
# cuts the tail of the 100 TIME_SHIFTs, so time moves in short steps and notes end early:
# 16 pieces of 45 s, mean note length 0.24 s at 0.95 against 0.38 s at 1 (ASAP 0.35 s).
MIDI_TOP_P = 1.0
ENDING_GRACE = 1.25  # timing-conditioned models: a piece may run this much past --seconds to end


def resolve_label(labels: list[str], name: str) -> int:
    """A label's id (1 + its index, matched ignoring case), or a ValueError listing the known ones."""
    by_name = {label.casefold(): i + 1 for i, label in enumerate(labels)}
    if name.casefold() not in by_name:
        raise ValueError(f"--composer {name!r} is not one the model knows; it knows: {', '.join(labels)}")
    return by_name[name.casefold()]


def check_conditioning(
    condition: list[str],
    labels: list[str],
    composer: str | None = None,
    style_given: bool = False,
    guidance: float = 1.0,
    seconds: float | None = None,
) -> None:
    """ValueError for conditioning the model (its `condition` and `labels`) cannot take."""
    if not guidance >= 0 or math.isinf(guidance):
        raise ValueError(f"--guidance must be >= 0 and finite, got {guidance}")
    if composer is not None:
        if "label" not in condition:
            raise ValueError("--composer: this model is not conditioned on composers")
        resolve_label(labels, composer)
    if style_given and "style" not in condition:
        raise ValueError("--style: this model is not conditioned on a reference performance's style")
    timed = "timing" in condition and seconds is not None
    if guidance != 1 and composer is None and not style_given and not timed:
        raise ValueError("--guidance needs something to guide towards: --composer, --style or --seconds")


def check_sampling(
    temperature: float, top_k: int, top_p: float, min_p: float, pitch_range: tuple[int, int] = PIANO
) -> None:
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    lo, hi = pitch_range
    if not 0 <= lo <= hi < NUM_PITCHES:
        raise ValueError(f"pitch_range must be two pitches 0 <= low <= high <= 127, got {lo}-{hi}")


def token_cap(seconds: float) -> int:
    """The most tokens a piece of `seconds` seconds may take in seconds mode."""
    return math.ceil(CAP_TOKENS_PER_SECOND * seconds) + CAP_EXTRA_TOKENS


def check_generate(
    *,
    num: int = 1,
    tokens: int | None = None,
    seconds: float | None = None,
    prompt_tokens_last: int | None = None,
    prompt_seconds_last: float | None = None,
    refill: int | None = None,
    precision: str = "auto",
    audio_format: str | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    pitch_range: tuple[int, int] = PIANO,
) -> None:
    """ValueError naming the option (as the command spells it) for the first bad setting.

    What depends on the model (refill up to its num_latents) is checked once it is loaded.
    """
    check_sampling(temperature, top_k, top_p, min_p, pitch_range)
    counts = {"num": num, "tokens": tokens, "prompt-tokens": prompt_tokens_last, "refill": refill}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if tokens is not None and tokens > MAX_TOKENS:
        raise ValueError(f"--tokens must be at most {MAX_TOKENS:,}, got {tokens:,}")
    for name, value in {"seconds": seconds, "prompt-seconds": prompt_seconds_last}.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name} must be positive, got {value}")
    if seconds is not None and seconds > MAX_SECONDS:
        raise ValueError(f"--seconds must be at most {MAX_SECONDS:,}, got {seconds:g}")
    check_precision(precision)
    if audio_format is not None and audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
