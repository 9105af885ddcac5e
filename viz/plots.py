"""Matplotlib figures for the report, rendered off-screen (Agg) to PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 100


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def heatmaps(
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    cmap: str = "viridis",
    annotate_diagonal: bool = True,
) -> bytes:
    """Square matrices side by side, each with its own colour bar.

    Args:
        panels: ``(title, (B, B) matrix)`` pairs; rows are queries, columns are targets.
        cmap: matplotlib colour map.
        annotate_diagonal: outline the diagonal (the dataset's positive pairs).
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, (title, mat) in zip(axes[0], panels, strict=True):
        b = mat.shape[0]
        im = ax.imshow(mat, cmap=cmap, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title, fontsize=9)
        ticks = np.arange(b) if b <= 16 else np.arange(0, b, max(1, b // 8))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("target", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        if annotate_diagonal and b <= 64:
            ax.plot(
                np.arange(b), np.arange(b), "s", mfc="none", mec="white", ms=max(2, 80 / b), mew=0.6
            )
    fig.tight_layout()
    return figure_png(fig)


def label_distributions(
    rows: Sequence[int],
    series: Sequence[tuple[str, np.ndarray]],
) -> bytes:
    """Bar charts of target distributions for a few query rows, one panel per query.

    Args:
        rows: query indices to show.
        series: ``(label, (B, B) row-stochastic matrix)``, e.g. one-hot and soft labels.
    """
    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 2.4), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(series))
    for ax, r in zip(axes[0], rows, strict=True):
        for k, (label, mat) in enumerate(series):
            x = np.arange(mat.shape[1]) + (k - (len(series) - 1) / 2) * width
            ax.bar(x, mat[r], width=width, label=label)
        ax.set_title(f"query {r}", fontsize=9)
        ax.set_ylim(0, 1.0)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("target index in the batch", fontsize=8)
        ax.set_xticks(np.arange(series[0][1].shape[1]))
    axes[0, 0].set_ylabel("probability", fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, names, fontsize=7, ncol=len(series), loc="lower center", bbox_to_anchor=(0.5, 1.0)
    )
    fig.tight_layout()
    return figure_png(fig)


def curves(
    panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    *,
    xlabel: str = "step",
    ncols: int = 3,
    logy: bool = False,
) -> bytes:
    """Small multiples of line plots.

    Args:
        panels: ``{panel title: {line label: (x, y)}}``.
        xlabel: shared x axis label.
        ncols: panels per row.
        logy: log-scale y axes (only where every value is positive).
    """
    names = list(panels)
    ncols = max(1, min(ncols, len(names)))
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        positive = True
        for label, (x, y) in panels[name].items():
            ax.plot(x, y, lw=1.2, label=label, marker="." if len(x) < 30 else None)
            positive = positive and bool(np.all(np.asarray(y) > 0))
        if logy and positive:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panels[name]) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def embedding_scatter(
    panels: Sequence[tuple[str, np.ndarray, list[str], list[bool]]],
) -> bytes:
    """2-D embeddings side by side, coloured by image and marked by modality.

    Args:
        panels: ``(title, (N, 2) coordinates, group of each row, is-caption of each row)``;
            rows of one group (an image and its captions) share a colour.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (title, xy, groups, is_caption) in zip(axes[0], panels, strict=True):
        order = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        colors = np.array([cmap(order[g] % 20) for g in groups]).reshape(-1, 4)
        cap = np.asarray(is_caption, dtype=bool)
        if (~cap).any():
            ax.scatter(
                xy[~cap, 0],
                xy[~cap, 1],
                c=colors[~cap],
                marker="o",
                s=36,
                edgecolors="black",
                linewidths=0.5,
                label="image",
            )
        if cap.any():
            ax.scatter(
                xy[cap, 0], xy[cap, 1], c=colors[cap], marker="^", s=18, alpha=0.85, label="caption"
            )
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return figure_png(fig)
