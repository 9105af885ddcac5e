"""The cells of the sensitivity study, trained on demand and compared seed by seed with InfoNCE.

:class:`Sweep` loads the stored splits (and the fine-tuned student's input), chooses each
schedule once, trains every cell and every InfoNCE baseline once per seed, and keeps the runs;
:func:`~benchmarks.cusa_stats.summarize` gives a cell's paired Δ RSUM against InfoNCE and its verdict;
:func:`grid` runs the (τ, α) grid of one teacher pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from torch import nn

from benchmarks.common import mean_std
from benchmarks.cusa_config import ExperimentConfig, Schedule
from benchmarks.cusa_features import SplitFeatures, load_split
from benchmarks.cusa_sensitivity_config import Cell, SweepConfig, sweep_loss
from benchmarks.cusa_sensitivity_finetune import (
    MiniLMTail,
    PartialTextTowerStudent,
    TokenSplitFeatures,
    with_tokens,
)
from benchmarks.cusa_stats import summarize
from benchmarks.cusa_training import (
    choose_schedule,
    evaluate_model,
    holdout_split,
    train_variant,
)
from cusa.errors import StoreError
from cusa_train.config.loss import LossConfig
from cusa_train.config.parsing import to_dict

log = logging.getLogger("benchmarks.cusa_sensitivity_sweep")


# ---- the sweep -----------------------------------------------------------------------------------


class Sweep:
    """Trains cells on demand; every run and every InfoNCE baseline is computed once."""

    def __init__(self, cfg: SweepConfig, store: str, train: str, train_split: str) -> None:
        self.cfg = cfg
        self.store = store
        self.train_name, self.train_split = train, train_split
        self._pairs: dict[tuple[str, str], SplitFeatures] = {}
        self._schedules: dict[tuple[int, str], dict[str, Any]] = {}
        self.baselines: dict[str, dict[int, dict[str, Any]]] = {}
        self.cells: dict[str, dict[str, Any]] = {}
        self.cell_specs: dict[str, Cell] = {}
        towers = replace(
            cfg.base, image_teacher=cfg.base.image_tower, text_teacher=cfg.base.text_tower
        )
        self.val = load_split(towers, store, cfg.base.eval, cfg.base.eval_split)
        self._tail: MiniLMTail | None = None
        self._val_tokens: TokenSplitFeatures | None = None
        self._train_tokens: TokenSplitFeatures | None = None
        self.timings: dict[str, float] = {"train_eval_s": 0.0, "tuning_s": 0.0, "tokens_s": 0.0}
        self.n_runs = 0

    # data ------------------------------------------------------------------------------------

    def pair(self, image_teacher: str, text_teacher: str) -> SplitFeatures:
        key = (image_teacher, text_teacher)
        if key not in self._pairs:
            cfg = replace(self.cfg.base, image_teacher=image_teacher, text_teacher=text_teacher)
            self._pairs[key] = load_split(cfg, self.store, self.train_name, self.train_split)
        return self._pairs[key]

    def size_index(self, n: int) -> np.ndarray:
        """Image rows of the nested seeded subset of ``n`` train images (all of them at full size)."""
        total = len(self.pair(*self.default_pair).image_ids)
        if n >= total:
            return np.arange(total)
        perm = np.random.default_rng(2024).permutation(total)
        return np.sort(perm[:n])

    @property
    def default_pair(self) -> tuple[str, str]:
        return (self.cfg.base.image_teacher, self.cfg.base.text_teacher)

    def train_data(self, cell: Cell) -> SplitFeatures:
        data = self.pair(cell.image_teacher, cell.text_teacher)
        if cell.student == "finetune":
            data = self.token_split(data)
        if cell.train_size < len(data.image_ids):
            data = data.subset(self.size_index(cell.train_size))
        return data

    def eval_data(self, student: str) -> SplitFeatures:
        if student == "finetune":
            if self._val_tokens is None:
                t0 = time.perf_counter()
                self._val_tokens = with_tokens(
                    self.val, self.tail, self.cfg.base.eval, self.cfg.base.eval_split
                )
                self.timings["tokens_s"] += time.perf_counter() - t0
            return self._val_tokens
        return self.val

    @property
    def tail(self) -> MiniLMTail:
        if self._tail is None:
            self._tail = MiniLMTail(train_layers=1)
        return self._tail

    def token_split(self, data: SplitFeatures) -> TokenSplitFeatures:
        """``data`` with MiniLM hidden states; computed once, shared by every teacher pair."""
        if self._train_tokens is None:
            t0 = time.perf_counter()
            self._train_tokens = with_tokens(data, self.tail, self.train_name, self.train_split)
            self.timings["tokens_s"] += time.perf_counter() - t0
        if data.caption_ids != self._train_tokens.caption_ids:  # pragma: no cover - same store
            raise StoreError("teacher pairs disagree on the caption ids of the train split")
        return TokenSplitFeatures.of(data, self._train_tokens.tokens, self._train_tokens.token_mask)

    def student_factory(self, student: str):
        if student == "frozen":
            return None
        base = self.cfg.base

        def factory(_cfg: ExperimentConfig, data: SplitFeatures) -> nn.Module:
            image_in = data.towers.dims[0]
            return PartialTextTowerStudent(
                self.tail.layers(),
                image_in,
                self.tail.model.config.hidden_size,
                base.adapter_hidden,
                base.embed_dim,
            )

        return factory

    def experiment(self, student: str) -> ExperimentConfig:
        if student == "finetune":
            return replace(
                self.cfg.base,
                tune_lrs=self.cfg.finetune_tune_lrs,
                tune_epochs=self.cfg.finetune_tune_epochs,
            )
        return self.cfg.base

    # schedule and baselines -----------------------------------------------------------------

    def _default_cell(self, size: int, student: str) -> Cell:
        img, txt = self.default_pair
        return Cell("cusa", image_teacher=img, text_teacher=txt, train_size=size, student=student)

    def schedule(self, size: int, student: str) -> Schedule:
        key = (size, student)
        if key not in self._schedules:
            exp = self.experiment(student)
            t0 = time.perf_counter()
            data = self.train_data(self._default_cell(size, student))
            if exp.tune:
                tuning = choose_schedule(exp, data, student_factory=self.student_factory(student))
                sched = replace(exp.schedule, **tuning["chosen"])
            else:
                tuning = {"chosen": {"lr": exp.schedule.lr, "epochs": exp.schedule.epochs}}
                sched = exp.schedule
            tuning["schedule"] = asdict(sched)
            tuning["seconds"] = round(time.perf_counter() - t0, 2)
            self.timings["tuning_s"] += time.perf_counter() - t0
            self._schedules[key] = tuning
            log.info(
                "schedule n=%d %s: %s (%.0f s)", size, student, tuning["chosen"], tuning["seconds"]
            )
        return Schedule(**self._schedules[key]["schedule"])

    def _run(self, variant: str, loss: LossConfig | None, data: SplitFeatures, evald: SplitFeatures,
             seed: int, sched: Schedule, student: str) -> dict[str, Any]:  # fmt: skip
        t0 = time.perf_counter()
        run = train_variant(
            self.experiment(student), variant, data, seed, sched,
            loss=loss, student_factory=self.student_factory(student),
        )  # fmt: skip
        metrics = evaluate_model(run.model, evald)
        self.timings["train_eval_s"] += time.perf_counter() - t0
        self.n_runs += 1
        return {
            "metrics": {k: round(v, 4) for k, v in metrics.items()},
            "train_s": round(run.seconds, 3),
            "steps": run.steps,
        }

    def baseline(self, size: int, student: str, seeds: Sequence[int]) -> dict[int, dict]:
        """InfoNCE on the same images, batches and initial weights, per seed."""
        key = f"infonce|n={size}|{student}"
        done = self.baselines.setdefault(key, {})
        sched = self.schedule(size, student)
        cell = self._default_cell(size, student)
        for seed in seeds:
            if seed not in done:
                done[seed] = self._run(
                    "infonce", None, self.train_data(cell), self.eval_data(student), seed,
                    sched, student,
                )  # fmt: skip
        return {s: done[s]["metrics"] for s in seeds}

    def cell(self, cell: Cell, seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Train ``cell`` for every seed (once), and summarise it against InfoNCE."""
        seeds = tuple(seeds or self.cfg.seeds)
        entry = self.cells.setdefault(cell.key, {"spec": asdict(cell), "runs": {}})
        self.cell_specs[cell.key] = cell
        sched = self.schedule(cell.train_size, cell.student)
        loss = sweep_loss(cell.variant, cell.tau, cell.alpha, cell.beta)
        entry["loss"] = to_dict(loss)
        for seed in seeds:
            if seed not in entry["runs"]:
                entry["runs"][seed] = self._run(
                    cell.variant, loss, self.train_data(cell), self.eval_data(cell.student),
                    seed, sched, cell.student,
                )  # fmt: skip
        base = self.baseline(cell.train_size, cell.student, seeds)
        runs = {s: entry["runs"][s]["metrics"] for s in seeds}
        summary = summarize(runs, base)
        # The sweep's own seeds give the cell's summary; other seeds (the confirmation) are kept
        # apart, so every cell of a table is compared on the same seeds.
        if seeds == tuple(self.cfg.seeds):
            entry["summary"] = summary
        else:
            entry.setdefault("other_seeds", {})[",".join(map(str, seeds))] = summary
        log.info(
            "%-70s Δ RSUM %+6.2f ± %.2f (%s above)  t2t Δ %+.2f",
            cell.key, summary["delta_rsum"]["mean"], summary["delta_rsum"]["std"],
            summary["seeds_above"], summary["delta_t2t_r1"]["mean"],
        )  # fmt: skip
        return summary

    def holdout_check(self, cells: Sequence[Cell], seeds: Sequence[int]) -> dict[str, Any]:
        """Train on the fit part of the train images and score on the held-out part (the images
        that chose the schedule, never used to choose a loss setting)."""
        out: dict[str, Any] = {}
        data = self.pair(*self.default_pair)
        sched = self.schedule(len(data.image_ids), "frozen")
        base_runs: dict[int, dict] = {}
        for cell in cells:
            fit, hold = holdout_split(
                self.cfg.base, self.pair(cell.image_teacher, cell.text_teacher)
            )
            if not base_runs:
                for seed in seeds:
                    base_runs[seed] = self._run("infonce", None, fit, hold, seed, sched, "frozen")[
                        "metrics"
                    ]
            loss = sweep_loss(cell.variant, cell.tau, cell.alpha, cell.beta)
            runs = {
                seed: self._run(cell.variant, loss, fit, hold, seed, sched, "frozen")["metrics"]
                for seed in seeds
            }
            out[cell.key] = {"summary": summarize(runs, base_runs), "runs": runs}
        out["infonce"] = {
            "runs": base_runs,
            "rsum": mean_std([r["rsum"] for r in base_runs.values()], 3),
        }
        return out


def best_of(sweep: Sweep, keys: Sequence[str]) -> str:
    """The cell with the highest mean Δ RSUM (ties: more seeds above, then the first)."""
    return max(
        keys,
        key=lambda k: (
            sweep.cells[k]["summary"]["delta_rsum"]["mean"],
            sweep.cells[k]["summary"]["frac_above"],
        ),
    )


def sweep_key(sweep: Sweep, cell: Cell) -> str:
    sweep.cell(cell)
    return cell.key


def grid(sweep: Sweep, cfg: SweepConfig, image_teacher: str, text_teacher: str, n: int) -> dict:
    """The full (τ, α) grid of CUSA (β official) for one teacher pair."""
    keys = {
        f"{t:g}": {
            f"{a:g}": sweep_key(
                sweep,
                Cell(
                    "cusa",
                    tau=t,
                    alpha=a,
                    image_teacher=image_teacher,
                    text_teacher=text_teacher,
                    train_size=n,
                ),
            )  # fmt: skip
            for a in cfg.alphas
        }
        for t in cfg.taus
    }
    delta = {t: {a: sweep.cells[k]["summary"]["delta_rsum"] for a, k in row.items()}
             for t, row in keys.items()}  # fmt: skip
    return {"image_teacher": image_teacher, "text_teacher": text_teacher, "keys": keys,
            "delta_rsum": delta}  # fmt: skip
