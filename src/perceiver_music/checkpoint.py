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
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from perceiver_music.config import Config, from_dict

STEP_PREFIX = "step_"
BUNDLED = Path(__file__).resolve().parent / "bundled"  # the default model: weights, config, card


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> tensors by 'state.<param>.<name>' and the JSON-able rest."""
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
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
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
    save_file(rng_state(), str(staging / f"rng_rank{rank}.safetensors"))


def write_checkpoint(
    staging: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict,
    config: Config,
) -> None:
    """Write model, optimizer and trainer state into the staging folder (rank 0 only)."""
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
        str(staging / "model.safetensors"),
    )
    tensors, rest = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(staging / "optimizer.safetensors"))
    _write_json(staging / "trainer.json", {**trainer, "optimizer": rest})
    _write_json(staging / "config.json", config_dict(config))


def publish(staging: Path, keep_last: int) -> Path:
    """Rename a complete staging folder to its final name; keep only the last `keep_last`."""
    final = staging.with_name(staging.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    steps = sorted(
        p for p in final.parent.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")
    )
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, model: torch.nn.Module, config: Config, info: dict) -> None:
    """Weights and config of the best validation NLL so far, in run_dir/best (atomically)."""
    tmp = run_dir / "best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    _write_json(tmp / "config.json", config_dict(config))
    _write_json(tmp / "info.json", info)
    final = run_dir / "best"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(
        p
        for p in (run_dir / "checkpoints").glob(f"{STEP_PREFIX}*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer.json").is_file()
    )
    return steps[-1] if steps else None


def read_training_state(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Restore model, optimizer and this process's RNG; return trainer.json."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    trainer = json.loads((ckpt / "trainer.json").read_text())
    optimizer.load_state_dict(
        _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")), trainer["optimizer"])
    )
    rng_file = ckpt / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)))
    return trainer


def config_dict(config: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def read_config(path: Path) -> Config:
    return from_dict(Config, json.loads(path.read_text()))


def bundled() -> Path:
    """The default model shipped inside the package (see bundled/MODEL_CARD.md)."""
    if not (BUNDLED / "model.safetensors").is_file() or not (BUNDLED / "config.json").is_file():
        raise FileNotFoundError(
            f"no bundled model in this installation ({BUNDLED}); pass --ckpt RUN_DIR, "
            "or train one with recipes/default_model.sh"
        )
    return BUNDLED


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
        model = build_model(config.model)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
    return model.to(device).eval(), config
