"""Likelihood of a checkpoint on a prepared split: nats and bits per token, by position.

    perceiver-music evaluate --ckpt RUN_DIR --data DATA_DIR [--split test] --out OUT_DIR [--stride S]

Every token of every piece (after BOS) is scored once, with as much context as the model
allows: windows end every `stride` tokens, each scores only its last `stride` targets, so each
target sees at least max_len - stride + 1 tokens before it (or the whole piece so far). A
stride of num_latents is the training-time tiling; a smaller stride gives more context per
token at proportionally more compute, down to stride 1 (full context for every token).

A conditioned model is always given the time elapsed through each token (the tokens say it);
with `told` also each piece's composer and total length. Style is never told here: every
part of a piece is scored, so a reference from the piece would show the model what it predicts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from perceiver_music.checkpoint import load_model
from perceiver_music.data.windows import TokenData
from perceiver_music.files import atomic_write_text
from perceiver_music.model.conditioning import Cond
from perceiver_music.progress import progress_bar
from perceiver_music.tokens.performance import PAD, Vocab, keyboard_state

DEFAULT_BUCKETS = (1024, 4096)  # token positions where a new bucket starts


@dataclass
class LikelihoodResult:
    nats_per_token: float
    bits_per_token: float
    tokens: int
    pieces: int
    buckets: list[dict]
    per_piece: list[dict]

    def to_json(self) -> dict:
        return self.__dict__.copy()


def bucket_labels(bounds: tuple[int, ...]) -> list[str]:
    edges = [0, *bounds]
    labels = [f"{a:,}-{b - 1:,}" for a, b in zip(edges[:-1], edges[1:])]
    return [*labels, f"{edges[-1]:,}+"]


@torch.no_grad()
def piece_nll(
    model,
    tokens: np.ndarray,
    max_len: int,
    num_latents: int,
    stride: int,
    batch_size: int,
    device,
    elapsed: np.ndarray | None = None,
    label: int = 0,
    total: float = 0.0,
    keyboard: np.ndarray | None = None,
) -> np.ndarray:
    """NLL (nats, float64) of tokens[1:] given everything before each, [len(tokens) - 1].

    elapsed [len(tokens)]: seconds through each token, for a timing-conditioned model; label
    and total (seconds): what a conditioned model is told about the piece (0: nothing);
    keyboard [len(tokens), 128]: the piece's keyboard state in seconds, for a model conditioned on it."""
    n = len(tokens)
    out = np.full(n, np.nan)
    ends = list(range(n, 1, -stride))[::-1]  # window ends (exclusive); targets (end - stride, end]
    need = max_len + 1
    for b in range(0, len(ends), batch_size):
        batch_ends = ends[b : b + batch_size]
        seq = np.full((len(batch_ends), need), PAD, np.int64)
        pos = np.zeros((len(batch_ends), need), np.int64)
        for row, end in enumerate(batch_ends):
            chunk = tokens[max(0, end - need) : end]
            seq[row, need - len(chunk) :] = chunk
            pos[row, need - len(chunk) :] = np.arange(end - len(chunk), end)
        seq_t = torch.from_numpy(seq).to(device)
        cond = None
        if model.cfg.condition:
            B = len(batch_ends)
            window_elapsed = None
            if elapsed is not None:  # the inputs' positions; PAD positions read 0
                window_elapsed = torch.from_numpy(
                    np.where(seq[:, :-1] == PAD, 0.0, elapsed[pos[:, :-1]])
                ).float()
            window_keyboard = None
            if keyboard is not None:  # PAD inputs are silent
                pad = (seq[:, :-1] == PAD)[..., None]
                window_keyboard = torch.from_numpy(np.where(pad, -1.0, keyboard[pos[:, :-1]])).float()
            cond = Cond(
                label=torch.full((B,), label, dtype=torch.long),
                total=torch.full((B,), float(total)),
                elapsed=window_elapsed,
                keyboard=window_keyboard,
            ).to(device)
        kwargs = {} if cond is None else {"cond": cond}  # (an audio upsampler takes none)
        logits = model(
            seq_t[:, :-1], torch.from_numpy(pos[:, :-1]).to(device), num_latents, **kwargs
        )  # [B, N, V]
        targets = seq_t[:, -num_latents:]
        nll = (
            F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").double().cpu().numpy()
        )
        for row, end in enumerate(batch_ends):
            take = min(stride, end - 1)  # the piece's first token (BOS) has nothing to predict it
            out[end - take : end] = nll[row, -take:]
    return out[1:]


def evaluate_likelihood(
    ckpt: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    stride: int | None = None,
    batch_size: int = 8,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    max_pieces: int | None = None,
    device: str | None = None,
    progress: bool = True,
    told: bool = False,
) -> LikelihoodResult:
    """told: tell a conditioned model each piece's composer and total length (see above)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_model(ckpt, device)
    m = config.model
    data = TokenData(data_dir, split)
    vocab = Vocab(data.tokenizer)
    label_ids = data.label_ids(m.labels)
    if len(data) == 0:
        raise ValueError(f"{data_dir}: the {split} split has no pieces")
    max_len = config.model.max_len
    if config.model.arch == "perceiver_ar":
        # Perceiver AR predicts its num_latents last positions; a stride below that keeps them
        # all as queries (the model's training shape) and counts only the last `stride`.
        stride = stride or config.model.num_latents
        if not 1 <= stride <= config.model.num_latents:
            raise ValueError(f"--stride must be in 1..{config.model.num_latents} (the number of latents)")
        num_latents = config.model.num_latents
    else:  # a Transformer predicts every position; ask for just the last `stride`
        stride = stride or min(config.model.num_latents, max_len)
        if not 1 <= stride <= max_len:
            raise ValueError(f"--stride must be in 1..{max_len}")
        num_latents = stride
    condition = _piece_condition(model, config, data_dir, split)
    labels = bucket_labels(buckets)
    sums, counts = np.zeros(len(labels)), np.zeros(len(labels), np.int64)
    per_piece = []
    pieces = range(min(len(data), max_pieces or len(data)))
    for i in progress_bar(pieces, desc=f"likelihood {split}", unit="piece", enabled=progress):
        tokens = np.asarray(data.piece(i), np.int64)
        if len(tokens) < 2:
            continue
        cond = {}
        if m.conditioned_on("timing"):
            steps, sps = data.clock
            seconds = np.cumsum(steps[tokens]) / sps
            cond["elapsed"] = seconds
            cond["total"] = float(seconds[-1]) if told else 0.0
        if told and m.conditioned_on("label"):
            cond["label"] = label_ids[i]
        if m.conditioned_on("keyboard"):
            cond["keyboard"] = keyboard_state(tokens, vocab)
        with condition(i):
            nll = piece_nll(model, tokens, max_len, num_latents, stride, batch_size, device, **cond)
        which = np.searchsorted(np.array(buckets), np.arange(1, len(tokens)), side="right")
        sums += np.bincount(which, weights=nll, minlength=len(labels))
        counts += np.bincount(which, minlength=len(labels))
        per_piece.append({"piece": i, "tokens": len(nll), "nats_per_token": float(nll.mean())})
    total, count = float(sums.sum()), int(counts.sum())
    if count == 0:
        raise ValueError(f"{data_dir}: the {split} split has no tokens to score")
    rows = [
        {
            "label": label,
            "tokens": int(c),
            "nats_per_token": float(s / c) if c else None,
            "bits_per_token": float(s / c / math.log(2)) if c else None,
        }
        for label, s, c in zip(labels, sums, counts)
    ]
    return LikelihoodResult(
        total / count, total / count / math.log(2), count, len(per_piece), rows, per_piece
    )


def _piece_condition(model, config, data_dir, split: str):
    """i -> the context piece i is scored in: audio codes are checked against the model's codec
    and level, and an upsampler is conditioned on the level above (audio/codes.py)."""
    codes_data = TokenData(data_dir, split).meta.get("kind") == "codes"
    if not (codes_data or config.codes.codec or config.model.arch == "upsampler"):
        return lambda i: contextlib.nullcontext()
    from perceiver_music.audio.codes import piece_conditioning

    return piece_conditioning(model, config, data_dir, split)


def write_likelihood(result: LikelihoodResult, out_dir: str | os.PathLike, meta: dict) -> Path:
    """likelihood.json, likelihood.md and likelihood.png in out_dir."""
    from perceiver_music.evaluate.plots import likelihood_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {**meta, **result.to_json(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(out / "likelihood.json", json.dumps(data, indent=1, allow_nan=False))
    lines = [
        f"# Likelihood: {meta['checkpoint']} on {meta['data']} ({meta['split']})",
        "",
        f"{result.pieces} pieces, {result.tokens:,} tokens, stride {meta['stride']}: "
        f"**{result.nats_per_token:.4f} nats/token ({result.bits_per_token:.4f} bits)**.",
        "",
        "| token position | tokens | nats/token | bits/token |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in result.buckets:
        if row["tokens"]:
            lines.append(
                f"| {row['label']} | {row['tokens']:,} | {row['nats_per_token']:.4f} | {row['bits_per_token']:.4f} |"
            )
        else:
            lines.append(f"| {row['label']} | 0 | n/a (no piece that long) | n/a |")
    atomic_write_text(out / "likelihood.md", "\n".join(lines) + "\n")
    likelihood_plot(result.buckets, out / "likelihood.png", f"{meta['split']}: bits per token by position")
    return out
