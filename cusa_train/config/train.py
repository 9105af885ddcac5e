"""Typed, frozen, validated configuration for CUSA training.

Every section is a frozen dataclass checked on construction: an unknown key or an out-of-range
value (ranges are declared on the fields, :func:`cusa_train.config.parsing.in_range`) raises :class:`cusa.errors.ConfigError` naming the key or value and how to fix it.
A whole run is a :class:`TrainConfig`, loadable from YAML, JSON or TOML with
:meth:`TrainConfig.from_file`, and :meth:`TrainConfig.from_official` maps an official CUSA
training YAML (lerogo/aaai24_itr_cusa) onto it. The loss section lives in
:mod:`cusa_train.config.loss`, the parsing in :mod:`cusa_train.config.parsing`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    StrictBool,
    StrictFloat,
    StrictInt,
    with_config,
)

from cusa.errors import ConfigError
from cusa.teacher_defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from cusa_train.config.loss import LossConfig
from cusa_train.config.parsing import (
    SECTION,
    build,
    check_ranges,
    in_range,
    load_mapping,
    to_dict,
)
from cusa_train.students.clip_catalog import CLIP_STUDENTS

# ---- model, teachers, data, optimisation, run -------------------------------------------------

#: The largest seed every seeded generator accepts (torch takes 64 bits, the epoch is added).
MAX_SEED = 2**63 - 1
#: A seed: an integer that python, numpy (mod 2**32) and torch all accept.
Seed = Annotated[StrictInt, in_range(ge=0, le=MAX_SEED, fix=f"use an integer in [0, {MAX_SEED}]")]
#: AdamW's peak learning rate: larger than 1 only ever diverges (1e308 gave inf temperatures).
MAX_LR = 1.0
Beta = Annotated[StrictFloat, in_range(ge=0, lt=1, fix="each beta must be in [0, 1)")]


@with_config(SECTION)
@dataclass(frozen=True)
class ModelConfig:
    """The student and the CUSA heads.

    Args:
        student: name in the student registry (``cusa_train.students.registry``), e.g. ``"mobilenetv2-minilm"``.
        student_options: keyword arguments for the student factory.
        embed_dim: output size of the heads; ``None`` keeps the student's (which must then be
            the same for both towers).
        head_init_std: std of the heads' Linear weights (official 0.02).
        init_from: a state dict to start from, read with ``weights_only=True``: a ``cusa train``
            checkpoint, or an official CUSA (``unire``) checkpoint or state dict, whose names are
            converted. Keys it lacks keep their fresh values (e.g. the student's pretrained
            weights); a key the model does not have is refused.
    """

    student: str = "mobilenetv2-minilm"
    student_options: dict[str, Any] = field(default_factory=dict)
    embed_dim: (
        Annotated[StrictInt, in_range(ge=1, fix="use >= 1, or null for the student's")] | None
    ) = None
    head_init_std: Annotated[StrictFloat, in_range(ge=0)] = 0.02
    init_from: str | None = None

    def __post_init__(self) -> None:
        check_ranges(self, "model")


@with_config(SECTION)
@dataclass(frozen=True)
class TeachersConfig:
    """Which stored teacher features to use.

    Args:
        image: image teacher name or spec fingerprint in the store (paper: Unicom ViT-B/32
            ``forward_features``, ``unicom-vit-b32-tokens``).
        text: text teacher name or spec fingerprint (paper: all-mpnet-base-v2).
        image_spec: expected spec fields of the image teacher (any subset of ``TeacherSpec``);
            the store is refused when a recorded field differs.
        text_spec: the same for the text teacher.
    """

    image: str = DEFAULT_IMAGE_TEACHER
    text: str = DEFAULT_TEXT_TEACHER
    image_spec: dict[str, Any] = field(default_factory=dict)
    text_spec: dict[str, Any] = field(default_factory=dict)


@with_config(SECTION)
@dataclass(frozen=True)
class DataConfig:
    """Training data and its soft labels.

    Args:
        dataset: dataset name or path for :func:`cusa.readers.open_dataset`.
        root: the dataset folder, for registered names that need one (``coco``, ``flickr30k``).
        split: split to train on.
        store: feature store path or URL; ``None`` is :func:`cusa.paths.default_store`.
        store_dataset: dataset name the features were stored under (defaults to ``dataset``).
        batch_size: (image, caption) pairs per step and process; one pair per caption.
        num_workers: DataLoader worker processes.
        max_samples: keep only the first N images (for quick runs).
        captions: what the student reads: ``"raw"`` captions, or ``"pre_caption"``, the official
            normalisation (lower case, punctuation to spaces, 64 words) that the official code
            applies before ``clip.tokenize`` and that cusa applies for the text teacher.
        shuffle_seed: seed of the per-epoch shuffle (``seed + epoch``, as torch's
            ``DistributedSampler``); ``None`` uses ``run.seed``. The official code leaves the
            sampler at its default, 0.
    """

    dataset: str = "coco-sample"
    root: str | None = None
    split: str = "train"
    store: str | None = None
    store_dataset: str | None = None
    batch_size: Annotated[
        StrictInt, in_range(ge=2, message="{name}={value!r}; in-batch losses need at least 2")
    ] = 32
    num_workers: Annotated[StrictInt, in_range(ge=0)] = 0
    max_samples: Annotated[StrictInt, in_range(ge=1, fix="use >= 1, or null")] | None = None
    captions: Literal["raw", "pre_caption"] = "raw"
    shuffle_seed: Seed | None = None

    def __post_init__(self) -> None:
        check_ranges(self, "data")


@with_config(SECTION)
@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine schedule.

    Two schedules:

    - ``"step-cosine"`` (default): linear warmup over ``warmup_steps``, then a cosine decay to
      ``min_lr_ratio * lr`` (or ``min_lr``), updated every step.
    - ``"epoch-cosine"``: the official CUSA schedule (timm's ``CosineLRScheduler`` with
      ``t_initial = epochs``, stepped once per epoch before its first batch):
      ``lr(e) = min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2``, after a linear warmup
      from ``warmup_lr`` over ``warmup_epochs`` (0 in every official config). With
      ``warmup_prefix: true`` (default, the official code's copy of the scheduler) the cosine
      starts after the warmup, ``e`` above being ``epoch - warmup_epochs``; ``false`` is stock
      timm, whose cosine counts from epoch 0.

    Two weight-decay groupings:

    - ``"matrices"`` (default): decay on tensors with 2 or more dimensions only.
    - ``"official"``: timm's ``add_weight_decay`` as the official code uses it: no decay on 1-d
      tensors and on names ending in ``.bias``, decay on the rest, so the 0-d temperatures *are*
      decayed.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay, applied as ``decay_groups`` says.
        betas: AdamW betas.
        eps: AdamW epsilon.
        schedule: ``"step-cosine"`` or ``"epoch-cosine"`` (official).
        warmup_steps: linear warmup steps (``step-cosine``).
        warmup_epochs: linear warmup epochs (``epoch-cosine``).
        warmup_lr: lr at the start of the warmup (``epoch-cosine``; default ``lr``).
        warmup_prefix: start the cosine after the warmup (``epoch-cosine``; official ``True``).
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: total optimiser steps; ``None`` derives it from ``epochs``.
        min_lr_ratio: final lr as a fraction of ``lr`` (when ``min_lr`` is not set).
        min_lr: final lr, absolute (official ``min_lr``); overrides ``min_lr_ratio``.
        decay_groups: ``"matrices"`` or ``"official"``.
        grad_clip_norm: clip the global grad norm; ``None`` disables (the official code does not clip).
    """

    lr: Annotated[
        StrictFloat, in_range(gt=0, le=MAX_LR, fix=f"use e.g. 1e-4 (0 < lr <= {MAX_LR})")
    ] = 1e-4
    weight_decay: Annotated[StrictFloat, in_range(ge=0)] = 0.2
    betas: tuple[Beta, Beta] = (0.9, 0.98)
    eps: Annotated[StrictFloat, in_range(gt=0)] = 1e-6
    schedule: Literal["step-cosine", "epoch-cosine"] = "step-cosine"
    warmup_steps: Annotated[StrictInt, in_range(ge=0)] = 100
    warmup_epochs: Annotated[StrictInt, in_range(ge=0)] = 0
    warmup_lr: Annotated[StrictFloat, in_range(ge=0)] | None = None
    warmup_prefix: StrictBool = True
    epochs: Annotated[StrictInt, in_range(ge=1)] = 1
    max_steps: Annotated[StrictInt, in_range(ge=1, fix="use >= 1, or null")] | None = None
    min_lr_ratio: Annotated[StrictFloat, in_range(ge=0, le=1)] = 0.0
    min_lr: Annotated[StrictFloat, in_range(ge=0)] | None = None
    decay_groups: Literal["matrices", "official"] = "matrices"
    grad_clip_norm: Annotated[StrictFloat, in_range(gt=0, fix="use a value > 0 or null")] | None = (
        None
    )

    @property
    def final_lr(self) -> float:
        """The lr the cosine ends at."""
        return self.min_lr if self.min_lr is not None else self.lr * self.min_lr_ratio

    def __post_init__(self) -> None:
        check_ranges(self, "optim")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(
                f"optim.min_lr={self.min_lr!r} must be in [0, lr={self.lr!r}] (or null for min_lr_ratio)"
            )


@with_config(SECTION)
@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes.

    Args:
        output_dir: checkpoints, ``metrics.jsonl`` and ``config.json`` go here.
        seed: seed for python, numpy and torch (offset by rank under DDP).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        log_every: write a metrics line every N steps.
        log_to: where metrics go: any of ``"jsonl"`` (``metrics.jsonl``), ``"tensorboard"``
            (event files in ``tensorboard/``; extra ``cusa[tensorboard]``) and ``"wandb"``
            (extra ``cusa[wandb]``; honours ``WANDB_MODE=offline``), each with the same scalars.
        checkpoint_every: also save ``checkpoint-last.pt`` every N steps; 0 = only at the end of
            every epoch (and of the run). Each save replaces the previous file atomically.
        allow_non_finite: go on when a loss term, temperature, gradient or eval metric is
            ``nan``/``inf`` (a warning is logged); by default the run stops with
            :class:`~cusa.errors.NonFiniteError` naming the step, the term and the value.
        resume: continue from ``output_dir/checkpoint-last.pt`` when it exists.
        progress: show a progress bar.
        all_gather: under DDP, whether the in-batch losses see the global batch.
            ``"off"`` (every official config, ``is_all_gather: False``): each rank's loss is over
            its own ``batch_size`` pairs. ``"on"``: embeddings, teacher features and ids are
            all-gathered, and the local gradient is multiplied by the world size so that DDP's
            averaging yields exactly the gradient of the global-batch loss. ``"official"``: the
            official ``AllGather`` backward (no scaling), whose backbone gradient is
            ``world_size`` times smaller than the global-batch loss's; for parity only.
        on_config_change: what a rerun into an ``output_dir`` whose checkpoint was made with a
            different config does: ``"refuse"`` (default; the message names every differing
            field), ``"resume-anyway"`` (continue; the old ``config.json`` is kept as
            ``config-before-step-<N>.json``) or ``"overwrite"`` (start again; the old checkpoints
            and metrics are moved to ``previous-<time>/``). Settings that do not change the result
            (``run.progress``, ``run.log_every``, ``run.log_to``, ``run.checkpoint_every``,
            ``run.allow_non_finite``, ``run.device``, ``data.num_workers``, ``optim.max_steps``,
            ``eval.batch_size``) may always differ.
    """

    output_dir: str = "runs/cusa"
    seed: Seed = 0
    device: str = "auto"
    log_every: Annotated[StrictInt, in_range(ge=1)] = 1
    log_to: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl",)
    checkpoint_every: Annotated[StrictInt, in_range(ge=0)] = 0
    allow_non_finite: StrictBool = False
    resume: StrictBool = True
    progress: StrictBool = True
    all_gather: Literal["off", "on", "official"] = "on"
    on_config_change: Literal["refuse", "resume-anyway", "overwrite"] = "refuse"

    def __post_init__(self) -> None:
        check_ranges(self, "run")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"run.device={self.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


@with_config(SECTION)
@dataclass(frozen=True)
class ValidationConfig:
    """Evaluation after every epoch, and which checkpoint is kept as the best.

    The official code evaluates val and test after every epoch and keeps the checkpoint with the
    best **test** ``r_mean``. Choosing on test reports an optimistic test score, so cusa chooses
    on ``val`` unless ``select_on: test`` asks for the official behaviour.

    Args:
        splits: splits of ``data.dataset`` to evaluate after every epoch (e.g. ``[val, test]``);
            empty: no evaluation, only ``checkpoint-last.pt``.
        select_on: the split whose ``metric`` picks ``checkpoint-best.pt``; ``None`` keeps no best.
        metric: a key of the retrieval report, higher is better (official ``r_mean``).
        max_images: evaluate only the first N images of each split.
        batch_size: items encoded at once.
    """

    splits: tuple[str, ...] = ()
    select_on: str | None = "val"
    metric: str = "r_mean"
    max_images: Annotated[StrictInt, in_range(ge=1, fix="use >= 1, or null")] | None = None
    batch_size: Annotated[StrictInt, in_range(ge=1)] = 128

    def __post_init__(self) -> None:
        if self.splits and self.select_on is not None and self.select_on not in self.splits:
            raise ConfigError(
                f"eval.select_on={self.select_on!r} is not one of eval.splits={list(self.splits)}; "
                "add it to the splits or set select_on: null"
            )
        check_ranges(self, "eval")


@with_config(SECTION)
@dataclass(frozen=True)
class TrainConfig:
    """A whole training run; every section has defaults (the official CUSA loss settings)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: ValidationConfig = field(default_factory=ValidationConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate from a plain mapping."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"a training config must be a mapping of sections, got {type(data).__name__}"
            )
        return build(cls, data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load from a ``.yaml``/``.yml`` (needs pyyaml), ``.json`` or ``.toml`` file."""
        return cls.from_dict(load_mapping(path))

    @classmethod
    def from_official(
        cls, official: dict[str, Any] | str | Path, *, dataset: str | None = None
    ) -> TrainConfig:
        """Map an official CUSA training YAML (``configs/<arch>/<dataset>/<name>.yaml`` of
        lerogo/aaai24_itr_cusa) onto a :class:`TrainConfig`.

        Every value the official run depends on is carried over; the result equals the preset
        in ``configs/paper/`` made from the same file. ``data_path`` becomes ``data.root`` (set
        it with ``--set data.root=...`` when the file leaves it empty). Model selection is on
        ``val`` (the official code selects on test; set ``eval.select_on: test`` for that).

        Args:
            official: the parsed YAML, or its path.
            dataset: the cusa dataset to train on. The official Flickr30K configs say
                ``dataset_name: cross_coco`` too (that class reads ``new_{split}.json`` from
                ``data_path``, whatever the dataset), so pass ``"flickr30k"`` for them; by
                default ``cross_coco`` is ``coco`` and ``cross_flickr`` is ``flickr30k``.

        Raises:
            ConfigError: a key is missing, or an option the official code has but this mapping
                does not reproduce (another optimiser or scheduler, LR noise, cooldown).
        """
        data = load_mapping(official) if isinstance(official, (str, Path)) else official
        try:
            return _from_official(data, dataset)
        except KeyError as exc:
            raise ConfigError(f"official CUSA config is missing key {exc.args[0]!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **sections: Any) -> TrainConfig:
        return dataclasses.replace(self, **sections)


#: ``dataset_name`` of the official configs -> the registered Karpathy readers (same splits).
OFFICIAL_DATASETS: dict[str, str] = {"cross_coco": "coco", "cross_flickr": "flickr30k"}
#: What the official ``retrieval.py`` fixes in code rather than in the YAML.
OFFICIAL_SEED = 23  # argparse default of --seed
OFFICIAL_NUM_WORKERS = 16
OFFICIAL_PRINT_FREQ = 50


def _from_official(cfg: dict[str, Any], dataset: str | None) -> TrainConfig:
    students = {arch: name for name, arch in CLIP_STUDENTS.items()}
    clip_name = cfg["clip_model"]
    if clip_name not in students:
        raise ConfigError(
            f"official clip_model={clip_name!r} is not one the official code accepts; "
            f"use one of {list(students)}"
        )
    if dataset is None and cfg["dataset_name"] not in OFFICIAL_DATASETS:
        raise ConfigError(
            f"official dataset_name={cfg['dataset_name']!r}; use one of {list(OFFICIAL_DATASETS)}"
        )
    opt, sched = cfg["optimizer"], cfg["schedular"]
    if str(opt["opt"]).lower() != "adamw":
        raise ConfigError(f"official optimizer.opt={opt['opt']!r}; only adamW is reproduced")
    if sched["sched"] != "cosine":
        raise ConfigError(f"official schedular.sched={sched['sched']!r}; only cosine is reproduced")
    for key, neutral in (("decay_rate", 1), ("cooldown_epochs", 0)):
        if sched.get(key, neutral) != neutral:
            raise ConfigError(
                f"official schedular.{key}={sched[key]!r} is not reproduced; "
                f"every official config uses {neutral}"
            )
    for key in ("lr_noise", "opt_eps", "opt_betas", "opt_args", "lr_cycle_mul"):
        if (opt.get(key) if key.startswith("opt") else sched.get(key)) is not None:
            raise ConfigError(f"official option {key!r} is not reproduced; remove it")
    return TrainConfig(
        model=ModelConfig(student=students[clip_name]),
        loss=LossConfig.from_official(cfg["loss_config"]),
        teachers=TeachersConfig(image=DEFAULT_IMAGE_TEACHER, text=DEFAULT_TEXT_TEACHER),
        data=DataConfig(
            dataset=dataset or OFFICIAL_DATASETS[cfg["dataset_name"]],
            root=cfg.get("data_path") or None,
            split="train",
            batch_size=int(cfg["batch_size_train"]),
            num_workers=OFFICIAL_NUM_WORKERS,
            captions="pre_caption",
            shuffle_seed=0,  # DistributedSampler's default seed; --seed does not reach it
        ),
        optim=OptimConfig(
            lr=float(opt["lr"]),
            weight_decay=float(opt["weight_decay"]),
            betas=(0.9, 0.999),  # torch AdamW defaults: the official code passes none
            eps=1e-8,
            schedule="epoch-cosine",
            warmup_steps=0,
            warmup_epochs=int(sched["warmup_epochs"]),
            warmup_lr=float(sched["warmup_lr"]),
            warmup_prefix=True,  # the official scheduler copy's default
            epochs=int(sched["epochs"]),
            min_lr=float(sched["min_lr"]),
            decay_groups="official",
            grad_clip_norm=None,
        ),
        run=RunConfig(
            output_dir=str(cfg.get("save_path") or "runs/cusa"),
            seed=OFFICIAL_SEED,
            log_every=OFFICIAL_PRINT_FREQ,
            all_gather="official" if cfg.get("is_all_gather") else "off",
        ),
        eval=ValidationConfig(
            splits=("val", "test"),
            select_on="val",
            metric="r_mean",
            batch_size=int(cfg.get("batch_size_test", 128)),
        ),
    )
