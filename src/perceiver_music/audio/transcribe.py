"""Audio to MIDI notes: basic-pitch (Spotify's ICASSP 2022 note model) run by onnxruntime.

This turns a recording into notes, so that a recording can be continued symbolically (transcribe,
then `generate --prompt`), and generated audio can be scored with the same metric suite as
generated MIDI (`bench/transcribe.py`).

basic-pitch ships its model inside its wheel (`saved_models/icassp_2022/nmp.onnx`), so nothing
is fetched at run time. Its package metadata asks for tensorflow < 2.15.1, which wants numpy < 2;
the ONNX model needs none of it, so the `transcribe` extra lists basic-pitch's runtime
dependencies and scripts/setup.sh installs basic-pitch itself with `--no-deps`:

    pip install -e ".[transcribe]" && pip install --no-deps basic-pitch==0.4.0
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from perceiver_music.audio.data import AudioError, read_audio

INSTALL = 'pip install -e ".[transcribe]" && pip install --no-deps basic-pitch==0.4.0'


class TranscribeError(RuntimeError):
    """The transcriber cannot run here (basic-pitch or onnxruntime missing)."""


@dataclass
class Transcription:
    path: Path  # the MIDI written
    notes: int
    seconds: float  # the audio's length


@dataclass(frozen=True)
class TranscribeSettings:
    """basic-pitch's note-making thresholds (its defaults)."""

    onset_threshold: float = 0.5  # how sure an onset must be
    frame_threshold: float = 0.3  # how sure a sounding frame must be
    min_note_ms: float = 127.7  # shorter notes are dropped

    def __post_init__(self) -> None:
        for name in ("onset_threshold", "frame_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value:g}")
        if not self.min_note_ms >= 0:
            raise ValueError(f"--min-note-ms must be >= 0, got {self.min_note_ms:g}")


class Transcriber:
    """The ONNX note model, loaded once and applied to any number of files."""

    def __init__(self, settings: TranscribeSettings | None = None):
        self.settings = settings or TranscribeSettings()
        # basic-pitch logs a warning for each backend it does not find (tensorflow, coreml,
        # tflite): noise for a user who has the one it needs.
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            import onnxruntime  # noqa: F401  (basic-pitch only offers ONNX when it imports)
            from basic_pitch import FilenameSuffix, build_icassp_2022_model_path
            from basic_pitch.inference import Model
        except ImportError as e:
            raise TranscribeError(
                f"transcribe needs basic-pitch and onnxruntime ({e.name} is missing): {INSTALL}"
            ) from None
        finally:
            logging.getLogger().setLevel(quiet)
        self._model = Model(build_icassp_2022_model_path(FilenameSuffix.onnx))

    def __call__(self, audio: str | os.PathLike, out: str | os.PathLike) -> Transcription:
        """Transcribe one audio file to the MIDI file `out`. AudioError names a bad input."""
        import soundfile as sf
        from basic_pitch.constants import AUDIO_SAMPLE_RATE, FFT_HOP
        from basic_pitch.inference import run_inference
        from basic_pitch.note_creation import model_output_to_notes
        from symusic import Note, Score, Tempo, Track

        audio = Path(audio)
        # Our reader, not librosa's: it names a truncated or undecodable file (AudioError)
        # where librosa falls back to audioread and fails with NoBackendError. basic-pitch
        # reads the result, already mono at its rate, from a temporary WAV.
        samples = read_audio(audio, AUDIO_SAMPLE_RATE)
        if len(samples) == 0:
            raise AudioError(audio, "no audio frames")
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "audio.wav"
            sf.write(str(wav), samples, AUDIO_SAMPLE_RATE, subtype="FLOAT")
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
                output = run_inference(wav, self._model)
        s = self.settings
        _, events = model_output_to_notes(
            output,
            onset_thresh=s.onset_threshold,
            frame_thresh=s.frame_threshold,
            min_note_len=int(round(s.min_note_ms / 1000 * AUDIO_SAMPLE_RATE / FFT_HOP)),
            melodia_trick=True,
            multiple_pitch_bends=False,
        )
        score = Score(1000)
        score.tempos.append(Tempo(0, mspq=1_000_000))  # 1000 ticks a second: a tick is 1 ms
        track = Track(name="piano", program=0)
        for start, end, pitch, amplitude, _bends in sorted(events, key=lambda e: (e[0], e[2])):
            on, off = int(round(start * 1000)), int(round(end * 1000))
            velocity = max(1, min(127, int(round(127 * amplitude))))
            track.notes.append(Note(on, max(1, off - on), int(pitch), velocity))
        score.tracks.append(track)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        score.dump_midi(str(out))
        return Transcription(out, len(track.notes), len(samples) / AUDIO_SAMPLE_RATE)


def transcribe_files(
    paths: list[str | os.PathLike], out_dir: str | os.PathLike, settings: TranscribeSettings | None = None
) -> tuple[list[Transcription], list[tuple[Path, str]]]:
    """Each audio file to OUT_DIR/<stem>.mid; bad files are reported, the others still run,
    and a file whose MIDI would overwrite an earlier one's (the same stem) is refused."""
    transcriber = Transcriber(settings)
    done, failed, written = [], [], {}
    for path in paths:
        path = Path(path)
        target = Path(out_dir) / f"{path.stem}.mid"
        if target in written:
            failed.append(
                (path, f"{target} is {written[target]}'s transcription already: give it another name")
            )
            continue
        try:
            done.append(transcriber(path, target))
            written[target] = path
        except AudioError as e:
            failed.append((path, e.reason))
    return done, failed
