"""Generate pieces from a checkpoint: the function behind `perceiver-music generate`.

Unconditional (from BOS) or continuing a MIDI prompt (its last k tokens, or its last s
seconds), --num samples as one batch, length in tokens or seconds, stopping at EOS, lengths
far beyond the training context. Writes one MIDI per sample, the tokens it was decoded from
(NAME.tokens.npy, prompt included), its piano roll (PNG, the prompt's end marked) and, where
FluidSynth is installed, its audio (WAV or FLAC), and generate.json with the settings used.

A conditioned model (model.condition) also takes a composer, the style of a reference
performance (`style_embedding`) and classifier-free guidance; one conditioned on timing is
told the length asked for (see generate_settings).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from perceiver_music.checkpoint import load_model
from perceiver_music.evaluate.validity import TOKENS_SUFFIX
from perceiver_music.generate_settings import (
    ENDING_GRACE,
    MIDI_TOP_P,
    check_conditioning,
    check_generate,
    resolve_label,
    token_cap,
)
from perceiver_music.progress import progress_bar
from perceiver_music.sample import Conditions, SamplingConfig, generate
from perceiver_music.tokens.performance import BOS, EOS, MidiError, PerformanceTokenizer


@dataclass
class GenerateResult:
    out_dir: Path
    midi_files: list[Path]
    prompt_tokens: int
    generated_tokens: list[int]
    seconds: list[float]  # length of each piece (prompt included)
    tokens_per_s: float
    notes: list[str] = field(default_factory=list)
    # why each piece ended: "eos", "seconds", "tokens", or "grace" (a timing-conditioned model
    # that ran to ENDING_GRACE x --seconds without ending)
    stopped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a piece cut by the safety cap
    rendered: list[Path] = field(default_factory=list)  # PNG and audio files


def prompt_tokens(
    tok: PerformanceTokenizer,
    midi: str | os.PathLike | None,
    context: int,
    last_tokens: int | None = None,
    last_seconds: float | None = None,
) -> tuple[np.ndarray, list[str], float]:
    """The prompt as token ids (BOS first when the whole piece fits), notes for the user, and
    the seconds of the piece before the kept part (0 when it is kept whole)."""
    notes: list[str] = []
    if midi is None:
        return np.array([BOS]), notes, 0.0
    events = tok.encode(midi).astype(np.int64)  # MidiError names the file and the problem
    if len(events) == 0:
        raise MidiError(midi, "the prompt has no notes")
    ids = np.concatenate([[BOS], events])
    if last_seconds is not None:
        steps = tok.vocab.shift_steps(events)
        before = np.cumsum(steps) - steps  # time at which each token happens
        cut = before[-1] + steps[-1] - last_seconds * tok.cfg.steps_per_second
        keep_from = int(np.searchsorted(before, cut, side="left"))  # the first token at or after the cut
        if keep_from > 0:
            ids = events[keep_from:]
            notes.append(f"prompt: the last {last_seconds:g} s of {midi} ({len(ids)} tokens)")
    if last_tokens is not None and len(ids) > last_tokens:
        ids = ids[-last_tokens:]
        notes.append(f"prompt: the last {last_tokens} tokens of {midi}")
    if len(ids) > context:
        ids = ids[-context:]
        notes.append(f"prompt: longer than the model's context; trimmed to its last {context} tokens")
    cut_steps = int(tok.vocab.shift_steps(events).sum() - tok.vocab.shift_steps(ids).sum())
    return ids, notes, cut_steps / tok.cfg.steps_per_second


STYLE_WINDOWS = 8  # a reference's style: the mean over this many evenly spaced windows of it


@torch.no_grad()
def style_vector(model, cfg, midi: str | os.PathLike) -> torch.Tensor:
    """The style vector [style_width] of a performance under a loaded style-conditioned model:
    its encoder's mean over up to STYLE_WINDOWS evenly spaced windows of style_len tokens."""
    if not cfg.model.conditioned_on("style"):
        raise ValueError("this model is not conditioned on a reference performance's style")
    events = PerformanceTokenizer(cfg.tokenizer).encode(midi).astype(np.int64)  # MidiError: file + reason
    if len(events) == 0:
        raise MidiError(midi, "the style reference has no notes")
    R = cfg.model.style_len
    starts = np.unique(np.linspace(0, max(0, len(events) - R), STYLE_WINDOWS).astype(int))
    windows = np.zeros((len(starts), R), np.int64)  # PAD-filled where the piece is shorter
    for row, start in zip(windows, starts):
        chunk = events[start : start + R]
        row[: len(chunk)] = chunk
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    vectors = model.conditioner.style_encoder(torch.as_tensor(windows, device=device))  # [W, S]
    model.train(was_training)
    return vectors.mean(0)


def style_embedding(
    midi: str | os.PathLike, ckpt: str | os.PathLike | None = None, device: str = "cpu"
) -> np.ndarray:
    """The style vector of a performance (a MIDI file) under a style-conditioned checkpoint (None:
    the bundled model). Vectors can be mixed, e.g. `0.5 * a + 0.5 * b`, and given to
    `generate_midi(style=...)`."""
    model, cfg = load_model(ckpt, device)
    return style_vector(model, cfg, midi).cpu().numpy()


def generate_midi(
    ckpt: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    prompt: str | os.PathLike | None = None,
    num: int = 1,
    tokens: int | None = None,
    seconds: float | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    prompt_tokens_last: int | None = None,
    prompt_seconds_last: float | None = None,
    use_cache: bool = True,
    refill: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    progress: bool = True,
    render: bool = True,
    audio_format: str | None = "wav",
    soundfont: str | os.PathLike | None = None,
    composer: str | None = None,
    style: str | os.PathLike | np.ndarray | None = None,
    guidance: float = 1.0,
    tell_length: bool = True,
) -> GenerateResult:
    """Generate `num` pieces and write them as MIDI into out_dir (see the module docstring).

    ckpt: a run or checkpoint folder; None for the bundled model.
    tokens: how many tokens to generate (default 1024 when neither tokens nor seconds is given);
    seconds: stop a piece once its continuation lasts this long; tokens then only caps it,
    by default at generate_settings.token_cap(seconds), and a piece cut there is a warning.
    Each piece's `stopped` says why it ended: "eos", "seconds", "tokens" or "grace".
    sampling: temperature, top-k/p, min-p, and the keyboard mask (`SamplingConfig.keyboard`,
    on by default: no NOTE_OFF of a silent pitch, no NOTE_ON of a sounding one).
    precision: "fp32", "bf16" or "auto" (bf16 on GPU, fp32 on CPU); see `sample.generate`.
    render: also write each piece's piano roll and, with `audio_format` ("wav", "flac" or None),
    its audio; when FluidSynth or a soundfont is missing the audio is skipped and a note says why.
    composer, style (a MIDI file, or a vector from `style_embedding`), guidance: conditioning,
    for a model trained with it (classifier-free guidance: 1 conditioned only, 0 unconditioned).
    A timing-conditioned model in seconds mode is told the length and may run up to
    ENDING_GRACE times it to end the piece; tell_length=False keeps the length from it (as
    timing dropout does in training) under the same limit, to see what being told is worth.
    """
    sampling = sampling or SamplingConfig(top_p=MIDI_TOP_P)
    check_generate(  # before the model loads
        num=num,
        tokens=tokens,
        seconds=seconds,
        prompt_tokens_last=prompt_tokens_last,
        prompt_seconds_last=prompt_seconds_last,
        refill=refill,
        precision=precision,
        audio_format=audio_format if render else None,
    )  # (SamplingConfig has run the same checks on itself)
    model, cfg = load_model(ckpt, device)
    if cfg.codes.codec:
        raise ValueError(
            f"{ckpt}: a {cfg.model.arch} over audio codes (level {cfg.codes.level}), not MIDI: generate audio "
            "with --ckpt PRIORS_DIR (a folder whose priors.json names the codec and its priors)"
        )
    m = cfg.model
    check_conditioning(m.condition, m.labels, composer, style is not None, guidance, seconds)
    if refill is not None and refill > cfg.model.num_latents:
        raise ValueError(
            f"--refill must be at most the model's num_latents ({cfg.model.num_latents}), got {refill}"
        )
    tok = PerformanceTokenizer(cfg.tokenizer)
    ids, notes, start = prompt_tokens(tok, prompt, cfg.model.max_len, prompt_tokens_last, prompt_seconds_last)
    sps = tok.cfg.steps_per_second
    prompt_steps = int(tok.vocab.shift_steps(ids).sum())
    timed = m.conditioned_on("timing") and seconds is not None
    limit = None if seconds is None else seconds * (ENDING_GRACE if timed else 1.0)
    capped = tokens is None and seconds is not None  # the safety cap, not a length asked for
    if tokens is None:
        tokens = 1024 if seconds is None else token_cap(limit)
    time_steps = None if seconds is None else int(round(limit * sps))
    conditions = None
    if m.condition:
        style_vec = None
        if style is not None:
            style_vec = (
                torch.as_tensor(np.asarray(style), dtype=torch.float32)
                if isinstance(style, np.ndarray)
                else style_vector(model, cfg, style)
            )
        conditions = Conditions(
            label=resolve_label(m.labels, composer) if composer else 0,
            total_seconds=start + prompt_steps / sps + seconds if timed and tell_length else 0.0,
            style=style_vec,
            guidance=guidance,
            start_seconds=start,  # a prompt cut from a piece starts that far into it
            tokenizer=cfg.tokenizer,
        )

    batch = torch.as_tensor(ids, device=device).expand(num, -1).clone()
    # In seconds mode the token count is open-ended: the bar counts without a percentage.
    bar = progress_bar(total=None if seconds else tokens, desc="generate", unit="tok", enabled=progress)
    t0 = time.perf_counter()
    rows = generate(
        model,
        batch,
        tokens,
        sampling,
        seed=seed,
        use_cache=use_cache,
        refill=refill,
        on_token=lambda n: bar.update(1),
        stop=_time_limit(tok, time_steps) if time_steps else None,
        precision=precision,
        conditions=conditions,
        tokenizer=cfg.tokenizer,
    )
    elapsed = time.perf_counter() - t0
    bar.finish()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, lengths, durations, stopped, warnings = [], [], [], [], []
    for i, row in enumerate(rows):
        row = row.cpu().numpy()
        path = out / f"sample_{i:02d}.mid"
        events = row[(row != BOS) & (row != EOS)]
        tok.decode_to_midi(events, path)
        # The emitted tokens, prompt included: `evaluate` reads them to count impossible events
        # (which the MIDI no longer shows, the decoder having repaired them).
        np.save(path.with_name(path.stem + TOKENS_SUFFIX), row.astype(np.uint16))
        decoded = tok.decode_notes(events)
        files.append(path)
        new = row[len(ids) :]
        lengths.append(len(new))
        durations.append(float(decoded.end.max()) / tok.cfg.steps_per_second if len(decoded) else 0.0)
        new_steps = int(tok.vocab.shift_steps(new).sum())  # how far the continuation moved time
        if len(new) and new[-1] == EOS:
            stopped.append("eos")
        elif time_steps is not None and new_steps >= time_steps:
            stopped.append("grace" if timed else "seconds")
        else:
            stopped.append("tokens")
            if capped:
                music = new_steps / tok.cfg.steps_per_second
                warnings.append(
                    f"{path.name}: cut at the safety cap of {tokens:,} tokens after {music:.1f} s of the "
                    f"{seconds:g} s asked for (the model is writing notes without moving on in time); "
                    "--tokens N sets another cap"
                )
    generated = sum(lengths)
    result = GenerateResult(
        out, files, len(ids), lengths, durations, generated / max(elapsed, 1e-9), notes, stopped=stopped,
        warnings=warnings,
    )  # fmt: skip
    prompt_end = prompt_steps / sps if prompt else None
    if render:
        result.rendered = _render(files, prompt_end, audio_format, soundfont, notes)
    settings = {
        "checkpoint": "bundled" if ckpt is None else str(ckpt),
        "prompt": None if prompt is None else str(prompt),
        "prompt_tokens": len(ids),
        "prompt_seconds": prompt_end,
        "num": num,
        "max_tokens": tokens,
        "seconds": seconds,
        "composer": composer,
        "style": None if style is None else (str(style) if not isinstance(style, np.ndarray) else "vector"),
        "guidance": guidance,
        "total_seconds_told": conditions.total_seconds if conditions is not None else None,
        "sampling": asdict(sampling),
        "seed": seed,
        "cache": use_cache,
        "refill": refill,
        "precision": precision,
        "device": str(device),
        "model": asdict(cfg.model),
        "files": [p.name for p in files],
        "token_files": [p.stem + TOKENS_SUFFIX for p in files],
        "generated_tokens": lengths,
        "piece_seconds": [round(d, 2) for d in durations],
        "stopped": stopped,
        "tokens_per_second": round(result.tokens_per_s, 1),
        "notes": notes + warnings,
        "rendered": [p.name for p in result.rendered],
    }
    (out / "generate.json").write_text(json.dumps(settings, indent=1))
    return result


def _render(
    files: list[Path], prompt_end: float | None, audio_format: str | None, soundfont, notes: list[str]
) -> list[Path]:
    """Piano rolls (the prompt's end marked) and, when FluidSynth can, audio next to each MIDI."""
    from perceiver_music import render

    # No length limit: these pieces are as long as they were asked to be.
    written = [
        render.piano_roll(
            path, path.with_suffix(".png"), boundary=prompt_end, title=path.name, max_seconds=None
        )
        for path in files
    ]
    if audio_format is None:
        return written
    try:
        for path in files:
            written.append(
                render.render_audio(
                    path, path.with_suffix(f".{audio_format}"), soundfont=soundfont, max_seconds=None
                )
            )
    except render.RenderError as e:  # no fluidsynth, soundfont or audio extra: the MIDI and PNG stand
        notes.append(f"no audio written: {e}")
    return written


def _time_limit(tok: PerformanceTokenizer, max_steps: int):
    """A stop rule: a row is done once its generated TIME_SHIFTs add up to max_steps."""
    steps_of = torch.as_tensor(tok.vocab.shift_steps(np.arange(tok.vocab.size)))  # per token id
    total: dict[str, torch.Tensor] = {}

    def stop(token: torch.Tensor) -> torch.Tensor:
        step = steps_of.to(token.device)[token]
        total["t"] = total.get("t", torch.zeros_like(token)) + step
        return total["t"] >= max_steps

    return stop
