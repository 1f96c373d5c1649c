"""Checkpoints: safetensors for every tensor, JSON for everything else, never pickle.

A training checkpoint is a folder, written under a temporary name and renamed when complete,
so a run killed at any moment leaves either the previous checkpoint or the new one:

    step_000500/
      model.safetensors       model weights
      optimizer.safetensors   optimizer tensors (AdamW moments and step counts)
      rng_rank0.safetensors   torch RNG states of each process (dropout masks after resume)
      trainer.json            step, optimizer hyper-parameters, best validation NLL
      config.json             the resolved configuration (model, data, train, tokenizer)

`load_model` reads the weights and config of such a folder, or of a run folder (its best
checkpoint, else its latest).

Every safetensors file written here carries a CRC-32 of its tensors in its metadata, so a file
damaged after it was written (cut short, a flipped bit) is refused with its name, as are
weights holding NaN or Inf and weights that do not fit their config (CheckpointError). Files
without a checksum (written before it was added) are still read.

torch and safetensors are imported by the functions that need them: finding a checkpoint and
reading its config (`resolve`, `read_config`) stay cheap for commands that check settings
before any model loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perceiver_music.config import Config, ConfigError, from_dict
from perceiver_music.files import default_mode

if TYPE_CHECKING:
    import torch

STEP_PREFIX = "step_"
STEP_DIR = re.compile(rf"{STEP_PREFIX}\d+")  # published checkpoints (not .tmp, not .damaged)
BUNDLED = Path(__file__).resolve().parent / "bundled"  # the default model: weights, config, card
BUNDLED_AUDIO = BUNDLED / "audio"  # the audio model: a PRIORS_DIR (codec, priors) and its card
CHECKSUM_KEY = "crc32"  # safetensors metadata: CRC-32 of every tensor's name and bytes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    import torch

    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensors[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={CHECKSUM_KEY: _checksum(tensors)})
    os.chmod(path, default_mode())  # save_file creates 0600; outputs follow the umask


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU, checked: readable, its checksum (when it
    has one) intact, every floating-point value finite."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get(CHECKSUM_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: damaged or truncated, not a readable safetensors file ({e})"
        ) from None
    if expected is not None and _checksum(tensors) != expected:
        raise CheckpointError(
            f"{path}: damaged (its checksum does not match: the file changed after it was written)"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf values")
    return tensors


def load_weights(
    model: torch.nn.Module, path: Path, config_path: Path, new_prefix: str | None = None
) -> None:
    """Load a model.safetensors into `model` (built from config_path), or say how they differ.
    new_prefix: the model's tensors under it that the file lacks keep their initialisation."""
    tensors = load_tensors(path)
    _check_fit(model, tensors, path, config_path, new_prefix)
    model.load_state_dict(tensors, strict=new_prefix is None)


def _check_fit(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    path: Path,
    config_path: Path,
    new_prefix: str | None = None,
) -> None:
    expected = model.state_dict()
    problems = [
        f"{name} is {list(tensors[name].shape)} in the file but {list(want.shape)} by the config"
        for name, want in expected.items()
        if name in tensors and tensors[name].shape != want.shape
    ]
    if missing := sorted(
        n for n in set(expected) - set(tensors) if not (new_prefix and n.startswith(new_prefix))
    ):
        problems.append(f"{len(missing)} tensor(s) the config needs are missing (e.g. {missing[0]})")
    if unknown := sorted(set(tensors) - set(expected)):
        problems.append(f"{len(unknown)} tensor(s) the config has no place for (e.g. {unknown[0]})")
    if problems:
        raise CheckpointError(
            f"{path} does not match {config_path} (other width, layers or vocabulary?): "
            f"{problems[0]}" + (f", and {len(problems) - 1} more differences" if len(problems) > 1 else "")
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> tensors by 'state.<param>.<name>' and the JSON-able rest."""
    import torch

    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in rest["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def staging_dir(ckpt_root: Path, step: int) -> Path:
    """Where the files of the checkpoint of `step` are written before it is published."""
    path = ckpt_root / f"{STEP_PREFIX}{step:07d}.tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_rng(staging: Path, rank: int) -> None:
    save_tensors(rng_state(), staging / f"rng_rank{rank}.safetensors")


def write_checkpoint(
    staging: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict,
    config: Config,
) -> None:
    """Write model, optimizer and trainer state into the staging folder (rank 0 only)."""
    save_tensors(model.state_dict(), staging / "model.safetensors")
    tensors, rest = _flatten_optimizer(optimizer.state_dict())
    save_tensors(tensors, staging / "optimizer.safetensors")
    _write_json(staging / "trainer.json", {**trainer, "optimizer": rest})
    _write_json(staging / "config.json", config_dict(config))


def publish(staging: Path, keep_last: int) -> Path:
    """Rename a complete staging folder to its final name; keep only the last `keep_last`."""
    final = staging.with_name(staging.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    steps = _step_dirs(final.parent)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, model: torch.nn.Module, config: Config, info: dict) -> None:
    """Weights and config of the best validation NLL so far, in run_dir/best (atomically)."""
    tmp = run_dir / "best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_tensors(model.state_dict(), tmp / "model.safetensors")
    _write_json(tmp / "config.json", config_dict(config))
    _write_json(tmp / "info.json", info)
    final = run_dir / "best"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _step_dirs(root: Path) -> list[Path]:
    """Published checkpoint folders under root, oldest first."""
    return sorted(p for p in root.glob(f"{STEP_PREFIX}*") if STEP_DIR.fullmatch(p.name) and p.is_dir())


def training_checkpoints(run_dir: Path) -> list[Path]:
    """A run's training checkpoints, newest first."""
    return [p for p in _step_dirs(run_dir / "checkpoints") if (p / "trainer.json").is_file()][::-1]


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = training_checkpoints(run_dir)
    return steps[0] if steps else None


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the rotation (never deleted: it may still be read)."""
    target, k = ckpt.with_name(f"{ckpt.name}.damaged"), 1
    while target.exists():
        k += 1
        target = ckpt.with_name(f"{ckpt.name}.damaged{k}")
    os.replace(ckpt, target)
    return target


def read_trainer(ckpt: Path) -> dict:
    """A training checkpoint's trainer.json (step, optimizer settings), or a CheckpointError."""
    trainer_file = ckpt / "trainer.json"
    try:
        trainer = json.loads(trainer_file.read_text())
        step = int(trainer["step"])
        if "optimizer" not in trainer:
            raise KeyError("optimizer")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{trainer_file}: damaged ({type(e).__name__}: {e})") from None
    if step < 0:
        raise CheckpointError(f"{trainer_file}: damaged (step {step})")
    return trainer


def read_training_state(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Restore model, optimizer and this process's RNG; return trainer.json.

    Every file is read and checked before anything is restored (CheckpointError: which file,
    what is wrong); the caller may then try an older checkpoint, which restores everything.
    """
    trainer = read_trainer(ckpt)
    optimizer_rest = trainer["optimizer"]
    weights_file = ckpt / "model.safetensors"
    weights = load_tensors(weights_file)
    _check_fit(model, weights, weights_file, ckpt / "config.json")
    optimizer_file = ckpt / "optimizer.safetensors"
    optimizer_tensors = load_tensors(optimizer_file)
    rng_file = ckpt / f"rng_rank{rank}.safetensors"
    rng = load_tensors(rng_file) if rng_file.is_file() else None
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, optimizer_rest))
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{optimizer_file} does not fit the model: {e}") from None
    if rng is not None:
        set_rng_state(rng)
    return trainer


def training_checkpoint(path: str | os.PathLike) -> Path:
    """A training checkpoint (checkpoints/step_N with trainer.json) from itself or its run folder."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path}: not a training checkpoint (no trainer.json) nor a run with checkpoints/"
        )
    return latest


def trained_steps(path: str | os.PathLike) -> int | None:
    """The optimizer steps behind a training checkpoint or a run's latest one; None for a
    folder with neither (a bundled model, a `best/`)."""
    try:
        return int(read_trainer(training_checkpoint(path))["step"])
    except CheckpointError:
        return None


def read_branch_state(ckpt: Path, model, optimizer, names: list[str], rank: int) -> dict:
    """Start `model` from another run's checkpoint whose model it extends (conditioning added):
    every tensor of the checkpoint is loaded, the model's new ones keep their initialisation,
    the optimizer state follows each parameter by name. names: the model's parameters in the
    optimizer's order. Returns trainer.json."""
    trainer = read_trainer(ckpt)
    optimizer_rest = trainer["optimizer"]
    weights_file = ckpt / "model.safetensors"
    weights = load_tensors(weights_file)
    expected = model.state_dict()
    wrong = [n for n, w in weights.items() if n not in expected or expected[n].shape != w.shape]
    new = [n for n in expected if n not in weights]
    if wrong or any(not n.startswith("conditioner.") for n in new):
        bad = wrong[0] if wrong else next(n for n in new if not n.startswith("conditioner."))
        raise CheckpointError(
            f"--branch: {weights_file} is not the model of this config without its conditioning "
            f"(e.g. {bad}); only model.condition and its settings may differ"
        )
    old_names = [n for n in names if n in weights]  # the source optimizer numbered these
    state = _unflatten_optimizer(load_tensors(ckpt / "optimizer.safetensors"), optimizer_rest)["state"]
    if len(old_names) != sum(len(g["params"]) for g in optimizer_rest["param_groups"]):
        raise CheckpointError(f"--branch: {ckpt / 'optimizer.safetensors'} does not fit the model")
    index = {n: i for i, n in enumerate(names)}
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(
        {
            "state": {index[n]: state[i] for i, n in enumerate(old_names) if i in state},
            "param_groups": optimizer.state_dict()["param_groups"],
        }
    )
    rng_file = ckpt / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_tensors(rng_file))
    return trainer


def config_dict(config: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def read_config(path: Path) -> Config:
    """A checkpoint's config.json, or a CheckpointError naming it."""
    try:
        return from_dict(Config, json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid configuration ({e})") from None


def bundled() -> Path:
    """The default model shipped inside the package (see bundled/MODEL_CARD.md)."""
    if not (BUNDLED / "model.safetensors").is_file() or not (BUNDLED / "config.json").is_file():
        raise FileNotFoundError(
            f"no bundled model in this installation ({BUNDLED}); pass --ckpt RUN_DIR, "
            "or train one with recipes/default_model.sh"
        )
    return BUNDLED


def bundled_audio() -> Path:
    """The audio model shipped inside the package, a PRIORS_DIR (see bundled/audio/MODEL_CARD.md)."""
    if not (BUNDLED_AUDIO / "priors.json").is_file():
        raise FileNotFoundError(
            f"no bundled audio model in this installation ({BUNDLED_AUDIO}); pass --ckpt PRIORS_DIR, "
            "or train one with recipes/audio_model.sh"
        )
    return BUNDLED_AUDIO


def resolve(path: str | os.PathLike | None) -> Path:
    """A checkpoint folder from a run folder (best, else latest), a checkpoint folder, or None
    for the bundled model."""
    if path is None:
        return bundled()
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path
    if (path / "best" / "model.safetensors").is_file():
        return path / "best"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(
        f"{path}: no checkpoint here (expected model.safetensors + config.json, "
        "a run folder with best/ or checkpoints/)"
    )


def load_model(path: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """(model in eval mode, Config) from a checkpoint or run folder; None: the bundled model."""
    from perceiver_music.model import build_model

    ckpt = resolve(path)
    config = read_config(ckpt / "config.json")
    if config.model.arch == "vqvae":
        from perceiver_music.audio.vqvae import VQVAE

        model = VQVAE(config.codec)
    else:
        model = build_model(config.model, config.codes)
    load_weights(model, ckpt / "model.safetensors", ckpt / "config.json")
    return model.to(device).eval(), config
