"""Pictures for evaluation: distance densities per metric, repetition, likelihood by position."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from perceiver_music.evaluate import metrics  # noqa: E402


def _slug(metric: str) -> str:
    return metric.replace("/", "_per_")


def _densities(ax, distances: dict[str, dict], metric: str) -> None:
    """KDEs of one metric's distances: intra-reference (black), and per generated set its
    inter-set (solid) and intra-set (dotted) distances."""
    first = next(iter(distances.values()))[metric]
    curves = [("intra reference", first["intra_reference"], "black", "-")]
    for i, (name, per_metric) in enumerate(distances.items()):
        d = per_metric[metric]
        curves.append((f"inter {name}", d["inter"], f"C{i}", "-"))
        if "intra_generated" in d:
            curves.append((f"intra {name}", d["intra_generated"], f"C{i}", ":"))
    scale = max(float(np.abs(c[1]).max()) for c in curves) or 1.0
    fitted = [metrics.Density.fit(c[1], scale) for c in curves]
    lo = min(d.sample.min() - 4 * d.bandwidth for d in fitted)
    hi = max(d.sample.max() + 4 * d.bandwidth for d in fitted)
    grid = np.linspace(lo, hi, 512)
    for (label, _, color, style), density in zip(curves, fitted):
        ax.plot(grid, density(grid), color=color, linestyle=style, label=label)
    ax.set_title(metric)
    ax.set_xlabel("distance")
    ax.set_yticks([])


def metric_densities(distances: dict[str, dict], out_dir: Path) -> list[Path]:
    """One PNG per metric plus overview.png from {generated set: set_distances(...)}: the closer
    a set's inter-set curve lies to the intra-reference curve, the closer it is to the reference."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for m in metrics.METRICS:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _densities(ax, distances, m)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{_slug(m)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    cols = 5
    rows = -(-len(metrics.METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows))
    for ax, m in zip(axes.ravel(), metrics.METRICS):
        _densities(ax, distances, m)
    for ax in axes.ravel()[len(metrics.METRICS) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=9)
    fig.tight_layout()
    path = out_dir / "overview.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [*written, path]


def repetition_plot(sets, path: Path) -> Path:
    """Repeated notes per second along the piece (PerceiverS figure 5) and token autocorrelation."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, s in enumerate(sets):
        color = "black" if i == 0 else f"C{i - 1}"
        profile = s.repetition_profile.mean(axis=0)
        x = (np.arange(len(profile)) + 0.5) / len(profile)
        left.plot(x, profile, color=color, label=f"{s.name} ({len(s)})")
        ac = s.autocorrelation
        defined = ac[~np.isnan(ac).any(axis=1)] if len(ac) else ac
        if len(defined):
            right.plot(np.arange(1, ac.shape[1] + 1), defined.mean(axis=0), color=color, label=s.name)
    left.set_xlabel("position in the piece (fraction of its duration)")
    left.set_ylabel("repeated notes per second")
    left.set_title("Back-to-back repetition")
    left.legend(fontsize=8)
    right.set_xlabel("lag (tokens)")
    right.set_ylabel("autocorrelation")
    right.set_title("Token autocorrelation")
    right.axhline(0, color="grey", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def likelihood_plot(buckets: list[dict], path: Path, title: str) -> Path:
    """Bits per token by position in the piece."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [b["label"] for b in buckets]
    bits = [b["bits_per_token"] if b["tokens"] else np.nan for b in buckets]
    ax.bar(labels, bits, color="C0")
    for i, b in enumerate(buckets):
        if b["tokens"]:
            ax.text(i, bits[i], f"{bits[i]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bits per token")
    ax.set_xlabel("token position in the piece")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
