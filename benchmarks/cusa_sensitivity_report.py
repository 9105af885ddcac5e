"""The plots and tables of the sensitivity study, from its results dict (or file).

Three figures (:func:`plot_factors`, :func:`plot_heatmaps`, :func:`plot_teachers`), the markdown
tables of ``docs/cusa_sensitivity.md`` (:func:`markdown_report`, ``--report FILE``) and the
console table printed at the end of a run (:func:`console_table`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import pyplot, save_figure
from benchmarks.cusa_stats import ci_from_summary, fmt_ci


def plot_heatmaps(results: dict[str, Any], path: Path) -> None:
    """Δ RSUM vs InfoNCE over (τ, α), one panel per teacher pair; text: mean ± std, seeds above."""
    plt = pyplot()
    grids = results["grids"]
    if not grids:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(5.6 * len(grids), 4.6), squeeze=False)
    vmax = (
        max(
            abs(d["mean"])
            for g in grids.values()
            for row in g["delta_rsum"].values()
            for d in row.values()
        )
        or 1.0
    )
    for ax, (name, g) in zip(axes[0], grids.items(), strict=True):
        taus = list(g["delta_rsum"])
        alphas = list(next(iter(g["delta_rsum"].values())))
        m = np.array([[g["delta_rsum"][t][a]["mean"] for a in alphas] for t in taus])
        im = ax.imshow(m, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        for i, t in enumerate(taus):
            for j, a in enumerate(alphas):
                cell = results["cells"][g["keys"][t][a]]["summary"]
                ax.text(j, i, f"{cell['delta_rsum']['mean']:+.1f}\n±{cell['delta_rsum']['std']:.1f}"
                        f" ({cell['seeds_above']})", ha="center", va="center", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(alphas)), [f"α={a}" for a in alphas])
        ax.set_yticks(range(len(taus)), [f"τ={t}" for t in taus])
        label = "default" if name == "default" else "best pair"
        ax.set_title(f"{label}: {g['image_teacher']} + {g['text_teacher']}", fontsize=9)
        fig.colorbar(im, ax=ax, label="Δ RSUM vs InfoNCE (mean over seeds)")
    fig.suptitle("CUSA (β = 0.5): paired Δ RSUM vs InfoNCE over soft-label τ and CSA weight α",
                 fontsize=10)  # fmt: skip
    save_figure(fig, path)


def plot_factors(results: dict[str, Any], path: Path) -> None:
    """One panel per one-factor sweep: Δ RSUM (mean ± std over seeds) against the factor."""
    plt = pyplot()
    f = results["factors"]
    cells = results["cells"]
    panels = []
    if "tau" in f:
        panels.append(("soft-label τ", {v: f["tau"][v] for v in f["tau"]}))
    if "alpha" in f:
        panels.append(("CSA weight α (CUSA)", {"cusa": f["alpha"]}))
        panels.append(("USA weight β (CUSA)", {"cusa": f["beta"]}))
    if "size" in f:
        panels.append(("train images (CUSA)", f["size"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for name, keys in series.items():
            xs = list(keys)
            ys = [cells[keys[x]]["summary"]["delta_rsum"]["mean"] for x in xs]
            es = [cells[keys[x]]["summary"]["delta_rsum"]["std"] for x in xs]
            ax.errorbar(range(len(xs)), ys, yerr=es, marker="o", capsize=3, label=name)
            ax.set_xticks(range(len(xs)), xs)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("Δ RSUM vs InfoNCE")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_teachers(results: dict[str, Any], path: Path) -> None:
    """Δ RSUM per teacher pair (rows image, columns text), at each τ of the teacher sweep."""
    plt = pyplot()
    sweeps = results["factors"].get("teachers")
    if not sweeps:
        return
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.0 * len(sweeps), 3.4), squeeze=False)
    for ax, (tau, pairs) in zip(axes[0], sweeps.items(), strict=True):
        images = list(dict.fromkeys(k.split("+")[0] for k in pairs))
        texts = list(dict.fromkeys(k.split("+")[1] for k in pairs))
        # Pairs not run (the one-factor-at-a-time sweep at the official τ) stay blank.
        m = np.array(
            [
                [
                    results["cells"][pairs[f"{i}+{t}"]]["summary"]["delta_rsum"]["mean"]
                    if f"{i}+{t}" in pairs
                    else np.nan
                    for t in texts
                ]
                for i in images
            ]
        )
        v = float(np.nanmax(np.abs(m))) or 1.0
        ax.imshow(np.ma.masked_invalid(m), cmap="RdBu", vmin=-v, vmax=v, aspect="auto")
        for r, i in enumerate(images):
            for c, t in enumerate(texts):
                if f"{i}+{t}" not in pairs:
                    ax.text(c, r, "not run", ha="center", va="center", fontsize=7, color="grey")
                    continue
                s = results["cells"][pairs[f"{i}+{t}"]]["summary"]
                ax.text(c, r, f"{s['delta_rsum']['mean']:+.1f}±{s['delta_rsum']['std']:.1f}\n"
                        f"({s['seeds_above']})", ha="center", va="center", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(texts)), texts, fontsize=7, rotation=15)
        ax.set_yticks(range(len(images)), images, fontsize=7)
        ax.set_title(f"CUSA Δ RSUM by teacher pair, soft-label τ = {tau}", fontsize=9)
    save_figure(fig, path)


def _fmt(m: dict[str, float], signed: bool = False) -> str:
    return f"{m['mean']:+.1f} ± {m['std']:.1f}" if signed else f"{m['mean']:.1f} ± {m['std']:.1f}"


def _ci(s: dict[str, Any], name: str = "delta_rsum") -> str:
    """``+3.3 [−0.1, +6.7]``: the paired mean Δ and its 95% t interval."""
    ci = s.get(f"{name}_ci") or ci_from_summary(s[name], s["seeds_above"])
    return fmt_ci(ci)


def _summary_row(label: str, s: dict[str, Any]) -> str:
    return (
        f"| {label} | {_fmt(s['rsum'])} | **{_ci(s)}** | {s['seeds_above']} | "
        f"{_fmt(s['t2t_r1'])} | {_ci(s, 'delta_t2t_r1')} | {s['verdict']} |"
    )


def _row(results: dict[str, Any], label: str, key: str) -> str:
    return _summary_row(label, results["cells"][key]["summary"])


HEADER = (
    "| {0} | RSUM | Δ RSUM vs InfoNCE [95% CI] | wins/n | t2t R@1 | Δ t2t R@1 [95% CI] | "
    "verdict |\n|---|---|---|---|---|---|---|"
)


def markdown_report(results: dict[str, Any]) -> str:
    """The page's tables from a results file (``--report FILE``): one table per factor."""
    f, out = results["factors"], []
    base = results["baselines"]
    out.append("InfoNCE baselines (RSUM, t2t R@1):\n")
    for k, b in base.items():
        out.append(f"- {k}: RSUM {_fmt(b['rsum'])}, t2t R@1 {_fmt(b['t2t_r1'])}")
    out.append("\n### official\n" + HEADER.format("variant"))
    out += [_row(results, v, k) for v, k in f["official"].items()]
    for v, col in f.get("tau", {}).items():
        out.append(f"\n### τ, {v}\n" + HEADER.format("soft-label τ"))
        out += [_row(results, t, k) for t, k in col.items()]
    for name in ("alpha", "beta"):
        if name in f:
            out.append(f"\n### {name} (CUSA)\n" + HEADER.format(name))
            out += [_row(results, a, k) for a, k in f[name].items()]
    for tau, pairs in f.get("teachers", {}).items():
        out.append(f"\n### teachers at τ = {tau} (CUSA)\n" + HEADER.format("image + text teacher"))
        out += [_row(results, p.replace("+", " + "), k) for p, k in pairs.items()]
    for name, sizes in f.get("size", {}).items():
        out.append(f"\n### train images, {name} setting (CUSA)\n" + HEADER.format("images"))
        out += [_row(results, n, k) for n, k in sizes.items()]
    for name, studs in f.get("student", {}).items():
        out.append(f"\n### student, {name} setting (CUSA)\n" + HEADER.format("student"))
        out += [_row(results, n, k) for n, k in studs.items()]
    for name, g in results.get("grids", {}).items():
        alphas = list(next(iter(g["keys"].values())))
        out.append(
            f"\n### grid {name}: {g['image_teacher']} + {g['text_teacher']} "
            "(Δ RSUM [95% CI], wins/n)\n"
        )
        out.append("| τ \\ α | " + " | ".join(alphas) + " |")
        out.append("|---" * (len(alphas) + 1) + "|")
        for t, row in g["keys"].items():
            cells = [results["cells"][row[a]]["summary"] for a in alphas]
            out.append(f"| {t} | " + " | ".join(
                f"{_ci(c)} ({c['seeds_above']})" for c in cells) + " |")  # fmt: skip
    out.append(
        "\n### entropy of the soft labels (nats; uniform = ln 128 = 4.85), effective neighbours\n"
    )
    taus = list(next(iter(results["entropy"].values()))["per_tau"])
    out.append("| teacher | cos mean ± std | " + " | ".join(f"τ = {t}" for t in taus) + " |")
    out.append("|---" * (len(taus) + 2) + "|")
    for name, e in results["entropy"].items():
        cols = [f"{e['per_tau'][t]['entropy_nats']:.2f} ({e['per_tau'][t]['effective_neighbours']:.1f})"
                for t in taus]  # fmt: skip
        out.append(f"| {name} | {e['offdiag_cosine_mean']:.2f} ± {e['offdiag_cosine_std']:.2f} | "
                   + " | ".join(cols) + " |")  # fmt: skip
    c = results.get("confirm", {})
    if "eval" in c:
        out.append(f"\n### confirmation, seeds {c['seeds']}\n" + HEADER.format("where / setting"))
        for where in ("eval", "holdout"):
            for name in ("official", "best"):
                out.append(_summary_row(f"{where} / {name}", c[where][name]))
    out.append("\n" + json.dumps({"selection": results["selection"], "schedules": {
        k: v["chosen"] for k, v in results["schedules"].items()}}, indent=1))  # fmt: skip
    return "\n".join(out)


def console_table(results: dict[str, Any]) -> str:
    """One line per cell: RSUM, Δ RSUM, seeds above InfoNCE and Δ t2t R@1."""
    lines = [f"{'cell':<78}{'RSUM':>15}{'Δ RSUM':>16}{'above':>7}{'Δ t2t R@1':>12}"]
    for key, c in results["cells"].items():
        s = c["summary"]
        lines.append(
            f"{key:<78}{s['rsum']['mean']:>9.2f}±{s['rsum']['std']:<5.2f}"
            f"{s['delta_rsum']['mean']:>+10.2f}±{s['delta_rsum']['std']:<5.2f}{s['seeds_above']:>7}"
            f"{s['delta_t2t_r1']['mean']:>+12.2f}"
        )
    return "\n".join(lines)
