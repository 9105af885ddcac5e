"""The configuration of the soft-label sensitivity study (:mod:`benchmarks.cusa_sensitivity`).

:class:`SweepConfig` (what is varied, around the official values), :class:`Cell` (one setting,
trained once per seed), :func:`sweep_loss` (the official loss with τ, α and β replaced), and the
two smaller presets of the command line (``--quick``, ``--size-by-tau``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from benchmarks.cusa_config import VARIANTS, ExperimentConfig, loss_config
from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig, TemperaturePairConfig

_OFFICIAL_LOSS = LossConfig()
#: The official cusa.yaml values every factor is varied around.
OFFICIAL = {
    "tau": _OFFICIAL_LOSS.csa.teacher_tau.merged.init,
    "alpha": _OFFICIAL_LOSS.csa.weight,
    "beta": _OFFICIAL_LOSS.usa.weight,
}
#: The variants with soft labels: variant -> (CSA on, USA on).
SOFT_LABEL_VARIANTS = {v: on for v, on in VARIANTS.items() if any(on)}
STUDENTS = ("frozen", "finetune")
#: lr grid of the held-out schedule choice (epochs: cusa_vs_infonce's 10 / 20 / 40).
SWEEP_TUNE_LRS = (3e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class SweepConfig:
    """Everything the sweep depends on (recorded in the results file).

    Args:
        base: the experiment of :mod:`benchmarks.cusa_vs_infonce` (data, towers, adapter, schedule
            search); its ``image_teacher``/``text_teacher`` are the default teachers.
        image_teachers, text_teachers: teachers compared (the student's towers among them are
            the control).
        taus, alphas, betas: soft-label temperatures, CSA and USA weights.
        train_sizes: training-set sizes (nested seeded subsets of the train images).
        seeds: seeds of every cell.
        confirm_seeds: fresh seeds for confirming the chosen setting.
        grids: run the (τ, α) grids; weight_sweep (α, β), teacher_sweep, size_sweep, finetune:
            the other factors.
        tau_variants: variants of the one-factor τ sweep.
        size_taus: more soft-label τ (CUSA, α and β official) for the training-set-size sweep.
        train_threads: torch threads for training, set after extraction (the teachers set their
            own); None keeps what extraction left (all cores).
        finetune_tune_lrs, finetune_tune_epochs: schedule grid of the fine-tuned student.
        quick: a subset (``--quick``), recorded for the reader.
    """

    base: ExperimentConfig
    image_teachers: tuple[str, ...] = ("efficientnet-lite0", "efficientnet-lite2", "mobilenetv2")
    text_teachers: tuple[str, ...] = (
        "all-mpnet-base-v2",
        "embeddinggemma-300m",
        "wordllama-l2-supercat",
        "all-MiniLM-L6-v2",
    )
    taus: tuple[float, ...] = (1.0, 0.5, 0.2, 0.1, 0.05)
    alphas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    betas: tuple[float, ...] = (0.1, 0.5, 1.0)
    train_sizes: tuple[int, ...] = (150, 300, 600)
    seeds: tuple[int, ...] = (0, 1, 2)
    confirm_seeds: tuple[int, ...] = (100, 101, 102, 103, 104)
    grids: bool = True
    weight_sweep: bool = True
    teacher_sweep: bool = True
    size_sweep: bool = True
    finetune: bool = True
    tau_variants: tuple[str, ...] = ("csa", "usa", "cusa")
    size_taus: tuple[float, ...] = ()
    train_threads: int | None = None
    finetune_tune_lrs: tuple[float, ...] = (3e-4, 1e-3)
    finetune_tune_epochs: tuple[int, ...] = (10,)
    quick: bool = False

    def __post_init__(self) -> None:
        if len(self.seeds) < 3 and not self.quick:
            raise ConfigError(f"seeds={self.seeds!r}: the sweep needs >= 3 seeds per cell")
        if not self.seeds:
            raise ConfigError("seeds is empty")
        for name, values in (("taus", self.taus), ("alphas", self.alphas), ("betas", self.betas)):
            if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
                raise ConfigError(f"{name}={values!r} must be non-empty and > 0")
        if OFFICIAL["tau"] not in self.taus or OFFICIAL["alpha"] not in self.alphas:
            raise ConfigError(
                f"taus/alphas must contain the official tau={OFFICIAL['tau']} and "
                f"alpha={OFFICIAL['alpha']}: every factor is varied around them"
            )
        for t in (self.base.image_teacher, self.base.text_teacher):
            if t not in (*self.image_teachers, *self.text_teachers):
                raise ConfigError(f"default teacher {t!r} is not among the teachers compared")
        bad = [v for v in self.tau_variants if v not in SOFT_LABEL_VARIANTS]
        if bad:
            raise ConfigError(
                f"tau_variants {bad!r} unknown; use a subset of {list(SOFT_LABEL_VARIANTS)}"
            )

    @property
    def full_size(self) -> int:
        return max(self.train_sizes)

    @property
    def control_pair(self) -> tuple[str, str]:
        return (self.base.image_tower, self.base.text_tower)


@dataclass(frozen=True)
class Cell:
    """One setting of the loss, teachers, data and student; trained once per seed."""

    variant: str
    tau: float = OFFICIAL["tau"]
    alpha: float = OFFICIAL["alpha"]
    beta: float = OFFICIAL["beta"]
    image_teacher: str = ""
    text_teacher: str = ""
    train_size: int = 600
    student: str = "frozen"

    @property
    def key(self) -> str:
        return (
            f"{self.variant}|tau={self.tau:g}|alpha={self.alpha:g}|beta={self.beta:g}|"
            f"{self.image_teacher}+{self.text_teacher}|n={self.train_size}|{self.student}"
        )


def sweep_loss(variant: str, tau: float, alpha: float, beta: float) -> LossConfig:
    """The official loss of ``variant`` with soft-label τ, α and β replaced.

    τ is fixed (not learned), like the official ``the_softlabel_*_tau``; with CSA on, USA reuses
    CSA's soft-label τ as in ``cusa.yaml``, and +USA alone gets its own copy of the same value.
    """
    base = loss_config(variant)
    teacher = TemperaturePairConfig.single(tau, min(tau, 0.1), max(tau, 1.0), learnable=False)
    csa = replace(base.csa, weight=alpha, teacher_tau=teacher)
    usa = replace(base.usa, weight=beta)
    if usa.teacher_tau != "csa":
        usa = replace(usa, teacher_tau=teacher)
    return replace(base, csa=csa, usa=usa)


def quick_config(base: ExperimentConfig) -> SweepConfig:
    """``--quick``: 150 train images, the default teachers, the official cells and the τ sweep of
    CUSA; 3 seeds. Under 5 minutes on 2 cores from an empty store."""
    return SweepConfig(
        base=replace(base, tune_epochs=(10, 20)),
        image_teachers=(base.image_teacher,),
        text_teachers=(base.text_teacher,),
        train_sizes=(150,),
        tau_variants=("cusa",),
        grids=False,
        weight_sweep=False,
        teacher_sweep=False,
        size_sweep=False,
        finetune=False,
        confirm_seeds=(),
        quick=True,
    )


def size_config(base: ExperimentConfig) -> SweepConfig:
    """``--size-by-tau``: training-set size x soft-label τ for CUSA with the default teachers
    (the official cells and the τ sweep at full size come along); about 10 minutes on a filled
    store. Writes ``cusa_sensitivity_size.json``."""
    return SweepConfig(
        base=base,
        image_teachers=(base.image_teacher,),
        text_teachers=(base.text_teacher,),
        tau_variants=("cusa",),
        size_taus=(0.5, 0.2, 0.1),
        grids=False,
        weight_sweep=False,
        teacher_sweep=False,
        finetune=False,
        confirm_seeds=(),
    )
