"""How much probability a model puts on impossible events, on fixed validation windows, JSON.

    python bench/impossible_mass.py CKPT [CKPT ...] [--data data/asap] [--windows 48]

At every target of `--windows` validation windows, evenly spaced over the split and the same for
every checkpoint, the mass the model gives to a NOTE_OFF of a pitch that is not sounding and to a
NOTE_ON of a pitch that is, with which pitches sound counted from the window's own tokens (a
note begun before the window is not seen, which sets a small floor common to all checkpoints).
These events never occur in performances: sampling without the keyboard mask emits them at this
rate per token, so it measures how far a model has learned which keys are down, with no
sampling noise. The validation NLL over the same targets is reported beside it.

Used to choose prefix dropout for the bundled model (from one checkpoint, 200 more steps with
0.25 and with 0) and to follow the long run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def impossible_mass(ckpt: str, data: str, windows: int, batch: int = 8) -> dict:
    import torch

    from perceiver_music.checkpoint import load_model
    from perceiver_music.data.windows import TokenData, WindowDataset
    from perceiver_music.tokens.performance import NUM_PITCHES, PAD, Vocab
    from perceiver_music.train import collate, model_inputs, window_conditions

    model, cfg = load_model(ckpt)
    vocab = Vocab(cfg.tokenizer)
    on, off = vocab.note_on, vocab.note_off
    ds = WindowDataset(
        TokenData(data, "valid"), cfg.data, cfg.model.max_len, cfg.model.num_latents, train=False,
        conditions=window_conditions(cfg),
    )  # fmt: skip
    chosen = np.linspace(0, len(ds) - 1, min(windows, len(ds))).astype(int)
    N = cfg.model.num_latents
    stray = restrike = nll = 0.0
    count = 0
    for start in range(0, len(chosen), batch):
        ws = [ds[int(i)] for i in chosen[start : start + batch]]
        b = collate(ws)
        with torch.no_grad():
            logits = model(b["inputs"], b["positions"], **model_inputs(b, told=False))  # told nothing
            logp = logits.float().log_softmax(-1).numpy()  # [B, N, V]
        for r, w in enumerate(ws):
            sounding = np.zeros(NUM_PITCHES, np.int64)
            L = len(w.inputs)
            for t, token in enumerate(w.inputs.tolist()):
                if on <= token < off:
                    sounding[token - on] += 1
                elif off <= token < off + NUM_PITCHES:
                    sounding[token - off] = max(0, sounding[token - off] - 1)
                j = t - (L - N)  # the latent that predicts the token after input t
                if j < 0 or w.targets[j] == PAD:
                    continue
                p = np.exp(logp[r, j])
                stray += float(p[off : off + NUM_PITCHES][sounding == 0].sum())
                restrike += float(p[on : on + NUM_PITCHES][sounding > 0].sum())
                nll -= float(logp[r, j, w.targets[j]])
                count += 1
    return {
        "checkpoint": ckpt,
        "targets": count,
        "val_nll": nll / count,
        "stray_note_off_mass": stray / count,
        "restruck_note_on_mass": restrike / count,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="run or checkpoint folders")
    p.add_argument("--data", default=str(REPO / "data" / "asap"))
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "impossible_mass.json"))
    args = p.parse_args(argv)
    rows = []
    for ckpt in args.ckpts:
        rows.append(impossible_mass(ckpt, args.data, args.windows))
        r = rows[-1]
        print(
            f"{ckpt}: NLL {r['val_nll']:.4f}, stray NOTE_OFF mass {r['stray_note_off_mass']:.4f}, "
            f"re-struck NOTE_ON mass {r['restruck_note_on_mass']:.4f} per target ({r['targets']} targets)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"windows": args.windows, "runs": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
