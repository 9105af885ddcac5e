"""The sensitivity study's headline cells with 8+ seeds each and 95% intervals (issue 24, item 7).

The cells the study's conclusions rest on, rerun with fresh seeds so that each claim carries its
uncertainty: +CUSA at soft-label τ ∈ {1 (official), 0.5 (``LossConfig.sharper_soft_labels()``),
0.1} at 150 and 600 train images, under two schedules fixed in advance:

- ``short``: what the held-out schedule search of ``cusa_sensitivity --size-by-tau`` chose for
  InfoNCE (150 images: lr 3e-3, 20 epochs; 600 images: lr 3e-4, 10 epochs);
- ``long``: lr 3e-3, 40 epochs (what the wider search chose at 600 images).

Every cell is compared with InfoNCE on the same seed (same images, batches and initial weights);
:func:`benchmarks.cusa_stats.paired_ci` gives the mean paired Δ, its 95% Student-t interval and
wins/n, and a direction is stated only where the interval excludes zero. Nothing is selected on
the eval split: the settings, schedules and seeds are fixed before the run. The training step and
the data are those of :mod:`benchmarks.cusa_sensitivity` (:class:`~benchmarks.cusa_sensitivity_sweep.Sweep`).

Run (reuses the store of the sweep; extraction fills only what is missing)::

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python -m benchmarks.cusa_sensitivity_headline \\
        --train ../shared/data/coco-example --eval ../shared/data/coco-example --store DIR

Writes ``benchmarks/results/cusa_sensitivity_headline.json`` after every seed (a partial file is
a valid file with fewer seeds) with the wall time, the process CPU time and the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, log_to_stderr, mean_std, versions, write_json
from benchmarks.cusa_config import ExperimentConfig, add_data_arguments
from benchmarks.cusa_sensitivity import extract_all
from benchmarks.cusa_sensitivity_config import OFFICIAL, Cell, SweepConfig, sweep_loss
from benchmarks.cusa_sensitivity_sweep import Sweep, summarize
from benchmarks.cusa_stats import fmt_ci

log = logging.getLogger("benchmarks.cusa_sensitivity_headline")

TAUS = (1.0, 0.5, 0.1)
SIZES = (150, 600)
#: schedule name -> train images -> (lr, epochs); ``short`` = the held-out search's choice.
SCHEDULES: dict[str, dict[int, tuple[float, int]]] = {
    "short": {150: (3e-3, 20), 600: (3e-4, 10)},
    "long": {150: (3e-3, 40), 600: (3e-3, 40)},
}
DEFAULT_SEEDS = tuple(range(300, 308))
RESULTS_JSON = RESULTS_DIR / "cusa_sensitivity_headline.json"


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cell_key(schedule: str, n: int, tau: float | None) -> str:
    return f"{schedule}|n={n}|" + ("infonce" if tau is None else f"cusa|tau={tau:g}")


def summaries(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per (schedule, size): InfoNCE's RSUM and every τ's paired summary (seeds done so far)."""
    out: dict[str, Any] = {}
    for schedule in SCHEDULES:
        for n in SIZES:
            base = {s: r["metrics"] for s, r in runs.get(cell_key(schedule, n, None), {}).items()}
            if len(base) < 2:
                continue
            row: dict[str, Any] = {
                "infonce_rsum": mean_std([m["rsum"] for m in base.values()], 3),
                "infonce_t2t_r1": mean_std([m["t2t_r1"] for m in base.values()], 3),
            }
            for tau in TAUS:
                got = {s: r["metrics"] for s, r in runs.get(cell_key(schedule, n, tau), {}).items()}
                if len(set(got) & set(base)) >= 2:
                    row[f"{tau:g}"] = summarize(got, base)
            out[f"{schedule}|n={n}"] = row
    return out


def run(cfg: SweepConfig, store: str, train: str, seeds: Sequence[int], out: Path,
        extract: bool = True, schedules: Sequence[str] = tuple(SCHEDULES)) -> dict:  # fmt: skip
    t0, cpu0 = time.perf_counter(), _cpu_s()
    load_start = os.getloadavg()
    extraction = extract_all(cfg, store, train, cfg.base.train_split) if extract else {}
    if cfg.train_threads:
        torch.set_num_threads(cfg.train_threads)
    sweep = Sweep(cfg, store, train, cfg.base.train_split)
    img, txt = sweep.default_pair
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    loads: list[list[float]] = []
    results: dict[str, Any] = {}
    for seed in seeds:
        for schedule, by_size in SCHEDULES.items():
            if schedule not in schedules:
                continue
            for n in SIZES:
                lr, epochs = by_size[n]
                sched = replace(cfg.base.schedule, lr=lr, epochs=epochs)
                data = sweep.train_data(Cell("cusa", image_teacher=img, text_teacher=txt,
                                             train_size=n))  # fmt: skip
                key = cell_key(schedule, n, None)
                runs.setdefault(key, {})[seed] = sweep._run(
                    "infonce", None, data, sweep.val, seed, sched, "frozen"
                )
                for tau in TAUS:
                    loss = sweep_loss("cusa", tau, OFFICIAL["alpha"], OFFICIAL["beta"])
                    runs.setdefault(cell_key(schedule, n, tau), {})[seed] = sweep._run(
                        "cusa", loss, data, sweep.val, seed, sched, "frozen"
                    )
                # after every block, so an interrupted run keeps what it finished
                loads.append([round(x, 2) for x in os.getloadavg()])
                results = _results(cfg, sweep, runs, extraction, seeds, t0, cpu0, load_start, loads)
                write_json(out, results, indent=1)
                log.info("seed %d %s n=%d done: %.0f s wall, %.0f s CPU", seed, schedule, n,
                         time.perf_counter() - t0, _cpu_s() - cpu0)  # fmt: skip
        log.info("seed %d done: %.0f s wall, %.0f s CPU, load %s", seed,
                 time.perf_counter() - t0, _cpu_s() - cpu0, loads[-1])  # fmt: skip
    return results


def _results(cfg: SweepConfig, sweep: Sweep, runs: dict, extraction: dict, seeds: Sequence[int],
             t0: float, cpu0: float, load_start: tuple[float, ...], loads: list) -> dict:  # fmt: skip
    done = sorted({s for r in runs.values() for s in r})
    return {
        "experiment": "cusa_sensitivity_headline (issue 24, item 7)",
        "design": {
            "cells": "+CUSA at soft-label tau 1 / 0.5 / 0.1 (alpha 0.1, beta 0.5, teachers "
            f"{sweep.default_pair[0]} + {sweep.default_pair[1]}) at {list(SIZES)} train images, "
            "schedules 'short' (held-out search's choice for InfoNCE) and 'long' (lr 3e-3, 40 ep)",
            "pairing": "each cell vs InfoNCE on the same seed: same images, batch order, init",
            "interval": "95% Student-t interval of the per-seed paired differences",
            "verdict": "helps/hurts only where the 95% interval excludes zero; else unclear",
            "selection": "none: settings, schedules and seeds fixed before the run; the eval "
            "split only scores",
        },
        "config": {
            "seeds_planned": list(seeds),
            "seeds_done": done,
            "taus": list(TAUS),
            "sizes": list(SIZES),
            "schedules": {
                k: {str(n): {"lr": lr, "epochs": ep} for n, (lr, ep) in v.items()}
                for k, v in SCHEDULES.items()
            },  # fmt: skip
            "base": asdict(cfg.base),
            "train_threads": cfg.train_threads,
        },
        "data": {
            "train_images": len(sweep.pair(*sweep.default_pair).image_ids),
            "eval_images": len(sweep.val.image_ids),
            "eval_captions": len(sweep.val.caption_ids),
        },  # fmt: skip
        "summary": summaries(runs),
        "runs": {k: {str(s): r for s, r in v.items()} for k, v in runs.items()},
        "timings_s": {
            "extraction": extraction,
            "wall_total": round(time.perf_counter() - t0, 1),
            "cpu_total_process": round(_cpu_s() - cpu0, 1),
            "runs": sweep.n_runs,
        },
        "load_average": {
            "at_start_1_5_15min": [round(x, 2) for x in load_start],
            "after_each_seed_1_5_15min": loads,
            "cpu_count": os.cpu_count(),
            "note": "the machine was shared with other jobs; wall time depends on them, CPU time "
            "much less",
        },
        "versions": versions(),
    }


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from runs of disjoint seed sets (e.g. run side by side on a shared
    machine): the runs are joined, the summaries recomputed, and the timings of every part kept;
    ``wall_total`` is the longest part's and ``cpu_total_process`` the sum."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for part in parts:  # parts may split seeds, or schedules of the same seeds
        for key, by_seed in part["runs"].items():
            for seed, run in by_seed.items():
                if int(seed) in runs.get(key, {}):
                    raise ValueError(f"seed {seed} of {key} is in two parts; merge disjoint seeds")
                runs.setdefault(key, {})[int(seed)] = run
    out = dict(parts[0])
    seeds = sorted({s for r in runs.values() for s in r})
    for p in parts:
        p["config"].setdefault("schedules_run", list(SCHEDULES))
    out["config"] = {**parts[0]["config"], "seeds_planned": seeds, "seeds_done": seeds}
    out["summary"] = summaries(runs)
    out["runs"] = {k: {str(s): r for s, r in sorted(v.items())} for k, v in runs.items()}
    out["timings_s"] = {
        "wall_total": max(p["timings_s"]["wall_total"] for p in parts),
        "cpu_total_process": round(sum(p["timings_s"]["cpu_total_process"] for p in parts), 1),
        "runs": sum(p["timings_s"]["runs"] for p in parts),
        "parts": [{"seeds": p["config"]["seeds_done"], **p["timings_s"]} for p in parts],
        "note": "the parts ran side by side, each in its own process with 1 torch thread",
    }
    out["load_average"] = {"parts": [p["load_average"] for p in parts]}
    return out


def committed_runs(sweep: dict[str, Any], origin: str) -> dict[str, dict[int, dict[str, Any]]]:
    """The runs of a committed sensitivity results file (``--size-by-tau``) that are one of this
    study's cells: same variant, τ, α, β, teachers and size, trained with the same schedule (its
    held-out choice) by the same ``train_variant``; keyed like :func:`cell_key`. Their seeds (0-2)
    are disjoint from this study's (300+)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for n in SIZES:
        chosen = sweep["schedules"].get(f"n={n}|frozen", {}).get("chosen")
        names = [
            k for k, v in SCHEDULES.items() if chosen and v[n] == (chosen["lr"], chosen["epochs"])
        ]
        if not names:
            continue
        base = sweep["baselines"][f"infonce|n={n}|frozen"]["runs"]
        for schedule in names:
            out[cell_key(schedule, n, None)] = {
                int(s): {**r, "origin": origin} for s, r in base.items()
            }
            for cell in sweep["cells"].values():
                spec = cell["spec"]
                if (spec["variant"], spec["train_size"], spec["student"]) != ("cusa", n, "frozen"):
                    continue
                if (spec["alpha"], spec["beta"]) != (OFFICIAL["alpha"], OFFICIAL["beta"]):
                    continue
                if spec["tau"] in TAUS and spec["image_teacher"] == "efficientnet-lite0" and \
                        spec["text_teacher"] == "all-mpnet-base-v2":  # fmt: skip
                    out[cell_key(schedule, n, spec["tau"])] = {
                        int(s): {**r, "origin": origin} for s, r in cell["runs"].items()
                    }
    return out


def pooled(results: dict[str, Any], sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Summaries of this study's runs joined with the committed runs of the same cells (seeds
    0-2 of the files in ``sweeps``), for the cells where this study has fewer than 8 seeds."""
    runs = {k: {int(s): r for s, r in v.items()} for k, v in results["runs"].items()}
    added: dict[str, list[int]] = {}
    for origin, sweep in sweeps.items():
        for key, by_seed in committed_runs(sweep, origin).items():
            if len(runs.get(key, {})) >= 8:
                continue
            for seed, run in by_seed.items():
                if seed not in runs.setdefault(key, {}):
                    runs[key][seed] = run
                    added.setdefault(key, []).append(seed)
    return {"summary": summaries(runs), "added_seeds": added, "from": list(sweeps)}


def markdown_table(results: dict[str, Any]) -> str:
    """The page's headline table: paired Δ RSUM [95% CI] (wins/n) per schedule, size and τ."""
    s = results["summary"]
    head = "| schedule | images | InfoNCE RSUM | " + " | ".join(
        f"τ = {t:g}" + (" (official)" if t == OFFICIAL["tau"] else "") for t in TAUS
    )
    lines = [head + " |", "|---" * (3 + len(TAUS)) + "|"]
    for key, row in s.items():
        schedule, n = key.split("|n=")
        lr, ep = SCHEDULES[schedule][int(n)]
        cols = []
        for t in TAUS:
            c = row.get(f"{t:g}")
            cols.append(
                "n/a" if c is None else
                f"**{fmt_ci(c['delta_rsum_ci'])}** ({c['delta_rsum_ci']['wins_n']}), {c['verdict']}"
            )  # fmt: skip
        b = row["infonce_rsum"]
        lines.append(f"| {schedule} (lr {lr:g}, {ep} ep) | {n} | {b['mean']:.1f} ± {b['std']:.1f} | "
                     + " | ".join(cols) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap)
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                    help="comma list of seeds (>= 8 for the headline claims)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training")
    ap.add_argument("--schedules", default=",".join(SCHEDULES),
                    help="comma list: run only these schedules (parts to --merge)")  # fmt: skip
    ap.add_argument("--no-extract", action="store_true",
                    help="the store is already filled: skip the extraction check")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS_JSON))
    ap.add_argument("--report", default=None, help="only print the table of a results file")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="join results files of disjoint seeds into --out")  # fmt: skip
    ap.add_argument("--pool", nargs="+", default=None,
                    help="with --merge: also summarise cells with < 8 seeds joined with the "
                    "committed runs of these sensitivity results files")  # fmt: skip
    args = ap.parse_args(argv)
    if args.merge:
        merged = merge([json.loads(Path(p).read_text()) for p in args.merge])
        if args.pool:
            sweeps = {Path(p).name: json.loads(Path(p).read_text()) for p in args.pool}
            merged["pooled_with_committed"] = pooled(merged, sweeps)
        write_json(Path(args.out), merged, indent=1)
        sys.stdout.write(markdown_table(merged) + "\n")
        return 0
    if args.report:
        sys.stdout.write(markdown_table(json.loads(Path(args.report).read_text())) + "\n")
        return 0
    log_to_stderr(quiet=("httpx", "sentence_transformers", "cusa.extract", "transformers"))
    seeds = tuple(int(x) for x in args.seeds.split(","))
    base = ExperimentConfig(train=args.train, eval=args.eval, train_split=args.train_split,
                            eval_split=args.eval_split, tune=False)  # fmt: skip
    cfg = SweepConfig(
        base=base,
        image_teachers=(base.image_teacher,),
        text_teachers=(base.text_teacher,),
        train_sizes=SIZES,
        seeds=DEFAULT_SEEDS,  # unused by run(), which trains ``seeds``; a part may have one seed
        tau_variants=("cusa",),
        grids=False,
        weight_sweep=False,
        teacher_sweep=False,
        size_sweep=False,
        finetune=False,
        confirm_seeds=(),
        train_threads=args.threads,
    )
    if args.store is None:
        ap.error("--store is required: the study reuses an extracted store")
    results = run(cfg, args.store, args.train, seeds, Path(args.out), extract=not args.no_extract,
                  schedules=args.schedules.split(","))  # fmt: skip
    sys.stdout.write(markdown_table(results) + "\n")
    t = results["timings_s"]
    sys.stdout.write(f"wall {t['wall_total']:.0f} s, CPU {t['cpu_total_process']:.0f} s, "
                     f"{t['runs']} runs; wrote {args.out}\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
