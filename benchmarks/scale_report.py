"""The analysis of :mod:`benchmarks.scale`'s results: each run's processes summarised, the goals
judged per runner, the plot ``docs/img/scale.png`` and the markdown tables of ``docs/scale.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import pyplot, save_figure


def summarise_processes(result: dict[str, Any]) -> None:
    procs = result["processes"]
    workers = [p for p in procs if p["role"] == "ray worker"]
    result["driver_peak_rss_mb_polled"] = max(
        (p["peak_rss_mb"] for p in procs if p["role"] == "driver"), default=None
    )
    result["driver_peak_anon_mb_polled"] = max(
        (p["peak_anon_mb"] or 0 for p in procs if p["role"] == "driver"), default=None
    )
    result["max_worker_peak_rss_mb"] = max((p["peak_rss_mb"] for p in workers), default=None)
    result["max_worker_peak_anon_mb"] = max((p["peak_anon_mb"] or 0 for p in workers), default=None)
    # CPU seconds of the whole run (driver during extract() + every Ray process): samples per
    # CPU second is what a shared, oversubscribed machine cannot distort the way it does wall time.
    if result.get("driver_cpu_s_extract") is not None:
        others = sum(p.get("cpu_s") or 0.0 for p in procs if p["role"] != "driver")
        total = result["driver_cpu_s_extract"] + others
        result["cpu_s_total"] = round(total, 1)
        result["samples_per_cpu_s"] = round(result["rows"] / total, 2) if total > 0 else None
    result["ray_system_peak_rss_mb"] = {
        _short(p["name"]): p["peak_rss_mb"] for p in procs if p["role"] == "ray system"
    }


def _short(cmdline: str) -> str:
    """``.../ray/dashboard/agent.py --x`` -> ``agent.py``; ``.../raylet --x`` -> ``raylet``."""
    tokens = cmdline.split() or [""]
    script = next((t for t in tokens if t.endswith(".py")), tokens[0])
    return script.rsplit("/", 1)[-1]


def goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each goal per runner: the largest N against N = 10k (the issue's comparison) when both
    were measured, else against the next largest N."""
    out: dict[str, Any] = {}
    for runner in sorted({r["runner"] for r in runs}):
        pts = sorted((r for r in runs if r["runner"] == runner), key=lambda r: r["n"])
        if len(pts) < 2:
            continue
        b = pts[-1]
        a = next((r for r in pts[:-1] if r["n"] == 10_000), pts[-2])
        g: dict[str, Any] = {"compared": f"N={a['n']} -> N={b['n']}"}

        def ratio(key: str, a: dict = a, b: dict = b) -> float | None:
            x, y = a.get(key), b.get(key)
            return round(y / x, 3) if x and y else None

        g["driver_peak_rss_ratio"] = ratio("driver_extract_peak_rss_mb")
        g["driver_peak_anon_ratio"] = ratio("driver_peak_anon_mb_polled")
        g["max_worker_peak_rss_ratio"] = ratio("max_worker_peak_rss_mb")
        g["max_worker_peak_anon_ratio"] = ratio("max_worker_peak_anon_mb")
        g["seal_peak_rss_ratio"] = ratio("seal_peak_rss_mb")
        g["throughput_ratio_end_to_end"] = ratio("samples_per_s")
        g["throughput_ratio_steady"] = ratio("samples_per_s_steady")
        g["throughput_ratio_per_cpu_s"] = ratio("samples_per_cpu_s")
        scale = b["n"] / a["n"]
        g["seal_time_ratio_over_n_ratio"] = round((b["seal_s"] / a["seal_s"]) / scale, 3)
        g["verify_time_ratio_over_n_ratio"] = round((b["verify_s"] / a["verify_s"]) / scale, 3)
        for key in ("seal_cpu_s", "verify_cpu_s"):  # 1.0 = exactly linear in N
            if a.get(key) and b.get(key):
                g[f"{key.removesuffix('_s')}_ratio_over_n_ratio"] = round(
                    (b[key] / a[key]) / scale, 3
                )
        rss = [x for x in (g["driver_peak_rss_ratio"], g["max_worker_peak_rss_ratio"]) if x]
        g["rss_flat_met"] = bool(rss) and all(x <= 1.2 for x in rss)
        # Judged per CPU second when measured (wall time on a shared machine follows the load of
        # the other jobs), else on the steady wall-clock rate.
        thr = g["throughput_ratio_per_cpu_s"] or g["throughput_ratio_steady"]
        g["throughput_flat_met"] = thr is not None and abs(thr - 1) <= 0.10
        out[runner] = g
    return out


#: The lines of the plot drawn per runner: (panel, key, line style, label after the runner's name,
#: drawn only when measured). Seal and verify time have their own rule (CPU seconds when measured).
_LINES = (
    ("thr", "samples_per_s", "-", ": samples/s, end to end", False),
    ("thr", "samples_per_s_steady", ":", ": samples/s, steady", True),
    ("thr", "samples_per_cpu_s", "--", ": samples per CPU-s", True),
    ("rss", "driver_extract_peak_rss_mb", "-", " driver", False),
    ("rss", "max_worker_peak_rss_mb", "--", " largest Ray worker", True),
    ("seal", "seal_peak_rss_mb", "-", " driver during seal", False),
)


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: samples/s, peak RSS, seal/verify time and seal RSS, each against N."""
    plt = pyplot()
    runs = results.get("extraction", [])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_thr, ax_rss), (ax_time, ax_seal) = axes
    panels = {"thr": ax_thr, "rss": ax_rss, "seal": ax_seal}
    for runner, marker in (("local", "o"), ("ray", "s")):
        pts = sorted((r for r in runs if r["runner"] == runner), key=lambda r: r["n"])
        if not pts:
            continue
        n = [p["n"] for p in pts]
        for panel, key, ls, label, optional in _LINES:
            ys = [p.get(key) if optional else p[key] for p in pts]
            if not optional or any(ys):
                panels[panel].plot(n, ys, marker=marker, ls=ls, label=f"{runner}{label}")
        for key, ls, what in (("seal", "-", "seal"), ("verify", ":", "verify")):
            cpu = [p.get(f"{key}_cpu_s") for p in pts]
            ys = cpu if all(cpu) else [p[f"{key}_s"] for p in pts]  # CPU s when measured
            ax_time.plot(n, ys, marker=marker, ls=ls, label=f"{runner} {what}")
    if runs:
        lo, hi = min(r["n"] for r in runs), max(r["n"] for r in runs)
        ref = max((r.get("seal_cpu_s") or r["seal_s"] for r in runs if r["n"] == hi), default=None)
        if ref and hi > lo:
            ax_time.plot([lo, hi], [ref * lo / hi, ref], color="grey", lw=0.8, label="linear")
    for ax, title, ylabel in (
        (ax_thr, "Extraction throughput (2 shared cores)", "samples per second"),
        (ax_rss, "Peak RSS during extraction", "MiB"),
        (ax_time, "Seal and verify time (CPU seconds)", "s"),
        (ax_seal, "Peak RSS while sealing", "MiB"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("N samples")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    ax_thr.set_ylim(bottom=0)
    ax_rss.set_ylim(bottom=0)
    ax_seal.set_ylim(bottom=0)
    fig.suptitle(
        "cusa extraction at scale: webdataset tars of real COCO JPEGs -> sealed store\n"
        "image teacher: tiny Unicom config, random weights (the pipeline, not a model)",
        fontsize=10,
    )
    save_figure(fig, path)


def markdown_tables(results: dict[str, Any]) -> str:
    """The extraction and store tables of ``docs/scale.md``, from a results file."""

    def f(x: Any, nd: int = 1) -> str:
        return "–" if x is None else f"{x:,.{nd}f}"

    lines = [
        "| runner | N | samples/s end to end | steady | per CPU-s | driver peak RSS (anon) MiB "
        "| largest Ray worker RSS (anon) MiB | store MB | seal s (CPU s) | seal peak RSS MiB "
        "| verify s (CPU s) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results.get("extraction", []), key=lambda r: (r["runner"], r["n"])):
        worker = (
            f"{f(r['max_worker_peak_rss_mb'], 0)} ({f(r['max_worker_peak_anon_mb'], 0)})"
            if r.get("max_worker_peak_rss_mb")
            else "–"
        )
        lines.append(
            f"| {r['runner']} | {r['n']:,} | {f(r['samples_per_s'])} | "
            f"{f(r.get('samples_per_s_steady'))} | {f(r.get('samples_per_cpu_s'))} | "
            f"{f(r['driver_extract_peak_rss_mb'], 0)} ({f(r.get('driver_peak_anon_mb_polled'), 0)}) | "
            f"{worker} | {f(r['store_bytes'] / 1e6)} | {f(r['seal_s'], 2)} "
            f"({f(r.get('seal_cpu_s'), 2)}) | {f(r['seal_peak_rss_mb'], 0)} | "
            f"{f(r['verify_s'], 2)} ({f(r.get('verify_cpu_s'), 2)}) | "
            f"{f(r.get('machine', {}).get('load_average_1min_at_end'))} |"
        )
    lines += [
        "",
        "| store | on disk | write s | seal s | seal RSS over before MiB | open s | open RSS MiB "
        "| gather µs | in-RAM baseline µs | gather / baseline | verify s | verify RSS over before MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(results.get("store", []), key=lambda c: (c["dim"], c["rows"])):
        lines.append(
            f"| {c['rows']:,} x {c['dim']:,} fp16 | {c['bytes_on_disk'] / 1e9:.2f} GB | "
            f"{f(c['write_s'])} | {f(c['seal_s'])} | {f(c['seal_rss_over_before_mb'], 0)} | "
            f"{f(c['open_s'], 3)} | {f(c['open_rss_mb'], 1)} | {f(c['gather_us'])} | "
            f"{f(c.get('baseline_ram_dict_ids_us'))} | {f(c.get('gather_vs_baseline'), 2)} | "
            f"{f(c['verify_s'])} | {f(c.get('verify_rss_over_before_mb'), 0)} |"
        )
    return "\n".join(lines)
