"""The training loop: one readable function, on CPU, one GPU, or many through torchrun (DDP).

    perceiver-music train --config debug --data DATA_DIR --out RUN_DIR [--resume] [key=value ...]
    torchrun --nproc_per_node 4 -m perceiver_music train --config ... (one process per GPU)

The config decides what is trained (a small "task": what a batch is, what the loss is, what
validation measures): a token model (Perceiver AR, PerceiverS, the Transformer) on windows of
MIDI tokens, or, with model.arch=vqvae, the audio codec on crops of prepared audio.

Every optimizer step sees `batch_size * grad_accum * world_size` windows. Window i of the
training stream is fixed by (seed, i) (see data/windows.py), so the data position is just the
step, and a resumed run sees exactly the windows, dropout masks and learning rates that an
uninterrupted run would have seen.

RUN_DIR gets config.json, log.jsonl and log.csv (one row per log or evaluation), loss.png,
checkpoints/step_*/ (the last `keep_last`) and best/ (the best validation NLL).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from perceiver_music import checkpoint as ckpt_io
from perceiver_music.config import Config, ConfigError, TrainConfig
from perceiver_music.data.windows import Conditions, TokenData, WindowDataset
from perceiver_music.files import atomic_write_text
from perceiver_music.model import build_model
from perceiver_music.model.base import autocast, nll_sum
from perceiver_music.model.conditioning import Cond, style_contrast_loss
from perceiver_music.progress import progress_bar
from perceiver_music.tokens.performance import PAD

LOG_FIELDS = ["step", "kind", "loss", "val_nll", "val_bits", "lr", "grad_norm", "tokens_per_s", "elapsed_s"]
# Conditioned models: val_nll is told nothing (comparable with an unconditioned run's), and
# val_nll_cond is told every condition.
COND_LOG_FIELDS = ["val_nll_cond"]
# Codec runs: validation loss, spectral convergence (dB) and codebook usage (mean over levels);
# log.jsonl has every level's figures.
CODEC_LOG_FIELDS = ["val_loss", "val_sc_db", "usage", "samples_per_s"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_loss: float
    best_val_nll: float | None  # the best validation score: NLL, or a codec's validation loss
    score_name: str = "validation NLL"
    already_finished: bool = False  # --resume of a run that had reached train.steps: nothing ran


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then to `min_lr` at `steps`: by a cosine (schedule=cosine), or held at
    `lr` until the last `decay_steps` and then linearly (schedule=wsd: warmup-stable-decay)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        # A run held at lr can be extended at will; a short decay branched off it (--branch with
        # train.steps=S+D train.decay_steps=D) gives a finished model at any point along the way.
        start = max(cfg.warmup_steps, cfg.steps - cfg.decay_steps)
        progress = min(1.0, max(0.0, (step - start) / max(1, cfg.steps - start)))
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class _Batches(torch.utils.data.Dataset):
    """Item k is the k-th micro-batch of this process, collated to tensors."""

    def __init__(self, windows, collate_fn, batch_size: int, rank: int, world: int):
        self.windows, self.collate, self.batch_size = windows, collate_fn, batch_size
        self.rank, self.world = rank, world

    def __len__(self) -> int:  # the stream is endless; the sampler decides what is read
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        first = (k * self.world + self.rank) * self.batch_size
        return self.collate([self.windows[i] for i in range(first, first + self.batch_size)])


COND_KEYS = ("label", "total", "elapsed", "reference", "keyboard")  # what `collate` adds for conditioning


def model_inputs(batch: dict[str, torch.Tensor], told: bool = True) -> dict:
    """The model's keyword arguments from a batch: `cond` (batch_cond) for a conditioned
    model's batch, and any other tensors beyond inputs, positions and targets (an audio
    upsampler's upper codes)."""
    skip = ("inputs", "positions", "targets", "piece", *COND_KEYS)
    kwargs: dict = {k: v for k, v in batch.items() if k not in skip}
    if any(k in batch for k in COND_KEYS):
        kwargs["cond"] = batch_cond(batch, told)
    return kwargs


def collate(windows) -> dict[str, torch.Tensor]:
    batch = {
        "inputs": torch.from_numpy(np.stack([w.inputs for w in windows])),
        "positions": torch.from_numpy(np.stack([w.positions for w in windows])),
        "targets": torch.from_numpy(np.stack([w.targets for w in windows])),
    }
    first = windows[0]
    if first.elapsed is not None:
        batch["elapsed"] = torch.from_numpy(np.stack([w.elapsed for w in windows]))
    if first.keyboard is not None:
        batch["keyboard"] = torch.from_numpy(np.stack([w.keyboard for w in windows]))
    if first.reference is not None:
        batch["reference"] = torch.from_numpy(np.stack([w.reference for w in windows]))
        # which windows share a piece: not each other's negatives in the style contrast
        batch["piece"] = torch.tensor([w.piece for w in windows], dtype=torch.long)
    if first.elapsed is not None or any(w.label for w in windows):
        batch["label"] = torch.tensor([w.label for w in windows], dtype=torch.long)
        batch["total"] = torch.tensor([w.total for w in windows], dtype=torch.float32)
    return batch


def batch_cond(batch: dict[str, torch.Tensor], told: bool = True) -> Cond:
    """What a collated batch is conditioned on (an unconditioned model ignores it); told=False:
    nothing but the time elapsed and the keyboard, which the tokens themselves give."""
    if not told:
        return Cond(elapsed=batch.get("elapsed"), keyboard=batch.get("keyboard"))
    return Cond(
        label=batch.get("label"),
        total=batch.get("total"),
        elapsed=batch.get("elapsed"),
        reference=batch.get("reference"),
        keyboard=batch.get("keyboard"),
    )


def window_conditions(cfg: Config) -> Conditions | None:
    """What the windows must carry for cfg.model's conditioning (None: unconditioned)."""
    m, t = cfg.model, cfg.train
    if not m.condition:
        return None
    return Conditions(
        labels=list(m.labels) if m.conditioned_on("label") else [],
        timing=m.conditioned_on("timing"),
        style_len=m.style_len if m.conditioned_on("style") else 0,
        label_dropout=t.label_dropout,
        timing_dropout=t.timing_dropout,
        style_dropout=t.style_dropout,
        condition_dropout=t.condition_dropout,
        keyboard=m.conditioned_on("keyboard"),
    )


def _write_branch_record(run_dir: Path, source: Path, step: int, cfg: Config) -> None:
    """branch.json: where a branched run started, what it added to the model, and for a decay
    branched off a held (wsd) run, over which steps its rate decayed (its model card tells the
    stages apart)."""
    t = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    source_file = source.parent.parent / "config.json"
    # read as a config, so a setting the source's file predates counts at its default
    source_model = ckpt_io.read_config(source_file).model if source_file.is_file() else None
    record = {
        "source": str(source),
        "step": step,
        "source_condition": list(source_model.condition) if source_model else [],
    }
    # the model settings it changed, besides the conditioning named on its own
    notes = [
        f"model.{f.name} {getattr(source_model, f.name)} -> {getattr(cfg.model, f.name)}"
        for f in dataclasses.fields(cfg.model)
        if source_model is not None
        and f.name not in ("condition", "labels")
        and getattr(source_model, f.name) != getattr(cfg.model, f.name)
    ]
    if t.schedule == "wsd" and t.decay_steps:
        start = max(step, t.steps - t.decay_steps)
        notes.append(f"learning rate decayed linearly to {t.min_lr:g} over steps {start:,}-{t.steps:,}")
    if notes:
        record["note"] = "; ".join(notes)
    atomic_write_text(run_dir / "branch.json", json.dumps(record, indent=1))


def branch_chain(run_dir: str | os.PathLike) -> list[tuple[Path, dict | None]]:
    """The runs a run went on from through `train --branch`, oldest first, itself last: (run
    folder, its branch.json record; None for the first). A source is followed as its branch.json
    names it (relative to where train ran), and the oldest is listed even if its folder is gone."""
    chain: list[tuple[Path, dict | None]] = []
    run = Path(run_dir)
    while (run / "branch.json").is_file():
        record = json.loads((run / "branch.json").read_text())
        chain.append((run, record))
        run = Path(record["source"]).parent.parent  # RUN/checkpoints/step_N
    chain.append((run, None))
    return chain[::-1]


def init_checkpoint(init: str | os.PathLike) -> Path:
    """The checkpoint folder `--init` names: "bundled", a run or a checkpoint folder."""
    try:
        return ckpt_io.resolve(None if str(init) == "bundled" else init)
    except FileNotFoundError as e:
        raise ckpt_io.CheckpointError(f"--init: {e}") from None


# What a fine-tuning run may add to the model it starts from: conditioning it did not have
# (whose weights start as a no-op, as a branch's do) and the regularisers that hold no weights.
INIT_MAY_ADD = ("condition", "timing_remaining", "keyboard_logits", "style_logits", "context_dropout")


def _fresh_parameters(model: torch.nn.Module, prefixes: list[str]) -> dict[str, torch.Tensor]:
    """The model's freshly initialised tensors under each of `prefixes` (train.reinit)."""
    state = model.state_dict()
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in state):
            raise ConfigError(f"train.reinit: the model has no parameter named {prefix}...")
    return {n: v.detach().clone() for n, v in state.items() if n.startswith(tuple(prefixes))}


def _init_source(cfg: Config, init: str | os.PathLike) -> Path:
    """The checkpoint folder `--init` names, once its model is known to be cfg.model, or that
    model with conditioning added (whose label set it then takes: a fine-tuning set's unknown
    composers count as unlabelled)."""
    source = init_checkpoint(init)
    source_model = ckpt_io.read_config(source / "config.json").model
    if cfg.model.conditioned_on("label") and not cfg.model.labels:
        cfg.model.labels = list(source_model.labels)
    differ = [
        f"{f.name}={getattr(source_model, f.name)!r} there, {getattr(cfg.model, f.name)!r} here"
        for f in dataclasses.fields(source_model)
        if getattr(source_model, f.name) != getattr(cfg.model, f.name)
        and (f.name not in INIT_MAY_ADD or not set(source_model.condition) <= set(cfg.model.condition))
    ]
    if differ:
        raise ConfigError(
            f"--init: {source} is another model (model.{differ[0]}); fine-tuning keeps the model "
            "as it is (leave out --config to take its config)"
        )
    return source


def _write_init_record(run_dir: Path, source: Path) -> None:
    """init.json: the weights a fine-tuning run started from, and what had trained them (its
    model card adds the source's steps and tokens to its own)."""
    info = json.loads((source / "info.json").read_text()) if (source / "info.json").is_file() else {}
    cfg = json.loads((source / "config.json").read_text())
    record = {"source": str(source), "source_info": info, "source_train": cfg.get("train", {})}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "init.json", json.dumps(record, indent=1))


def _setup_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@torch.no_grad()
def evaluate_windows(
    model,
    windows: WindowDataset,
    indices,
    batch_size,
    device,
    precision,
    rank=0,
    world=1,
    collate_fn=None,
    told: bool = True,
):
    """Validation NLL in nats per token over the given windows (split across processes);
    told: whether a conditioned model is told the windows' conditions."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    mine = indices[rank::world]
    for start in range(0, len(mine), batch_size):
        batch = (collate_fn or collate)([windows[int(i)] for i in mine[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            logits = model(batch["inputs"], batch["positions"], **model_inputs(batch, told))
        nll, n = nll_sum(logits, batch["targets"])
        total += nll.double().cpu()
        count += n.double().cpu()
    if world > 1:
        both = torch.stack([total, count]).to(device)
        dist.all_reduce(both)
        total, count = both[0].cpu(), both[1].cpu()
    model.train()
    return (total / count).item() if count > 0 else float("nan"), int(count.item())


class TokenTask:
    """Next-token prediction over windows of MIDI tokens (the token models)."""

    unit, score_name, log_fields = "tokens", "validation NLL", LOG_FIELDS

    def __init__(self, cfg: Config, data_dir):
        meta_path = Path(data_dir) / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("kind") == "audio":
            raise ConfigError(
                f"{data_dir}: audio data (from `prepare-audio`); model.arch={cfg.model.arch} trains on "
                "MIDI from `prepare` (model.arch=vqvae trains the audio codec)"
            )
        train_data, valid_data = TokenData(data_dir, "train"), TokenData(data_dir, "valid")
        if train_data.meta["vocab_size"] != cfg.model.vocab_size:
            raise ConfigError(
                f"{data_dir}: vocabulary of {train_data.meta['vocab_size']} tokens, but "
                f"model.vocab_size is {cfg.model.vocab_size}"
            )
        if len(train_data) == 0:
            raise ConfigError(f"{data_dir}: the train split has no pieces")
        m = cfg.model
        if m.conditioned_on("label") and not m.labels:
            m.labels = train_data.label_names()  # saved in config.json: the checkpoint's label set
            if not m.labels:
                how = (  # codes take their recordings' labels, which come from the MIDI they were rendered from
                    "prepare-audio --splits-from MIDI_DATA_DIR, then prepare-codes"
                    if train_data.meta.get("kind") == "codes"
                    else "prepare --labels FILE.csv, or ASAP/MAESTRO metadata"
                )
                raise ConfigError(
                    f"{data_dir}: model.condition has 'label' but no training piece has a label ({how})"
                )
        if cfg.train.style_contrast and not m.conditioned_on("style"):
            raise ConfigError("train.style_contrast trains the style encoder: add style to model.condition")
        conditions = window_conditions(cfg)
        self.train_windows = WindowDataset(
            train_data,
            cfg.data,
            m.max_len,
            m.num_latents,
            train=True,
            seed=cfg.train.seed,
            conditions=conditions,
        )
        self.valid_windows = WindowDataset(
            valid_data if len(valid_data) else train_data,
            cfg.data,
            m.max_len,
            m.num_latents,
            train=False,
            conditions=conditions,
        )
        self.no_valid = len(valid_data) == 0
        self.collate = collate
        self.cfg = cfg
        if m.condition:
            self.log_fields = (
                LOG_FIELDS + COND_LOG_FIELDS + (["style_contrast"] if cfg.train.style_contrast else [])
            )
        self.extras: dict[str, float] = {}

    def build(self, cfg: Config, fresh: bool):
        return build_model(cfg.model)

    def loss(self, net, model, batch) -> tuple[torch.Tensor, int]:
        logits = net(batch["inputs"], batch["positions"], **model_inputs(batch))
        loss = model.loss(logits, batch["targets"])
        weight = self.cfg.train.style_contrast
        if weight and "reference" in batch:
            R = batch["reference"].shape[1]
            # the window's last R inputs: the reference was drawn from outside the whole window
            contrast = style_contrast_loss(
                model.conditioner.style_encoder, batch["reference"], batch["inputs"][:, -R:], batch["piece"]
            )
            self.extras = {"style_contrast": round(contrast.item(), 5)}
            loss = loss + weight * contrast
        return loss, int((batch["targets"] != PAD).sum())

    def evaluate(
        self, net, indices, batch_size, device, precision, rank, world
    ) -> tuple[float, dict, dict, str]:
        """(score, log fields, best/info.json fields, message) of one validation pass."""
        conditioned = bool(self.cfg.model.condition)
        args = (net, self.valid_windows, indices, batch_size, device, precision, rank, world, self.collate)
        nll, n = evaluate_windows(*args, told=not conditioned)
        row = {"val_nll": round(nll, 6), "val_bits": round(nll / math.log(2), 6)}
        message = f"validation {nll:.4f} nats/token ({nll / math.log(2):.4f} bits) over {n} tokens"
        info = {"val_nll": nll, "val_tokens": n}
        if conditioned:
            told, _ = evaluate_windows(*args, told=True)
            row["val_nll_cond"] = info["val_nll_cond"] = round(told, 6)
            message += f" told nothing; {told:.4f} told every condition"
        return nll, row, info, message


class CodecTask:
    """The audio codec (model.arch=vqvae) on random crops of prepared audio."""

    unit, score_name, log_fields = "samples", "validation loss", LOG_FIELDS + CODEC_LOG_FIELDS

    def __init__(self, cfg: Config, data_dir):
        from perceiver_music.audio.data import AudioData, AudioWindows

        try:
            train_data, valid_data = AudioData(data_dir, "train"), AudioData(data_dir, "valid")
        except ValueError as e:
            raise ConfigError(f"{e}; model.arch=vqvae trains on `prepare-audio` data") from None
        c = cfg.codec
        if train_data.sample_rate != c.sample_rate:
            raise ConfigError(
                f"{data_dir}: audio at {train_data.sample_rate} Hz, but codec.sample_rate is {c.sample_rate} "
                f"(prepare-audio --sample-rate {c.sample_rate}, or set codec.sample_rate)"
            )
        if len(train_data) == 0:
            raise ConfigError(f"{data_dir}: the train split has no audio")
        self.train_windows = AudioWindows(train_data, c.sample_length, train=True, seed=cfg.train.seed)
        self.valid_windows = AudioWindows(
            valid_data if len(valid_data) else train_data, c.sample_length, train=False
        )
        self.no_valid = len(valid_data) == 0
        self.extras = {}

    @staticmethod
    def collate(crops) -> dict[str, torch.Tensor]:
        return {"audio": torch.from_numpy(np.stack(crops))}

    def build(self, cfg: Config, fresh: bool):
        from perceiver_music.audio.vqvae import VQVAE

        model = VQVAE(cfg.codec)
        if fresh:  # the loss's normalisers, from the first training crops (a resume loads them)
            n = min(64, len(self.train_windows))
            model.set_bandwidth(self.collate([self.train_windows[i] for i in range(n)])["audio"])
        return model

    def loss(self, net, model, batch) -> tuple[torch.Tensor, int]:
        out = net(batch["audio"])
        self.extras = {k: round(float(v), 5) for k, v in out.items() if k != "loss"}
        return out["loss"], batch["audio"].numel()

    def evaluate(
        self, net, indices, batch_size, device, precision, rank, world
    ) -> tuple[float, dict, dict, str]:
        from perceiver_music.audio.evaluate import SILENCE
        from perceiver_music.audio.metrics import spectral_convergence_db

        model = net.module if hasattr(net, "module") else net
        model.eval()
        keys = ["val_loss"] + [f"val_sc_db_l{level}" for level in range(len(model.hops))]
        sums, counts = (
            torch.zeros(len(keys), dtype=torch.float64),
            torch.zeros(len(keys), dtype=torch.float64),
        )
        mine = indices[rank::world]
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                crops = [self.valid_windows[int(i)] for i in mine[start : start + batch_size]]
                x = self.collate(crops)["audio"].to(device)
                with autocast(device, precision):
                    sums[0] += float(model(x)["loss"]) * len(x)
                counts[0] += len(x)
                # Spectral convergence divides by the crop's energy: silent crops are left out.
                audible = x.abs().amax(1) > SILENCE
                for level in range(len(model.hops)):
                    y = model.decode(model.encode(x, level), level).float()
                    sc = spectral_convergence_db(x, y)[audible]
                    sums[1 + level] += float(sc.sum())
                    counts[1 + level] += len(sc)
        model.train()
        if world > 1:
            both = torch.stack([sums, counts]).to(device)
            dist.all_reduce(both)
            sums, counts = both[0].cpu(), both[1].cpu()
        row = {k: round(float(s / c), 5) if c > 0 else None for k, s, c in zip(keys, sums, counts)}
        levels = [row[k] for k in keys[1:] if row[k] is not None]  # None: every crop was silent
        row["val_sc_db"] = round(sum(levels) / len(levels), 4) if levels else None
        usages = [float(q.books[k].usage()) for q in model.quantizers for k in range(q.num_codebooks)]
        row["usage"] = round(sum(usages) / len(usages), 4)
        sc = ", ".join("n/a" if row[k] is None else f"{row[k]:.2f}" for k in keys[1:])
        message = (
            f"validation loss {row['val_loss']:.4f}, spectral convergence {sc} dB, usage {row['usage']:.2f}"
        )
        return row["val_loss"], row, dict(row), message


def _token_task(cfg: Config, data_dir) -> TokenTask:
    """MIDI tokens, or audio codes from `prepare-codes` (audio/codes.py: priors, upsamplers)."""
    from perceiver_music.audio.codes import make_code_task

    return make_code_task(cfg, data_dir) or TokenTask(cfg, data_dir)


def train(
    cfg: Config,
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    branch: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
) -> TrainResult:
    """Train cfg on data_dir into run_dir. branch: start from another run's training checkpoint
    (its step, optimizer state, RNG and log), whose model cfg.model extends with conditioning:
    the parameters it lacks start from their initialisation (conditioning's: as a no-op).
    init: fine-tune, starting from a trained model's weights ("bundled", a run or a checkpoint
    folder; the same cfg.model) at step 0 with a fresh optimizer and cfg.train's schedule."""
    t = cfg.train
    if branch is not None and init is not None:
        raise ConfigError(
            "--branch and --init: choose one (a branch carries its optimizer, init only weights)"
        )
    init_source = _init_source(cfg, init) if init is not None else None
    rank, world, local_rank = _setup_distributed()
    main_process = rank == 0
    device = _device(t, local_rank)
    if device.type == "cpu":
        # A trained model's softmax and its backward produce denormal floats, which x86 CPUs
        # compute far slower than normal ones (bench/denormals.py: 5 % of a step at step 1,250
        # of the bundle run); flushed to zero (below 1.2e-38), nothing a model learns changes.
        torch.set_flush_denormal(True)
    if t.threads:
        torch.set_num_threads(t.threads)
    run_dir = Path(run_dir)

    task = CodecTask(cfg, data_dir) if cfg.model.arch == "vqvae" else _token_task(cfg, data_dir)
    valid_windows = task.valid_windows
    # The same evenly spaced validation windows at every evaluation.
    eval_idx = np.unique(
        np.linspace(0, len(valid_windows) - 1, min(t.eval_windows, len(valid_windows))).astype(int)
    )

    torch.manual_seed(t.seed + rank)
    latest = ckpt_io.latest_checkpoint(run_dir)
    model = task.build(cfg, fresh=latest is None).to(device)
    names = param_order(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [params[n] for n in names["decay"]], "weight_decay": t.weight_decay},
            {"params": [params[n] for n in names["no_decay"]], "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        fused=True,  # one kernel per step instead of a loop of element-wise ops (CPU and CUDA)
    )

    step, best, log_rows = 0, None, []
    if latest is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run (up to {latest.name}): add --resume, or choose another --out"
        )
    if branch is not None and latest is None:
        source = ckpt_io.training_checkpoint(branch)
        trainer = ckpt_io.read_branch_state(
            source, model, optimizer, names["decay"] + names["no_decay"], rank
        )
        step = trainer["step"]
        if step >= t.steps:
            raise ConfigError(f"--branch: {source} is at step {step}, not before train.steps={t.steps}")
        log_rows = _read_log(source.parent.parent, upto=step)
        if main_process:
            print(f"branched from {source} at step {step}")
            _write_branch_record(run_dir, source, step, cfg)
    if t.reinit and init_source is None and latest is None:
        raise ConfigError("train.reinit names parameters that --init should not load: add --init")
    if init_source is not None and latest is None:
        fresh = _fresh_parameters(model, t.reinit)
        ckpt_io.load_weights(
            model, init_source / "model.safetensors", init_source / "config.json", new_prefix="conditioner."
        )
        model.load_state_dict(fresh, strict=False)
        if main_process:
            print(
                f"fine-tuning from {init_source}"
                + (f" ({', '.join(t.reinit)} started afresh)" if fresh else "")
            )
            _write_init_record(run_dir, init_source)
    if resume and latest is None and main_process:
        print(f"no checkpoint in {run_dir / 'checkpoints'}: starting from step 0")
    if latest is not None:
        resumed, trainer = _resume(run_dir, model, optimizer, rank, world)
        step, best = trainer["step"], trainer.get("best_val_nll")
        if main_process:
            print(f"resumed from {resumed} at step {step}")
        if step >= t.steps:
            if main_process:
                print(f"{run_dir}: already finished (step {step} of train.steps={t.steps}); nothing to do")
            return TrainResult(run_dir, step, float("nan"), best, already_finished=True)
        log_rows = _read_log(run_dir, upto=step)
    if main_process:  # (again on resume: train.* settings may have changed, e.g. more steps)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(ckpt_io.config_dict(cfg), indent=1))
        if task.no_valid:
            print(f"note: {data_dir} has no validation pieces; validating on training windows")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    if main_process:
        _write_logs(
            run_dir, log_rows, task.log_fields
        )  # drop rows a killed run logged after its last checkpoint

    loader = torch.utils.data.DataLoader(
        _Batches(task.train_windows, task.collate, t.batch_size, rank, world),
        batch_size=None,
        sampler=range(step * t.grad_accum, t.steps * t.grad_accum),
        num_workers=t.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leave the global RNG (dropout) alone
        persistent_workers=False,
    )
    batches = iter(loader)
    board = _tensorboard(run_dir) if main_process else None
    bar = None
    if progress and main_process:
        bar = progress_bar(total=t.steps, initial=step, desc="train", unit="step")

    model.train()
    t_log, tokens_since, loss = time.perf_counter(), 0, float("nan")
    start_time = time.perf_counter()
    while step < t.steps:
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            sync = micro == t.grad_accum - 1 or world == 1
            with net.no_sync() if not sync else contextlib.nullcontext(), autocast(device, t.precision):
                micro_loss, units = task.loss(net, model, batch)
                micro_loss = micro_loss / t.grad_accum
            micro_loss.backward()
            loss_sum += micro_loss.item()
            tokens_since += units * world
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = loss_sum
        if world > 1:
            reduced = torch.tensor([loss], device=device)
            dist.all_reduce(reduced)
            loss = reduced.item() / world

        if step % t.log_every == 0 or step == t.steps:
            now = time.perf_counter()
            row = {
                "step": step,
                "kind": "train",
                "loss": round(loss, 6),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                f"{task.unit}_per_s": round(tokens_since / (now - t_log), 1),
                "elapsed_s": round(now - start_time, 2),
                **task.extras,
            }
            t_log, tokens_since = now, 0
            log_rows.append(row)
            if main_process:
                _append_log(run_dir, row, task.log_fields, board)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", per_s=f"{row[f'{task.unit}_per_s']:.0f}")
        if bar is not None:
            bar.update(1)

        if step % t.eval_every == 0 or step == t.steps:
            score, fields, info, message = task.evaluate(
                net, eval_idx, t.batch_size, device, t.precision, rank, world
            )
            row = {
                "step": step,
                "kind": "valid",
                **fields,
                "elapsed_s": round(time.perf_counter() - start_time, 2),
            }
            log_rows.append(row)
            improved = best is None or score < best
            best = score if improved else best
            if main_process:
                _append_log(run_dir, row, task.log_fields, board)
                if improved:
                    ckpt_io.save_best(run_dir, model, cfg, {"step": step, "world_size": world, **info})
                _plot(run_dir, log_rows)
                if bar is not None:
                    bar.write(f"step {step}: {message}")

        if step % t.ckpt_every == 0 or step == t.steps:
            _save(run_dir, step, best, model, optimizer, cfg, rank, world, t.keep_last)

    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    if main_process:
        _plot(run_dir, log_rows)
    if world > 1:
        dist.barrier()
    return TrainResult(run_dir, step, loss, best, task.score_name)


def param_order(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names of the optimizer's two groups (weight decay for matrices only), in the
    order the optimizer numbers its state."""
    named = list(model.named_parameters())
    return {
        "decay": [n for n, p in named if p.dim() >= 2],
        "no_decay": [n for n, p in named if p.dim() < 2],
    }


def _resume(run_dir: Path, model, optimizer, rank: int, world: int) -> tuple[Path, dict]:
    """Restore the newest intact checkpoint. Damaged newer ones are named, then renamed
    `*.damaged` (kept, out of the rotation, so no later save replaces or prunes a good one)."""
    damaged = []
    candidates = ckpt_io.training_checkpoints(run_dir)
    for k, ckpt in enumerate(candidates):
        try:
            trainer = ckpt_io.read_training_state(ckpt, model, optimizer, rank)
        except ckpt_io.CheckpointError as e:
            if rank == 0:
                then = "; trying the checkpoint before it" if k + 1 < len(candidates) else ""
                print(f"warning: {e}{then}", file=sys.stderr)
            damaged.append(ckpt)
            continue
        if world > 1:
            dist.barrier()  # every process has read its state before any folder is renamed
        if rank == 0:
            for bad in damaged:
                print(f"warning: {bad} renamed to {ckpt_io.set_aside(bad).name}", file=sys.stderr)
        return ckpt, trainer
    raise ckpt_io.CheckpointError(
        f"{run_dir}: no intact checkpoint to resume from ({len(damaged)} damaged, named above); "
        "start a new run with another --out"
    )


def _save(run_dir, step, best, model, optimizer, cfg, rank, world, keep_last) -> None:
    root = run_dir / "checkpoints"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    staging = ckpt_io.staging_dir(root, step)
    ckpt_io.write_rng(staging, rank)
    if world > 1:
        dist.barrier()
    if rank == 0:
        ckpt_io.write_checkpoint(staging, model, optimizer, {"step": step, "best_val_nll": best}, cfg)
        ckpt_io.publish(staging, keep_last)
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- logs and plots


def _append_log(run_dir: Path, row: dict, fields: list[str], board=None) -> None:
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    with open(run_dir / "log.csv", "a", newline="") as f:
        csv.DictWriter(f, fields, extrasaction="ignore").writerow(row)
    if board is not None:
        for key, value in row.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)):
                board.add_scalar(f"{row['kind']}/{key}", value, row["step"])


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in run_dir/tensorboard when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _read_log(run_dir: Path, upto: int) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
            row = json.loads(line)
            if row["step"] <= upto:
                rows.append(row)
    return rows


def _write_logs(run_dir: Path, rows: list[dict], fields: list[str]) -> None:
    with open(run_dir / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(run_dir / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _plot(run_dir: Path, rows: list[dict]) -> None:
    """loss.png: training loss and validation NLL over steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train_rows = [r for r in rows if r["kind"] == "train"]
    valid_rows = [r for r in rows if r["kind"] == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1, label="train loss")
    codec = any("val_loss" in r for r in valid_rows)
    key, label = ("val_loss", "validation loss") if codec else ("val_nll", "validation NLL (nats/token)")
    if valid_rows:
        ax.plot([r["step"] for r in valid_rows], [r[key] for r in valid_rows], "o-", lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if codec else "nats / token")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / "loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")
