"""How well `transcribe` hears piano: rendered ASAP audio back to the MIDI it was rendered from.

Generated audio is scored by transcribing it and running the metric suite on the notes
(recipes/audio_model.sh), so the transcriber's own errors are the floor of that measurement.
This measures them, in one run (bench/results/transcribe.json):

* note accuracy (mir_eval): onset-only precision/recall/F1 (50 ms) and F1 with offsets
  (offset within 20 % of the note or 50 ms), against the source MIDI's notes with the sustain
  pedal applied, as our tokenizer reads them;
* the metric suite (`evaluate --generated`) of the transcriptions against the source MIDI cut
  to the same length: how far transcription alone moves each metric's overlap area;
* speed in multiples of real time.

Data: a folder of audio rendered from MIDI (recipes/render_asap_audio.sh writes WAV/FLAC under
AUDIO_DIR and the MIDI it rendered under MIDI_DIR with the same relative paths).

    python bench/transcribe.py --audio data/asap_audio/wav --midi data/asap_audio/midi \
        [--files 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cut_audio(src: Path, dst: Path, seconds: float) -> float:
    import soundfile as sf

    info = sf.info(str(src))
    frames = min(info.frames, int(seconds * info.samplerate))
    x, sr = sf.read(str(src), frames=frames, dtype="float32")
    sf.write(str(dst), x, sr)
    return frames / sr


def cut_midi(src: Path, dst: Path, seconds: float) -> None:
    from symusic import Score

    Score(str(src), ttype="second").clip(0.0, seconds, clip_end=True).dump_midi(str(dst))


def note_arrays(tok, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Intervals [n, 2] in seconds and pitches in Hz, sustain applied (our tokenizer's reading)."""
    steps = tok.midi_to_notes(path)
    sps = tok.cfg.steps_per_second
    intervals = np.stack([steps.start / sps, np.maximum(steps.end, steps.start + 1) / sps], axis=1)
    return intervals.astype(float), 440.0 * 2.0 ** ((steps.pitch.astype(float) - 69) / 12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, required=True, help="rendered audio (WAV/FLAC), recursed")
    parser.add_argument("--midi", type=Path, required=True, help="the MIDI it was rendered from, same paths")
    parser.add_argument("--files", type=int, default=20, help="at most this many files, spread over the set")
    parser.add_argument("--seconds", type=float, default=30.0, help="the first S seconds of each")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transcribe.json")
    args = parser.parse_args()

    import mir_eval

    from perceiver_music.audio.data import find_audio
    from perceiver_music.audio.transcribe import Transcriber
    from perceiver_music.evaluate.sets import evaluate_sets
    from perceiver_music.tokens.performance import PerformanceTokenizer

    pairs = []
    for audio in find_audio(args.audio):
        midi = (args.midi / audio.relative_to(args.audio)).with_suffix(".mid")
        if midi.is_file():
            pairs.append((audio, midi))
    if len(pairs) < 2:
        raise SystemExit(
            f"bench/transcribe.py: fewer than 2 audio files under {args.audio} with MIDI under {args.midi}"
        )
    pick = np.unique(np.linspace(0, len(pairs) - 1, min(args.files, len(pairs))).round().astype(int))
    pairs = [pairs[i] for i in pick]

    tok = PerformanceTokenizer()
    t0 = time.perf_counter()
    transcriber = Transcriber()
    load_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="bench_transcribe_"))
    (work / "ref").mkdir()
    (work / "transcribed").mkdir()
    rows, audio_s, wall_s = [], 0.0, 0.0
    for i, (audio, midi) in enumerate(pairs):
        name = f"{i:02d}_{audio.stem}"
        clip = work / f"{name}.wav"
        audio_s_one = cut_audio(audio, clip, args.seconds)
        cut_midi(midi, work / "ref" / f"{name}.mid", audio_s_one)
        t0 = time.perf_counter()
        got = transcriber(clip, work / "transcribed" / f"{name}.mid")
        wall = time.perf_counter() - t0
        audio_s += audio_s_one
        wall_s += wall
        ref_i, ref_p = note_arrays(tok, work / "ref" / f"{name}.mid")
        est_i, est_p = note_arrays(tok, got.path)
        p, r, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
            ref_i, ref_p, est_i, est_p, offset_ratio=None
        )
        _, _, f_off, _ = mir_eval.transcription.precision_recall_f1_overlap(ref_i, ref_p, est_i, est_p)
        rows.append(
            {
                "file": str(audio.relative_to(args.audio)),
                "seconds": round(audio_s_one, 2),
                "ref_notes": len(ref_p),
                "transcribed_notes": len(est_p),
                "onset_precision": round(p, 4),
                "onset_recall": round(r, 4),
                "onset_f1": round(f, 4),
                "f1_with_offsets": round(f_off, 4),
                "x_real_time": round(audio_s_one / wall, 1),
            }
        )
        print(
            f"{rows[-1]['file']}: onset F1 {f:.3f}, with offsets {f_off:.3f}, {audio_s_one / wall:.0f}x real time",
            flush=True,
        )

    suite = evaluate_sets([work / "transcribed"], work / "ref", work / "suite", plots=False)
    overlap = {
        m: round(v["overlap"], 3) for m, v in suite["metrics"]["transcribed"].items() if "overlap" in v
    }
    result = {
        "benchmark": "transcribe",
        "transcriber": "basic-pitch 0.4.0 ICASSP 2022 model (onnxruntime)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count()},
        "files": len(rows),
        "seconds_each": args.seconds,
        "audio_seconds": round(audio_s, 1),
        "model_load_s": round(load_s, 2),
        "x_real_time": round(audio_s / wall_s, 1),
        "mean": {
            k: round(float(np.mean([r[k] for r in rows])), 4)
            for k in ("onset_precision", "onset_recall", "onset_f1", "f1_with_offsets")
        },
        "suite_overlap_transcribed_vs_source": overlap,
        "per_file": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("files", "audio_seconds", "x_real_time", "mean")}, indent=1))
    print("metric suite overlap, transcriptions vs their source MIDI:", overlap)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
