"""When do soft labels help? A sensitivity study of CUSA on real COCO images (issue 16).

The setting is the one of :mod:`benchmarks.cusa_vs_infonce` (frozen MobileNetV2 / all-MiniLM-L6-v2
towers, features stored once; a trainable MLP adapter per tower plus
:class:`cusa_train.wrapper.CusaModel`'s heads, temperatures and :class:`cusa_train.losses.CusaLoss`),
and the training step is the same :func:`~benchmarks.cusa_training.train_variant`, so there is
one training loop for both studies. Around the official values (soft-label τ = 1.0,
α = 0.1, β = 0.5, teachers efficientnet-lite0 + all-mpnet-base-v2, 600 train images, frozen
towers) it varies one factor at a time:

- soft-label temperature τ ∈ {1, 0.5, 0.2, 0.1, 0.05} for +CSA, +USA and +CUSA, with the entropy
  of every teacher's in-batch soft labels at each τ;
- CSA weight α ∈ {0.01, 0.03, 0.1, 0.3} and USA weight β ∈ {0.1, 0.5, 1.0};
- teachers: efficientnet-lite0, efficientnet-lite2 and the student's own MobileNetV2 (image) x
  all-mpnet-base-v2, EmbeddingGemma-300M, WordLlama and the student's own MiniLM (text), at the
  official τ and at the best τ of the default teachers;
- training-set size 150 / 300 / 600 images;
- the student: frozen towers, or the last transformer layer of the MiniLM text tower fine-tuned
  (its input, the hidden states of layer 5 of 6, is computed once per caption);

plus the full (τ, α) grid for the default teachers and for the best teacher pair. Each cell is
trained with >= 3 seeds and compared, seed by seed, with InfoNCE trained on the same images, the
same batches and the same initial weights. lr and epochs are chosen per training set and student
with InfoNCE on held-out *train* images (:func:`~benchmarks.cusa_training.choose_schedule`); the
eval split is only ever used to score. The chosen setting is then confirmed with fresh seeds on the
eval split and on the held-out train images, where nothing was selected.

Run (the whole sweep, from an empty store, extraction included)::

    python -m benchmarks.cusa_sensitivity --train ../shared/data/coco-example \\
        --eval ../shared/data/coco-example [--store DIR] [--quick]

Writes ``benchmarks/results/cusa_sensitivity.json`` (``cusa_sensitivity_quick.json`` with
``--quick``) and ``docs/img/cusa_sensitivity_*.png``.

This file extracts, decides which cells to run and writes the results; its parts live beside it:
:mod:`benchmarks.cusa_sensitivity_config` (the sweep's settings and cells),
:mod:`benchmarks.cusa_sensitivity_sweep` (training the cells against InfoNCE),
:mod:`benchmarks.cusa_sensitivity_finetune` (the student with its last MiniLM layer trained) and
:mod:`benchmarks.cusa_sensitivity_report` (plots and tables); what it shares with
:mod:`benchmarks.cusa_vs_infonce` is in ``cusa_config``, ``cusa_features`` and ``cusa_training``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    IMG_DIR,
    RESULTS_DIR,
    log_to_stderr,
    mean_std,
    store_or_temporary,
    versions,
    write_json,
)
from benchmarks.cusa_config import ExperimentConfig, add_data_arguments
from benchmarks.cusa_features import extract_job, soft_label_entropy
from benchmarks.cusa_sensitivity_config import (
    OFFICIAL,
    SOFT_LABEL_VARIANTS,
    STUDENTS,
    SWEEP_TUNE_LRS,
    Cell,
    SweepConfig,
    quick_config,
    size_config,
)
from benchmarks.cusa_sensitivity_report import (
    console_table,
    markdown_report,
    plot_factors,
    plot_heatmaps,
    plot_teachers,
)
from benchmarks.cusa_sensitivity_sweep import Sweep, best_of, grid, sweep_key

log = logging.getLogger("benchmarks.cusa_sensitivity")


# ---- extraction ----------------------------------------------------------------------------------


def extract_all(cfg: SweepConfig, store: str, train: str, train_split: str) -> dict[str, Any]:
    """Fill ``store``: the towers on both splits, every teacher on the train split only.

    Returns:
        ``{"<split>/<model>": {"seconds", "rows"}}`` per job and ``"total_s"``.

    Raises:
        StoreError: a job reported failed samples.
    """
    base = cfg.base
    jobs: list[tuple[str, str, str, str]] = [  # dataset, split, modality, model
        (train, train_split, "image", base.image_tower),
        (train, train_split, "text", base.text_tower),
        (base.eval, base.eval_split, "image", base.image_tower),
        (base.eval, base.eval_split, "text", base.text_tower),
    ]
    jobs += [(train, train_split, "image", t) for t in cfg.image_teachers]
    jobs += [(train, train_split, "text", t) for t in cfg.text_teachers]
    out: dict[str, Any] = {}
    seen = set()
    t_all = time.perf_counter()
    for dataset, split, modality, model in jobs:
        if (dataset, split, modality, model) in seen:
            continue
        seen.add((dataset, split, modality, model))
        key = f"{split}/{model}"
        summary, seconds = extract_job(
            dataset,
            split,
            store,
            image_teacher=model if modality == "image" else base.image_tower,
            text_teacher=model if modality == "text" else base.text_tower,
            modalities=(modality,),
            batch_size=base.extract_batch_size,
            key=key,
        )
        out[key] = {"seconds": round(seconds, 2), "rows": dict(summary.rows)}
    out["total_s"] = round(time.perf_counter() - t_all, 2)
    return out


def quick_dataset(source: str, split: str, n_images: int, dest: Path) -> str:
    """A copy of the first ``n_images`` images (sorted ids) of ``source``/``split`` as the split
    ``<split>quick`` of a new ALBEF folder, so ``--quick`` extracts only what it trains on."""
    src = Path(source)
    records = json.loads((src / f"new_{split}.json").read_text())
    keep = set(sorted({r["image_id"] for r in records})[:n_images])
    chosen = [r for r in records if r["image_id"] in keep]
    dest.mkdir(parents=True, exist_ok=True)
    for r in chosen:
        target = dest / r["image_path"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / r["image_path"], target)
    (dest / f"new_{split}quick.json").write_text(json.dumps(chosen))
    return str(dest)


# ---- the sweep -----------------------------------------------------------------------------------


def run_sweep(cfg: SweepConfig, store: str) -> dict[str, Any]:
    """Extract, run every factor and grid, select, confirm; return the results dict."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    base = cfg.base
    train, train_split = base.train, base.train_split
    tmp_quick = None
    if cfg.quick and Path(base.train).is_dir():
        tmp_quick = tempfile.TemporaryDirectory(prefix="cusa_sens_quick_")
        train = quick_dataset(base.train, base.train_split, cfg.full_size, Path(tmp_quick.name))
        train_split = f"{base.train_split}quick"
    try:
        extraction = extract_all(cfg, store, train, train_split)
        if cfg.train_threads:
            torch.set_num_threads(cfg.train_threads)
        sweep = Sweep(cfg, store, train, train_split)
        return _run_factors(cfg, sweep, extraction, t_start, load_start, train, train_split)
    finally:
        if tmp_quick is not None:
            tmp_quick.cleanup()


def _run_factors(cfg: SweepConfig, sweep: Sweep, extraction: dict[str, Any], t_start: float,
                 load_start: tuple[float, ...], train: str, train_split: str) -> dict[str, Any]:  # fmt: skip
    n_full = len(sweep.pair(*sweep.default_pair).image_ids)
    if n_full < cfg.full_size:
        log.warning("train split has %d images, fewer than %d", n_full, cfg.full_size)
    full = min(cfg.full_size, n_full)
    dimg, dtxt = sweep.default_pair
    official = dict(image_teacher=dimg, text_teacher=dtxt, train_size=full)
    factors: dict[str, Any] = {}
    loads = [os.getloadavg()[0]]

    # Entropy of every teacher's soft labels per τ (image side per image teacher, text per text).
    entropy: dict[str, Any] = {}
    for it in cfg.image_teachers:
        entropy[it] = soft_label_entropy(sweep.pair(it, dtxt), cfg.taus, base_batch(cfg))["image"]
    for tt in cfg.text_teachers:
        entropy[tt] = soft_label_entropy(sweep.pair(dimg, tt), cfg.taus, base_batch(cfg))["text"]

    # 1. The official cells.
    factors["official"] = {v: sweep_key(sweep, Cell(v, **official)) for v in SOFT_LABEL_VARIANTS}
    loads.append(os.getloadavg()[0])

    # 2. τ for CSA, USA and CUSA (α, β official).
    factors["tau"] = {
        v: {f"{t:g}": sweep_key(sweep, Cell(v, tau=t, **official)) for t in cfg.taus}
        for v in cfg.tau_variants
    }
    loads.append(os.getloadavg()[0])
    tau_col = factors["tau"].get("cusa") or next(iter(factors["tau"].values()))
    tau_star = sweep.cell_specs[best_of(sweep, list(tau_col.values()))].tau

    # 3. α (CUSA, τ official) and β (CUSA).
    if cfg.weight_sweep:
        factors["alpha"] = {
            f"{a:g}": sweep_key(sweep, Cell("cusa", alpha=a, **official)) for a in cfg.alphas
        }
        factors["beta"] = {
            f"{b:g}": sweep_key(sweep, Cell("cusa", beta=b, **official)) for b in cfg.betas
        }
    loads.append(os.getloadavg()[0])

    # 4. The (τ, α) grid of CUSA with the default teachers.
    grids: dict[str, Any] = {}
    if cfg.grids:
        grids["default"] = grid(sweep, cfg, dimg, dtxt, full)
        loads.append(os.getloadavg()[0])

    # 5. Teachers: one at a time (and the control pair) at the official τ; every pair at the best
    # τ of the default teachers, where the targets are peaked enough for the teacher to matter.
    selection: dict[str, Any] = {
        "tau_star": tau_star,
        "tau_star_from": "CUSA τ sweep (α, β official)",
    }
    best_pair = (dimg, dtxt)
    if cfg.teacher_sweep:
        factors["teachers"] = {}
        every = [(i, x) for i in cfg.image_teachers for x in cfg.text_teachers]
        for t in sorted({OFFICIAL["tau"], tau_star}, reverse=True):
            pairs = every
            if t != tau_star:  # one factor at a time, plus the control
                pairs = [(i, x) for i, x in every if i == dimg or x == dtxt]
                pairs += [cfg.control_pair] if cfg.control_pair in every else []
            factors["teachers"][f"{t:g}"] = {
                f"{i}+{x}": sweep_key(
                    sweep, Cell("cusa", tau=t, image_teacher=i, text_teacher=x, train_size=full)
                )
                for i, x in dict.fromkeys(pairs)
            }
        loads.append(os.getloadavg()[0])
        towers = set(cfg.control_pair)
        candidates = {
            k: v for k, v in factors["teachers"][f"{tau_star:g}"].items()
            if not towers & set(k.split("+"))
        }  # fmt: skip
        pick = best_of(sweep, list(candidates.values())) if candidates else None
        if pick is not None:
            spec = sweep.cell_specs[pick]
            best_pair = (spec.image_teacher, spec.text_teacher)
        selection["best_pair"] = list(best_pair)
        selection["best_pair_from"] = f"CUSA at τ={tau_star:g}, pairs without the student's towers"
        if cfg.grids and best_pair != (dimg, dtxt):
            grids["best"] = grid(sweep, cfg, best_pair[0], best_pair[1], full)
            loads.append(os.getloadavg()[0])

    # The setting to try first: the best cell of the default-teacher grid (or the τ sweep).
    pool = (
        [k for row in grids["default"]["keys"].values() for k in row.values()]
        if "default" in grids
        else list(tau_col.values())
    )
    best_key = best_of(sweep, pool)
    best = sweep.cell_specs[best_key]
    selection["best_setting"] = {"tau": best.tau, "alpha": best.alpha, "beta": best.beta,
                                 "key": best_key, "from": "CUSA (τ, α) grid, default teachers"}  # fmt: skip

    # 6. Training-set size, for the official and the best setting (and ``size_taus``).
    if cfg.size_sweep:
        factors["size"] = {
            name: {
                str(n): sweep_key(
                    sweep,
                    Cell(
                        "cusa",
                        tau=c.tau,
                        alpha=c.alpha,
                        beta=c.beta,
                        image_teacher=dimg,
                        text_teacher=dtxt,
                        train_size=min(n, n_full),
                    ),
                )  # fmt: skip
                for n in cfg.train_sizes
            }
            for name, c in (
                ("official", Cell("cusa")),
                ("best", best),
                *((f"tau={t:g}", Cell("cusa", tau=t)) for t in cfg.size_taus),
            )
        }
        loads.append(os.getloadavg()[0])

    # 7. The student: last MiniLM layer fine-tuned.
    if cfg.finetune:
        factors["student"] = {
            name: {
                s: sweep_key(
                    sweep,
                    Cell("cusa", tau=c.tau, alpha=c.alpha, beta=c.beta, student=s, **official),
                )  # fmt: skip
                for s in STUDENTS
            }
            for name, c in (("official", Cell("cusa")), ("best", best))
        }
        loads.append(os.getloadavg()[0])

    # 8. Confirmation of the chosen setting: fresh seeds on the eval split, and the held-out
    # train images (which chose the schedule but no loss setting).
    confirm: dict[str, Any] = {"seeds": list(cfg.confirm_seeds)}
    if cfg.confirm_seeds:
        off_cell = Cell("cusa", **official)
        confirm["eval"] = {
            "official": sweep.cell(off_cell, cfg.confirm_seeds),
            "best": sweep.cell(best, cfg.confirm_seeds),
        }
        hold = sweep.holdout_check([off_cell, best], cfg.confirm_seeds)
        confirm["holdout"] = {
            "official": hold[off_cell.key]["summary"],
            "best": hold[best_key]["summary"]
            if best_key in hold
            else hold[off_cell.key]["summary"],
            "infonce_rsum": hold["infonce"]["rsum"],
            "images": {
                "fit": n_full - round(n_full * cfg.base.holdout_fraction),
                "held_out": round(n_full * cfg.base.holdout_fraction),
            },  # fmt: skip
        }
        loads.append(os.getloadavg()[0])

    return {
        "experiment": "cusa_sensitivity (issue 16)",
        "quick": cfg.quick,
        "design": {
            "setting": "as benchmarks/cusa_vs_infonce.py: frozen MobileNetV2 + all-MiniLM-L6-v2 "
            "towers (stored), MLP adapter + CusaModel heads; fine-tuned variant: last MiniLM layer "
            "trained on stored layer-5 hidden states",
            "reference": f"official cusa.yaml: soft-label tau {OFFICIAL['tau']}, alpha "
            f"{OFFICIAL['alpha']}, beta {OFFICIAL['beta']}; teachers {dimg} + {dtxt}; "
            f"{full} train images",
            "pairing": "each cell vs InfoNCE on the same images, batch order and initial weights "
            "(same seed)",
            "schedule": "lr/epochs chosen per training set and student with InfoNCE on held-out "
            "train images; the eval split only scores",
            "verdict": "helps/hurts: every seed on the same side of InfoNCE; else unclear",
        },
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k != "base"},
            "base": {k: v for k, v in asdict(cfg.base).items()},
            "train_used": {"dataset": train, "split": train_split},
        },
        "data": {
            "train_images": n_full,
            "train_captions": len(sweep.pair(dimg, dtxt).caption_ids),
            "eval_images": len(sweep.val.image_ids),
            "eval_captions": len(sweep.val.caption_ids),
        },
        "entropy": entropy,
        "schedules": {f"n={k[0]}|{k[1]}": v for k, v in sweep._schedules.items()},
        "baselines": {
            k: {
                "runs": {str(s): r for s, r in v.items()},
                "rsum": mean_std([r["metrics"]["rsum"] for r in v.values()], 3),
                "t2t_r1": mean_std([r["metrics"]["t2t_r1"] for r in v.values()], 3),
            }
            for k, v in sweep.baselines.items()
        },  # fmt: skip
        "cells": {
            k: {**v, "runs": {str(s): r for s, r in v["runs"].items()}}
            for k, v in sweep.cells.items()
        },
        "factors": factors,
        "grids": grids,
        "selection": selection,
        "confirm": confirm,
        "timings_s": {
            "extraction": extraction,
            "tuning": round(sweep.timings["tuning_s"], 2),
            "minilm_hidden_states": round(sweep.timings["tokens_s"], 2),
            "train_and_eval_all_runs": round(sweep.timings["train_eval_s"], 2),
            "runs": sweep.n_runs,
            "total": round(time.perf_counter() - t_start, 2),
        },
        "load_average": {
            "at_start_1_5_15min": [round(x, 2) for x in load_start],
            "sampled_1min": [round(x, 2) for x in loads + [os.getloadavg()[0]]],
            "at_end_1_5_15min": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(),
        },
        "versions": versions(),
    }


def base_batch(cfg: SweepConfig) -> int:
    return cfg.base.schedule.batch_size


# ---- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap)
    ap.add_argument("--quick", action="store_true", help="a subset that runs in under 5 minutes")
    ap.add_argument(
        "--size-by-tau", action="store_true", help="only training-set size x soft-label τ"
    )
    ap.add_argument("--tune-lrs", default=None, help="comma list: lr grid of the schedule choice")
    ap.add_argument("--tune-epochs", default=None, help="comma list: epochs grid of the same")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per cell (>= 3)")
    ap.add_argument("--no-finetune", action="store_true", help="skip the fine-tuned student")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/...)")
    ap.add_argument("--img-dir", default=str(IMG_DIR), help="where the plots go")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads for training (default: all)"
    )
    ap.add_argument(
        "--report", default=None, help="only print the markdown tables of a results file"
    )
    args = ap.parse_args(argv)
    if args.report:
        sys.stdout.write(markdown_report(json.loads(Path(args.report).read_text())) + "\n")
        return 0
    log_to_stderr(quiet=("httpx", "sentence_transformers", "cusa.extract", "transformers"))
    if args.threads:
        torch.set_num_threads(args.threads)
    base = ExperimentConfig(
        train=args.train,
        eval=args.eval,
        train_split=args.train_split,
        eval_split=args.eval_split,
        # cusa_vs_infonce's grid plus lr 3e-3: with 150 images InfoNCE chose the grid's largest
        # lr and epochs, so the baseline gets a wider search (it is only ever favoured by it).
        tune_lrs=SWEEP_TUNE_LRS,
    )
    if args.tune_lrs:
        base = replace(base, tune_lrs=tuple(float(x) for x in args.tune_lrs.split(",")))
    if args.tune_epochs:
        base = replace(base, tune_epochs=tuple(int(x) for x in args.tune_epochs.split(",")))
    if args.quick:
        cfg = quick_config(base)
    elif args.size_by_tau:
        cfg = size_config(base)
    else:
        cfg = SweepConfig(base=base)
    cfg = replace(
        cfg,
        seeds=tuple(range(args.seeds)),
        finetune=cfg.finetune and not args.no_finetune,
        train_threads=args.threads,
    )
    suffix = "_quick" if args.quick else "_size" if args.size_by_tau else ""
    out = Path(args.out or RESULTS_DIR / f"cusa_sensitivity{suffix}.json")
    with store_or_temporary(args.store, prefix="cusa_sensitivity_") as store:
        results = run_sweep(cfg, store)
    results["config"]["store"] = "temporary" if args.store is None else args.store
    write_json(out, results, indent=1)
    img = Path(args.img_dir)
    plot_factors(results, img / f"cusa_sensitivity{suffix}_factors.png")
    plot_heatmaps(results, img / f"cusa_sensitivity{suffix}_grid.png")
    plot_teachers(results, img / f"cusa_sensitivity{suffix}_teachers.png")
    sys.stdout.write(console_table(results) + "\n")
    sys.stdout.write(
        f"total {results['timings_s']['total']:.0f} s ({results['timings_s']['runs']} runs); "
        f"load average at end {results['load_average']['at_end_1_5_15min']}; wrote {out}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
