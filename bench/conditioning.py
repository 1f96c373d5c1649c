"""How much each condition tells a conditioned model, measured as NLL on held-out windows.

    python bench/conditioning.py --ckpt RUN [--baseline UNCONDITIONED_RUN] --data DATA_DIR \
        [--split test] [--windows 256] [--at anywhere|start] [--out bench/results/conditioning.json]

On the same evenly spaced validation-style windows of the split (every target once, no
augmentation), or with `--at start` on the first window of every piece (its first num_latents
tokens, with nothing before them: where only the conditions say what the piece is, as when a
piece is generated from nothing), the conditioned model's NLL (nats/token), there also over
each piece's first `--head` tokens, before the piece's own notes have said much:

* told nothing (no label, no length, no style; the time elapsed is always known), and, with
  --baseline, the unconditioned model of the same budget on the same windows;
* composer: the true one / none / a wrong one (the next label in the model's list);
* style: from another part of the same piece / from a window of another piece / none;
* timing: the piece's true total length / none;
* everything true;
* and, for a timing-conditioned model, P(EOS) at the true end of every piece of the split
  (the window whose last target is its EOS), told the piece's length and not: whether the model
  has learned to end at all, before `conditioning_music.py endings` asks it to.

Expected when conditioning works: true < none < wrong for the composer, own < none and own <
other for the style, true < none for the length. For a style-conditioned model it also says how
much a reference can tell at all, model aside: the distance between token histograms (each
event's frequency standardised) from a window's targets to its own reference and to another
piece's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a conditioned run or checkpoint")
    p.add_argument("--baseline", help="an unconditioned run of the same budget, for comparison")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument(
        "--at",
        choices=["anywhere", "start"],
        default="anywhere",
        help="evenly spaced windows, or each piece's first",
    )
    p.add_argument(
        "--head",
        type=int,
        default=32,
        help="with --at start, also the NLL of each piece's first HEAD targets, where only the "
        "conditions can tell what the piece is (0: not measured)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/results/conditioning.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from perceiver_music.checkpoint import load_model, trained_steps
    from perceiver_music.data.windows import TokenData, WindowDataset
    from perceiver_music.model.base import nll_sum
    from perceiver_music.tokens.performance import PAD
    from perceiver_music.train import batch_cond, collate, model_inputs, window_conditions

    model, cfg = load_model(args.ckpt)
    m = cfg.model
    if not m.condition:
        print(f"{args.ckpt}: not a conditioned model (model.condition is empty)", file=sys.stderr)
        return 2
    data = TokenData(args.data, args.split)
    conditions = window_conditions(cfg)  # validation windows drop nothing
    ds = WindowDataset(data, cfg.data, m.max_len, m.num_latents, train=False, conditions=conditions)
    if args.at == "start":  # targets 1..num_latents of each piece: BOS is all the context
        windows = [ds.window(i, min(m.num_latents + 1, int(data.index[i, 1]))) for i in range(len(data))]
    else:
        idx = np.unique(np.linspace(0, len(ds) - 1, min(args.windows, len(ds))).astype(int))
        windows = [ds[int(i)] for i in idx]
    batches = [collate(windows[i : i + args.batch]) for i in range(0, len(windows), args.batch)]
    pieces = [
        np.array([w.piece for w in windows[i : i + args.batch]]) for i in range(0, len(windows), args.batch)
    ]
    n_labels = len(m.labels)

    def variant(batch, piece_ids, name):
        c = batch_cond(batch)
        none = _told_nothing(c)
        if name == "nothing":
            return none
        if name == "all true":
            return c
        if name == "composer: true":
            return replace(none, label=c.label)
        if name == "composer: wrong":  # the next label: never the true one
            return replace(none, label=torch.where(c.label > 0, c.label % n_labels + 1, 0))
        if name == "length: true":
            return replace(none, total=c.total)
        if name == "style: own piece":
            return replace(none, reference=c.reference)
        if name == "style: other piece":  # each row takes a reference of a row of another piece
            order = _other_piece_order(piece_ids)
            return replace(none, reference=c.reference[order])
        raise ValueError(name)

    names = ["nothing"]
    if m.conditioned_on("label"):
        names += ["composer: true", "composer: wrong"]
    if m.conditioned_on("timing"):
        names += ["length: true"]
    if m.conditioned_on("style"):
        names += ["style: own piece", "style: other piece"]
    names += ["all true"]

    head = args.head if args.at == "start" else 0
    results: dict[str, float] = {}
    head_results: dict[str, float] = {}
    with torch.no_grad():
        for name in names:
            total, count, head_total, head_count = 0.0, 0, 0.0, 0
            for batch, piece_ids in zip(batches, pieces):
                logits = model(batch["inputs"], batch["positions"], cond=variant(batch, piece_ids, name))
                nll, n = nll_sum(logits, batch["targets"])
                total, count = total + float(nll), count + int(n)
                if head:  # a piece-start window's first real targets are its piece's first tokens
                    t = batch["targets"]
                    first = (t != PAD).cumsum(1) <= head  # [B, N]; padding is never scored
                    nll, n = nll_sum(logits, torch.where(first, t, PAD))
                    head_total, head_count = head_total + float(nll), head_count + int(n)
            results[name] = total / count
            line = f"{name:22s} {results[name]:.4f} nats/token"
            if head:
                head_results[name] = head_total / head_count
                line += f"; first {head} tokens {head_results[name]:.4f}"
            print(line, flush=True)
        if args.baseline:
            base, _ = load_model(args.baseline)
            total, count = 0.0, 0
            for batch in batches:
                logits = base(batch["inputs"], batch["positions"], **model_inputs(batch, told=False))
                nll, n = nll_sum(logits, batch["targets"])
                total, count = total + float(nll), count + int(n)
            steps = trained_steps(args.baseline)  # the budget beside the name: compare like with like
            label = "unconditioned baseline" + ("" if steps is None else f" ({steps:,} steps)")
            results[label] = total / count
            print(f"{label:22s} {results[label]:.4f} nats/token")

    reference_signal = None
    if m.conditioned_on("style"):
        reference_signal = _reference_signal(batches, pieces, m.vocab_size)
        print(
            "what a reference can say (token histograms, standardised): distance from a window's targets "
            f"to its own reference {reference_signal['own']:.3f}, to another piece's {reference_signal['other']:.3f}"
        )

    style_retrieval = None
    if m.conditioned_on("style"):
        style_retrieval = _style_retrieval(model, batches, pieces)
        print(
            f"style vectors: a reference picks out its own window among {style_retrieval['windows']} "
            f"{style_retrieval['top1']:.1%} of the time (chance {1 / max(1, style_retrieval['windows']):.1%}), "
            f"mean rank {style_retrieval['mean_rank']:.1f}; spread (norm about their mean) {style_retrieval['spread']:.4f}"
        )

    eos_at_end = None
    if m.conditioned_on("timing") and len(data):
        eos_at_end = _eos_at_end(model, ds, data, args.batch)
        for k, v in eos_at_end.items():
            if k != "pieces":
                print(f"P(EOS) at the end, {k}: mean {v['mean']:.3f}, median {v['median']:.3f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "ckpt": args.ckpt,
        "baseline": args.baseline,
        "data": args.data,
        "split": args.split,
        "at": args.at,
        "windows": len(windows),
        "targets": count,
        "nll": {k: round(v, 5) for k, v in results.items()},
        "bits": {k: round(v / math.log(2), 5) for k, v in results.items()},
        "head": head,
        "nll_head": {k: round(v, 5) for k, v in head_results.items()},
        "eos_at_end": eos_at_end,
        "reference_signal": reference_signal,
        "style_retrieval": style_retrieval,
    }
    out.write_text(json.dumps(record, indent=1))
    print(f"written: {out}")
    return 0


def _told_nothing(c):
    """The windows' conditions with no label, no length and no style (elapsed time and the keys
    down stay: they come from the tokens)."""
    return replace(c, label=torch.zeros_like(c.label), total=torch.zeros_like(c.total), reference=None)


def _eos_at_end(model, ds, data, batch_size: int) -> dict:
    """P(EOS) where each piece ends, told its true length and told nothing."""
    from perceiver_music.tokens.performance import EOS
    from perceiver_music.train import batch_cond, collate

    ends = [ds.window(i, int(data.index[i, 1])) for i in range(len(data))]
    probs: dict[str, list[float]] = {"told the length": [], "not told": []}
    with torch.no_grad():
        for i in range(0, len(ends), batch_size):
            batch = collate(ends[i : i + batch_size])
            assert bool((batch["targets"][:, -1] == EOS).all()), "the last target of each window is its EOS"
            c = batch_cond(batch)
            none = _told_nothing(c)
            for name, cond in (("told the length", replace(none, total=c.total)), ("not told", none)):
                logits = model(batch["inputs"], batch["positions"], cond=cond)  # [B, N, V]
                probs[name] += torch.softmax(logits[:, -1].float(), -1)[:, EOS].tolist()
    out: dict = {"pieces": len(ends)}
    for name, values in probs.items():
        out[name] = {"mean": round(float(np.mean(values)), 5), "median": round(float(np.median(values)), 5)}
    return out


def _reference_signal(batches, pieces, vocab_size: int) -> dict:
    """How much nearer a window's targets are to its own style reference (another part of the
    same piece) than to another piece's, whatever a model makes of them: the distance between
    token histograms, each event's frequency standardised over the windows. A reference that
    is hardly nearer its own window than another piece's has little to tell a model."""
    targets, refs, other = [], [], []
    for batch, piece_ids in zip(batches, pieces):
        t, r = batch["targets"].numpy(), batch["reference"].numpy()
        order = _other_piece_order(piece_ids)
        for i in range(len(t)):
            if (r[i] > 2).any() and order[i] != i:
                targets.append(_histogram(t[i], vocab_size))
                refs.append(_histogram(r[i], vocab_size))
                other.append(_histogram(r[order[i]], vocab_size))
    if not targets:
        return {"windows": 0}
    t, r, o = (np.stack(x) for x in (targets, refs, other))
    both = np.concatenate([t, r])
    mean, std = both.mean(0), both.std(0) + 1e-6
    z = lambda x: (x - mean) / std  # noqa: E731
    own_d = np.linalg.norm(z(t) - z(r), axis=1).mean()
    other_d = np.linalg.norm(z(t) - z(o), axis=1).mean()
    return {"windows": len(t), "own": round(float(own_d), 4), "other": round(float(other_d), 4),
            "ratio": round(float(own_d / other_d), 4)}  # fmt: skip


def _style_retrieval(model, batches, pieces) -> dict:
    """What the style encoder tells apart: each window's reference and the window's own last
    style_len inputs, both encoded; how often a reference's vector is nearest (cosine) its own
    window's among all the windows (other windows of its piece left out), its mean rank (1 is
    best), and how far the vectors spread about their mean (a collapsed encoder: ~0)."""
    from perceiver_music.model.conditioning import style_similarity
    from perceiver_music.tokens.performance import PAD

    encoder = model.conditioner.style_encoder
    refs, owns, ids = [], [], []
    with torch.no_grad():
        for batch, piece_ids in zip(batches, pieces):
            r = batch["reference"]
            keep = (r != PAD).any(-1).numpy()
            if not keep.any():
                continue
            refs.append(encoder(r[keep]))
            owns.append(encoder(batch["inputs"][keep][:, -r.shape[1] :]))
            ids.append(piece_ids[keep])
    if not refs:
        return {"windows": 0, "top1": 0.0, "mean_rank": 0.0, "spread": 0.0}
    ref, ids = torch.cat(refs), np.concatenate(ids)
    sim = style_similarity(ref, torch.cat(owns), torch.from_numpy(ids))
    rank = 1 + (sim > sim.diag()[:, None]).sum(1).float()  # [N]
    spread = (ref - ref.mean(0)).norm(dim=-1).mean()
    return {"windows": len(ids), "top1": round(float((rank == 1).float().mean()), 4),
            "mean_rank": round(float(rank.mean()), 2), "spread": round(float(spread), 4)}  # fmt: skip


def _histogram(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The share of each event among the non-special tokens (ids > 2)."""
    kept = tokens[tokens > 2]
    return np.bincount(kept, minlength=vocab_size)[:vocab_size] / max(1, len(kept))


def _other_piece_order(piece_ids: np.ndarray) -> np.ndarray:
    """For each row, the index of a row from another piece (itself if the batch has one piece)."""
    order = np.arange(len(piece_ids))
    for i in range(len(piece_ids)):
        for k in range(1, len(piece_ids)):
            j = (i + k) % len(piece_ids)
            if piece_ids[j] != piece_ids[i]:
                order[i] = j
                break
    return order


if __name__ == "__main__":
    sys.exit(main())
