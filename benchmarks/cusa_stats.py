"""Paired comparisons with their uncertainty, for both CUSA studies (issue 24, item 7).

Every cell of :mod:`benchmarks.cusa_sensitivity` and every variant of
:mod:`benchmarks.cusa_vs_infonce` is compared with InfoNCE trained on the same seed (same images,
same batch order, same initial weights). :func:`paired_summary` turns the per-seed differences into
their mean, a 95% Student-t confidence interval, and wins/n (:func:`paired_ci`); :func:`direction` states a direction
only where that interval excludes zero. :func:`annotate_sensitivity` recomputes every summary of an
existing sensitivity results file from its stored runs, so files written before this module carry
the intervals too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.common import mean_std

#: Two-sided 97.5% quantiles of Student's t, by degrees of freedom (1..30); above: 1.96 + a
#: correction that stays within 0.003 of the exact value.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df={df!r}: a t interval needs at least 2 paired values")
    if df <= len(_T975):
        return _T975[df - 1]
    return 1.96 + 2.4 / df  # within 0.003 of the exact quantile for df > 30


def paired_ci(diffs: Sequence[float], ndigits: int = 3) -> dict[str, Any]:
    """Mean, sample std and the 95% t interval of paired differences, and wins/n.

    With a single value the interval is unbounded (``None``): one seed says nothing about the sign.
    """
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        raise ValueError("paired_ci needs at least one paired difference")
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else 0.0
    if n > 1:
        half = t975(n - 1) * sd / math.sqrt(n)
        lo, hi = round(mean - half, ndigits), round(mean + half, ndigits)
    else:
        lo = hi = None
    wins = sum(x > 0 for x in d)
    return {
        "mean": round(mean, ndigits),
        "std": round(sd, ndigits),
        "n": n,
        "ci95": [lo, hi],
        "ci_method": "Student t, two-sided 95%, paired by seed",
        "wins": wins,
        "wins_n": f"{wins}/{n}",
    }


def direction(ci: dict[str, Any]) -> str:
    """``helps`` if the 95% interval is above zero, ``hurts`` if below, else ``unclear``."""
    lo, hi = ci["ci95"]
    if lo is not None and lo > 0:
        return "helps"
    if hi is not None and hi < 0:
        return "hurts"
    return "unclear"


def fmt_ci(ci: dict[str, Any], digits: int = 1) -> str:
    """``+3.3 [−0.1, +6.7]``: the mean paired difference and its 95% interval."""
    lo, hi = ci["ci95"]
    if lo is None:
        return f"{ci['mean']:+.{digits}f} [n/a]"
    return f"{ci['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


# ---- existing results files ----------------------------------------------------------------------


def ci_from_summary(delta: dict[str, Any], wins_n: str, ndigits: int = 3) -> dict[str, Any]:
    """:func:`paired_ci` from a stored mean/std/n of paired differences (runs not kept)."""
    n, mean, sd = int(delta["n"]), float(delta["mean"]), float(delta["std"])
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else None
    wins = int(wins_n.split("/")[0])
    return {
        "mean": round(mean, ndigits),
        "std": round(sd, ndigits),
        "n": n,
        "ci95": [None, None] if half is None else [round(mean - half, ndigits),
                                                   round(mean + half, ndigits)],
        "ci_method": "Student t, two-sided 95%, paired by seed (from the stored mean and std)",
        "wins": wins,
        "wins_n": f"{wins}/{n}",
    }  # fmt: skip


def summarize(runs: dict[int, dict[str, float]], base: dict[int, dict[str, float]]) -> dict:
    """RSUM, paired Δ RSUM vs InfoNCE (same seeds) with its 95% t interval and wins/n, text->text
    R@1 and its Δ (with interval), and the :func:`verdict`."""
    seeds = sorted(s for s in runs if s in base)
    d_rsum = [runs[s]["rsum"] - base[s]["rsum"] for s in seeds]
    above = sum(d > 0 for d in d_rsum)
    out = {
        "rsum": mean_std([runs[s]["rsum"] for s in seeds], 3),
        "delta_rsum": mean_std(d_rsum, 3),
        "delta_rsum_ci": paired_ci(d_rsum),
        "t2t_r1": mean_std([runs[s]["t2t_r1"] for s in seeds], 3),
        "delta_t2t_r1": mean_std([runs[s]["t2t_r1"] - base[s]["t2t_r1"] for s in seeds], 3),
        "delta_t2t_r1_ci": paired_ci([runs[s]["t2t_r1"] - base[s]["t2t_r1"] for s in seeds]),
        "seeds_above": f"{above}/{len(seeds)}",
        "frac_above": round(above / len(seeds), 3),
    }
    sd = out["delta_rsum"]["std"]
    out["paired_t"] = (
        round(out["delta_rsum"]["mean"] / (sd / math.sqrt(len(seeds))), 2) if sd else None
    )
    out["verdict"] = verdict(out)
    return out


def verdict(summary: dict[str, Any]) -> str:
    """``helps`` / ``hurts``: the 95% interval of the paired Δ RSUM excludes zero, above / below;
    otherwise ``unclear`` (a direction is stated only where the interval excludes zero)."""
    return direction(summary["delta_rsum_ci"])


def _summary(runs: dict[str, dict], base: dict[str, dict]) -> dict[str, Any]:
    return summarize({int(s): r for s, r in runs.items()}, {int(s): r for s, r in base.items()})


def annotate_sensitivity(results: dict[str, Any]) -> dict[str, Any]:
    """Recompute every cell summary of a sensitivity results dict (in place) from its stored runs,
    with the 95% intervals and the interval-based verdict; the held-out confirmation, whose runs
    were not kept, gets its interval from the stored mean, std and n."""
    own = {str(x) for x in results["config"]["seeds"]}
    for cell in results["cells"].values():
        spec = cell["spec"]
        key = f"infonce|n={spec['train_size']}|{spec['student']}"
        base = {s: r["metrics"] for s, r in results["baselines"][key]["runs"].items()}
        runs = {s: r["metrics"] for s, r in cell["runs"].items()}
        cell["summary"] = _summary({s: runs[s] for s in runs if s in own}, base)
        for tag in cell.get("other_seeds", {}):
            cell["other_seeds"][tag] = _summary({s: runs[s] for s in tag.split(",")}, base)
    confirm = results.get("confirm", {})
    if "eval" in confirm:
        tag = ",".join(str(s) for s in confirm["seeds"])
        best = results["selection"]["best_setting"]["key"]
        with_tag = [k for k, c in results["cells"].items() if tag in c.get("other_seeds", {})]
        official = next((k for k in with_tag if k != best), best)
        confirm["eval"]["official"] = results["cells"][official]["other_seeds"][tag]
        confirm["eval"]["best"] = results["cells"][best]["other_seeds"][tag]
    for summary in confirm.get("holdout", {}).values():
        if isinstance(summary, dict) and "delta_rsum" in summary and "seeds_above" in summary:
            summary["delta_rsum_ci"] = ci_from_summary(
                summary["delta_rsum"], summary["seeds_above"]
            )
            summary["verdict"] = direction(summary["delta_rsum_ci"])
    return results


def annotate_vs_infonce(results: dict[str, Any]) -> dict[str, Any]:
    """Add the paired 95% interval of Δ RSUM (and Δ t2t R@1) per variant, from the stored runs."""
    base = results["runs"]["infonce"]
    for variant, d in results["deltas_vs_infonce"].items():
        runs = results["runs"][variant]
        seeds = [s for s in runs if s in base]
        for metric in ("rsum", "t2t_r1"):
            diffs = [runs[s]["metrics"][metric] - base[s]["metrics"][metric] for s in seeds]
            d[f"{metric}_ci"] = paired_ci(diffs)
        d["verdict"] = direction(d["rsum_ci"])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.cusa_stats FILE...``: add the intervals to existing results files."""
    import argparse
    import json
    from pathlib import Path

    from benchmarks.common import write_json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    for name in args.files:
        path = Path(name)
        results = json.loads(path.read_text())
        if "cells" in results:
            annotate_sensitivity(results)
        elif "deltas_vs_infonce" in results:
            annotate_vs_infonce(results)
        else:
            raise SystemExit(f"{name}: neither a sensitivity nor a cusa_vs_infonce results file")
        write_json(path, results, indent=1 if "cells" in results else 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
