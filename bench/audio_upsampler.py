"""Is the upsampler the limit? For held-out recordings, the bottom level sampled by a PRIORS_DIR's
upsamplers given the recording's *true* top-level codes (after --prompt-seconds of the true
bottom codes as context), decoded, and heard as basic-pitch hears it: its notes and how near it is
to the recording (pitch-class cosine, mean log-mel dB; bench/audio_continuation.py's measures).
Beside it: the recording, its true bottom-level codes decoded (the codec's ceiling) and its top
level decoded alone (what a PRIORS_DIR without upsamplers would play from perfect top codes).

    python bench/audio_upsampler.py --priors bundled --data data/asap_audio/data --splits test valid \\
        --out bench/out/audio_upsampler.json

Needs librosa and basic-pitch (the `transcribe` extra).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from audio_continuation import clip_arguments, compare, held_out_clips
from perceiver_music.audio.data import write_audio
from perceiver_music.audio.generate import _sample_level, load_priors, read_prompt
from perceiver_music.audio.transcribe import Transcriber
from perceiver_music.checkpoint import bundled_audio
from perceiver_music.sample import SamplingConfig

KINDS = ("truth", "true bottom codes", "top level alone", "upsampled from the true top")


def main(argv: list[str] | None = None) -> None:
    parser = clip_arguments(__doc__.split("\n")[0], files=3, prompt=1.0, seconds=4.0)
    parser.add_argument("--temperature", type=float, default=1.0, help="the upsamplers' sampling temperature")
    args = parser.parse_args(argv)
    priors = load_priors(bundled_audio() if args.priors == "bundled" else Path(args.priors))
    codec, top = priors.codec, priors.levels[0].level
    if len(priors.levels) < 2:
        raise SystemExit(f"{args.priors}: no upsampler to measure")
    transcriber, rows = Transcriber(), []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = held_out_clips(
            args.data, args.splits, args.files, args.start, args.prompt_seconds, args.seconds
        )
        for file, sr, clip, p in clips:
            n = len(clip) - p
            codes, _ = read_prompt(codec, write_audio(tmp / "clip.wav", clip, sr))
            upper = torch.as_tensor(codes[top][0:1], dtype=torch.long)  # [1, frames]
            for lv in priors.levels[1:]:  # each upsampler given the level above (true, then sampled)
                given = codes[lv.level].shape[1] * p // (p + n)
                sampling = SamplingConfig(temperature=args.temperature)
                sampled = _sample_level(
                    lv, codes[lv.level][:, :given], codes[lv.level].shape[1] - given, 1, upper, sampling,
                    args.seed + lv.level, True, None, "fp32", False, args.seconds, "cpu",
                )[0]  # fmt: skip
                upper = torch.as_tensor(sampled[0:1], dtype=torch.long)
            bottom = priors.levels[-1].level
            audio = {
                "truth": clip,
                "true bottom codes": codec.decode_array(codes[bottom], bottom),
                "top level alone": codec.decode_array(codes[top], top),
                "upsampled from the true top": codec.decode_array(sampled, bottom),
            }
            row = {"file": file}
            for kind in KINDS:
                heard = audio[kind][p : p + n]
                wav = write_audio(tmp / "heard.wav", heard, sr)
                row[kind] = {
                    "notes": transcriber(wav, tmp / "heard.mid").notes,
                    **compare(heard, clip[p:], sr),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        kind: {
            "notes": int(sum(r[kind]["notes"] for r in rows)),
            **{
                k: round(float(np.mean([r[kind][k] for r in rows])), 4)
                for k in ("chroma_cosine", "mel_db_distance")
            },
        }
        for kind in KINDS
    }
    print(json.dumps({"recordings": len(rows), "sum_and_mean": summary}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"priors": args.priors, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        args.out.write_text(json.dumps({**report, "sum_and_mean": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
