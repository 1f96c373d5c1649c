"""The tiny VQ-VAE against Opus and 8-bit mu-law, restarts on versus off, speed and memory.

One run, figures side by side in one JSON (bench/results/codec.json):

* the `vqvae_tiny` preset trained `--minutes` on this machine (or `--run` loaded), its training
  curve, and on held-out clips (the data's test split) each level's spectral convergence, mel
  distance, SI-SDR and codebook usage;
* on the same clips, Opus (opusenc --hard-cbr) at the bitrate nearest each level's that it
  offers (6 kbps and up), and 8-bit mu-law at each level's bitrate (the audio resampled to
  bitrate / 8 samples per second with soxr, companded, and resampled back);
* restarts on versus off, each trained `--ablation-minutes` from the same seed: codebook
  usage and spectral convergence;
* encoding and decoding speed in multiples of real time (torch threads 2), and the peak
  memory of `encode` on a 10-minute file (`--long-seconds`) against a 10-second one (it codes
  in chunks, so the two should be close).

Data: a folder made by `prepare-audio` at 22.05 kHz, e.g. ASAP rendered by
recipes/render_asap_audio.sh and prepared with --splits-from, so the test clips are ASAP's
test pieces.

    python bench/codec.py --data DATA_DIR [--minutes 30] [--ablation-minutes 10] [--run RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
THREADS = 2


def calibrate(data: Path, run: Path, minutes: float, extra: list[str]) -> int:
    """The steps vqvae_tiny takes in about `minutes` here, timed over steps 10-40 of a probe
    run with the main run's threads (start-up and the first steps' warm-up left out)."""
    from perceiver_music.config import load_config
    from perceiver_music.train import train

    probe = run.with_name(run.name + "_probe")
    shutil.rmtree(probe, ignore_errors=True)
    cfg = load_config(
        "vqvae_tiny",
        [
            *extra,
            "train.steps=40",
            "train.log_every=5",
            "train.eval_every=1000",
            "train.ckpt_every=1000",
            f"train.threads={THREADS}",
        ],
    )
    train(cfg, data, probe, progress=False)
    rows = [json.loads(line) for line in (probe / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(probe, ignore_errors=True)
    timed = {r["step"]: r["elapsed_s"] for r in rows if r["kind"] == "train"}
    per_step = (timed[40] - timed[10]) / 30
    # The main run also validates six times and writes checkpoints: about 5 % more.
    return max(2, int(minutes * 60 / (per_step * 1.05)))


def train_for(data: Path, run: Path, steps: int, extra: list[str]) -> dict:
    """Train vqvae_tiny for `steps` (its curve: six validations)."""
    from perceiver_music.config import load_config
    from perceiver_music.train import train

    every = max(1, steps // 6)
    cfg = load_config(
        "vqvae_tiny",
        [
            *extra,
            f"train.steps={steps}",
            f"train.eval_every={every}",
            f"train.ckpt_every={every}",
            f"train.threads={THREADS}",
        ],
    )
    t0 = time.perf_counter()
    result = train(cfg, data, run, progress=False)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {
        "steps": result.step,
        "wall_minutes": round(wall / 60, 2),
        "seconds_per_step": round(wall / max(result.step, 1), 3),
        "audio_seconds_seen": round(
            result.step * cfg.train.batch_size * cfg.codec.sample_length / cfg.codec.sample_rate
        ),
        "curve": [
            {
                k: r[k]
                for k in r
                if k in ("step", "kind", "loss", "val_loss", "val_sc_db", "usage")
                or k.startswith("val_sc_db_l")
            }
            for r in log
        ],
    }


def clips_of(data: Path, split: str, clips: int, seconds: float) -> tuple[list[np.ndarray], int]:
    from perceiver_music.audio.data import AudioData
    from perceiver_music.audio.evaluate import audible_clips

    d = AudioData(data, split)
    return [x for _, _, x in audible_clips(d, clips, int(seconds * d.sample_rate))], d.sample_rate


def opus_round_trip(x: np.ndarray, sr: int, kbps: float, work: Path) -> tuple[np.ndarray, float]:
    """Opus at `kbps` (constant bitrate), decoded and resampled back; and the file's bitrate."""
    import soundfile as sf
    import soxr

    wav, opus, back = work / "in.wav", work / "x.opus", work / "out.wav"
    sf.write(wav, x, sr, subtype="PCM_16")
    subprocess.run(
        ["opusenc", "--quiet", "--hard-cbr", "--bitrate", f"{kbps:g}", str(wav), str(opus)], check=True
    )
    subprocess.run(["opusdec", "--quiet", "--rate", "48000", str(opus), str(back)], check=True)
    y, rate = sf.read(back, dtype="float32")
    y = soxr.resample(y, rate, sr) if rate != sr else y
    out = np.zeros_like(x)
    out[: min(len(x), len(y))] = y[: len(x)]
    return out, os.path.getsize(opus) * 8 / (len(x) / sr)


def mulaw_round_trip(x: np.ndarray, sr: int, bps: float) -> np.ndarray:
    """8-bit mu-law at `bps` bits per second: bps / 8 samples per second."""
    import soxr

    low = bps / 8
    y = soxr.resample(x, sr, low)
    mu = 255.0
    q = np.round((np.sign(y) * np.log1p(mu * np.minimum(np.abs(y), 1.0)) / np.log1p(mu) + 1) / 2 * mu)
    z = 2 * q / mu - 1
    y = np.sign(z) * ((1 + mu) ** np.abs(z) - 1) / mu
    back = soxr.resample(y.astype(np.float32), low, sr)
    out = np.zeros_like(x)
    out[: min(len(x), len(back))] = back[: len(x)]
    return out


def mean_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], sr: int) -> dict:
    from perceiver_music.audio.evaluate import signal_metrics

    rows = [signal_metrics(x, y, sr) for x, y in pairs]
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


def ours_on_clips(run: Path, clips: list[np.ndarray]) -> tuple[dict, list[dict]]:
    import torch

    from perceiver_music.audio.codec import CodecRun
    from perceiver_music.audio.metrics import bitrate, codebook_usage

    torch.set_num_threads(THREADS)
    codec = CodecRun.load(run)
    sr = codec.cfg.sample_rate
    levels = []
    coded = [codec.encode_array(x) for x in clips]
    for level, hop in enumerate(codec.model.hops):
        pairs = [(x, codec.decode_array(c[level], level)[: len(x)]) for x, c in zip(clips, coded)]
        codes = np.concatenate([c[level] for c in coded], 1)
        usage = codebook_usage(codes[0], codec.cfg.l_bins)
        levels.append(
            {
                "level": level,
                "hop": hop,
                "bitrate_bps": round(bitrate(sr / hop, codec.cfg.codebooks, codec.cfg.l_bins), 1),
                **mean_metrics(pairs, sr),
                "perplexity": round(usage["perplexity"], 2),
                "share_used": round(usage["share_used"], 4),
            }
        )
    return {"sample_rate": sr, "levels": levels}, levels


def speed(run: Path, clip: np.ndarray) -> dict:
    """Encode (every level) and decode (each level) of one clip, in multiples of real time."""
    import torch

    from perceiver_music.audio.codec import CodecRun

    torch.set_num_threads(THREADS)
    codec = CodecRun.load(run)
    seconds = len(clip) / codec.cfg.sample_rate
    codec.encode_array(clip[: codec.cfg.sample_rate])  # warm-up
    t0 = time.perf_counter()
    codes = codec.encode_array(clip)
    enc = time.perf_counter() - t0
    out = {"audio_seconds": round(seconds, 1), "encode_all_levels_x_realtime": round(seconds / enc, 1)}
    for level in range(codec.levels):
        t0 = time.perf_counter()
        codec.decode_array(codes[level], level)
        out[f"decode_level{level}_x_realtime"] = round(seconds / (time.perf_counter() - t0), 1)
    return out


def peak_memory(run: Path, wav: Path) -> dict:
    """Peak resident memory (MiB) of `perceiver-music encode` on one file, in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import resource, sys, time, torch; torch.set_num_threads(2); from perceiver_music.cli import main; "
            f"t = time.perf_counter(); rc = main(['encode', '--codec', {str(run)!r}, {str(wav)!r}, '--out', {out!r}]); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall, rss_kib = proc.stdout.split()[-2:]
    return {"peak_rss_mib": round(int(rss_kib) / 1024, 1), "wall_s": round(float(wall), 2)}


def long_file(path: Path, clips: list[np.ndarray], sr: int, seconds: float) -> Path:
    """`seconds` of audio written block by block (test clips looped)."""
    import soundfile as sf

    block = np.concatenate(clips)
    with sf.SoundFile(str(path), "w", sr, 1, subtype="PCM_16") as f:
        left = int(seconds * sr)
        while left > 0:
            f.write(block[:left])
            left -= min(left, len(block))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepare-audio folder at 22.05 kHz")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time of the main run")
    parser.add_argument(
        "--ablation-minutes", type=float, default=10.0, help="training time of each restarts run"
    )
    parser.add_argument("--run", type=Path, help="measure this trained run instead of training one")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--long-seconds", type=float, default=600.0, help="the long file of the memory test")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "codec.json")
    args = parser.parse_args()
    if shutil.which("opusenc") is None or shutil.which("opusdec") is None:
        sys.exit(
            "bench/codec.py: opusenc/opusdec not found (apt-get install opus-tools, or scripts/setup.sh)"
        )

    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    clips, sr = clips_of(args.data, args.split, args.clips, args.clip_seconds)
    if not clips:
        sys.exit(f"bench/codec.py: {args.data} has no {args.split} audio")
    result: dict = {
        "benchmark": "codec",
        "data": str(args.data),
        "split": args.split,
        "clips": len(clips),
        "clip_seconds": args.clip_seconds,
    }

    if args.run is None:
        print(f"training vqvae_tiny for {args.minutes:g} minutes ...", flush=True)
        steps = calibrate(args.data, work / "tiny", args.minutes, [])
        result["training"] = train_for(args.data, work / "tiny", steps, [])
        run = work / "tiny"
    else:
        run = args.run
        result["training"] = {"loaded": str(run)}
    ours, levels = ours_on_clips(run, clips)
    result["ours"] = ours

    opus_dir = work / "opus"
    opus_dir.mkdir(exist_ok=True)
    result["opus"], result["mulaw"] = [], []
    for lv in levels:
        kbps = max(6.0, round(lv["bitrate_bps"] / 1000, 1))
        pairs, rates = [], []
        for x in clips:
            y, rate = opus_round_trip(x, sr, kbps, opus_dir)
            pairs.append((x, y))
            rates.append(rate)
        result["opus"].append(
            {
                "for_level": lv["level"],
                "kbps_asked": kbps,
                "kbps_file": round(float(np.mean(rates)) / 1000, 2),
                **mean_metrics(pairs, sr),
            }
        )
        mu = [(x, mulaw_round_trip(x, sr, lv["bitrate_bps"])) for x in clips]
        result["mulaw"].append(
            {
                "for_level": lv["level"],
                "bitrate_bps": lv["bitrate_bps"],
                "sample_rate": round(lv["bitrate_bps"] / 8, 1),
                **mean_metrics(mu, sr),
            }
        )

    if args.ablation_minutes > 0:
        ablation = {}
        # The same number of steps for both, from one timing: the same budget.
        steps = calibrate(args.data, work / "restarts", args.ablation_minutes, [])
        for name, flag in (("restarts_on", "true"), ("restarts_off", "false")):
            print(
                f"training {name} for {steps} steps (about {args.ablation_minutes:g} minutes) ...", flush=True
            )
            r = train_for(args.data, work / name, steps, [f"codec.restarts={flag}"])
            measured, _ = ours_on_clips(work / name, clips)
            ablation[name] = {
                "steps": r["steps"],
                "curve_usage": [(row["step"], row["usage"]) for row in r["curve"] if row["kind"] == "valid"],
                "levels": [
                    {
                        k: lv[k]
                        for k in (
                            "level",
                            "spectral_convergence_db",
                            "mel_distance",
                            "perplexity",
                            "share_used",
                        )
                    }
                    for lv in measured["levels"]
                ],
            }
        result["restarts"] = ablation

    long_clip = np.concatenate(clips)[: int(60 * sr)]
    result["speed"] = {"threads": THREADS, **speed(run, long_clip)}
    short = long_file(work / "short.wav", clips, sr, 10.0)
    long = long_file(work / "long.wav", clips, sr, args.long_seconds)
    small, big = peak_memory(run, short), peak_memory(run, long)
    result["memory"] = {
        "encode_10s": small,
        f"encode_{args.long_seconds:g}s": big,
        "long_x_realtime": round(args.long_seconds / big["wall_s"], 1),
    }
    result["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':>14} {'kbps':>6} {'SC dB':>7} {'mel':>6} {'SI-SDR':>7} {'used':>5}")
    for lv, op, mu in zip(levels, result["opus"], result["mulaw"]):
        print(
            f"ours level {lv['level']:<3} {lv['bitrate_bps'] / 1000:>6.1f} {lv['spectral_convergence_db']:>7.2f} {lv['mel_distance']:>6.2f} {lv['si_sdr_db']:>7.2f} {100 * lv['share_used']:>4.0f}%"
        )
        print(
            f"{'opus':<14} {op['kbps_asked']:>6.1f} {op['spectral_convergence_db']:>7.2f} {op['mel_distance']:>6.2f} {op['si_sdr_db']:>7.2f}"
        )
        print(
            f"{'mu-law 8 bit':<14} {mu['bitrate_bps'] / 1000:>6.1f} {mu['spectral_convergence_db']:>7.2f} {mu['mel_distance']:>6.2f} {mu['si_sdr_db']:>7.2f}"
        )
    for name, r in result.get("restarts", {}).items():
        print(
            name,
            r["steps"],
            "steps:",
            [(lv["level"], lv["spectral_convergence_db"], lv["share_used"]) for lv in r["levels"]],
        )
    print("speed:", result["speed"], "memory:", result["memory"])
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
