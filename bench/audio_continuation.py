"""Does an audio continuation follow its prompt? For held-out recordings: --prompt-seconds of
each (from --start on) as the prompt, continued for --seconds by a PRIORS_DIR; the same length
generated without a prompt (same seed) is the baseline. Both are compared with what the
recording really plays next: by the pitch-class profile (chroma, cosine similarity; 1 is the
same profile) and the mean log-mel spectrum (mean absolute difference in dB; register and
loudness). A continuation that follows its prompt is nearer the truth than the baseline; the
prompt's own last --seconds against the truth is the ceiling of "the same music goes on".
Each is also transcribed (basic-pitch, as `perceiver-music transcribe`): the notes it plays, where
the truth's own count says how many a piano continuation would.

    python bench/audio_continuation.py --priors bundled --data data/asap_audio/data \\
        --splits test valid --out bench/out/audio_continuation.json

Needs librosa (the `transcribe` extra).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from perceiver_music.audio.data import AudioData, read_audio, write_audio
from perceiver_music.audio.generate import generate_audio
from perceiver_music.audio.transcribe import Transcriber
from perceiver_music.checkpoint import bundled_audio


def features(audio: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(pitch-class profile [12], unit length; mean log-mel spectrum [64] in dB)."""
    import librosa

    chroma = librosa.feature.chroma_stft(y=audio, sr=sr, n_fft=2048, hop_length=512).mean(1)
    mel = librosa.feature.melspectrogram(y=audio, sr=sr, n_fft=2048, hop_length=512, n_mels=64)
    return chroma / max(np.linalg.norm(chroma), 1e-9), librosa.power_to_db(mel + 1e-10).mean(1)


def compare(a: np.ndarray, b: np.ndarray, sr: int) -> dict[str, float]:
    (ca, ma), (cb, mb) = features(a, sr), features(b, sr)
    return {"chroma_cosine": float(ca @ cb), "mel_db_distance": float(np.abs(ma - mb).mean())}


def held_out_clips(
    data_dir: Path, splits: list[str], files: int, start: float, prompt: float, seconds: float
):
    """(name, sample rate, clip, prompt samples) for up to `files` recordings of the splits long
    enough for `prompt` + `seconds` from `start` on."""
    found = 0
    for split in splits:
        data = AudioData(data_dir, split)
        sr = data.sample_rate
        begin, p, n = (int(round(x * sr)) for x in (start, prompt, seconds))
        for i in range(len(data)):
            if found == files:
                return
            clip = data.clip(i, begin, p + n)
            if len(clip) < p + n:
                continue  # too short for a prompt and its truth
            found += 1
            yield f"{split}/{data.paths[i]}", sr, clip, p


def clip_arguments(description: str, files: int, prompt: float, seconds: float) -> argparse.ArgumentParser:
    """The options of a bench over held-out clips (held_out_clips) of a PRIORS_DIR's audio."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--priors", default="bundled", help="a PRIORS_DIR, or 'bundled'")
    parser.add_argument("--data", type=Path, required=True, help="a prepare-audio folder")
    parser.add_argument("--splits", nargs="+", default=["test"])
    parser.add_argument("--files", type=int, default=files, help="at most this many recordings")
    parser.add_argument("--start", type=float, default=5.0, help="where the clip starts (s)")
    parser.add_argument("--prompt-seconds", type=float, default=prompt, help="given first (s)")
    parser.add_argument("--seconds", type=float, default=seconds, help="generated, and compared (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    return parser


def main() -> None:
    args = clip_arguments(__doc__.split("\n")[0], files=4, prompt=5.0, seconds=5.0).parse_args()
    priors = bundled_audio() if args.priors == "bundled" else Path(args.priors)
    rows = []
    transcriber = Transcriber()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = held_out_clips(
            args.data, args.splits, args.files, args.start, args.prompt_seconds, args.seconds
        )
        for file, sr, audio, p in clips:
            prompt, truth = audio[:p], audio[p:]
            wav = write_audio(tmp / f"prompt{len(rows)}.wav", prompt, sr)
            kept = read_audio(wav, sr)  # the prompt as written (16-bit), kept sample for sample
            runs = {}
            for name, given in (("continued", wav), ("unprompted", None)):
                result = generate_audio(
                    priors, tmp / f"{name}{len(rows)}", args.seconds, prompt=given, seed=args.seed,
                    progress=False, png=False,
                )  # fmt: skip
                runs[name] = read_audio(result.audio_files[0], sr)[len(kept) if given else 0 :]
            row = {
                "file": file,
                "prompt_kept_exactly": bool(
                    np.array_equal(
                        read_audio(tmp / f"continued{len(rows)}" / "sample_00.wav", sr)[: len(kept)], kept
                    )
                ),
                "continued": compare(runs["continued"], truth, sr),
                "unprompted": compare(runs["unprompted"], truth, sr),
                "prompt_itself": compare(kept[-len(truth) :], truth, sr),
            }
            row["notes"] = {
                name: transcriber(
                    write_audio(tmp / f"{name}{len(rows)}.wav", audio, sr), tmp / "notes.mid"
                ).notes
                for name, audio in (
                    ("continued", runs["continued"]),
                    ("unprompted", runs["unprompted"]),
                    ("truth", truth),
                )
            }
            rows.append(row)
            print(json.dumps(row))
    summary = {
        name: {
            k: round(float(np.mean([r[name][k] for r in rows])), 4)
            for k in ("chroma_cosine", "mel_db_distance")
        }
        for name in ("continued", "unprompted", "prompt_itself")
    }
    report = {
        "priors": str(priors),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "priors", "data")},
        "data": str(args.data),
        "recordings": len(rows),
        "mean": summary,
        "rows": rows,
    }
    summary["notes"] = {
        k: int(sum(r["notes"][k] for r in rows)) for k in ("continued", "unprompted", "truth")
    }
    print(json.dumps({"recordings": len(rows), "mean": summary}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
