"""MIDI -> audio (FluidSynth, loudness-normalised WAV or FLAC) and MIDI -> piano-roll PNG.

Audio goes through the `fluidsynth` program (`sudo apt-get install fluidsynth
fluid-soundfont-gm`) and needs the `audio` extra (scipy for the loudness filter, soundfile
for reading and writing). Piano rolls need only matplotlib.

This module never imports torch, and imports matplotlib, scipy and soundfile only inside
the functions that use them, so `perceiver-music render` starts at once.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from perceiver_music.data.prepare import find_midi
from perceiver_music.tokens.performance import MidiError, _tick_to_seconds, load_score, score_to_notes

if TYPE_CHECKING:
    from symusic.core import ScoreQuarter, ScoreSecond, ScoreTick

    Score = ScoreTick | ScoreQuarter | ScoreSecond

log = logging.getLogger(__name__)

SOUNDFONT_ENV = "PERCEIVER_MUSIC_SOUNDFONT"
INSTALL_HINT = "sudo apt-get install fluidsynth fluid-soundfont-gm"
EXTRA_HINT = "pip install 'perceiver-music[audio]'"
# Searched in order: exact files first, so the General MIDI bank that Debian and Ubuntu ship
# wins over whatever else happens to lie in the same folders.
SOUNDFONT_CANDIDATES: list[str] = [
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf3/*.sf3",
    "/usr/share/sounds/sf2/*.sf2",
    "/usr/share/soundfonts/*.sf2",
    "/usr/share/soundfonts/*.sf3",
    "/usr/local/share/soundfonts/*.sf2",
    "/opt/homebrew/share/soundfonts/*.sf2",
]
AUDIO_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
PEAK_CEILING_DBFS = -1.0
# With float output fluidsynth never clips, so the gain only sets the level of
# `loudness=None` renders; 0.5 keeps a single forte note well below full scale.
FLUIDSYNTH_GAIN = 0.5
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 96000  # what fluidsynth's synth.sample-rate accepts
# Longer files are refused before anything is drawn or synthesised (`max_seconds`,
# --max-seconds): an hour of float stereo at 44.1 kHz is 1.3 GB of temporary WAV, and a
# file that claims days (a stray event, a broken tempo) would fill the disk.
DEFAULT_MAX_SECONDS = 3600.0
FLUIDSYNTH_PAD_SECONDS = 10.0  # a generous bound on what fluidsynth renders past the last event


class RenderError(RuntimeError):
    """Rendering cannot run or failed: a missing program, soundfont or package, or fluidsynth failed."""


# ----------------------------------------------------------------------------- tools


def fluidsynth_available() -> bool:
    return shutil.which("fluidsynth") is not None


def _fluidsynth() -> str:
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise RenderError(f"the fluidsynth program was not found on PATH; install it with: {INSTALL_HINT}")
    return exe


def _check_soundfont(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise RenderError(f"soundfont not found: {path} ({origin}); install one with: {INSTALL_HINT}")
    # fluidsynth exits 0 and renders silence when the soundfont is not one, so check here.
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        raise RenderError(f"not a SoundFont (.sf2/.sf3) file: {path} ({origin})")
    return path


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    """The soundfont to render with: `soundfont` if given, else $PERCEIVER_MUSIC_SOUNDFONT, else
    the first of SOUNDFONT_CANDIDATES (exact paths and globs) that exists.

    A path given explicitly or through the environment must be a SoundFont; it is never
    silently replaced by another one.
    """
    if soundfont is not None:
        return _check_soundfont(Path(soundfont).expanduser(), "given with --soundfont")
    if env := os.environ.get(SOUNDFONT_ENV):
        return _check_soundfont(Path(env).expanduser(), f"from ${SOUNDFONT_ENV}")
    for pattern in SOUNDFONT_CANDIDATES:
        folder, name = os.path.split(pattern)
        for path in sorted(Path(folder).glob(name)) if Path(folder).is_dir() else []:
            try:
                return _check_soundfont(path, "found on this system")
            except RenderError:
                continue
    raise RenderError(
        "no General MIDI soundfont found; install one with: "
        f"{INSTALL_HINT}, or pass --soundfont FILE.sf2 (or set ${SOUNDFONT_ENV})"
    )


def rendering_available(soundfont: str | os.PathLike | None = None) -> bool:
    """Whether the fluidsynth program and a soundfont are both there."""
    if not fluidsynth_available():
        return False
    try:
        find_soundfont(soundfont)
    except RenderError:
        return False
    return True


def _require_audio_packages(need_scipy: bool) -> None:
    try:
        import soundfile  # noqa: F401

        if need_scipy:
            import scipy.signal  # noqa: F401
    except (ImportError, OSError) as e:  # soundfile raises OSError when libsndfile is missing
        raise RenderError(
            f"audio rendering needs the audio extra ({e}); install it with: {EXTRA_HINT}"
        ) from None


def _check_audio_settings(suffix: str, sample_rate: int, tail: float) -> str:
    """The soundfile format for a file suffix such as '.wav' (or 'wav')."""
    fmt = AUDIO_FORMATS.get("." + suffix.lower().lstrip("."))
    if fmt is None:
        raise RenderError(f"audio must be .wav or .flac, not {suffix!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise RenderError(f"sample rate {sample_rate} Hz outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
    if not tail >= 0:
        raise RenderError(f"tail must be 0 seconds or more, got {tail}")
    return fmt


# ----------------------------------------------------------------------------- loudness


def k_weighting_sos(sample_rate: int) -> np.ndarray:
    """The BS.1770 K-weighting (high shelf, then the RLB high-pass) as two biquads [2, 6].

    BS.1770 tabulates coefficients at 48 kHz only; these analogue prototypes (from
    libebur128) reproduce that table and give the same response at any other rate.
    """
    k = math.tan(math.pi * 1681.974450955533 / sample_rate)
    q = 0.7071752369554196
    vh = 10 ** (3.999843853973347 / 20)
    vb = vh**0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf = [(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0]
    shelf += [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
    k = math.tan(math.pi * 38.13547087602444 / sample_rate)
    q = 0.5003270373238773
    a0 = 1 + k / q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
    return np.array([shelf, highpass])


def integrated_loudness(samples: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4) of [n] or [n, channels] samples in [-1, 1].

    Every channel is weighted 1 (mono and stereo; no surround weights). Silence, or anything
    quieter than the absolute gate, is -inf. A signal shorter than one 400 ms block is
    measured as one block, where the standard leaves it undefined.
    """
    from scipy.signal import sosfilt

    x = np.asarray(samples)
    x = x[:, None] if x.ndim == 1 else x
    if len(x) == 0:
        return -math.inf
    # Blocks of 400 ms every 100 ms are sums of four consecutive 100 ms segments.
    seg_len, per_block = max(1, round(0.1 * sample_rate)), 4
    if len(x) < per_block * seg_len:
        seg_len, per_block = len(x), 1
    n_seg = len(x) // seg_len
    sos = k_weighting_sos(sample_rate)
    segments = np.zeros(n_seg)
    # One channel at a time: each float64 copy of a 20-minute piece is hundreds of MB.
    for c in range(x.shape[1]):
        y = sosfilt(sos, x[: n_seg * seg_len, c].astype(np.float64))  # causal: the cut end changes nothing
        segments += (y * y).reshape(n_seg, seg_len).sum(axis=1)
    power = np.convolve(segments, np.ones(per_block), mode="valid") / (per_block * seg_len)
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(power)
    gated = power[block_lufs > -70.0]
    if len(gated) == 0:
        return -math.inf
    relative_gate = -0.691 + 10 * math.log10(gated.mean()) - 10.0
    gated = power[(block_lufs > -70.0) & (block_lufs > relative_gate)]
    return -0.691 + 10 * math.log10(gated.mean())


@dataclass
class Levels:
    """What loudness normalisation did to one piece."""

    loudness: float | None  # LUFS after normalisation; -inf for silence; None when not measured
    peak_dbfs: float  # sample peak after normalisation; -inf for silence
    gain_db: float  # gain applied
    peak_limited: bool  # the gain was lowered to keep the peak at the ceiling


def normalize(
    samples: np.ndarray,
    sample_rate: int,
    loudness: float | None = -16.0,
    *,
    peak_ceiling_dbfs: float = PEAK_CEILING_DBFS,
) -> tuple[np.ndarray, Levels]:
    """Scale to `loudness` LUFS (None: keep the level), then lower the gain if the sample peak
    would exceed `peak_ceiling_dbfs`. A plain gain: no compression, no limiter.

    Silence is returned unchanged (its loudness is -inf, there is nothing to scale). With
    `loudness=None` nothing is measured and scipy is not needed.
    """
    x = np.asarray(samples, np.float32)
    peak = float(np.abs(x).max(initial=0.0))
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    measured = None if loudness is None else integrated_loudness(x, sample_rate)
    if peak == 0.0 or measured == -math.inf:
        return x, Levels(measured, peak_db, 0.0, False)
    gain_db = 0.0 if loudness is None or measured is None else loudness - measured
    limited = peak_db + gain_db > peak_ceiling_dbfs
    if limited:
        gain_db = peak_ceiling_dbfs - peak_db
    x = x * np.float32(10 ** (gain_db / 20))
    return x, Levels(None if measured is None else measured + gain_db, peak_db + gain_db, gain_db, limited)


# ----------------------------------------------------------------------------- audio


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary name next to `path`, renamed onto it when the block succeeds.

    The writer creates the file itself (unlike mkstemp's 0600 file), so the result gets the
    usual permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes" if seconds >= 60 else f"{seconds:.1f} s"


def _check_length(seconds: float, max_seconds: float | None, label: str | os.PathLike | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise MidiError(
            label,
            f"lasts {_human(seconds)}, longer than the limit of {_human(max_seconds)} "
            "(max_seconds; --max-seconds S raises it)",
        )


def _playable(score: ScoreTick, until: float, path: Path) -> Path:
    """Write `score` cut after `until` seconds to `path`: fluidsynth plays a file to its last
    event, so controllers or meta events long after the music would otherwise be rendered as
    silence of any length."""
    to_sec = _tick_to_seconds(score)
    last = max(int(score.end()), 0)
    # The first tick after `until` (seconds grow with ticks): events from there on are dropped.
    cut = bisect.bisect_right(range(last + 2), until, key=lambda t: float(to_sec(np.array([t]))[0]))
    score.clip(0, cut, clip_end=False).dump_midi(str(path))
    return path


def _check_disk(work_dir: Path, seconds: float, sample_rate: int, midi: Path) -> None:
    """fluidsynth writes float32 stereo: refuse a render that cannot fit, before it starts."""
    need = (seconds + FLUIDSYNTH_PAD_SECONDS) * sample_rate * 2 * 4
    free = shutil.disk_usage(work_dir).free
    if need > free:
        raise RenderError(
            f"rendering {midi} needs about {need / 1e9:.2f} GB of temporary space in {work_dir.parent}, "
            f"and only {free / 1e9:.2f} GB are free"
        )


def _synthesize(
    midi: Path, soundfont: Path, sample_rate: int, work_dir: Path, n_notes: int, play: Path | None = None
) -> np.ndarray:
    """fluidsynth's float render of `play` (default `midi`; errors name `midi`) as float32 [frames, 2]."""
    import soundfile

    wav = work_dir / "fluidsynth.wav"
    # Absolute paths: a name starting with '-' would otherwise read as an option.
    cmd = [_fluidsynth(), "-ni", "-g", str(FLUIDSYNTH_GAIN), "-r", str(sample_rate), "-O", "float"]
    cmd += ["-T", "wav", "-F", str(wav), str(soundfont.resolve()), str((play or midi).resolve())]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
    if proc.returncode != 0 or not wav.is_file():
        raise RenderError(f"fluidsynth failed on {midi}: {detail}")
    # fluidsynth goes on with its default soundfont, or none, when ours fails to load (e.g.
    # a truncated file), and still exits 0.
    if re.search(r"failed to load.*soundfont", proc.stderr, re.IGNORECASE):
        raise RenderError(f"fluidsynth could not load the soundfont {soundfont} to render {midi}: {detail}")
    samples, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise RenderError(f"fluidsynth wrote {rate} Hz instead of {sample_rate} Hz for {midi}")
    # Notes that make no sound: no preset for their program, or no soundfont at all.
    if n_notes and not np.abs(samples).max(initial=0.0) > 1e-6:
        raise RenderError(
            f"fluidsynth rendered silence for {midi} ({n_notes} notes) with {soundfont}: {detail}"
        )
    return samples


def _trim(samples: np.ndarray, sample_rate: int, music_end: float, tail: float) -> np.ndarray:
    """Keep the music, its release and reverb until they fade below -60 dB of the peak (or
    -100 dBFS), and at most `tail` seconds past the last note; fluidsynth pads seconds of
    silence. A release cut by the limit fades out over 50 ms instead of clicking."""
    level = np.abs(samples).max(axis=1)
    threshold = max(float(level.max(initial=0.0)) * 1e-3, 1e-5)
    audible = np.flatnonzero(level > threshold)
    audible_end = int(audible[-1]) + 1 if len(audible) else 0
    end = round(music_end * sample_rate)
    keep = max(end, audible_end + round(0.1 * sample_rate))
    keep = min(keep, end + round(tail * sample_rate), len(samples))
    out = samples[:keep].copy()
    if audible_end > keep:
        fade = min(keep, round(0.05 * sample_rate))
        out[keep - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)[:, None]
    return out


def _write_pcm16(samples: np.ndarray, sample_rate: int, out: Path, fmt: str) -> None:
    import soundfile

    # Scaled by 32767 so +1.0 fits; readers divide by 32768, so the peak read back never
    # exceeds the ceiling that was applied in float.
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    with _atomic_target(out) as tmp:
        soundfile.write(tmp, pcm, sample_rate, format=fmt, subtype="PCM_16")


def _render(
    score: ScoreTick,
    midi: Path,
    out: Path,
    fmt: str,
    soundfont: Path,
    sample_rate: int,
    loudness: float | None,
    tail: float,
    max_seconds: float | None,
) -> Levels:
    notes = score_to_notes(score, str(midi))
    music_end = float(notes.end.max(initial=0.0))
    _check_length(music_end, max_seconds, midi)
    # Next to the output rather than in /tmp: a 20-minute float render is over 400 MB. What
    # fluidsynth plays ends with the music and its tail, so the space it takes is bounded.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".render-") as work:
        _check_disk(Path(work), music_end + tail, sample_rate, midi)
        play = _playable(score, music_end + tail, Path(work) / midi.name)
        samples = _synthesize(midi, soundfont, sample_rate, Path(work), len(notes), play)
    samples = _trim(samples, sample_rate, music_end, tail)
    samples, levels = normalize(samples, sample_rate, loudness)
    _write_pcm16(samples, sample_rate, out, fmt)
    measured = "" if levels.loudness is None else f"{levels.loudness:.1f} LUFS, "
    limited = f" (gain lowered to keep the peak at {PEAK_CEILING_DBFS:g} dBFS)" if levels.peak_limited else ""
    log.info("%s: %speak %.1f dBFS%s", out, measured, levels.peak_dbfs, limited)
    return levels


def render_audio(
    midi: str | os.PathLike,
    out: str | os.PathLike,
    *,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
    loudness: float | None = -16.0,
    tail: float = 3.0,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> Path:
    """Render `midi` with fluidsynth into `out` (.wav or .flac, 16-bit, stereo).

    The audio is scaled to `loudness` LUFS (BS.1770 integrated; None keeps fluidsynth's
    level), with the gain lowered where needed to keep the sample peak at -1 dBFS (logged at
    INFO). At most `tail` seconds are kept after the last note for the release. A MIDI file
    with no notes gives a short silence. The file is written under a temporary name and
    renamed when complete. A file whose music lasts longer than `max_seconds` (None: no limit)
    is refused before fluidsynth runs; events after the music and its tail are not played.

    Raises MidiError for a file that is not readable MIDI or too long (before fluidsynth runs), and
    RenderError for a bad output suffix or sample rate, a missing fluidsynth, soundfont or
    audio package, or a failed fluidsynth run.
    """
    midi, out = Path(midi), Path(out)
    fmt = _check_audio_settings(out.suffix, sample_rate, tail)
    score = load_score(midi)
    _fluidsynth()
    font = find_soundfont(soundfont)
    _require_audio_packages(need_scipy=loudness is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    _render(score, midi, out, fmt, font, sample_rate, loudness, tail, max_seconds)
    return out


# ----------------------------------------------------------------------------- piano roll


class RollData(NamedTuple):
    """What a piano roll draws, in seconds after the tempo map."""

    notes: np.ndarray  # float64 [n, 4]: start, end, pitch, velocity; sorted by (start, pitch)
    pedal: np.ndarray  # float64 [m, 2]: start, end of each sustain-pedal-down span, merged over tracks


def _as_tick_score(midi_or_score: str | os.PathLike | Score) -> tuple[ScoreTick, str | None]:
    """The score in ticks (what the tempo-map conversion expects), and a file name if any."""
    if isinstance(midi_or_score, (str, os.PathLike)):
        return load_score(midi_or_score), Path(midi_or_score).name
    from symusic.core import ScoreTick

    if isinstance(midi_or_score, ScoreTick):
        return midi_or_score, None
    return midi_or_score.to("tick"), None


def roll_data(midi_or_score: str | os.PathLike | Score, *, sustain: bool = False) -> RollData:
    """Notes and sustain-pedal spans of the non-drum tracks of a MIDI file or symusic Score.

    With `sustain`, notes last as the tokenizer hears them (held by the pedal). A pedal is
    down while CC64 >= 64; one still down at the end is released at the last note or pedal
    event of the file, as the tokenizer does.
    """
    score, label = _as_tick_score(midi_or_score)
    try:
        to_sec = _tick_to_seconds(score)
    except MidiError as e:
        raise MidiError(label, e.reason) from None
    notes, pedal_events = [], []
    piece_end = 0.0
    for track in score.tracks:
        nt = track.notes.numpy()
        on = nt["time"].astype(np.int64)
        start, end = to_sec(on), to_sec(on + np.maximum(nt["duration"].astype(np.int64), 0))
        cc = track.controls.numpy()
        is_pedal = cc["number"] == 64
        pedal_time = to_sec(cc["time"][is_pedal].astype(np.int64))
        piece_end = max(piece_end, float(end.max(initial=0.0)), float(pedal_time.max(initial=0.0)))
        if track.is_drum:
            continue
        pedal_events.append((pedal_time, cc["value"][is_pedal] >= 64))
        notes.append(np.column_stack([start, end, nt["pitch"], nt["velocity"]]))
    if sustain:
        held = score_to_notes(score, label)
        table = np.column_stack([held.start, held.end, held.pitch, held.velocity]).astype(np.float64)
    else:
        table = np.concatenate(notes).astype(np.float64) if notes else np.zeros((0, 4))
        table = table[(table[:, 2] >= 0) & (table[:, 2] < 128) & (table[:, 3] > 0)]
    table = table[np.lexsort((table[:, 2], table[:, 0]))]
    spans = [_pedal_spans(t, down, piece_end) for t, down in pedal_events]
    return RollData(table, _merge_spans(np.concatenate(spans) if spans else np.zeros((0, 2))))


def _pedal_spans(time: np.ndarray, down: np.ndarray, piece_end: float) -> np.ndarray:
    order = np.lexsort((~down, time))  # downs before ups at one time, as in apply_sustain
    time, down = time[order], down[order]
    change = down != np.concatenate([[False], down[:-1]])
    time, down = time[change], down[change]  # alternating down, up, down, ...
    starts, ends = time[down], time[~down]
    ends = np.append(ends, piece_end) if len(ends) < len(starts) else ends
    spans = np.column_stack([starts, ends])
    return spans[spans[:, 1] > spans[:, 0]]


def _merge_spans(spans: np.ndarray) -> np.ndarray:
    if len(spans) == 0:
        return np.zeros((0, 2))
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    # A span starts a new group when it begins after every earlier span has ended.
    reach = np.maximum.accumulate(spans[:, 1])
    new = np.concatenate([[True], spans[1:, 0] > reach[:-1]])
    group = np.cumsum(new) - 1
    ends = np.zeros(group[-1] + 1)
    np.maximum.at(ends, group, spans[:, 1])
    return np.column_stack([spans[new, 0], ends])


def _pitch_range(notes: np.ndarray) -> tuple[int, int]:
    """Lowest and highest pitch drawn: the notes' range, widened to at least an octave so a few
    notes do not become bars as tall as the figure."""
    lo, hi = (int(notes[:, 2].min()), int(notes[:, 2].max())) if len(notes) else (60, 71)
    lo = min(max(lo - (11 - (hi - lo)) // 2, 0), 127 - 11) if hi - lo < 11 else lo
    return lo, max(hi, lo + 11)


PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def note_name(pitch: int) -> str:
    """MIDI pitch -> name with octave, middle C (60) being C4."""
    return f"{PITCH_NAMES[pitch % 12]}{pitch // 12 - 1}"


def figure_size(seconds: float, pitch_rows: int) -> tuple[float, float]:
    """Inches (width, height): about 45 s per inch from 8 in (up to 3 min) to 28 in (15 min
    and more), so notes stay distinguishable without the image becoming unwieldy."""
    width = float(np.clip(4.0 + seconds / 45.0, 8.0, 28.0))
    height = float(np.clip(2.0 + 0.07 * pitch_rows, 4.0, 8.0))
    return width, height


def _check_boundary(boundary: float | None) -> None:
    if boundary is not None and not (math.isfinite(boundary) and boundary >= 0):
        raise ValueError(f"boundary must be a time in seconds >= 0, got {boundary}")


def piano_roll(
    midi_or_score: str | os.PathLike | Score,
    out_png: str | os.PathLike,
    *,
    boundary: float | None = None,
    title: str | None = None,
    sustain: bool = False,
    dpi: int = 100,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> Path:
    """Draw a piano roll PNG: pitch over time in seconds, velocity as colour, sustain-pedal
    spans as a band below the notes, and with `boundary` (seconds) a line between prompt and
    continuation. `midi_or_score` is a MIDI path or a symusic Score; the title defaults to
    the file name. The image is figure_size(...) * dpi pixels. Written atomically. A piece
    longer than `max_seconds` (None: no limit) is refused with a MidiError.
    """
    _check_boundary(boundary)
    out_png = Path(out_png)
    score, label = _as_tick_score(midi_or_score)
    notes, pedal = roll_data(score, sustain=sustain)
    title = title if title is not None else label
    lo, hi = _pitch_range(notes)
    rows = hi - lo + 1
    seconds = max(notes[:, 1].max(initial=0.0), pedal[:, 1].max(initial=0.0), boundary or 0.0) or 1.0
    _check_length(seconds, max_seconds, label)

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MultipleLocator
    from matplotlib.transforms import blended_transform_factory

    width, height = figure_size(seconds, rows)

    # A Figure without pyplot: the Agg canvas, no global state, no effect on the caller's backend.
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    # viridis without its palest yellows, which vanish on white.
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.9, 256)))
    norm = Normalize(1, 127)
    if len(notes):
        x0, x1, p = notes[:, 0], notes[:, 1], notes[:, 2]
        corners = [(x0, p - 0.4), (x1, p - 0.4), (x1, p + 0.4), (x0, p + 0.4)]
        # Outlines in the fill colour keep notes of a few ms visible in a 20-minute roll.
        bars = PolyCollection(
            np.stack([np.column_stack(c) for c in corners], axis=1), edgecolors="face", linewidths=0.6
        )
        bars.set(array=notes[:, 3], cmap=cmap, norm=norm)
        ax.add_collection(bars)
    octaves = range(lo + (-lo) % 12, hi + 1, 12)  # the Cs
    for c in octaves:
        ax.axhline(c - 0.5, color="0.88", lw=0.6, zorder=0)
    yticks = [float(t) for t in (range(lo, hi + 1) if rows <= 13 else octaves)]
    ylabels = [note_name(int(t)) for t in yticks]

    bottom, top = lo - 0.5, hi + 0.5
    if len(pedal):
        band = max(1.0, 0.04 * rows)
        bottom -= band + 0.5
        ax.broken_barh(
            np.column_stack([pedal[:, 0], np.diff(pedal, axis=1)[:, 0]]), (bottom, band), color="0.6"
        )
        yticks.insert(0, bottom + band / 2)
        ylabels.insert(0, "pedal")
        bottom -= 0.3
    if boundary is not None:
        top += max(2.0, 0.08 * rows)  # room for the labels above the highest notes
        ax.axvline(boundary, color="crimson", lw=1.2, ls="--")
        at_top = blended_transform_factory(ax.transData, ax.transAxes)
        for text, dx, ha in (("prompt", -4, "right"), ("continuation", 4, "left")):
            ax.annotate(
                text, (boundary, 1.0), xycoords=at_top, xytext=(dx, -4), textcoords="offset points",
                ha=ha, va="top", color="crimson", fontsize=9,
            )  # fmt: skip

    ax.set_xlim(0.0, seconds * 1.01)
    ax.set_ylim(bottom, top)
    ax.set_yticks(yticks, ylabels)
    ax.set_ylabel("pitch")
    if seconds > 120:  # minutes:seconds, about one tick per inch
        steps = (10, 15, 20, 30, 60, 120, 300, 600, 1800)
        # Past the last step (hours of music, max_seconds raised): whole hours.
        step = next(
            (s for s in steps if seconds / s <= 1.2 * width), 3600 * math.ceil(seconds / 3600 / width)
        )
        ax.xaxis.set_major_locator(MultipleLocator(step))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{int(t) // 60}:{int(t) % 60:02d}"))
        ax.set_xlabel("time (min:s)")
    else:
        ax.set_xlabel("time (s)")
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    # About 0.25 in of colorbar at any width.
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="velocity", fraction=0.25 / width, pad=0.1 / width)
    with _atomic_target(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


# ----------------------------------------------------------------------------- many files


@dataclass
class RenderReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (MIDI file, reason)
    levels: dict[Path, Levels] = field(default_factory=dict)  # audio file -> its levels


def _jobs(paths: Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, Path, Path]], list[tuple[Path, str]]]:
    """(MIDI file, its path relative to what was given, output path relative to out_dir
    without suffix) for every file to render, and the paths that do not exist or hold no MIDI."""
    jobs, missing, taken = [], [], set()
    for given in map(Path, paths):
        if given.is_dir():
            found = [(f, f.relative_to(given)) for f in find_midi(given)]
            if not found:
                missing.append((given, "no .mid or .midi files in this folder"))
        elif given.is_file():
            found = [(given, Path(given.name))]
        else:
            missing.append((given, "no such file or folder"))
            continue
        for midi, rel in found:
            # Two inputs with one stem (a.mid and a.midi, or x/a.mid and y/a.mid given as
            # files) become a and a-2 rather than overwriting each other.
            stem = unique = rel.with_suffix("")
            k = 1
            while unique.as_posix().lower() in taken:
                k += 1
                unique = stem.with_name(f"{stem.name}-{k}")
            taken.add(unique.as_posix().lower())
            jobs.append((midi, rel, unique))
    return jobs, missing


def render_files(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    audio_format: str | None = "wav",
    png: bool = True,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
    loudness: float | None = -16.0,
    tail: float = 3.0,
    sustain: bool = False,
    boundary: float | None = None,
    progress: bool = False,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> RenderReport:
    """Render MIDI files, and folders searched recursively for .mid/.midi, into `out_dir`:
    `<stem>.wav|.flac` with `audio_format`, `<stem>.png` piano rolls with `png`. Files found
    in a folder keep their subfolders under `out_dir`.

    A file that cannot be read or rendered, has no notes, or lasts longer than `max_seconds`,
    and a folder without MIDI, is listed in `failed` with the reason; the others are still
    rendered. When audio is asked for, fluidsynth, the soundfont and the audio
    packages are checked first, and RenderError is raised before anything is written.
    """
    if audio_format is None and not png:
        raise ValueError("nothing to render: no audio format and no piano roll")
    _check_boundary(boundary)
    out_dir = Path(out_dir)
    fmt, font = None, None
    if audio_format is not None:
        fmt = _check_audio_settings(audio_format, sample_rate, tail)
        _fluidsynth()
        font = find_soundfont(soundfont)
        _require_audio_packages(need_scipy=loudness is not None)
    jobs, missing = _jobs(paths)
    report = RenderReport(failed=missing)
    if progress:
        from perceiver_music.progress import progress_bar

        jobs = progress_bar(jobs, desc="render", unit="file")
    for midi, rel, stem in jobs:
        target = out_dir / stem
        try:
            score = load_score(midi)
            if len(score_to_notes(score, str(midi))) == 0:
                raise MidiError(midi, "no notes: nothing to render")
            target.parent.mkdir(parents=True, exist_ok=True)
            if png:
                roll = target.with_name(f"{target.name}.png")
                roll_png = piano_roll(
                    score,
                    roll,
                    boundary=boundary,
                    title=rel.as_posix(),
                    sustain=sustain,
                    max_seconds=max_seconds,
                )
                report.written.append(roll_png)
            if fmt is not None and font is not None:
                audio = target.with_name(f"{target.name}.{fmt.lower()}")
                report.levels[audio] = _render(
                    score, midi, audio, fmt, font, sample_rate, loudness, tail, max_seconds
                )
                report.written.append(audio)
        except MidiError as e:
            report.failed.append((midi, e.reason))
        except (RenderError, OSError) as e:
            report.failed.append((midi, str(e)))
        except Exception as e:  # one file's surprise must not cost the rest of the folder
            log.debug("rendering %s failed", midi, exc_info=True)
            report.failed.append((midi, f"cannot be rendered ({type(e).__name__}: {e})"))
    return report
