"""Speed of audio generation at the recipe's sizes: vqvae_tiny, a prior_tiny top prior and an
upsampler_tiny for level 0, untrained (the cost of a token does not depend on the weights), or
a trained PRIORS_DIR (`--priors bundled`: the bundled audio model).

    python bench/audio_generate_speed.py --seconds 3 --threads 1 [--out bench/out/audio_speed.json]
    python bench/audio_generate_speed.py --priors bundled --seconds 20 --threads 2

Prints and writes the wall time of each level and of decoding, and the speed in seconds of
audio per second of wall time (Jukebox's README: about 3 hours per 20 s on a V100). On a CPU
shared with other work, one thread can be much faster than two (measured: 6x).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from perceiver_music.audio.codes import FIRST_CODE, strides_between
from perceiver_music.audio.generate import generate_audio, write_priors
from perceiver_music.audio.vqvae import VQVAE
from perceiver_music.checkpoint import bundled_audio, save_best
from perceiver_music.config import load_config
from perceiver_music.model import build_model


def build_priors(root: Path) -> Path:
    """A PRIORS_DIR of untrained runs at the shipped tiny sizes."""
    codec_cfg = load_config("vqvae_tiny")
    for name in ("codec", "top", "up0"):
        (root / name).mkdir(parents=True)
    save_best(root / "codec", VQVAE(codec_cfg.codec), codec_cfg, {"step": 0})
    digest = hashlib.sha1((root / "codec" / "best" / "model.safetensors").read_bytes()).hexdigest()[:16]
    c = codec_cfg.codec
    for name, config, level in (("top", "prior_tiny", c.levels - 1), ("up0", "upsampler_tiny", 0)):
        cfg = load_config(config)
        cfg.codes.codec, cfg.codes.level, cfg.codes.cardinality = digest, level, c.l_bins
        cfg.codes.frame_rate = c.sample_rate / c.hop_lengths()[level]
        if level < c.levels - 1:
            cfg.codes.upper_cardinality, cfg.codes.upper_strides = c.l_bins, strides_between(c, level)
        assert cfg.model.vocab_size == FIRST_CODE + c.l_bins
        save_best(root / name, build_model(cfg.model, cfg.codes), cfg, {"step": 0})
    write_priors(root / "priors", "../codec", "../top", {0: "../up0"})
    return root / "priors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--priors", help="a PRIORS_DIR, or 'bundled' (default: untrained, at the tiny sizes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.priors == "bundled":
            priors = bundled_audio()
        else:
            priors = Path(args.priors) if args.priors else build_priors(Path(tmp))
        t0 = time.perf_counter()
        result = generate_audio(
            priors, Path(tmp) / "gen", args.seconds, seed=args.seed, progress=False, png=False
        )
        wall = time.perf_counter() - t0
    row = {
        "priors": str(priors) if args.priors else "untrained, tiny sizes",
        "seconds_of_audio": args.seconds,
        "threads": args.threads,
        "wall_s": round(wall, 2),
        "level_wall_s": {k: round(v, 2) for k, v in result.level_seconds.items()},
        "decode_and_write_s": round(wall - sum(result.level_seconds.values()), 2),
        "audio_seconds_per_second": round(args.seconds / wall, 4),
        "projected_20s_wall_s": round(wall * 20 / args.seconds, 1),
    }
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
