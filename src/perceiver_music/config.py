"""Typed configuration: dataclasses are the one source of truth; YAML loads into them.

A config is built from defaults, then a YAML file (a shipped name such as `debug` or a path),
then dotted command-line overrides such as `model.max_len=2048`. Unknown keys and values of
the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


CONFIG_DIR = Path(__file__).parent / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass
class TokenizerConfig:
    """Performance-event encoding (DESIGN.md section 2)."""

    steps_per_second: int = 100
    velocity_bins: int = 32
    max_shift_steps: int = 100
    max_note_seconds: float = 5.0  # decoding: a note never closed ends after this
    default_velocity: int = 64  # decoding: a NOTE_ON before any VELOCITY
    max_seconds: float = 4 * 3600.0  # longer MIDI files are refused as absurd

    def __post_init__(self) -> None:
        if self.steps_per_second <= 0 or 1000 % self.steps_per_second:
            raise ConfigError("tokenizer.steps_per_second must divide 1000 (MIDI is written in ms)")
        if not 1 <= self.velocity_bins <= 127:
            raise ConfigError("tokenizer.velocity_bins must be in 1..127")
        if self.max_shift_steps < 1:
            raise ConfigError("tokenizer.max_shift_steps must be at least 1")
        if self.max_note_seconds <= 0:
            raise ConfigError("tokenizer.max_note_seconds must be positive")
        if not 1 <= self.default_velocity <= 127:
            raise ConfigError("tokenizer.default_velocity must be in 1..127")
        if self.max_seconds <= 0:
            raise ConfigError("tokenizer.max_seconds must be positive")


@dataclass
class PrepareConfig:
    """Folder of MIDI -> token arrays (DESIGN.md section 3)."""

    workers: int = 0  # 0: one per CPU core
    split: Literal["auto", "maestro", "asap", "hash"] = "auto"
    valid_fraction: float = 0.1  # of pieces (asap) or files (hash)
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError("prepare.workers must be >= 0")
        if not (0 <= self.valid_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ConfigError("prepare.valid_fraction and test_fraction must be in [0, 1)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError("prepare.valid_fraction + test_fraction must leave room for train")


@dataclass
class DataConfig:
    """Training windows (DESIGN.md section 4); their size is the model's max_len / num_latents."""

    segmentation: Literal["effective", "baseline"] = "effective"
    transpose: int = 3  # augmentation: uniform shift in [-transpose, transpose] semitones
    stretch: float = 0.05  # augmentation: time factor uniform in [1 - stretch, 1 + stretch]
    # Share of training windows drawn among those whose targets hold their piece's EOS (effective
    # segmentation): each piece ends once in ~10k tokens, too rarely for a model asked for a
    # length to learn how music ends.
    end_windows: float = 0.0

    def __post_init__(self) -> None:
        if self.transpose < 0 or not 0 <= self.stretch < 1:
            raise ConfigError("data.transpose must be >= 0 and data.stretch in [0, 1)")
        if not 0 <= self.end_windows < 1:
            raise ConfigError("data.end_windows must be in [0, 1)")
        if self.end_windows and self.segmentation != "effective":
            raise ConfigError(
                "data.end_windows needs data.segmentation=effective (baseline windows end inside pieces)"
            )


@dataclass
class ModelConfig:
    """Perceiver AR / PerceiverS / Transformer baseline (DESIGN.md section 5)."""

    # vqvae: the `codec` section; upsampler: a Transformer over audio codes conditioned on the
    # codes of the level above (the `codes` section, audio/upsampler.py)
    arch: Literal["perceiver_ar", "transformer", "vqvae", "upsampler"] = "perceiver_ar"
    vocab_size: int = 391
    max_len: int = 1024  # input tokens per window (the context)
    num_latents: int = 256  # positions predicted per window: the last num_latents
    width: int = 512
    heads: int = 8
    layers: int = 6  # causal self-attention layers (over the latents for Perceiver AR)
    mlp_ratio: int = 4
    # PerceiverS multi-scale cascade: one cross-attention layer per entry, "full" or a window of
    # that many inputs; ["full"] is Perceiver AR, ["full", 1024] PerceiverS.
    scales: list[int | str] = field(default_factory=lambda: ["full"])
    scale_mode: Literal["relative", "absolute"] = "relative"  # window per query / last W of the input
    rotary_fraction: float = 0.5  # of each head's dims
    rotary_base: float = 10000.0
    dropout: float = 0.1  # attention, residual, and the latents' embeddings (not the inputs' keys/values)
    prefix_dropout: float = 0.0  # fraction of the non-latent inputs dropped while training
    # share of training windows that see none of the inputs before their latents, as at a piece's
    # start: there only the conditions (composer, style) say what the piece is, so they must carry it
    context_dropout: float = 0.0
    z_loss: float = 1e-4
    checkpoint_activations: bool = False
    # Conditioning (DESIGN.md section 8b): any of "label" (composer), "timing" (total length,
    # elapsed time and fraction), "style" (a reference performance's encoding) and "keyboard"
    # (the pitches sounding after each token and for how long, which the tokens give).
    condition: list[Literal["label", "timing", "style", "keyboard"]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # label names; empty: the data's, at train time
    timing_bins: int = 64  # range-embedding buckets of each timing quantity
    # timing also tells the time left (log-spaced, so fine near the end, where the fraction's
    # last bucket spans a 64th of the piece: seconds of a long one)
    timing_remaining: bool = False
    # with keyboard: also a learnt logit, per pitch, for each event the keyboard makes impossible
    # (NOTE_ON of a key down, NOTE_OFF of one up or struck at this instant, EOS while keys are
    # down), so the model itself can give them no probability (model/conditioning.py)
    keyboard_logits: bool = False
    # with style: the style vector also reaches the output, as a learnt bias over the whole
    # vocabulary (which pitches, loudness and note spacing the reference plays); the query
    # stream alone gave the vector nothing the context did not, and training turned it off
    style_logits: bool = False
    style_len: int = 512  # reference tokens the style encoder reads
    style_width: int = 128
    style_layers: int = 2

    def __post_init__(self) -> None:
        if self.max_len < 1 or not 1 <= self.num_latents <= self.max_len:
            raise ConfigError("model.num_latents must be in 1..model.max_len")
        if self.width % self.heads:
            raise ConfigError("model.width must be a multiple of model.heads")
        if self.arch in ("transformer", "upsampler") and self.num_latents != self.max_len:
            raise ConfigError(f"model.arch={self.arch} predicts every position: set num_latents = max_len")
        if not self.scales:
            raise ConfigError("model.scales needs at least one entry")
        for s in self.scales:
            if not (s == "full" or (isinstance(s, int) and s > 0)):
                raise ConfigError(f"model.scales: {s!r} is neither 'full' nor a positive window size")
        if not 0 <= self.rotary_fraction <= 1:
            raise ConfigError("model.rotary_fraction must be in [0, 1]")
        if not (0 <= self.dropout < 1 and 0 <= self.prefix_dropout < 1):
            raise ConfigError("model.dropout and model.prefix_dropout must be in [0, 1)")
        if not 0 <= self.context_dropout <= 1:
            raise ConfigError("model.context_dropout must be in [0, 1]")
        if self.context_dropout and self.arch != "perceiver_ar":
            raise ConfigError(
                "model.context_dropout needs inputs before the latents: model.arch=perceiver_ar"
            )
        if len(set(self.condition)) != len(self.condition):
            raise ConfigError("model.condition lists a kind twice")
        if len(set(self.labels)) != len(self.labels) or "" in self.labels:
            raise ConfigError("model.labels must be distinct, non-empty names")
        if self.timing_bins < 2 or self.style_len < 1 or self.style_layers < 1:
            raise ConfigError("model.timing_bins must be >= 2, style_len and style_layers >= 1")
        if self.timing_remaining and not self.conditioned_on("timing"):
            raise ConfigError("model.timing_remaining is part of timing: add timing to model.condition")
        if self.keyboard_logits and not self.conditioned_on("keyboard"):
            raise ConfigError("model.keyboard_logits reads the keyboard: add keyboard to model.condition")
        if self.style_logits and not self.conditioned_on("style"):
            raise ConfigError("model.style_logits reads the style vector: add style to model.condition")
        if self.style_width % 4:
            raise ConfigError("model.style_width must be a multiple of 4 (its attention heads)")

    def conditioned_on(self, kind: str) -> bool:
        return kind in self.condition

    def window_sizes(self) -> list[int | None]:
        """`scales` as window sizes, None for full."""
        return [None if s == "full" else int(s) for s in self.scales]


@dataclass
class TrainConfig:
    """The training loop (one file: train.py)."""

    steps: int = 10_000
    batch_size: int = 8  # windows per optimizer step and process, before accumulation
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 500
    schedule: Literal["cosine", "wsd"] = "cosine"  # after warmup: see train.learning_rate
    decay_steps: int = 0  # wsd: the last steps, decayed linearly from lr to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_windows: int = 256  # validation windows per evaluation (evenly spaced, always the same)
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    threads: int = 0  # CPU threads (0: torch's default)
    num_workers: int = 0  # data-loading processes
    # Conditioned models (model.condition): the share of training windows that are not told
    # their label / total length / style, so one model also generates without them.
    label_dropout: float = 0.15
    timing_dropout: float = 0.15
    style_dropout: float = 0.25
    # ... and the share told nothing at all (each alone rarely drops all three together, and
    # "nothing" is what an unconditioned generation and guidance's second row ask for).
    condition_dropout: float = 0.2
    # Weight of the style encoder's contrastive term (model.conditioning.style_contrast_loss):
    # each window's reference must pick out that window among the batch's. 0: the prior's loss
    # alone, which turns an unused encoder's output down to a constant.
    style_contrast: float = 0.0
    # With `train --init`: parameters whose names start with one of these keep their fresh
    # initialisation instead of the source's weights (a part training had turned off, such as
    # a style encoder whose output had collapsed to a constant, starts again).
    reinit: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "log_every",
            "ckpt_every",
            "keep_last",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("train.lr must be positive and train.min_lr in [0, lr]")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.eval_windows < 1:
            raise ConfigError("train.warmup_steps and grad_clip must be >= 0, eval_windows >= 1")
        if not 0 <= self.decay_steps <= self.steps:
            raise ConfigError(f"train.decay_steps must be in [0, train.steps={self.steps}]")
        for name in ("label_dropout", "timing_dropout", "style_dropout", "condition_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name} must be in [0, 1]")
        if self.style_contrast < 0:
            raise ConfigError("train.style_contrast must be >= 0")


@dataclass
class CodecConfig:
    """The audio codec (DESIGN.md section 8), trained when model.arch is vqvae.

    quantizer=vq: Jukebox's VQ-VAE, one encoder/decoder/codebook per level, level l
    downsampling by prod(strides_t[:l+1] ** downs_t[:l+1]). quantizer=rvq: one level whose
    frames are quantized by `codebooks` residual codebooks (SoundStream/EnCodec).
    """

    sample_rate: int = 44100
    sample_length: int = 32768  # samples per training crop (a multiple of the top level's hop)
    levels: int = 3
    downs_t: list[int] = field(default_factory=lambda: [3, 2, 2])  # stride-2 convs per level
    strides_t: list[int] = field(default_factory=lambda: [2, 2, 2])
    emb_width: int = 64  # code vector size
    l_bins: int = 2048  # codes per codebook
    width: int = 32  # conv channels
    depth: int = 4  # residual blocks per downsampling step
    m_conv: float = 1.0  # residual blocks' hidden width, times `width`
    dilation_growth_rate: int = 3
    multipliers: list[int] = field(default_factory=lambda: [2, 1, 1])  # width and depth, per level
    quantizer: Literal["vq", "rvq"] = "vq"
    codebooks: int = 1  # rvq: residual codebooks per frame (K)
    quantizer_dropout: float = 0.0  # rvq: share of examples trained with a random 1..K codebooks
    mu: float = 0.99  # EMA decay of the codebooks
    restarts: bool = True  # codes whose EMA usage falls below restart_threshold get batch vectors
    restart_threshold: float = 1.0
    commit: float = 0.02
    l2: float = 1.0
    linf: float = 0.02  # weight of the mean of the `linf_k` largest squared errors
    linf_k: int = 2048
    spectral: float = 1.0  # multi-resolution STFT magnitude loss
    stft_sizes: list[int] = field(default_factory=lambda: [2048, 1024, 512])
    stft_hops: list[int] = field(default_factory=lambda: [240, 120, 50])
    stft_windows: list[int] = field(default_factory=lambda: [1200, 600, 240])
    chunk_seconds: float = 10.0  # encode/decode long files in chunks of this length

    def __post_init__(self) -> None:
        n = self.levels
        if n < 1 or not (len(self.downs_t) == len(self.strides_t) == len(self.multipliers) == n):
            raise ConfigError("codec.downs_t, strides_t and multipliers need one entry per level")
        if min(self.downs_t) < 1 or min(self.strides_t) < 2 or any(s % 2 for s in self.strides_t):
            raise ConfigError("codec.downs_t must be >= 1 and codec.strides_t even numbers >= 2")
        if self.quantizer == "rvq" and n != 1:
            raise ConfigError("codec.quantizer=rvq works at one level: set codec.levels=1")
        if self.codebooks < 1 or (self.quantizer == "vq" and self.codebooks != 1):
            raise ConfigError("codec.codebooks must be 1 for quantizer=vq and >= 1 for rvq")
        if not 0 <= self.quantizer_dropout <= 1 or not 0 < self.mu < 1:
            raise ConfigError("codec.quantizer_dropout must be in [0, 1] and codec.mu in (0, 1)")
        if self.sample_length % self.hop_lengths()[-1]:
            raise ConfigError(
                f"codec.sample_length ({self.sample_length}) must be a multiple of the top hop "
                f"({self.hop_lengths()[-1]})"
            )
        if not (len(self.stft_sizes) == len(self.stft_hops) == len(self.stft_windows)):
            raise ConfigError("codec.stft_sizes, stft_hops and stft_windows need the same length")
        if self.l_bins < 2 or self.emb_width < 1 or self.width < 1 or self.depth < 1:
            raise ConfigError("codec.l_bins must be >= 2; emb_width, width and depth >= 1")

    def hop_lengths(self) -> list[int]:
        """Audio samples per code frame at each level."""
        hops, hop = [], 1
        for down, stride in zip(self.downs_t, self.strides_t):
            hop *= stride**down
            hops.append(hop)
        return hops


@dataclass
class AudioPrepareConfig:
    """Folder of audio -> mono PCM per split (prepare-audio)."""

    sample_rate: int = 22050
    min_seconds: float = 1.0  # shorter files are skipped
    max_seconds: float = 4 * 3600.0  # longer files are refused as absurd
    silence_db: float = -60.0  # files whose peak is below this (dBFS) are skipped as silent

    def __post_init__(self) -> None:
        if self.sample_rate < 1000 or self.min_seconds < 0 or self.max_seconds <= self.min_seconds:
            raise ConfigError("audio.sample_rate must be >= 1000 and 0 <= min_seconds < max_seconds")


@dataclass
class CodesConfig:
    """Audio codes as a prior's tokens (DESIGN.md section 8; data from `prepare-codes`).

    `train` fills the layout from the data's meta.json, so a checkpoint knows which codec and
    level it models: token id = 3 + codebook k x cardinality + code (0-2 are PAD, BOS, EOS).
    The conditioner settings are the upsampler's (model.arch=upsampler): Jukebox's stack of
    dilated residual convolutions at each rate between the upper level and this one.
    """

    codec: str = ""  # digest of the codec's weights ("": the tokens are not audio codes)
    level: int = 0
    codebooks: int = 1  # K: a frame is K consecutive tokens, codebook t % K at the t-th code
    cardinality: int = 0  # codes per codebook
    frame_rate: float = 0.0  # frames per second of audio
    upper_cardinality: int = 0  # upsampler: codes per codebook of the level above
    upper_strides: list[int] = field(default_factory=list)  # upsampler: one transposed conv each
    cond_depth: int = 3  # residual blocks per rate in the conditioner
    cond_dilation_growth: int = 3

    def __post_init__(self) -> None:
        if self.codebooks < 1 or self.cond_depth < 1 or self.cond_dilation_growth < 1:
            raise ConfigError("codes.codebooks, cond_depth and cond_dilation_growth must be >= 1")
        if any(s < 2 or s % 2 for s in self.upper_strides):
            raise ConfigError("codes.upper_strides must be even numbers >= 2")


@dataclass
class Config:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    audio: AudioPrepareConfig = field(default_factory=AudioPrepareConfig)
    codes: CodesConfig = field(default_factory=CodesConfig)


# ----------------------------------------------------------------------------- loading


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known here: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, path)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested mapping; values are parsed as YAML."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config name (`debug`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named {name_or_path!r}: shipped configs are {', '.join(names)}")


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None, cls: type[T] = Config
) -> T:
    """Defaults <- YAML file <- dotted overrides, checked against `cls`."""
    data: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        except UnicodeDecodeError as e:  # e.g. a damaged run's config.json
            raise ConfigError(f"{path}: not a text file ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)
