"""`perceiver-music studio`: generate from a model and listen to it in the browser.

A Gradio page over `generate.generate_midi`: a MIDI prompt (or a recording, transcribed to notes
when the `transcribe` extra is installed, or none) and how much of its end to keep, the length, variations and sampling settings, Generate; then each variation's piano roll
(the prompt's end marked), its audio in the page and its MIDI and WAV files, beside the model's
card. Composer, style file and guidance appear only for a model whose config has them.

Gradio's queue runs one generation at a time (one model, one process's CPU or GPU) off the
request threads; the rest wait their turn in the queue and the page stays responsive. Everything
the app writes lies under its output folder: uploads in `.gradio/` (Gradio's cache), prompt
previews in `uploads/`, and each generation in a folder of its own under `jobs/`.

Gradio is the `studio` extra; only this module imports it, and only `perceiver-music studio`
imports this module.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceiver_music.generate_settings import MIDI_TOP_P

MAX_VARIATIONS = 4  # the page has this many result slots
MAX_UPLOAD_MB = 10  # the largest ASAP performance is 0.2 MB; MAESTRO's, 1 MB
MAX_AUDIO_MB = 100  # a recording prompt: about 10 minutes of CD-quality WAV
MAX_STUDIO_SECONDS = 600  # the length slider's end: ten minutes
MAX_AUDIO_SECONDS = 60  # an audio model's slider: CPU sampling runs well below real time
INSTALL_HINT = "pip install 'perceiver-music[studio]'"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(ValueError):
    """An uploaded file the studio refuses; the message names the file and the problem."""


@dataclass
class PromptInfo:
    path: Path
    name: str  # the file name as uploaded, made safe to show and to write
    seconds: float  # length of the music
    notes: int
    tokens: int


@dataclass
class ModelInfo:
    """What the page needs to know about the model before anything is generated."""

    ckpt: Path  # the resolved checkpoint folder
    bundled: bool
    card: str  # Markdown
    labels: list[str] = field(default_factory=list)  # composers it is conditioned on, if any
    style: bool = False  # whether it takes a style file
    condition: list[str] = field(default_factory=list)  # model.condition: label, timing, style, keyboard
    sample_rate: int | None = None  # an audio model (a PRIORS_DIR): its codec's rate; None: MIDI
    upsamplers: bool = False  # an audio model with levels below the top (the page may skip them)


def safe_name(name: str, limit: int = 80) -> str:
    """A file name reduced to letters, digits, '.', '_' and '-', never empty, '.' or '..'."""
    cleaned = _UNSAFE.sub("_", Path(name).name).strip("._")[:limit]
    return cleaned or "file"


def _check_size(path: Path, name: str, max_mb: float) -> None:
    size = path.stat().st_size
    if size > max_mb * 2**20:
        raise UploadError(f"{name}: {size / 2**20:.1f} MB is over the studio's limit of {max_mb:g} MB")


def check_midi_upload(path: str | os.PathLike, max_mb: float = MAX_UPLOAD_MB) -> PromptInfo:
    """A readable MIDI file with notes, within the size limit; else UploadError naming it."""
    from perceiver_music.data.prepare import MIDI_SUFFIXES
    from perceiver_music.tokens.performance import MidiError, PerformanceTokenizer

    path = Path(path)
    name = safe_name(path.name)
    if path.suffix.lower() not in MIDI_SUFFIXES:
        raise UploadError(f"{name}: not a MIDI file (expected .mid or .midi)")
    _check_size(path, name, max_mb)
    tok = PerformanceTokenizer()
    try:
        events = tok.encode(path)
    except MidiError as e:
        raise UploadError(f"{name}: {e.reason}") from None
    notes = tok.decode_notes(events)
    if len(notes) == 0:
        raise UploadError(f"{name}: no notes: nothing to continue")
    seconds = float(notes.end.max()) / tok.cfg.steps_per_second
    return PromptInfo(path, name, seconds, len(notes), len(events))


def model_info(ckpt: str | os.PathLike | None) -> ModelInfo:
    """The checkpoint (None: the bundled model), its card, and the conditioning it takes; a
    PRIORS_DIR is an audio model, its codec and priors checked as `generate` checks them.

    FileNotFoundError or CheckpointError when there is no usable checkpoint there, PriorsError
    for priors that do not fit together."""
    from perceiver_music.checkpoint import read_config, resolve

    if ckpt is not None and (Path(ckpt) / "priors.json").is_file():
        return _audio_model_info(Path(ckpt))
    folder = resolve(ckpt)
    cfg = read_config(folder / "config.json")
    condition = list(cfg.model.condition)
    labels = list(cfg.model.labels) if "label" in condition else []
    style = "style" in condition
    card_file = folder / "MODEL_CARD.md"
    card = card_file.read_text() if ckpt is None and card_file.is_file() else config_card(folder, cfg)
    return ModelInfo(folder, ckpt is None, card, labels, style, condition)


def _audio_model_info(root: Path) -> ModelInfo:
    from perceiver_music.audio.generate import load_priors

    priors = load_priors(root)
    card_file = root / "MODEL_CARD.md"
    if card_file.is_file():
        card = card_file.read_text()
    else:
        rate = priors.codec.cfg.sample_rate
        lines = [f"## {root.name}", "", f"An audio model: `{root}/priors.json`, a codec at {rate} Hz and", ""]
        lines += [f"- level {lv.level}: {lv.cfg.model.arch} `{lv.run}`" for lv in priors.levels]
        lines += ["", "No model card: the licence of the weights is that of the data they were trained on."]
        card = "\n".join(lines)
    top = priors.levels[0].cfg.model  # only the top prior is conditioned (on composers, if labelled)
    labels = list(top.labels) if top.conditioned_on("label") else []
    return ModelInfo(
        root,
        False,
        card,
        labels,
        condition=list(top.condition),
        sample_rate=priors.codec.cfg.sample_rate,
        upsamplers=len(priors.levels) > 1,
    )


def config_card(folder: Path, cfg) -> str:
    """A short card for a run of one's own: what the model is and how far it was trained."""
    import json

    m, t = cfg.model, cfg.train
    lines = [
        f"## {folder.parent.name if folder.name == 'best' else folder.name}",
        "",
        f"Checkpoint `{folder}`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | {m.arch}, scales {', '.join(map(str, m.scales))} |",
        f"| size | {m.layers} layers of width {m.width}, {m.heads} heads |",
        f"| context | {m.max_len:,} tokens, {m.num_latents:,} latents |",
        f"| vocabulary | {m.vocab_size} |",
        f"| training | {t.steps:,} steps planned, batch {t.batch_size}, learning rate {t.lr:g} |",
    ]
    for name in ("info.json", "trainer.json"):  # best/ has info.json, checkpoints/step_* trainer.json
        try:
            info = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if "step" in info:
            lines.append(f"| this checkpoint | step {info['step']:,} |")
        nll = info.get("val_nll", info.get("best_val_nll"))
        if isinstance(nll, (int, float)):
            lines.append(f"| validation NLL | {nll:.3f} nats/token |")
        break
    lines += ["", "No model card: the licence of the weights is that of the data they were trained on."]
    return "\n".join(lines)


@dataclass
class Job:
    """One press of Generate: what was asked for, and where it is written."""

    prompt: Path | None = None
    keep_seconds: float | None = None  # the prompt's last S seconds; None, or S beyond its length: all
    seconds: float = 20.0
    num: int = 1
    temperature: float = 1.0
    top_p: float = MIDI_TOP_P
    min_p: float = 0.0
    seed: int = 0
    composer: str | None = None
    style: Path | None = None
    guidance: float | None = None
    upsample: bool = True  # an audio model: False decodes the top level directly (generate --no-upsample)


class Studio:
    """The state behind the page: the model, the output folder, and the numbering of jobs."""

    def __init__(self, info: ModelInfo, out: Path, ckpt: str | os.PathLike | None, device: str = "cpu"):
        self.info, self.out, self.ckpt, self.device = info, out.resolve(), ckpt, device
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._transcriber = None  # loaded at the first recording uploaded
        self._transcribed: dict[str, Path] = {}  # an uploaded recording -> its notes

    def new_folder(self, kind: str, name: str = "") -> Path:
        """out/kind/NNNN[-name]: a fresh folder of the output folder, whatever name is given."""
        with self._lock:
            n = next(self._numbers)
        folder = self.out / kind / (f"{n:04d}-{safe_name(name)}" if name else f"{n:04d}")
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def prompt_midi(self, upload: str | os.PathLike) -> Path:
        """The MIDI of an uploaded prompt: itself, or a recording's transcription (made once,
        under uploads/). UploadError for what cannot be used, naming the file."""
        from perceiver_music.audio.data import AUDIO_SUFFIXES, AudioError

        path = Path(upload)
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            return path  # check_midi_upload says what is wrong with it, if anything
        name = safe_name(path.name)
        _check_size(path, name, MAX_AUDIO_MB)
        key = str(path.resolve())
        with self._lock:
            done = self._transcribed.get(key)
        if done is not None:
            return done
        from perceiver_music.audio.transcribe import TranscribeError, Transcriber

        try:
            if self._transcriber is None:
                self._transcriber = Transcriber()
            midi = self.new_folder("uploads", path.stem) / f"{safe_name(path.stem)}.mid"
            self._transcriber(path, midi)
        except TranscribeError as e:
            raise UploadError(f"{name}: a recording; {e}") from None
        except AudioError as e:
            raise UploadError(f"{name}: {e.reason}") from None
        with self._lock:
            self._transcribed[key] = midi
        return midi

    def check_recording(self, upload: str | os.PathLike) -> PromptInfo:
        """An audio model's prompt: a recording at its codec's rate; else UploadError naming it."""
        from perceiver_music.audio.data import AUDIO_SUFFIXES, AudioError, audio_info

        path = Path(upload)
        name = safe_name(path.name)
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise UploadError(
                f"{name}: this is an audio model; its prompt is a recording ({', '.join(AUDIO_SUFFIXES)})"
            )
        _check_size(path, name, MAX_AUDIO_MB)
        try:
            info = audio_info(path)
        except AudioError as e:
            raise UploadError(f"{name}: {e.reason}") from None
        rate = self.info.sample_rate
        if info.samplerate != rate:
            raise UploadError(
                f"{name}: a recording at {info.samplerate} Hz; this model works at {rate} Hz and keeps the "
                f"prompt sample for sample: resample it first (e.g. `sox IN -r {rate} OUT.wav`)"
            )
        return PromptInfo(path, name, info.frames / info.samplerate, 0, 0)

    def preview(self, upload: str | os.PathLike) -> tuple[PromptInfo, Path]:
        """Check an uploaded prompt (a recording is transcribed first, unless the model is an
        audio model) and draw its piano roll or spectrogram; UploadError if it is refused."""
        from perceiver_music.render import piano_roll

        if self.info.sample_rate is not None:
            from perceiver_music.audio.data import read_audio
            from perceiver_music.audio.evaluate import spectrogram_png

            info = self.check_recording(upload)
            png = self.new_folder("uploads", Path(info.name).stem) / "prompt.png"
            audio = read_audio(info.path, self.info.sample_rate)
            spectrogram_png(png, info.name, audio, [], self.info.sample_rate, label="prompt")
            return info, png

        info = check_midi_upload(self.prompt_midi(upload))
        info.name = safe_name(Path(upload).name)  # the upload's name, even for a recording
        # A recording's roll goes beside its transcription, in the folder made for it.
        transcribed = info.path != Path(upload)
        folder = info.path.parent if transcribed else self.new_folder("uploads", Path(info.name).stem)
        png = folder / "prompt.png"
        return info, piano_roll(info.path, png, title=info.name)

    def generate(self, job: Job, on_progress=None):
        """Run one job into its own folder under jobs/; returns generate's GenerateResult.

        UploadError for a refused prompt or style file, ValueError for a bad setting, and the
        errors of `generate_midi` (MidiError, CheckpointError) as they are."""
        if self.info.sample_rate is not None:
            return self._generate_audio(job, on_progress)
        from perceiver_music.generate import generate_midi
        from perceiver_music.generate_settings import check_conditioning, check_generate
        from perceiver_music.sample import SamplingConfig

        check_generate(
            num=job.num, seconds=job.seconds, prompt_seconds_last=job.keep_seconds,
            temperature=job.temperature, top_p=job.top_p, min_p=job.min_p,
        )  # fmt: skip
        if not 1 <= job.num <= MAX_VARIATIONS:
            raise ValueError(f"variations must be 1 to {MAX_VARIATIONS}, got {job.num}")
        prompt = check_midi_upload(self.prompt_midi(job.prompt)) if job.prompt is not None else None
        whole = prompt is None or job.keep_seconds is None or job.keep_seconds >= prompt.seconds
        keep = None if whole else job.keep_seconds
        style = check_midi_upload(job.style) if job.style is not None else None
        # Conditioning goes to generate only when asked for, so models without it never see it.
        conditioning: dict[str, Any] = {}
        if job.composer:
            conditioning["composer"] = job.composer
        if style is not None:
            conditioning["style"] = style.path
        if conditioning and job.guidance is not None:
            conditioning["guidance"] = job.guidance
        # Refused before a folder is made (the same check generate runs once the model is loaded).
        check_conditioning(
            self.info.condition,
            self.info.labels,
            conditioning.get("composer"),
            style is not None,
            conditioning.get("guidance", 1.0),
            job.seconds,
        )
        folder = self.new_folder("jobs")
        # The job's folder keeps its inputs beside its outputs (under safe names).
        if prompt is not None:
            prompt_copy = folder / f"prompt_{prompt.name}"
            shutil.copyfile(prompt.path, prompt_copy)
        if style is not None:
            conditioning["style"] = folder / f"style_{style.name}"
            shutil.copyfile(style.path, conditioning["style"])
        if on_progress is not None:
            on_progress("loading the model")
        return generate_midi(
            self.ckpt,
            folder,
            prompt=prompt_copy if prompt is not None else None,
            num=job.num,
            seconds=job.seconds,
            sampling=SamplingConfig(job.temperature, 0, job.top_p, job.min_p),
            seed=job.seed,
            prompt_seconds_last=keep,
            device=self.device,
            progress=True,  # tqdm's bar, which Gradio's progress tracks
            render=True,
            audio_format="wav",
            **conditioning,
        )

    def _generate_audio(self, job: Job, on_progress=None):
        """An audio model's job: the recording continued (or audio from nothing), as
        `generate --ckpt PRIORS_DIR`; returns its AudioGenerateResult."""
        from perceiver_music.audio.generate import generate_audio
        from perceiver_music.generate_settings import check_conditioning, check_sampling
        from perceiver_music.sample import SamplingConfig

        if not 0 < job.seconds <= MAX_AUDIO_SECONDS:
            raise ValueError(
                f"an audio model generates up to {MAX_AUDIO_SECONDS} s here, got {job.seconds:g}"
            )
        if not 1 <= job.num <= MAX_VARIATIONS:
            raise ValueError(f"variations must be 1 to {MAX_VARIATIONS}, got {job.num}")
        check_sampling(job.temperature, 0, job.top_p, job.min_p, (0, 127))
        # as for MIDI, guidance only with a composer to guide towards
        composer = job.composer or None
        guidance = job.guidance if composer and job.guidance is not None else 1.0
        check_conditioning(self.info.condition, self.info.labels, composer, False, guidance)
        prompt = self.check_recording(job.prompt) if job.prompt is not None else None
        folder = self.new_folder("jobs")
        if prompt is not None:
            prompt_copy = folder / f"prompt_{prompt.name}"
            shutil.copyfile(prompt.path, prompt_copy)
        if on_progress is not None:
            on_progress("loading the model")
        return generate_audio(
            self.ckpt,
            folder,
            job.seconds,
            prompt=prompt_copy if prompt is not None else None,
            num=job.num,
            sampling=SamplingConfig(job.temperature, 0, job.top_p, job.min_p, keyboard=False),
            seed=job.seed,
            device=self.device,
            progress=True,
            composer=composer,
            guidance=guidance,
            upsample=job.upsample,
        )


# ----------------------------------------------------------------------------- the page


def _theme(gr):
    # System fonts: the default theme would have every browser fetch its fonts from the web.
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(studio: Studio):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    info = studio.info
    audio_model = info.sample_rate is not None
    recordings = [".wav", ".flac", ".ogg", ".oga", ".mp3"]
    with gr.Blocks(title="perceiver-music studio", analytics_enabled=False) as app:
        gr.Markdown("# perceiver-music studio")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.File(
                    label=f"prompt (optional): a recording at {info.sample_rate} Hz to continue as audio"
                    if audio_model
                    else f"prompt (optional): MIDI up to {MAX_UPLOAD_MB} MB, or a recording to transcribe",
                    file_types=recordings if audio_model else [".mid", ".midi", *recordings],
                    elem_id="prompt",
                )
                prompt_status = gr.Markdown(
                    "No prompt: the piece starts from nothing.", elem_id="prompt-status"
                )
                prompt_roll = gr.Image(label="prompt", type="filepath", visible=False, elem_id="prompt-roll")
                keep = gr.Slider(
                    1, 60, value=60, step=0.5, label="keep the last ... seconds of the prompt",
                    visible=False, elem_id="keep",
                )  # fmt: skip
                seconds = gr.Slider(
                    1, MAX_AUDIO_SECONDS if audio_model else MAX_STUDIO_SECONDS, value=5 if audio_model else 20,
                    step=1, label="length (seconds)", elem_id="seconds",
                )  # fmt: skip
                num = gr.Slider(1, MAX_VARIATIONS, value=2, step=1, label="variations", elem_id="num")
                with gr.Accordion("sampling", open=True):
                    temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(
                        0.05, 1.0, value=1.0 if audio_model else MIDI_TOP_P, step=0.01, label="top-p (1: off)"
                    )
                    min_p = gr.Slider(0.0, 0.5, value=0.0, step=0.01, label="min-p (0: off)")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    upsample = gr.Checkbox(
                        value=True,
                        label="upsample (off: the top level decoded directly, several times faster)",
                        visible=info.upsamplers,
                        elem_id="upsample",
                    )
                conditioned = bool(info.labels) or info.style
                with gr.Accordion("conditioning", open=True, visible=conditioned):
                    composer = gr.Dropdown(
                        ["(none)", *info.labels], value="(none)", label="composer",
                        visible=bool(info.labels), elem_id="composer",
                    )  # fmt: skip
                    style = gr.File(
                        label="style file (MIDI)",
                        file_types=[".mid", ".midi"],
                        visible=info.style,
                        elem_id="style",
                    )
                    guidance = gr.Slider(0.0, 5.0, value=1.0, step=0.1, label="guidance", elem_id="guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                job_status = gr.Markdown("", elem_id="job-status")
                slots, outputs = [], [job_status]
                for i in range(MAX_VARIATIONS):
                    with gr.Group(visible=False, elem_id=f"variation-{i}") as group:
                        # The roll's own title names the file; a label would cover it.
                        roll = gr.Image(show_label=False, type="filepath", elem_id=f"roll-{i}")
                        audio = gr.Audio(
                            label=f"variation {i + 1}",
                            type="filepath",
                            elem_id=f"audio-{i}",
                            interactive=False,
                        )
                        files = gr.File(
                            label="WAV and codes" if audio_model else "MIDI and WAV",
                            file_count="multiple",
                            interactive=False,
                            elem_id=f"files-{i}",
                        )
                    slots.append(group)
                    outputs += [group, roll, audio, files]
                with gr.Accordion("model card", open=False):
                    gr.Markdown(info.card, elem_id="card")

        def on_prompt(upload):
            if upload is None:
                return (
                    "No prompt: the piece starts from nothing.",
                    gr.update(visible=False),
                    gr.update(visible=False),
                )
            try:
                p, png = studio.preview(upload)
            except UploadError as e:
                gr.Warning(str(e))
                return f"**Refused:** {e}", gr.update(value=None, visible=False), gr.update(visible=False)
            top = max(1.0, round(p.seconds, 1))
            if audio_model:  # the whole recording is continued: no notes, nothing to cut
                text = f"**{p.name}**: {p.seconds:.1f} s of audio; the recording is continued as audio."
                return text, gr.update(value=str(png), visible=True), gr.update(visible=False)
            text = f"**{p.name}**: {p.seconds:.1f} s, {p.notes:,} notes ({p.tokens:,} tokens)."
            if p.path != Path(upload):
                text += " Transcribed from the recording; the piece continues these notes."
            return (
                text,
                gr.update(value=str(png), visible=True),
                gr.update(maximum=top, value=top, visible=True),
            )

        prompt.change(on_prompt, prompt, [prompt_status, prompt_roll, keep], concurrency_limit=2)

        # Gradio hands its progress tracker to the argument whose default is one; tracking tqdm
        # shows generate's token bar in the page.
        def on_generate(
            upload, keep_s, seconds_, num_, temperature_, top_p_, min_p_, seed_, composer_, style_, guidance_,
            upsample_, progress=gr.Progress(track_tqdm=True),  # noqa: B008
        ):  # fmt: skip
            job = Job(
                prompt=Path(upload) if upload else None,
                seconds=float(seconds_), num=int(num_), temperature=float(temperature_), top_p=float(top_p_),
                min_p=float(min_p_), seed=int(seed_ or 0),
                composer=composer_ if info.labels and composer_ not in (None, "(none)") else None,
                style=Path(style_) if info.style and style_ else None,
                guidance=float(guidance_) if conditioned else None,
                upsample=bool(upsample_),
            )  # fmt: skip
            if job.prompt is not None and keep_s:
                job.keep_seconds = float(keep_s)
            return _results(studio, job, lambda text: progress(0, desc=text))

        button.click(
            on_generate,
            [
                prompt,
                keep,
                seconds,
                num,
                temperature,
                top_p,
                min_p,
                seed,
                composer,
                style,
                guidance,
                upsample,
            ],
            outputs,
            concurrency_limit=1,
            concurrency_id="model",
        )
    return app


def _results(studio: Studio, job: Job, on_progress) -> list:
    """Run a job and fill the page's result slots; a refused job is an error in the page."""
    import gradio as gr

    from perceiver_music.checkpoint import CheckpointError
    from perceiver_music.tokens.performance import MidiError

    t0 = time.perf_counter()
    try:
        result = studio.generate(job, on_progress)
    except (UploadError, ValueError, MidiError, CheckpointError, FileNotFoundError) as e:
        raise gr.Error(str(e), print_exception=False) from None
    if studio.info.sample_rate is not None:  # an AudioGenerateResult
        lines = [
            f"**{len(result.audio_files)} recording(s)** of {result.seconds:g} s in {time.perf_counter() - t0:.1f} s "
            f"({result.speed:.3f} s of audio per second), written to `{result.out_dir}`."
        ]
        values = ["\n".join(lines)]
        for i in range(MAX_VARIATIONS):
            if i >= len(result.audio_files):
                values += [gr.update(visible=False), None, None, None]
                continue
            wav, codes = str(result.audio_files[i]), str(result.codes_files[i])
            values += [gr.update(visible=True), str(result.images[i]), wav, [wav, codes]]
        return values
    why = {
        "eos": "ended itself",
        "seconds": "reached the length",
        "tokens": "cut at the safety cap",
        "grace": "ran past the length without ending",
    }
    lines = [
        f"**{len(result.midi_files)} variation(s)** in {time.perf_counter() - t0:.1f} s "
        f"({result.tokens_per_s:.0f} tokens/s), written to `{result.out_dir}`."
    ]
    lines += [
        f"- {p.name}: {s:.1f} s, {why[w]}"
        for p, s, w in zip(result.midi_files, result.seconds, result.stopped)
    ]
    lines += [f"- {n}" for n in result.notes + result.warnings]
    values: list = ["\n".join(lines)]
    for i in range(MAX_VARIATIONS):
        if i >= len(result.midi_files):
            values += [gr.update(visible=False), None, None, None]
            continue
        midi = result.midi_files[i]
        png, wav = midi.with_suffix(".png"), midi.with_suffix(".wav")
        audio = str(wav) if wav.is_file() else None
        values += [gr.update(visible=True), str(png), audio, [str(midi), *([audio] if audio else [])]]
    return values


def serve(
    ckpt: str | os.PathLike | None,
    out: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
):
    """Start the studio at http://host:port/, every file it writes under `out`, and return
    the running app (`app.block_thread()` waits until Ctrl+C, `app.close()` stops it).

    FileNotFoundError or CheckpointError for a missing or damaged checkpoint, ImportError
    without Gradio, OSError when the port is taken."""
    info = model_info(ckpt)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Gradio keeps uploads and the files it serves in its cache: inside the output folder too.
    # (It reads the setting when imported.)
    os.environ["GRADIO_TEMP_DIR"] = str(out / ".gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    app = build_app(Studio(info, out, ckpt, device))
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        allowed_paths=[str(out)],
        theme=_theme(gr),
        prevent_thread_lock=True,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        quiet=True,
    )
    return app
