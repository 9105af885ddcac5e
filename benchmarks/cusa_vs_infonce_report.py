"""The plot and the console table of :mod:`benchmarks.cusa_vs_infonce`, from its results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import pyplot, save_figure
from benchmarks.cusa_config import PAPER_TABLE5_RSUM, VARIANT_LABELS


def plot_rsum(results: dict[str, Any], path: Path) -> None:
    """Left: RSUM per variant (mean ± std over seeds, dots = seeds). Right: paired Δ RSUM vs InfoNCE,
    ours next to the paper's Table 5."""
    plt = pyplot()
    variants = list(results["aggregate"])
    labels = [VARIANT_LABELS[v] for v in variants]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    means = [results["aggregate"][v]["rsum"]["mean"] for v in variants]
    stds = [results["aggregate"][v]["rsum"]["std"] for v in variants]
    colors = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728"][: len(variants)]
    ax.bar(labels, means, yerr=stds, capsize=6, color=colors, alpha=0.8)
    for x, v in enumerate(variants):
        pts = [r["metrics"]["rsum"] for r in results["runs"][v].values()]
        ax.scatter([x] * len(pts), pts, color="black", s=10, zorder=3)
    lo = min(
        min(m - s for m, s in zip(means, stds, strict=True)),
        min(r["metrics"]["rsum"] for v in variants for r in results["runs"][v].values()),
    )
    hi = max(
        max(m + s for m, s in zip(means, stds, strict=True)),
        max(r["metrics"]["rsum"] for v in variants for r in results["runs"][v].values()),
    )
    pad = max(2.0, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    n_seeds = len(next(iter(results["runs"].values())))
    ax.set_ylabel("RSUM on eval split (max 600)")
    ax.set_title(
        f"Ours: frozen towers, trained heads\nmean ± std over {n_seeds} seeds (dots: seeds)",
        fontsize=10,
    )

    others = [v for v in variants if v != "infonce" and v in results["deltas_vs_infonce"]]
    xs = np.arange(len(others))
    ours = [results["deltas_vs_infonce"][v]["rsum"]["mean"] for v in others]
    ours_err = [results["deltas_vs_infonce"][v]["rsum"]["std"] for v in others]
    paper = [PAPER_TABLE5_RSUM[v] - PAPER_TABLE5_RSUM["infonce"] for v in others]
    ax2.bar(
        xs - 0.18,
        ours,
        0.36,
        yerr=ours_err,
        capsize=5,
        label="ours (paired Δ, mean ± std)",
        color="#1f77b4",
    )
    ax2.bar(xs + 0.18, paper, 0.36, label="paper Table 5 (CLIP, MSCOCO)", color="#ff7f0e")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xticks(xs, [VARIANT_LABELS[v] for v in others])
    ax2.set_ylabel("Δ RSUM vs InfoNCE")
    ax2.set_title("Difference from InfoNCE", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle("CUSA vs InfoNCE on COCO (coco-example: 600 train / 201 eval images)", fontsize=11)
    save_figure(fig, path, dpi=120)


def format_table(results: dict[str, Any]) -> str:
    """Mean ± std of RSUM, Δ RSUM, t2t R@1 and mAP@R and the training seconds, per variant."""
    lines = [
        f"{'variant':<9}{'RSUM':>16}{'Δ RSUM':>16}{'t2t R@1':>16}{'t2t mAP@R':>16}{'train s':>9}"
    ]
    for v, a in results["aggregate"].items():
        d = results["deltas_vs_infonce"].get(v)
        dr = f"{d['rsum']['mean']:+.2f}±{d['rsum']['std']:.2f}" if d else "-"
        lines.append(
            f"{v:<9}{a['rsum']['mean']:>10.2f}±{a['rsum']['std']:<5.2f}{dr:>16}"
            f"{a['t2t_r1']['mean']:>10.2f}±{a['t2t_r1']['std']:<5.2f}"
            f"{a['t2t_map_at_r']['mean']:>10.2f}±{a['t2t_map_at_r']['std']:<5.2f}{a['train_s']['mean']:>9.1f}"
        )
    return "\n".join(lines)
