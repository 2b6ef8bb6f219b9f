"""Conflict heatmap ordered by group and PCA scatter coloured by group (PNG, matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def conflict_heatmap(matrix: np.ndarray, sources: list[str], groups: list[list[str]], out: Path) -> None:
    plt = _pyplot()
    order = [sources.index(s) for g in groups for s in g]
    m = np.asarray(matrix)[np.ix_(order, order)]
    n = len(order)
    fig, ax = plt.subplots(figsize=(min(4 + 0.22 * n, 16), min(3.5 + 0.22 * n, 15)))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [sources[i] for i in order]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n), labels, fontsize=6)
    edge = 0
    for g in groups[:-1]:
        edge += len(g)
        ax.axhline(edge - 0.5, color="k", lw=1)
        ax.axvline(edge - 0.5, color="k", lw=1)
    fig.colorbar(im, ax=ax, label="cosine of mean gradients")
    ax.set_title("conflict matrix C, ordered by group")
    fig.tight_layout()
    _save(fig, out)


def pca_scatter(scores: np.ndarray, sources: list[str], groups: list[list[str]], out: Path) -> None:
    plt = _pyplot()
    scores = np.asarray(scores)
    y = scores[:, 1] if scores.shape[1] > 1 else np.zeros(len(scores))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for k, g in enumerate(groups):
        idx = [sources.index(s) for s in g]
        ax.scatter(scores[idx, 0], y[idx], label=f"group {k}", s=30)
        for i in idx:
            ax.annotate(sources[i], (scores[i, 0], y[i]), fontsize=6, alpha=0.8)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2" if scores.shape[1] > 1 else "")
    ax.legend(fontsize=8)
    ax.set_title("PCA of the conflict matrix, coloured by group")
    fig.tight_layout()
    _save(fig, out)


def per_source_bars(per_source: dict[str, dict[str, float]], title: str, out: Path) -> None:
    """Grouped bars: each source's score (x) per method (colour); ``per_source`` is {method: {source: score}}."""
    plt = _pyplot()
    methods = list(per_source)
    sources = list(next(iter(per_source.values())))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * len(sources) * max(1, len(methods) / 3), 18), 4.2))
    x = np.arange(len(sources))
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [per_source[m].get(s, np.nan) for s in sources], width,
               label=m)
    ax.set_xticks(x, sources, rotation=90, fontsize=7)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=min(len(methods), 6))
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: Path) -> None:
    """Save under a temporary name, then rename: a kill mid-save never leaves half a picture."""
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
