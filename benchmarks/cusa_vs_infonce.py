"""Does CUSA help on real COCO images? InfoNCE vs +CSA vs +USA vs +CUSA (issue 6).

The experiment, end to end, from an empty feature store:

1. **Extract** with ``cusa.extract`` (local runner, CPU) for the train and eval splits:
   the teachers (image: ``efficientnet-lite0``, an ImageNet CNN standing in for Unicom, which
   cannot be downloaded here; text: ``all-mpnet-base-v2``, the paper's) and the student's frozen
   towers (``mobilenetv2`` pooled 1280-d, ``all-MiniLM-L6-v2`` mean-pooled 384-d). The towers are
   registered as "teachers" too, so their pooled features land in the same store; they are the
   towers of ``cusa_train.students.registry``'s ``mobilenetv2-minilm`` student up to L2 normalisation.
2. **Train** CUSA's heads on the stored features with the towers frozen (full fine-tuning does
   not fit 30 minutes on 2 CPU cores): a small trainable MLP adapter per tower stands in for the
   trainable top of the backbone, and :class:`cusa_train.wrapper.CusaModel` adds the official heads
   (LayerNorm+Linear cross-modal heads; separate LayerNorm+Linear uni-modal projector heads when
   USA is on), the temperatures and the loss (:class:`cusa_train.losses.CusaLoss`). Soft labels
   are gathered per batch from the store with :class:`cusa_train.data.TeacherFeatures`.
   Variants: InfoNCE, +CSA, +USA, +CUSA with the official ``cusa.yaml`` weights (alpha=0.1,
   beta=0.5) and temperatures, the same seeds and the same schedule.
3. **Schedule** (learning rate, epochs): picked once on a held-out part of the *train* split with
   InfoNCE only, then frozen for every variant; ``--no-tune`` uses the fixed defaults instead.
   The eval split is never looked at before the final evaluation.
4. **Evaluate** on the eval split with :func:`cusa_train.evaluation.evaluate.evaluate_features`: i2t/t2i
   R@1/5/10 and RSUM, text->text R@1 and mAP@R (positives: the other captions of the same image).

Run::

    python -m benchmarks.cusa_vs_infonce --train ../shared/data/coco-example \\
        --eval ../shared/data/coco-example [--seeds 5] [--store DIR]

Writes ``benchmarks/results/cusa_vs_infonce.json`` and ``docs/img/cusa_vs_infonce_rsum.png``.

This file runs the experiment; its parts live beside it: :mod:`benchmarks.cusa_config` (variants,
schedule, config), :mod:`benchmarks.cusa_features` (extraction, stored splits),
:mod:`benchmarks.cusa_training` (student, training, evaluation, schedule choice) and
:mod:`benchmarks.cusa_vs_infonce_report` (plot and table).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
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
from benchmarks.cusa_config import (
    PAPER_TABLE5_RSUM,
    ExperimentConfig,
    Schedule,
    add_data_arguments,
    loss_config,
)
from benchmarks.cusa_features import extract_features, load_split, soft_label_stats
from benchmarks.cusa_stats import direction, paired_ci
from benchmarks.cusa_training import choose_schedule, evaluate_model, reference_t2t, train_variant
from benchmarks.cusa_vs_infonce_report import format_table, plot_rsum
from cusa_train.config.parsing import to_dict

log = logging.getLogger("benchmarks.cusa_vs_infonce")

RESULTS_JSON = RESULTS_DIR / "cusa_vs_infonce.json"
PLOT_PNG = IMG_DIR / "cusa_vs_infonce_rsum.png"


def aggregate(runs: dict[str, dict[int, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-variant mean ± std of every metric, and paired (same seed) differences from InfoNCE
    with the 95% t interval of Δ RSUM and Δ t2t R@1 and the interval-based verdict."""
    agg: dict[str, Any] = {}
    deltas: dict[str, Any] = {}
    for variant, by_seed in runs.items():
        keys = list(next(iter(by_seed.values()))["metrics"])
        agg[variant] = {k: mean_std([r["metrics"][k] for r in by_seed.values()]) for k in keys}
        agg[variant]["train_s"] = mean_std([r["train_s"] for r in by_seed.values()])
        if "infonce" in runs and variant != "infonce":
            base = runs["infonce"]
            seeds = [s for s in by_seed if s in base]
            deltas[variant] = {
                k: mean_std([by_seed[s]["metrics"][k] - base[s]["metrics"][k] for s in seeds])
                for k in keys
            }
            wins = sum(by_seed[s]["metrics"]["rsum"] > base[s]["metrics"]["rsum"] for s in seeds)
            deltas[variant]["rsum_wins"] = f"{wins}/{len(seeds)}"
            for k in ("rsum", "t2t_r1"):  # paired 95% t interval; a direction only if it excludes 0
                deltas[variant][f"{k}_ci"] = paired_ci(
                    [by_seed[s]["metrics"][k] - base[s]["metrics"][k] for s in seeds]
                )
            deltas[variant]["verdict"] = direction(deltas[variant]["rsum_ci"])
    return agg, deltas


# ---- the whole experiment ----------------------------------------------------------------------


def run_experiment(cfg: ExperimentConfig, store: str) -> dict[str, Any]:
    """Extract, (tune,) train every variant for every seed, evaluate; return the results dict."""
    t_start = time.perf_counter()
    extraction = extract_features(cfg, store)
    train = load_split(cfg, store, cfg.train, cfg.train_split)
    val = load_split(cfg, store, cfg.eval, cfg.eval_split)
    log.info(
        "train: %d images / %d captions; eval: %d images / %d captions",
        len(train.image_ids),
        len(train.caption_ids),
        len(val.image_ids),
        len(val.caption_ids),
    )
    tuning = None
    schedule = cfg.schedule
    t_tune = time.perf_counter()
    if cfg.tune:
        tuning = choose_schedule(cfg, train)
        schedule = replace(schedule, **tuning["chosen"])
        log.info("schedule chosen on held-out train images: %s", tuning["chosen"])
    tune_s = time.perf_counter() - t_tune
    runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in cfg.variants}
    t_train = time.perf_counter()
    for seed in cfg.seeds:
        for variant in cfg.variants:  # round-robin so machine load hits every variant alike
            run = train_variant(cfg, variant, train, seed, schedule)
            metrics = evaluate_model(run.model, val)
            runs[variant][seed] = {
                "metrics": {k: round(v, 4) for k, v in metrics.items()},
                "train_s": round(run.seconds, 3),
                "steps": run.steps,
                "final_losses": {k: round(v, 6) for k, v in run.final_losses.items()},
                "temperatures": {k: round(v, 5) for k, v in run.temperatures.items()},
                "trainable_params": sum(
                    p.numel() for p in run.model.parameters() if p.requires_grad
                ),
            }
            log.info(
                "%-8s seed %d: RSUM %.2f t2t R@1 %.2f (%.1f s)",
                variant,
                seed,
                metrics["rsum"],
                metrics["t2t_r1"],
                run.seconds,
            )
    train_eval_s = time.perf_counter() - t_train
    agg, deltas = aggregate(runs)
    final_cfg = replace(cfg, schedule=schedule)
    return {
        "experiment": "cusa_vs_infonce (issue 6)",
        "design": {
            "student": "frozen MobileNetV2 (ImageNet) + frozen all-MiniLM-L6-v2 towers, features stored "
            "once; trainable per-tower adapter + CusaModel heads (LayerNorm+Linear cross-modal heads, "
            "separate LayerNorm+Linear uni-modal heads with USA)",
            "teachers": f"image {cfg.image_teacher} (ImageNet CNN stand-in for Unicom), text {cfg.text_teacher}",
            "loss": "official cusa.yaml: InfoNCE mean mode tau 0.05 [0.01, 0.1]; CSA alpha 0.1 each-mode "
            "tau 0.45 [0.1, 0.99] soft-label tau 1.0 fixed; USA beta 0.5 tau 0.45 [0.1, 1.0] per modality",
            "batches": "one random caption per image per epoch, images shuffled",
            "schedule_selection": "lr/epochs chosen with InfoNCE on held-out train images"
            if cfg.tune
            else "fixed a priori (no tuning)",
            "eval": "eval split used once, at the end; t2t positives = other captions of the same image",
        },
        "config": {
            **{k: v for k, v in asdict(final_cfg).items() if k not in ("schedule",)},
            "schedule": asdict(schedule),
            "loss": {v: to_dict(loss_config(v)) for v in cfg.variants},
        },
        "data": {
            "train": {
                "dataset": train.dataset,
                "split": train.split,
                "images": len(train.image_ids),
                "captions": len(train.caption_ids),
            },
            "eval": {
                "dataset": val.dataset,
                "split": val.split,
                "images": len(val.image_ids),
                "captions": len(val.caption_ids),
                "captions_per_image": {
                    str(k): int(v)
                    for k, v in zip(
                        *np.unique(np.bincount(val.caption_image), return_counts=True), strict=True
                    )
                },
            },
        },
        "tuning": tuning,
        "reference_t2t_untrained": reference_t2t(val),
        "soft_label_stats_train": soft_label_stats(train, schedule.batch_size),
        "runs": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in runs.items()},
        "aggregate": agg,
        "deltas_vs_infonce": deltas,
        "paper_table5_rsum": PAPER_TABLE5_RSUM,
        "timings_s": {
            "extraction": extraction,
            "tuning": round(tune_s, 2),
            "train_and_eval_all_runs": round(train_eval_s, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "versions": versions(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(ap)
    ap.add_argument("--seeds", type=int, default=5, help="seeds per variant (0..N-1)")
    ap.add_argument("--adapter", choices=("mlp", "none"), default="mlp")
    ap.add_argument("--no-tune", action="store_true", help="skip the held-out schedule choice")
    ap.add_argument("--epochs", type=int, default=None, help="with --no-tune: epochs")
    ap.add_argument("--lr", type=float, default=None, help="with --no-tune: learning rate")
    ap.add_argument("--out", default=str(RESULTS_JSON))
    ap.add_argument("--plot", default=str(PLOT_PNG))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    log_to_stderr(quiet=("httpx", "sentence_transformers", "cusa.extract"))
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = Schedule()
    if args.epochs is not None:
        schedule = replace(schedule, epochs=args.epochs)
    if args.lr is not None:
        schedule = replace(schedule, lr=args.lr)
    cfg = ExperimentConfig(
        train=args.train,
        eval=args.eval,
        train_split=args.train_split,
        eval_split=args.eval_split,
        seeds=tuple(range(args.seeds)),
        adapter=args.adapter,
        schedule=schedule,
        tune=not args.no_tune,
    )
    with store_or_temporary(args.store, prefix="cusa_vs_infonce_") as store:
        results = run_experiment(cfg, store)
    results["config"]["store"] = "temporary" if args.store is None else args.store
    out = Path(args.out)
    write_json(out, results, indent=2)
    plot_rsum(results, Path(args.plot))
    sys.stdout.write(format_table(results) + "\n")
    sys.stdout.write(f"total {results['timings_s']['total']:.0f} s; wrote {out} and {args.plot}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
