"""The reference CUSA trainer: AdamW + cosine, per-epoch evaluation, best/last checkpoints with
exact resume, JSONL metrics, DDP.

Teacher features come from the store (:mod:`cusa_train.data`); no teacher runs during training.
With a preset from ``configs/paper/`` the loop is the official ``retrieval.py`` loop step for
step (``tests/cusa_train/test_official_parity.py`` checks it against
``tests/fixtures/cusa_train_step_golden.pt``): per-epoch cosine set before the epoch's first
batch, timm-style weight-decay groups, ``DistributedSampler`` order, no clipping, fp32.

Example::

    from cusa_train.config import TrainConfig
    from cusa_train.trainer import train

    result = train(TrainConfig.from_file("configs/coco-sample.yaml"))
    print(result.final)            # last logged metrics

Under ``torchrun --nproc_per_node N`` the same call trains with DDP (gloo on CPU, NCCL on GPU);
``run.all_gather`` says whether the in-batch losses see the global batch (``on``) or each rank's
own batch (``off``, as every official config).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cusa.errors import ConfigError, NonFiniteError
from cusa.readers import open_dataset
from cusa_train.checkpoints import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    check_resume,
    link_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cusa_train.config import TrainConfig
from cusa_train.data import (
    PairDataset,
    SoftLabelCollate,
    TeacherFeatures,
    apply_text_transform,
    check_left_out,
    pair_collate,
)
from cusa_train.distributed import rank as dist_rank
from cusa_train.distributed import world_size as dist_world_size
from cusa_train.evaluation.data import caption_transform as caption_transform_of
from cusa_train.evaluation.validation import evaluate_split
from cusa_train.losses import LOSS_KEYS
from cusa_train.optim import cosine_schedule, epoch_cosine_lr, param_groups
from cusa_train.run_log import RunLog, check_sinks
from cusa_train.students.registry import STUDENTS
from cusa_train.wrapper import CusaModel, load_init_weights

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished :func:`train` call did.

    Attributes:
        steps: optimiser steps taken in total (including those before a resume).
        resumed_from: step the run resumed at, or None.
        final: the last metrics record.
        checkpoint: path of the last checkpoint.
        output_dir: the run folder.
        model: the trained model (unwrapped from DDP), in eval mode.
        evaluations: one record per evaluated epoch, ``{"epoch", "<split>/<metric>": ...}``.
        best: ``{"split", "metric", "value", "epoch", "checkpoint"}`` of the best checkpoint, or
            None when no split is selected on.
    """

    steps: int
    resumed_from: int | None
    final: dict[str, Any]
    checkpoint: Path
    output_dir: Path
    model: CusaModel = field(repr=False)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


# ---- pieces --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device when available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"run.device={name!r} but CUDA is not available here; use 'auto' or 'cpu'"
        )
    return device


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, that can start mid-epoch (resume).

    The order is torch's ``DistributedSampler(shuffle=True, drop_last=True)``: ``randperm`` with a
    generator seeded ``seed + epoch``, the tail beyond a multiple of ``world`` dropped, rank ``r``
    taking every ``world``-th index from ``r``. With one rank it is exactly the official order.
    """

    def __init__(
        self, length: int, seed: int, epoch: int = 0, skip: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        self.length, self.seed, self.epoch, self.skip = length, seed, epoch, skip
        self.rank, self.world = rank, world

    def indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.length, generator=g).tolist()
        total = (self.length // self.world) * self.world
        return perm[:total][self.rank : total : self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return max(0, self.length // self.world - self.skip)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {
                kk: vv.to(device) if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()
            }
        else:
            out[k] = v
    return out


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="cusa train",
        unit="step",
        dynamic_ncols=True,
    )


def _init_distributed(device_name: str) -> bool:
    """Join the torchrun process group when launched by torchrun; True if we created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
    dist.init_process_group(backend)
    logger.info(
        "joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend
    )
    return True


# ---- the loop ------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    student: nn.Module | None = None,
    reader: Any | None = None,
    teachers: TeacherFeatures | None = None,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train a student with CUSA as ``config`` says; see the module docstring.

    Args:
        config: the run configuration.
        student: a ready student (with ``preprocess_image``); default builds
            ``config.model.student`` from :mod:`cusa_train.students.registry`.
        reader: a dataset reader; default ``open_dataset(config.data.dataset, root=..., split=...)``.
        teachers: stored teacher features; default opened from ``config.data.store``.
        dataset: ready training pairs instead of a reader: a map-style dataset whose items are
            ``{"image": (3, H, W) tensor, "text": str or token ids, "image_id", "caption_id"}``;
            teacher features are still joined from ``teachers`` by id.

    Returns:
        :class:`TrainResult`.

    Raises:
        ConfigError: inconsistent settings (e.g. fewer pairs than one batch).
        StoreError / StoreSpecMismatchError / SampleNotFoundError: soft labels unavailable.
        NonFiniteError: a loss term, temperature, gradient or eval metric became ``nan``/``inf``
            (unless ``run.allow_non_finite``); the message names the step, the term and the value.
    """
    created_group = _init_distributed(config.run.device)
    try:
        result = _train(config, student, reader, teachers, dataset)
        if created_group:
            dist.barrier()  # no rank tears gloo down while another still works
        return result
    finally:
        if created_group:
            dist.destroy_process_group()


def train_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    *,
    grad_clip_norm: float | None = None,
    check_finite: bool = False,
    step: int | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """One optimisation step of a :class:`~cusa_train.wrapper.CusaModel` (or its DDP wrapper).

    Forward on ``batch`` (``image``, ``text``, ``image_id`` and, for CSA/USA, ``teacher_image``
    and ``teacher_text``), backward, optional grad-norm clipping, the optimiser step and a
    per-step scheduler step.

    Args:
        check_finite: refuse a non-finite loss term (before backward) or gradient (before the
            optimiser step, so the parameters stay as they were).
        step: the step number the messages give.

    Returns:
        The model's outputs (``loss`` and each term) and the learning rate the step used.

    Raises:
        NonFiniteError: with ``check_finite``, naming the step, the term and the value.
    """
    out = model(
        batch["image"],
        batch["text"],
        batch["image_id"],
        batch.get("teacher_image"),
        batch.get("teacher_text"),
    )
    if check_finite:
        check_values({k: float(out[k].detach()) for k in LOSS_KEYS}, "loss term", step)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if check_finite:
        _check_gradients(model, step)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step used
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out, lr


def check_values(
    values: Mapping[str, float], what: str, step: int | None, *, allowed: bool = False
) -> None:
    """Stop (or, when ``allowed``, warn) at the first non-finite value of ``values``.

    Raises:
        NonFiniteError: naming the step, ``what`` and the offending name and value.
    """
    bad = next(((k, v) for k, v in values.items() if not math.isfinite(v)), None)
    if bad is None:
        return
    message = (
        f"non-finite {what} at step {step}: {bad[0]}={bad[1]!r}; lower optim.lr or check the "
        "teacher features (`cusa store verify`); set run.allow_non_finite: true to go on anyway"
    )
    if allowed:
        logger.warning("%s", message)
        return
    raise NonFiniteError(message)


def _check_gradients(model: nn.Module, step: int | None) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        return
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            worst = p.grad[~torch.isfinite(p.grad)].flatten()[0]
            check_values({f"grad of {name}": float(worst)}, "gradient", step)


@dataclass
class _Run:
    """A built run: what each step of the loop needs, and where the run stands."""

    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    model: CusaModel
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: Dataset
    collate: Any
    preprocess: Any
    caption_transform: Any
    steps_per_epoch: int
    total_steps: int
    shuffle_seed: int
    step: int = 0
    resumed_from: int | None = None
    best: dict[str, Any] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    eval_readers: dict[str, Any] = field(default_factory=dict)
    saved_step: int | None = None  # the step checkpoint-last.pt holds, once saved by this run
    best_pending: bool = False  # a new best waits for the next save to become checkpoint-best.pt
    log: RunLog | None = None
    bar: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def _train(
    config: TrainConfig,
    student: nn.Module | None,
    reader: Any,
    teachers: TeacherFeatures | None,
    dataset: Dataset | None,
) -> TrainResult:
    run = _build_run(config, student, reader, teachers, dataset)
    try:
        while run.step < run.total_steps:
            epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
            if in_epoch == 0 and epoch > 0:
                _end_epoch(run, epoch - 1)  # a resume at an epoch boundary evaluates it first
            _train_epoch(run, epoch, in_epoch)
        if run.step % run.steps_per_epoch == 0:
            _end_epoch(run, run.step // run.steps_per_epoch - 1)
        _checkpoint(run)
    finally:
        run.close()
    run.model.eval()
    return TrainResult(
        steps=run.step,
        resumed_from=run.resumed_from,
        final=run.final,
        checkpoint=run.out_dir / CHECKPOINT_NAME,
        output_dir=run.out_dir,
        model=run.model,
        evaluations=run.evaluations,
        best=run.best,
    )


# ---- step 1: build the run -----------------------------------------------------------------------


def _build_run(
    config: TrainConfig,
    student: nn.Module | None,
    reader: Any,
    teachers: TeacherFeatures | None,
    dataset: Dataset | None,
) -> _Run:
    """Check the cheap things, then build the model, data, optimiser and restore a checkpoint."""
    rank, world = dist_rank(), dist_world_size()
    device = resolve_device(config.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(config.run.seed + rank)
    out_dir = Path(config.run.output_dir)
    # Everything cheap is checked before a student is built (and its weights downloaded).
    check_sinks(config.run.log_to)
    saved = check_resume(config, out_dir, rank == 0)  # the checkpoint to resume, read once
    if student is None:
        student_factory = STUDENTS.get(config.model.student)  # an unknown name fails here
    if reader is None and dataset is None:
        reader = _open_split(config, config.data.split)
    if teachers is None:
        teachers = _open_teachers(config, reader)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    if student is None:
        student = student_factory(**config.model.student_options)
    model, preprocess = _build_model(config, student, needs_preprocess=dataset is None)
    caption_transform = caption_transform_of(config.data.captions)
    if dataset is None:
        dataset = _pair_dataset(config, reader, preprocess, teachers, caption_transform)
    steps_per_epoch = _steps_per_epoch(len(dataset), world, config.data.batch_size)
    total_steps = config.optim.max_steps or steps_per_epoch * config.optim.epochs
    text_transform = getattr(student, "tokenize", None)
    collate = (
        SoftLabelCollate(teachers, text_transform=text_transform)
        if teachers is not None
        else _PlainCollate(text_transform)
    )
    model.to(device)
    optimizer, scheduler = _build_optimizer(config, model, total_steps)
    run = _Run(
        config=config,
        device=device,
        rank=rank,
        world=world,
        out_dir=out_dir,
        model=model,
        ddp_model=_wrap_ddp(model, device, world),
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=dataset,
        collate=collate,
        preprocess=preprocess,
        caption_transform=caption_transform,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        shuffle_seed=_default(config.data.shuffle_seed, config.run.seed),
    )
    _restore(run, saved)
    del saved  # the loaded checkpoint is not held through training
    run.log = RunLog(config.run.log_to, out_dir, config.to_dict(), enabled=run.is_main)
    run.bar = _progress_bar(total_steps, run.step, config.run.progress and run.is_main)
    return run


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _open_teachers(config: TrainConfig, reader: Any) -> TeacherFeatures | None:
    """The stored teacher features, when a CSA or USA term needs them."""
    if not any(term.enabled and term.weight > 0 for term in (config.loss.csa, config.loss.usa)):
        return None
    return TeacherFeatures.open(
        config.data.store,
        dataset=config.data.store_dataset
        or (reader.name if reader is not None else config.data.dataset),
        split=config.data.split,
        image_teacher=config.teachers.image,
        text_teacher=config.teachers.text,
        image_spec=config.teachers.image_spec or None,
        text_spec=config.teachers.text_spec or None,
    )


def _build_model(
    config: TrainConfig, student: nn.Module, *, needs_preprocess: bool
) -> tuple[CusaModel, Any]:
    preprocess = getattr(student, "preprocess_image", None)
    if preprocess is None and needs_preprocess:
        raise ConfigError(
            f"student {type(student).__name__!r} has no preprocess_image(bytes) -> (3, H, W) tensor; add one"
        )
    model = CusaModel(
        student,
        config.loss,
        embed_dim=config.model.embed_dim,
        head_init_std=config.model.head_init_std,
        gather=config.run.all_gather,
    )
    if config.model.init_from is not None:
        kept = load_init_weights(model, config.model.init_from)
        logger.info(
            "initialised from %s (%d keys kept their values)", config.model.init_from, len(kept)
        )
    return model, preprocess


def _pair_dataset(
    config: TrainConfig,
    reader: Any,
    preprocess: Any,
    teachers: TeacherFeatures | None,
    caption_transform: Any,
) -> Dataset:
    dataset = PairDataset(
        reader,
        preprocess,
        max_images=config.data.max_samples,
        require_ids=(teachers.image.ids, teachers.text.ids) if teachers is not None else None,
        caption_transform=caption_transform,
    )
    if teachers is not None:
        check_left_out(dataset, teachers)
    return dataset


def _steps_per_epoch(pairs: int, world: int, batch_size: int) -> int:
    steps = pairs // world // batch_size
    if steps < 1:
        raise ConfigError(
            f"{pairs} pairs over {world} process(es) do not fill one batch of {batch_size}; "
            "lower data.batch_size or use more data"
        )
    return steps


def _wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _build_optimizer(
    config: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    o = config.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay, o.decay_groups), lr=o.lr, betas=o.betas, eps=o.eps
    )
    scheduler = None
    if o.schedule == "step-cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(o.warmup_steps, total_steps, o.final_lr / o.lr)
        )
    return optimizer, scheduler


def _restore(run: _Run, saved: dict[str, Any] | None) -> None:
    """Continue from ``checkpoint-last.pt`` when ``run.resume`` and it exists."""
    ckpt_path = run.out_dir / CHECKPOINT_NAME
    if not (run.config.run.resume and ckpt_path.is_file()):
        return
    ckpt = saved if saved is not None else load_checkpoint(ckpt_path)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(ckpt["scheduler"])
    run.step = run.resumed_from = int(ckpt["step"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(_python_rng_state(ckpt["python_rng"]))
    run.best = ckpt.get("best")
    run.evaluations = list(ckpt.get("evaluations") or [])
    logger.info("resumed %s at step %d", ckpt_path, run.step)


# ---- step 2: one epoch ---------------------------------------------------------------------------


def _epoch_loader(run: _Run, epoch: int, in_epoch: int) -> DataLoader:
    """The epoch's batches from batch ``in_epoch`` on; sets the epoch's lr (``epoch-cosine``)."""
    o = run.config.optim
    if o.schedule == "epoch-cosine":
        # Official: ``lr_scheduler.step(epoch)`` before the epoch's first batch.
        lr_now = epoch_cosine_lr(
            epoch, o.lr, o.final_lr, o.epochs, o.warmup_epochs, o.warmup_lr, o.warmup_prefix
        )
        for group in run.optimizer.param_groups:
            group["lr"] = lr_now
    batch_size = run.config.data.batch_size
    sampler = EpochSampler(
        len(run.dataset), run.shuffle_seed, epoch, in_epoch * batch_size, run.rank, run.world
    )
    return DataLoader(
        run.dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=run.config.data.num_workers,
        collate_fn=run.collate,
        pin_memory=run.device.type == "cuda",
        persistent_workers=False,
    )


def _train_epoch(run: _Run, epoch: int, in_epoch: int) -> None:
    """Train from batch ``in_epoch`` of ``epoch`` to its end (or to the last step)."""
    config, o = run.config, run.config.optim
    batch_size = config.data.batch_size
    loader = _epoch_loader(run, epoch, in_epoch)
    run.model.train()
    allowed = config.run.allow_non_finite
    t_data = time.perf_counter()
    for batch in loader:
        t0 = time.perf_counter()
        batch = _to_device(batch, run.device)
        out, lr = train_step(
            run.ddp_model,
            batch,
            run.optimizer,
            run.scheduler,
            grad_clip_norm=o.grad_clip_norm,
            check_finite=not allowed,
            step=run.step + 1,
        )
        run.step += 1
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        t1 = time.perf_counter()
        taus = run.model.temperature_values()
        check_values(taus, "temperature", run.step, allowed=allowed)
        record = {
            "step": run.step,
            "epoch": epoch,
            "lr": lr,
            **{k: float(out[k].detach()) for k in LOSS_KEYS},
            **{f"tau/{k}": v for k, v in taus.items()},
            "step_time_s": t1 - t0,
            "data_time_s": t0 - t_data,
            "pairs_per_s": batch_size * run.world / max(t1 - t_data, 1e-9),
        }
        check_values({k: record[k] for k in LOSS_KEYS}, "loss term", run.step, allowed=allowed)
        run.final = record
        if run.step % config.run.log_every == 0 or run.step == run.total_steps:
            run.log.write(record)
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if config.run.checkpoint_every and run.step % config.run.checkpoint_every == 0:
            _checkpoint(run)
        if run.step >= run.total_steps:
            break
        t_data = time.perf_counter()


# ---- step 3: evaluate and select -----------------------------------------------------------------


def _end_epoch(run: _Run, epoch: int) -> None:
    """Evaluate the finished epoch, keep the best checkpoint, then save the last one."""
    _evaluate_and_select(run, epoch)
    _checkpoint(run)


def _evaluate_and_select(run: _Run, epoch: int) -> None:
    """Score every ``eval.splits`` split once per epoch (rank 0) and note a new best."""
    cfg = run.config.eval
    if not cfg.splits or not run.is_main or any(e["epoch"] == epoch for e in run.evaluations):
        return
    record: dict[str, Any] = {"epoch": epoch, "step": run.step}
    for split in cfg.splits:
        if split not in run.eval_readers:
            run.eval_readers[split] = _open_split(run.config, split)
        scores = evaluate_split(
            run.model,
            run.eval_readers[split],
            preprocess_image=run.preprocess,
            caption_transform=run.caption_transform,
            batch_size=cfg.batch_size,
            max_images=cfg.max_images,
        )
        record.update({f"{split}/{k}": v for k, v in scores.items()})
    metrics = {k: v for k, v in record.items() if "/" in k}
    check_values(metrics, "eval metric", run.step, allowed=run.config.run.allow_non_finite)
    run.evaluations.append(record)
    run.saved_step = None  # the checkpoint must now carry this evaluation
    run.log.write({"event": "eval", **record})
    if cfg.select_on is not None:
        key = f"{cfg.select_on}/{cfg.metric}"
        if key not in record:
            raise ConfigError(
                f"eval.metric={cfg.metric!r} is not in the report; it has "
                f"{sorted(k.split('/', 1)[1] for k in metrics)}"
            )
        if run.best is None or record[key] > run.best["value"]:
            run.best = {
                "split": cfg.select_on,
                "metric": cfg.metric,
                "value": record[key],
                "epoch": epoch,
                "checkpoint": str(run.out_dir / BEST_CHECKPOINT_NAME),
            }
            run.best_pending = True
    logger.info("epoch %d: %s", epoch, {k: round(v, 2) for k, v in metrics.items()})


# ---- step 4: checkpoint --------------------------------------------------------------------------


def _checkpoint(run: _Run) -> None:
    """Save ``checkpoint-last.pt`` (atomically replacing the previous one) unless it already holds
    this step; a new best becomes ``checkpoint-best.pt`` as a hard link to it, not a second write.
    """
    if run.is_main and run.saved_step != run.step:
        last = run.out_dir / CHECKPOINT_NAME
        save_checkpoint(last, _state(run))
        run.saved_step = run.step
        if run.best_pending:
            link_checkpoint(last, run.out_dir / BEST_CHECKPOINT_NAME)
            run.best_pending = False
    if run.world > 1:
        dist.barrier()


def _state(run: _Run) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "step": run.step,
        "config": run.config.to_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "best": run.best,
        "evaluations": run.evaluations,
    }


def _open_split(config: TrainConfig, split: str) -> Any:
    return open_dataset(config.data.dataset, root=config.data.root, split=split)


def _python_rng_state(state: Any) -> tuple:
    # weights_only loading returns the tuple as saved, lists only if it was serialised as JSON.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class _PlainCollate:
    """Collate for runs without soft labels (InfoNCE only)."""

    def __init__(self, text_transform: Any = None) -> None:
        self.text_transform = text_transform

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return apply_text_transform(pair_collate(samples), self.text_transform)
