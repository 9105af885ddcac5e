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

from cusa.errors import ConfigError
from cusa.readers import open_dataset
from cusa_train.checkpoints import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    METRICS_NAME,
    check_resume,
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


class MetricsLog:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


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
) -> tuple[dict[str, torch.Tensor], float]:
    """One optimisation step of a :class:`~cusa_train.wrapper.CusaModel` (or its DDP wrapper).

    Forward on ``batch`` (``image``, ``text``, ``image_id`` and, for CSA/USA, ``teacher_image``
    and ``teacher_text``), backward, optional grad-norm clipping, the optimiser step and a
    per-step scheduler step.

    Returns:
        The model's outputs (``loss`` and each term) and the learning rate the step used.
    """
    out = model(
        batch["image"],
        batch["text"],
        batch["image_id"],
        batch.get("teacher_image"),
        batch.get("teacher_text"),
    )
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step used
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out, lr


def _train(
    config: TrainConfig,
    student: nn.Module | None,
    reader: Any,
    teachers: TeacherFeatures | None,
    dataset: Dataset | None,
) -> TrainResult:
    rank, world = dist_rank(), dist_world_size()
    device = resolve_device(config.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(config.run.seed + rank)
    out_dir = Path(config.run.output_dir)
    is_main = rank == 0
    ckpt_path = out_dir / CHECKPOINT_NAME
    # Everything cheap is checked before a student is built (and its weights downloaded).
    saved = check_resume(config, out_dir, is_main)  # the checkpoint to resume, read once
    if student is None:
        student_factory = STUDENTS.get(config.model.student)  # an unknown name fails here
    if reader is None and dataset is None:
        reader = _open_split(config, config.data.split)
    needs_teachers = any(
        term.enabled and term.weight > 0 for term in (config.loss.csa, config.loss.usa)
    )
    if teachers is None and needs_teachers:
        teachers = TeacherFeatures.open(
            config.data.store,
            dataset=config.data.store_dataset
            or (reader.name if reader is not None else config.data.dataset),
            split=config.data.split,
            image_teacher=config.teachers.image,
            text_teacher=config.teachers.text,
            image_spec=config.teachers.image_spec or None,
            text_spec=config.teachers.text_spec or None,
        )
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))

    # -- student, data, soft labels
    if student is None:
        student = student_factory(**config.model.student_options)
    preprocess = getattr(student, "preprocess_image", None)
    if preprocess is None and dataset is None:
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
    caption_transform = caption_transform_of(config.data.captions)
    if dataset is None:
        dataset = PairDataset(
            reader,
            preprocess,
            max_images=config.data.max_samples,
            require_ids=(teachers.image, teachers.text) if teachers is not None else None,
            caption_transform=caption_transform,
        )
        if teachers is not None:
            check_left_out(dataset, teachers)
    batch_size = config.data.batch_size
    per_rank = len(dataset) // world
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{len(dataset)} pairs over {world} process(es) do not fill one batch of {batch_size}; "
            "lower data.batch_size or use more data"
        )
    total_steps = config.optim.max_steps or steps_per_epoch * config.optim.epochs
    text_transform = getattr(student, "tokenize", None)
    collate = (
        SoftLabelCollate(teachers, text_transform=text_transform)
        if teachers is not None
        else _PlainCollate(text_transform)
    )
    shuffle_seed = config.run.seed if config.data.shuffle_seed is None else config.data.shuffle_seed

    # -- model, optimiser, schedule
    model.to(device)
    ddp_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    o = config.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay, o.decay_groups), lr=o.lr, betas=o.betas, eps=o.eps
    )
    scheduler = None
    if o.schedule == "step-cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(o.warmup_steps, total_steps, o.final_lr / o.lr)
        )

    # -- resume
    best_path = out_dir / BEST_CHECKPOINT_NAME
    step, resumed_from = 0, None
    best: dict[str, Any] | None = None
    evaluations: list[dict[str, Any]] = []
    if config.run.resume and ckpt_path.is_file():
        ckpt = saved if saved is not None else load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        step = resumed_from = int(ckpt["step"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(_python_rng_state(ckpt["python_rng"]))
        best = ckpt.get("best")
        evaluations = list(ckpt.get("evaluations") or [])
        logger.info("resumed %s at step %d", ckpt_path, step)
        del ckpt
    del saved  # the loaded checkpoint is not held through training

    metrics = MetricsLog(out_dir / METRICS_NAME, is_main)
    bar = _progress_bar(total_steps, step, config.run.progress and is_main)
    final: dict[str, Any] = {}
    eval_readers: dict[str, Any] = {}

    def checkpoint() -> None:
        if is_main:
            save_checkpoint(ckpt_path, state())
        if world > 1:
            dist.barrier()

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "step": step,
            "config": config.to_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "best": best,
            "evaluations": evaluations,
        }

    def end_of_epoch(epoch: int) -> None:
        """Evaluate the finished epoch, keep the best checkpoint, then save the last one."""
        nonlocal best
        if not config.eval.splits:
            return
        record: dict[str, Any] = {"epoch": epoch, "step": step}
        if is_main and not any(e["epoch"] == epoch for e in evaluations):
            for split in config.eval.splits:
                if split not in eval_readers:
                    eval_readers[split] = _open_split(config, split)
                scores = evaluate_split(
                    model,
                    eval_readers[split],
                    preprocess_image=preprocess,
                    caption_transform=caption_transform,
                    batch_size=config.eval.batch_size,
                    max_images=config.eval.max_images,
                )
                record.update({f"{split}/{k}": v for k, v in scores.items()})
            evaluations.append(record)
            metrics.write({"event": "eval", **record})
            key = f"{config.eval.select_on}/{config.eval.metric}"
            if config.eval.select_on is not None:
                if key not in record:
                    raise ConfigError(
                        f"eval.metric={config.eval.metric!r} is not in the report; it has "
                        f"{sorted(k.split('/', 1)[1] for k in record if '/' in k)}"
                    )
                if best is None or record[key] > best["value"]:
                    best = {
                        "split": config.eval.select_on,
                        "metric": config.eval.metric,
                        "value": record[key],
                        "epoch": epoch,
                        "checkpoint": str(best_path),
                    }
                    save_checkpoint(best_path, state())
            logger.info(
                "epoch %d: %s", epoch, {k: round(v, 2) for k, v in record.items() if "/" in k}
            )
        checkpoint()

    model.train()
    try:
        while step < total_steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if in_epoch == 0 and epoch > 0:
                end_of_epoch(epoch - 1)  # a resume at an epoch boundary evaluates it first
            if o.schedule == "epoch-cosine":
                # Official: ``lr_scheduler.step(epoch)`` before the epoch's first batch.
                lr_now = epoch_cosine_lr(
                    epoch, o.lr, o.final_lr, o.epochs, o.warmup_epochs, o.warmup_lr, o.warmup_prefix
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
            sampler = EpochSampler(
                len(dataset), shuffle_seed, epoch, in_epoch * batch_size, rank, world
            )
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                drop_last=True,
                num_workers=config.data.num_workers,
                collate_fn=collate,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            model.train()
            t_data = time.perf_counter()
            for batch in loader:
                t0 = time.perf_counter()
                batch = _to_device(batch, device)
                out, lr = train_step(
                    ddp_model, batch, optimizer, scheduler, grad_clip_norm=o.grad_clip_norm
                )
                step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                if not all(torch.isfinite(out[k]) for k in LOSS_KEYS):
                    raise FloatingPointError(
                        f"non-finite loss at step {step}: { {k: float(out[k]) for k in LOSS_KEYS} }; "
                        "lower optim.lr or check the teacher features (`cusa store verify`)"
                    )
                record = {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    **{k: float(out[k].detach()) for k in LOSS_KEYS},
                    **{f"tau/{k}": v for k, v in model.temperature_values().items()},
                    "step_time_s": t1 - t0,
                    "data_time_s": t0 - t_data,
                    "pairs_per_s": batch_size * world / max(t1 - t_data, 1e-9),
                }
                final = record
                if step % config.run.log_every == 0 or step == total_steps:
                    metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if config.run.checkpoint_every and step % config.run.checkpoint_every == 0:
                    checkpoint()
                if step >= total_steps:
                    break
                t_data = time.perf_counter()
        if step % steps_per_epoch == 0:
            end_of_epoch(step // steps_per_epoch - 1)
        checkpoint()
    finally:
        bar.close()
    model.eval()
    return TrainResult(
        steps=step,
        resumed_from=resumed_from,
        final=final,
        checkpoint=ckpt_path,
        output_dir=out_dir,
        model=model,
        evaluations=evaluations,
        best=best,
    )


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
