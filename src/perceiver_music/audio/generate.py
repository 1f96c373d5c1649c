"""Audio generation: the top prior, then each upsampler, then the codec's decoder (Jukebox's
ancestral sampling), unconditionally or continuing a recording.

A PRIORS_DIR ties the runs together with a small `priors.json` (paths relative to it):

    {"codec": "codec", "top": "top", "upsamplers": {"0": "up0"}}

`codec` is a VQ-VAE run, `top` a prior trained on its top level, `upsamplers` one run per lower
level (model.arch=upsampler), each trained on that level of `prepare-codes` data of that codec;
they are checked against the codec (its weights' digest, level, vocabulary, strides) before
anything is sampled. Generation stops at the lowest level that has an upsampler.

Every level is sampled with sample.generate: the exact sliding-window cache past the context,
the Perceiver AR refill for the top prior and the Transformer band for upsamplers, with the
codebook mask (audio.codes.CodebookMask) at every position. A prompt is encoded at every
level; each level continues its own codes (the last max_len of them as context), the
upsamplers conditioned on the whole upper sequence, prompt and continuation. The output
starts with the prompt's own samples, bit for bit, followed by the decoded continuation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from perceiver_music.audio.codec import CodecRun
from perceiver_music.audio.codes import (
    FIRST_CODE,
    CodebookMask,
    codes_of,
    frame_steps,
    ids_of,
    strides_between,
)
from perceiver_music.audio.data import AudioError, audio_info, read_audio, write_audio
from perceiver_music.checkpoint import CheckpointError, load_model
from perceiver_music.codec import CodecError
from perceiver_music.config import Config
from perceiver_music.generate_settings import check_conditioning, resolve_label
from perceiver_music.progress import progress_bar
from perceiver_music.sample import Conditions, SamplingConfig, generate
from perceiver_music.tokens.performance import BOS

PRIORS_FILE = "priors.json"


class PriorsError(ValueError):
    """A PRIORS_DIR, prompt or setting that audio generation cannot use (the message names it)."""


def is_priors_dir(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / PRIORS_FILE).is_file()


def write_priors(
    root: str | os.PathLike, codec: str, top: str, upsamplers: dict[int, str] | None = None
) -> Path:
    """Write ROOT/priors.json (paths relative to ROOT, or absolute)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = {"codec": codec, "top": top, "upsamplers": {str(k): v for k, v in (upsamplers or {}).items()}}
    (root / PRIORS_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return root / PRIORS_FILE


@dataclass
class Level:
    level: int
    model: torch.nn.Module
    cfg: Config
    run: Path


@dataclass
class Priors:
    root: Path
    codec: CodecRun
    levels: list[Level]  # the top prior first, then each upsampler downwards


def load_priors(root: str | os.PathLike, device: str = "cpu") -> Priors:
    """The codec and priors of a PRIORS_DIR, each checked against the codec (PriorsError)."""
    root = Path(root)
    spec_path = root / PRIORS_FILE
    try:
        spec = json.loads(spec_path.read_text())
        codec_path, top_path = root / spec["codec"], root / spec["top"]
        ups = {int(k): root / v for k, v in (spec.get("upsamplers") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PriorsError(
            f'{spec_path}: not a priors file ({type(e).__name__}: {e}); it holds {{"codec": RUN, "top": RUN, '
            '"upsamplers": {"LEVEL": RUN}}'
        ) from None
    try:
        codec = CodecRun.load(codec_path, device)
    except (FileNotFoundError, CodecError, CheckpointError) as e:
        raise PriorsError(f"{spec_path}: codec: {e}") from None
    top = codec.levels - 1
    expected = list(range(top - 1, top - 1 - len(ups), -1))
    if sorted(ups, reverse=True) != expected:
        raise PriorsError(
            f"{spec_path}: upsamplers for levels {sorted(ups)}; they must run down from the level below the "
            f"top ({top}) without a gap: {expected or [top - 1]}"
        )
    levels = [_load_level(codec, top, top_path, spec_path, device)]
    levels += [_load_level(codec, lv, ups[lv], spec_path, device) for lv in expected]
    return Priors(root, codec, levels)


def _load_level(codec: CodecRun, level: int, run: Path, spec_path: Path, device: str) -> Level:
    try:
        model, cfg = load_model(run, device)
    except (FileNotFoundError, CheckpointError) as e:
        raise PriorsError(f"{spec_path}: level {level}: {e}") from None
    codes, K, C = cfg.codes, codec.cfg.codebooks, codec.cfg.l_bins
    upsampler = level < codec.levels - 1
    what = f"{spec_path}: level {level} ({run})"
    if not codes.codec:
        raise PriorsError(f"{what}: not trained on audio codes (a {cfg.model.arch} over MIDI tokens)")
    if codes.codec != codec.digest:
        raise PriorsError(
            f"{what}: trained on codes of another codec (weights {codes.codec}); this PRIORS_DIR's codec "
            f"has weights {codec.digest}: priors from different codecs cannot be mixed"
        )
    if codes.level != level:
        raise PriorsError(f"{what}: trained on level {codes.level} codes, not level {level}")
    if cfg.model.vocab_size != FIRST_CODE + K * C or codes.codebooks != K or codes.cardinality != C:
        raise PriorsError(
            f"{what}: a vocabulary of {cfg.model.vocab_size} ids; the codec's codes need {FIRST_CODE + K * C}"
        )
    if upsampler and (
        cfg.model.arch != "upsampler" or codes.upper_strides != strides_between(codec.cfg, level)
    ):
        raise PriorsError(
            f"{what}: a {cfg.model.arch}, not an upsampler from level {level + 1} of this codec"
        )
    if not upsampler and cfg.model.arch == "upsampler":
        raise PriorsError(f"{what}: an upsampler; the top level needs a prior (perceiver_ar or transformer)")
    return Level(level, model, cfg, run)


@dataclass
class AudioGenerateResult:
    out_dir: Path
    audio_files: list[Path]
    codes_files: list[Path]
    images: list[Path]
    level: int  # the level decoded
    prompt_seconds: float
    seconds: float  # generated, per sample
    level_seconds: dict[int, float]  # wall time of each level's sampling
    elapsed: float  # everything: sampling and decoding
    notes: list[str] = field(default_factory=list)

    @property
    def speed(self) -> float:
        """Seconds of audio generated per second of wall time (all samples)."""
        return self.seconds * len(self.audio_files) / max(self.elapsed, 1e-9)


def read_prompt(codec: CodecRun, prompt: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """(codes [K, T] per level, the samples) of a recording at the codec's rate (PriorsError)."""
    try:
        info = audio_info(prompt)
        if info.samplerate != codec.cfg.sample_rate:
            raise PriorsError(
                f"{prompt}: a prompt at {info.samplerate} Hz; this codec works at {codec.cfg.sample_rate} Hz "
                "and the prompt is kept sample for sample: resample it first (e.g. `sox IN -r "
                f"{codec.cfg.sample_rate} OUT.wav`)"
            )
        audio = read_audio(prompt, codec.cfg.sample_rate)
    except AudioError as e:
        raise PriorsError(f"prompt {e}") from None
    return codec.encode_array(audio), audio


def generate_audio(
    priors_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seconds: float,
    prompt: str | os.PathLike | None = None,
    num: int = 1,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    use_cache: bool = True,
    refill: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    progress: bool = True,
    png: bool = True,
    hop_fraction: float | None = None,
    composer: str | None = None,
    guidance: float = 1.0,
    upsample: bool = True,
) -> AudioGenerateResult:
    """`num` recordings of `seconds` (after the prompt), written as sample_NN.wav, their codes
    (sample_NN.codes.npz, every level sampled), spectrograms and generate.json.

    hop_fraction: sample the upsamplers in Jukebox's windows (see `_sample_level`) instead of
    sliding exactly past their context (None, the default).
    composer: a label the top prior was trained with (model.condition has label); guidance:
    classifier-free guidance of the top prior towards its conditions, as for MIDI.
    upsample: False samples the top level alone and decodes it directly (Jukebox's decoders take
    any level): the upsamplers are skipped, which is several times faster and, for priors whose
    upsamplers lose what the top level holds (bench/audio_upsampler.py), heard better."""
    if not (seconds > 0 and math.isfinite(seconds)) or num < 1:
        raise PriorsError(f"--seconds must be positive and --num at least 1 (got {seconds}, {num})")
    if hop_fraction is not None and not 0 < hop_fraction <= 1:
        raise PriorsError(f"--hop-fraction must be in (0, 1], got {hop_fraction}")
    if hop_fraction is not None and not upsample:
        raise PriorsError("--hop-fraction sets how the upsamplers sample, and --no-upsample skips them")
    t0 = time.perf_counter()
    priors = load_priors(priors_dir, device)
    if not upsample:
        priors = replace(priors, levels=priors.levels[:1])
    codec = priors.codec
    top_model = priors.levels[0].cfg.model
    try:
        check_conditioning(top_model.condition, top_model.labels, composer, False, guidance, seconds)
    except ValueError as e:
        raise PriorsError(f"{priors_dir}: the top prior ({priors.levels[0].run}): {e}") from None
    label = resolve_label(top_model.labels, composer) if composer else 0
    sr, K = codec.cfg.sample_rate, codec.cfg.codebooks
    if prompt is not None:
        codes, prompt_audio = read_prompt(codec, prompt)
    else:
        codes, prompt_audio = (
            [np.zeros((K, 0), np.int64) for _ in range(codec.levels)],
            np.zeros(0, np.float32),
        )
    for lv in priors.levels:
        if refill is not None and refill > lv.cfg.model.num_latents:
            raise PriorsError(
                f"--refill must be at most level {lv.level}'s num_latents ({lv.cfg.model.num_latents})"
            )
    top_hop = codec.model.hops[-1]
    new_top = math.ceil(seconds * sr / top_hop)
    sampling = sampling or SamplingConfig(keyboard=False)
    per_row = [[c] * num for c in codes]  # level -> row -> codes [K, T]
    told = _length_told(priors.levels[0], codes, new_top)
    top_conditions = None  # what a conditioned top prior is told; start_seconds per window
    if top_model.condition:
        tc = priors.levels[0].cfg.codes
        top_conditions = Conditions(
            label=label,
            total_seconds=told or 0.0,
            guidance=guidance,
            id_seconds=frame_steps(tc.codebooks, tc.cardinality, top_model.vocab_size) / tc.frame_rate,
        )
    level_seconds: dict[int, float] = {}
    upper = None
    for lv in priors.levels:
        new_frames = new_top * top_hop // codec.model.hops[lv.level]
        start = time.perf_counter()
        per_row[lv.level] = _sample_level(
            lv, codes[lv.level], new_frames, num, upper, sampling, seed + lv.level, use_cache, refill, precision,
            progress, seconds, device, hop_fraction if lv.level < codec.levels - 1 else None,
            top_conditions if lv is priors.levels[0] else None,
        )  # fmt: skip
        level_seconds[lv.level] = time.perf_counter() - start
        upper = torch.as_tensor(np.stack([c[0] for c in per_row[lv.level]]), device=device)

    bottom = priors.levels[-1].level
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = len(prompt_audio)
    total = keep + int(round(seconds * sr))
    audio_files, codes_files, images = [], [], []
    sampled = [lv.level for lv in priors.levels]
    for i in range(num):
        decoded = codec.decode_array(per_row[bottom][i], bottom)
        audio = np.concatenate([prompt_audio, decoded[keep:total]])  # the prompt sample for sample
        path = write_audio(out / f"sample_{i:02d}.wav", audio, sr)
        audio_files.append(path)
        level_codes = {lv: per_row[lv][i] for lv in sampled}
        codes_files.append(
            codec.save_codes(out / f"sample_{i:02d}.codes.npz", level_codes, len(audio), "generated")
        )
        if png:
            from perceiver_music.audio.evaluate import spectrogram_png

            image = out / f"sample_{i:02d}.png"
            title = f"{path.name}: level {bottom}" + (
                f", prompt {Path(prompt).name} up to the line" if prompt else ""
            )
            spectrogram_png(
                image, title, audio, [], sr, boundary=keep / sr if prompt else None, label="generated"
            )
            images.append(image)
    elapsed = time.perf_counter() - t0
    result = AudioGenerateResult(
        out, audio_files, codes_files, images, bottom, keep / sr, seconds, level_seconds, elapsed
    )
    settings = {
        "priors": str(priors_dir),
        "codec": codec.digest,
        "levels": {lv.level: str(lv.run) for lv in priors.levels},
        "decoded_level": bottom,
        "prompt": None if prompt is None else str(prompt),
        "prompt_seconds": round(keep / sr, 4),
        "seconds": seconds,
        "total_seconds_told": told,
        "composer": composer,
        "guidance": guidance,
        "num": num,
        "sampling": asdict(sampling),
        "seed": seed,
        "cache": use_cache,
        "refill": refill,
        "hop_fraction": hop_fraction,
        "upsampled": len(priors.levels) > 1,
        "precision": precision,
        "device": str(device),
        "files": [p.name for p in audio_files],
        "level_wall_seconds": {k: round(v, 3) for k, v in level_seconds.items()},
        "wall_seconds": round(elapsed, 3),
        "audio_seconds_per_second": round(result.speed, 4),
    }
    (out / "generate.json").write_text(json.dumps(settings, indent=1))
    return result


def _length_told(top: Level, prompt_codes: list[np.ndarray], new_frames: int) -> float | None:
    """The whole length (prompt and continuation) a timing-conditioned top prior is told."""
    if not top.cfg.model.conditioned_on("timing"):
        return None
    return round((prompt_codes[top.level].shape[1] + new_frames) / top.cfg.codes.frame_rate, 4)


def _sample_level(
    lv: Level, prompt_codes, new_frames, num, upper, sampling, seed, use_cache, refill, precision, progress,
    seconds, device, hop_fraction=None, conditions=None,
) -> list[np.ndarray]:  # fmt: skip
    """Each row's codes [K, prompt + new_frames] of one level: the prompt's codes continued
    (a conditioned prior under `conditions`, each window told the time before its context).

    One sample.generate call slides exactly past the context; with `hop_fraction` (upsamplers,
    as Jukebox samples them) the level is sampled in windows instead, each a fresh stream whose
    context is the last (1 - hop_fraction) x max_len ids, adding hop_fraction x max_len."""
    codes_cfg, model, max_len = lv.cfg.codes, lv.model, lv.cfg.model.max_len
    K, C = codes_cfg.codebooks, codes_cfg.cardinality
    ids = torch.as_tensor(np.concatenate([[BOS], ids_of(prompt_codes, C)]), device=device).expand(num, -1)
    total = ids.shape[1] + new_frames * K
    hop = total if hop_fraction is None or upper is None else max(1, int(hop_fraction * max_len))
    step = 1.0 / (codes_cfg.frame_rate * K)  # seconds of audio per id
    bar = progress_bar(total=round(seconds, 2), desc=f"level {lv.level}", unit="s", enabled=progress)
    window = 0
    while ids.shape[1] < total:
        # The context: the last max_len ids (max_len - hop between windows); frame 0 starts at
        # position 1 of the whole stream, so at 1 - dropped in this one's.
        keep = max_len if window == 0 else max(1, max_len - hop)
        dropped = max(0, ids.shape[1] - keep)
        context, frame0 = ids[:, dropped:].clone(), 1 - dropped
        n = min(total - ids.shape[1], hop if window else max(hop, max_len - context.shape[1]))
        mask = CodebookMask(codes_cfg, lv.cfg.model.vocab_size, context.shape[1], frame0)
        told = None
        if conditions is not None:  # the codes dropped before this context came first
            before = float(conditions.id_seconds[ids[0, :dropped].cpu().numpy()].sum())
            told = replace(conditions, start_seconds=before)
        conditioned = (
            model.conditioned(upper, frame0_position=frame0)
            if upper is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), conditioned:
            rows = generate(
                model,
                context,
                n,
                sampling,
                seed=seed + window,
                use_cache=use_cache,
                refill=refill,
                stop_at_eos=False,
                on_token=lambda _: bar.update(min(step, max(0.0, bar.total - bar.n))),
                precision=precision,
                logits_mask=mask,
                conditions=told,
            )
        ids = torch.cat([ids, torch.stack([r[context.shape[1] :] for r in rows])], dim=1)
        window += 1
    bar.finish()
    new = ids[:, 1 + prompt_codes.shape[1] * K :].cpu().numpy()
    return [np.concatenate([prompt_codes, codes_of(row, K, C)], axis=1) for row in new]


def priors_likelihood(
    priors_dir: str | os.PathLike,
    codes_dir: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    **kwargs,
) -> list[dict]:
    """NLL of every level of a PRIORS_DIR on CODES_DIR/level<L> (from `prepare-codes` with its
    codec): likelihood.* per level in OUT_DIR/level<L>/, and levels.json / levels.md with nats
    and bits per code and bits per second of audio. kwargs go to evaluate_likelihood."""
    from perceiver_music.audio.codes import level_dir
    from perceiver_music.evaluate.likelihood import evaluate_likelihood, write_likelihood
    from perceiver_music.files import atomic_write_text

    priors = load_priors(priors_dir)
    out = Path(out_dir)
    rows = []
    for lv in priors.levels:
        data = level_dir(codes_dir, lv.level)
        if not (data / f"{split}.npy").is_file():
            raise PriorsError(
                f"{data}: no {split} split of level {lv.level} (run prepare-codes with this codec)"
            )
        result = evaluate_likelihood(lv.run, data, split, **kwargs)
        stride = kwargs.get("stride") or "num_latents"
        write_likelihood(
            result,
            out / f"level{lv.level}",
            {"checkpoint": str(lv.run), "data": str(data), "split": split, "stride": stride},
        )
        ids_per_second = lv.cfg.codes.frame_rate * lv.cfg.codes.codebooks
        rows.append(
            {
                "level": lv.level,
                "run": str(lv.run),
                "codes": result.tokens,
                "nats_per_code": result.nats_per_token,
                "bits_per_code": result.bits_per_token,
                "bits_per_second": result.bits_per_token * ids_per_second,
            }
        )
    atomic_write_text(
        out / "levels.json",
        json.dumps(
            {"priors": str(priors_dir), "data": str(codes_dir), "split": split, "levels": rows}, indent=1
        ),
    )
    lines = [
        f"# NLL per level: {priors_dir} on {codes_dir} ({split})",
        "",
        "| level | run | codes | nats/code | bits/code | bits/s of audio |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['level']} | {r['run']} | {r['codes']:,} | {r['nats_per_code']:.4f} | {r['bits_per_code']:.4f} | {r['bits_per_second']:,.0f} |"
        for r in rows
    ]
    atomic_write_text(out / "levels.md", "\n".join(lines) + "\n")
    return rows
