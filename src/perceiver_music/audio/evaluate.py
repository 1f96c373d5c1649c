"""Codec evaluation on a prepared split: each level's reconstructions against the originals.

    perceiver-music evaluate --codec RUN --data DATA_DIR --split test --out OUT_DIR

Clips of `clip_seconds` are cut from the split's files (at most `clips`, spread over the files,
silent ones left out),
encoded and decoded at every level, and measured: spectral convergence (dB, Jukebox), the
multi-scale mel distance (DAC), SI-SDR (dB), the codebooks' usage over all clips (perplexity,
share of codes used) and the bitrate. Writes codec_eval.json, codec_eval.md and spectrogram
PNGs of a few clips (original above each level's reconstruction).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from perceiver_music.audio.codec import CodecRun
from perceiver_music.audio.data import AudioData
from perceiver_music.audio.metrics import (
    bitrate,
    codebook_usage,
    mel_distance,
    si_sdr,
    spectral_convergence_db,
)
from perceiver_music.files import atomic_write_text


def clip_starts(data: AudioData, clips: int, length: int) -> list[tuple[int, int]]:
    """(file, start) of up to `clips` clips of `length` samples, spread evenly over the files
    and, within each, over its length (a file shorter than a clip gives one, zero-padded)."""
    lengths = data.index[:, 1] if len(data) else np.zeros(0, np.int64)
    per_file = [max(1, int(n) // length) for n in lengths]
    total = sum(per_file)
    if total == 0:
        return []
    picks = np.unique(np.linspace(0, total - 1, min(clips, total)).astype(int))
    bounds = np.cumsum([0, *per_file])
    out = []
    for p in picks.tolist():
        f = int(np.searchsorted(bounds, p, side="right") - 1)
        out.append((f, (p - int(bounds[f])) * length))
    return out


SILENCE = 10 ** (-50 / 20)  # clips whose peak is below -50 dBFS are not measured


def audible_clips(data: AudioData, clips: int, length: int) -> list[tuple[int, int, np.ndarray]]:
    """(file, start, samples) of up to `clips` clips that are not silent (spectral convergence
    divides by the original's energy), chosen evenly from twice as many candidates."""
    found = []
    for f, start in clip_starts(data, 2 * clips, length):
        x = np.zeros(length, np.float32)
        clip = data.clip(f, start, length)
        x[: len(clip)] = clip
        if np.abs(x).max() > SILENCE:
            found.append((f, start, x))
    keep = np.unique(np.linspace(0, len(found) - 1, min(clips, len(found))).astype(int)) if found else []
    return [found[i] for i in keep]


def signal_metrics(x: np.ndarray, y: np.ndarray, sample_rate: int) -> dict[str, float]:
    """Spectral convergence (dB), mel distance and SI-SDR (dB) of reconstruction y of x."""
    n = min(len(x), len(y))
    tx, ty = torch.from_numpy(x[:n])[None].float(), torch.from_numpy(y[:n])[None].float()
    return {
        "spectral_convergence_db": float(spectral_convergence_db(tx, ty)[0]),
        "mel_distance": float(mel_distance(tx, ty, sample_rate)[0]),
        "si_sdr_db": float(si_sdr(tx, ty)[0]),
    }


def evaluate_codec(
    run: str | os.PathLike | CodecRun,
    data_dir: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    clips: int = 32,
    clip_seconds: float = 5.0,
    plots: int = 3,
    progress: bool = False,
    labels: dict | None = None,
) -> dict:
    """The figures per level (and the per-clip rows); written to out_dir when given."""
    codec = run if isinstance(run, CodecRun) else CodecRun.load(run)
    data = AudioData(data_dir, split)
    if data.sample_rate != codec.cfg.sample_rate:
        raise ValueError(
            f"{data_dir}: audio at {data.sample_rate} Hz, the codec works at {codec.cfg.sample_rate} Hz "
            f"(prepare-audio --sample-rate {codec.cfg.sample_rate})"
        )
    length = int(clip_seconds * codec.cfg.sample_rate)
    starts = audible_clips(data, clips, length)
    if not starts:
        raise ValueError(f"{data_dir}: the {split} split has no audio (or only silence)")
    sr = codec.cfg.sample_rate
    rows: list[dict] = []
    codes_seen: list[list[np.ndarray]] = [[] for _ in range(codec.levels)]
    examples = []
    t0 = time.perf_counter()
    items = starts
    if progress:
        from tqdm import tqdm

        items = tqdm(starts, desc="evaluate", unit="clip", dynamic_ncols=True)
    for i, (f, start, x) in enumerate(items):
        codes = codec.encode_array(x)
        recon = []
        for level, c in enumerate(codes):
            y = codec.decode_array(c, level)[:length]
            codes_seen[level].append(c)
            rows.append(
                {
                    "clip": i,
                    "file": data.paths[f],
                    "start_s": round(start / sr, 2),
                    "level": level,
                    **signal_metrics(x, y, sr),
                }
            )
            recon.append(y)
        if i < plots:
            examples.append((f"{data.paths[f]} at {start / sr:.1f} s", x, recon))
    elapsed = time.perf_counter() - t0

    levels = []
    for level, hop in enumerate(codec.model.hops):
        mine = [r for r in rows if r["level"] == level]
        all_codes = np.concatenate(codes_seen[level], 1)  # [K, frames]
        usage = [codebook_usage(all_codes[k], codec.cfg.l_bins) for k in range(all_codes.shape[0])]
        levels.append(
            {
                "level": level,
                "hop": hop,
                "frame_rate": sr / hop,
                "bitrate_bps": bitrate(sr / hop, codec.cfg.codebooks, codec.cfg.l_bins),
                **{
                    k: float(np.mean([r[k] for r in mine]))
                    for k in ("spectral_convergence_db", "mel_distance", "si_sdr_db")
                },
                "perplexity": float(np.mean([u["perplexity"] for u in usage])),
                "share_used": float(np.mean([u["share_used"] for u in usage])),
            }
        )
    result = {
        **(labels or {}),
        "split": split,
        "clips": len(starts),
        "clip_seconds": clip_seconds,
        "sample_rate": sr,
        "l_bins": codec.cfg.l_bins,
        "codebooks": codec.cfg.codebooks,
        "seconds_coded": round(len(starts) * clip_seconds, 1),
        "elapsed_s": round(elapsed, 2),
        "levels": levels,
        "per_clip": rows,
    }
    if out_dir is not None:
        write_codec_eval(result, examples, Path(out_dir), sr)
    return result


def write_codec_eval(result: dict, examples: list, out: Path, sample_rate: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "codec_eval.json", json.dumps(result, indent=1))
    lines = [
        f"# Codec evaluation: {result.get('codec', '')} on {result.get('data', '')} ({result['split']})",
        "",
        f"{result['clips']} clips of {result['clip_seconds']:g} s at {sample_rate} Hz. Spectral convergence: "
        "lower is better (-20 dB: the spectral error is a tenth of the signal); mel distance: DAC's "
        "multi-scale log-mel L1, lower is better; SI-SDR: higher is better.",
        "",
        "| level | hop | frames/s | kbps | spectral conv. (dB) | mel distance | SI-SDR (dB) | perplexity | codes used |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in result["levels"]:
        lines.append(
            f"| {lv['level']} | {lv['hop']} | {lv['frame_rate']:.0f} | {lv['bitrate_bps'] / 1000:.1f} | "
            f"{lv['spectral_convergence_db']:.2f} | {lv['mel_distance']:.3f} | {lv['si_sdr_db']:.2f} | "
            f"{lv['perplexity']:.1f} | {100 * lv['share_used']:.0f}% |"
        )
    atomic_write_text(out / "codec_eval.md", "\n".join(lines) + "\n")
    for i, (title, x, recon) in enumerate(examples):
        spectrogram_png(out / "plots" / f"clip{i}.png", title, x, recon, sample_rate)


def spectrogram_png(
    path: Path,
    title: str,
    x: np.ndarray,
    recon: list[np.ndarray],
    sample_rate: int,
    boundary: float | None = None,
    label: str = "original",
) -> None:
    """Log-magnitude spectrograms: the original (named `label`), then each level's
    reconstruction; `boundary` (seconds) draws a line, e.g. where a prompt ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import stft

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(label, x)] + [(f"level {lv}", y) for lv, y in enumerate(recon)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.2 * len(rows)), dpi=100, sharex=True)
    for ax, (name, sig) in zip(np.atleast_1d(axes), rows):
        f, t, z = stft(sig, sample_rate, nperseg=1024, noverlap=768)
        ax.pcolormesh(
            t, f / 1000, 20 * np.log10(np.abs(z) + 1e-6), vmin=-100, vmax=-10, shading="auto", cmap="magma"
        )
        ax.set_ylabel(f"{name}\nkHz")
        if boundary is not None:
            ax.axvline(boundary, color="cyan", lw=1.2)
    np.atleast_1d(axes)[-1].set_xlabel("seconds")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
