"""The configuration of the CUSA-vs-InfoNCE experiment, shared with the sensitivity study.

The variants (InfoNCE, +CSA, +USA, +CUSA) and their official ``cusa.yaml`` losses, the schedule of
the trainable heads, and :class:`ExperimentConfig`: everything one run depends on (data, teachers,
the student's frozen towers, seeds, adapter, schedule search), recorded in the results file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig

#: variant -> (CSA on, USA on); InfoNCE is always on.
VARIANTS: dict[str, tuple[bool, bool]] = {
    "infonce": (False, False),
    "csa": (True, False),
    "usa": (False, True),
    "cusa": (True, True),
}
VARIANT_LABELS = {"infonce": "InfoNCE", "csa": "+CSA", "usa": "+USA", "cusa": "+CUSA"}

#: The paper's Table 5 ablation (CLIP fine-tuned on MSCOCO), RSUM.
PAPER_TABLE5_RSUM = {"infonce": 422.6, "csa": 427.7, "usa": 425.7, "cusa": 429.7}


@dataclass(frozen=True)
class Schedule:
    """Optimisation of the heads: AdamW + linear warmup + cosine decay (as ``cusa_train.trainer``).

    Args:
        epochs: passes over the training images; one random caption per image per epoch.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices (official cusa.yaml: 1e-4).
        batch_size: (image, caption) pairs per step (official: 128).
        warmup_steps: linear warmup steps.
        min_lr_ratio: final lr as a fraction of ``lr`` (official: 1e-6 / 1e-5).
    """

    epochs: int = 10
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 128
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or not self.lr > 0:
            raise ConfigError(
                f"schedule epochs={self.epochs!r}, batch_size={self.batch_size!r}, lr={self.lr!r}: "
                "need epochs >= 1, batch_size >= 2 and lr > 0"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run of the experiment depends on (recorded in the results file).

    Args:
        train, eval: ALBEF/CUSA-layout dataset folders (or registered dataset names).
        train_split, eval_split: their splits.
        image_teacher, text_teacher: soft-label teachers in the store.
        image_tower, text_tower: the student's frozen towers, stored like teachers.
        seeds: one training run per variant per seed.
        variants: subset of :data:`VARIANTS`.
        adapter: ``"mlp"`` (a trainable 2-layer MLP per tower before the heads) or ``"none"``
            (the heads read the frozen tower features directly).
        adapter_hidden: hidden width of the MLP adapter.
        embed_dim: output size of the adapter and of the heads.
        schedule: optimisation; when ``tune`` is set, ``lr``/``epochs`` are replaced by the
            choice made on the held-out part of train.
        tune: pick ``lr`` and ``epochs`` with InfoNCE on a held-out part of the train split.
        tune_lrs, tune_epochs: the grid searched.
        holdout_fraction: share of train images held out for that choice.
        extract_batch_size: teacher batch size during extraction.
    """

    train: str
    eval: str
    train_split: str = "train"
    eval_split: str = "val"
    image_teacher: str = "efficientnet-lite0"
    text_teacher: str = "all-mpnet-base-v2"
    image_tower: str = "mobilenetv2"
    text_tower: str = "all-MiniLM-L6-v2"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    variants: tuple[str, ...] = tuple(VARIANTS)
    adapter: str = "mlp"
    adapter_hidden: int = 1024
    embed_dim: int = 512
    schedule: Schedule = field(default_factory=Schedule)
    tune: bool = True
    tune_lrs: tuple[float, ...] = (3e-4, 1e-3)
    tune_epochs: tuple[int, ...] = (10, 20, 40)
    holdout_fraction: float = 1 / 6
    extract_batch_size: int = 32

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(
                f"variants {bad or self.variants!r} unknown; use a subset of {list(VARIANTS)}"
            )
        if self.adapter not in ("mlp", "none"):
            raise ConfigError(f"adapter={self.adapter!r} is not supported; use 'mlp' or 'none'")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one seed (3 or more for error bars)")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction={self.holdout_fraction!r} must be in (0, 1)")


def loss_config(variant: str) -> LossConfig:
    """The official ``cusa.yaml`` loss (``LossConfig()`` defaults) with CSA/USA switched per variant."""
    csa, usa = VARIANTS[variant]
    base = LossConfig()
    usa_cfg = replace(base.usa, enabled=usa)
    if usa and not csa:
        # cusa.yaml lets USA reuse CSA's soft-label temperature (fixed 1.0); with CSA off that
        # parameter does not exist, so +USA gets its own copy of the same fixed value.
        if usa_cfg.teacher_tau == "csa":
            usa_cfg = replace(usa_cfg, teacher_tau=base.csa.teacher_tau)
        if usa_cfg.tau == "csa":
            usa_cfg = replace(usa_cfg, tau=base.csa.tau)
    return replace(base, csa=replace(base.csa, enabled=csa), usa=usa_cfg)


def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line options of both experiments for their data and their feature store."""
    ap.add_argument(
        "--train", required=True, help="train dataset folder (ALBEF/CUSA layout) or name"
    )
    ap.add_argument("--eval", required=True, help="eval dataset folder or name")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--eval-split", default="val")
    ap.add_argument(
        "--store", default=None, help="feature store to fill (default: a temporary one)"
    )
