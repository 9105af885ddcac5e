"""How both CUSA experiments train and score the student on stored features.

- **The student** (:class:`StoredFeatureStudent`): a trainable MLP adapter per frozen tower (or
  none), under :class:`cusa_train.wrapper.CusaModel`'s heads, temperatures and loss;
  :func:`build_model` makes it, the same for every variant with the same seed.
- **Training** (:func:`train_variant`): AdamW + warmup + cosine decay over :func:`epoch_batches`,
  soft labels gathered per batch from the store. The one training loop of both studies.
- **Evaluation** (:func:`evaluate_model`, :func:`reference_t2t`): i2t/t2i R@1/5/10, RSUM and
  text->text R@1 / mAP@R on a split.
- **Schedule choice** (:func:`choose_schedule`): lr and epochs for InfoNCE on held-out *train*
  images (:func:`holdout_split`); the eval split plays no part.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.cusa_config import ExperimentConfig, Schedule, loss_config
from benchmarks.cusa_features import SplitFeatures, epoch_batches
from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig
from cusa_train.data import TeacherFeatures
from cusa_train.evaluation.evaluate import evaluate_features
from cusa_train.evaluation.metrics import label_retrieval_metrics
from cusa_train.optim import cosine_schedule, param_groups
from cusa_train.trainer import train_step
from cusa_train.wrapper import CusaModel

log = logging.getLogger("benchmarks.cusa_training")

CROSS_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


# ---- the student ---------------------------------------------------------------------------------


class StoredFeatureStudent(nn.Module):
    """A dual encoder over stored, frozen tower features.

    ``encode_image``/``encode_text`` take the towers' pooled features (B, 1280) / (B, 384) and
    return (B, embed_dim) through a trainable adapter (``"mlp"``: LayerNorm, Linear, GELU, Linear)
    or unchanged (``"none"``: the CusaModel heads then read the tower features directly).
    """

    def __init__(
        self, image_in: int, text_in: int, adapter: str, hidden: int, embed_dim: int
    ) -> None:
        super().__init__()
        if adapter == "mlp":
            self.image_adapter: nn.Module = mlp(image_in, hidden, embed_dim)
            self.text_adapter: nn.Module = mlp(text_in, hidden, embed_dim)
            self.image_dim = self.text_dim = embed_dim
        elif adapter == "none":
            self.image_adapter, self.text_adapter = nn.Identity(), nn.Identity()
            self.image_dim, self.text_dim = image_in, text_in
        else:
            raise ConfigError(f"adapter={adapter!r} is not supported; use 'mlp' or 'none'")

    def encode_image(self, features: Tensor) -> Tensor:  # (B, image_in) -> (B, image_dim)
        return self.image_adapter(features)

    def encode_text(self, features: Tensor) -> Tensor:  # (B, text_in) -> (B, text_dim)
        return self.text_adapter(features)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out)
    )


#: Builds the student of a run from the experiment config and the split (default:
#: :class:`StoredFeatureStudent` over the stored tower features).
StudentFactory = Callable[[ExperimentConfig, SplitFeatures], nn.Module]


def build_model(
    cfg: ExperimentConfig,
    variant: str,
    data: SplitFeatures,
    seed: int,
    *,
    loss: LossConfig | None = None,
    student_factory: StudentFactory | None = None,
) -> CusaModel:
    """The student + CUSA model of one variant; same seed -> same adapter and cross-head init.

    ``loss`` replaces the variant's official loss (the sensitivity study varies it), and
    ``student_factory`` the default student over stored features.
    """
    torch.manual_seed(seed)
    if student_factory is None:
        image_in, text_in = data.towers.dims
        student: nn.Module = StoredFeatureStudent(
            image_in, text_in, cfg.adapter, cfg.adapter_hidden, cfg.embed_dim
        )
    else:
        student = student_factory(cfg, data)
    return CusaModel(student, loss or loss_config(variant), embed_dim=cfg.embed_dim, gather=False)


# ---- training ------------------------------------------------------------------------------------


@dataclass
class TrainRun:
    """One trained model and what it cost."""

    model: CusaModel
    seconds: float
    steps: int
    final_losses: dict[str, float]
    temperatures: dict[str, float]


def train_variant(
    cfg: ExperimentConfig,
    variant: str,
    data: SplitFeatures,
    seed: int,
    schedule: Schedule | None = None,
    *,
    loss: LossConfig | None = None,
    student_factory: StudentFactory | None = None,
) -> TrainRun:
    """Train the heads (and adapter) of one variant on ``data`` with the stored soft labels.

    ``loss`` and ``student_factory`` are passed to :func:`build_model`; with the same seed the
    batch order is the same whatever the loss, so runs pair up seed by seed.
    """
    sched = schedule or cfg.schedule
    model = build_model(cfg, variant, data, seed, loss=loss, student_factory=student_factory)
    # Batch order: independent of the model, the same for every variant.
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(epoch_batches(data, np.random.default_rng(0), sched.batch_size))
    total = steps_per_epoch * sched.epochs
    optimizer = torch.optim.AdamW(param_groups(model, sched.weight_decay), lr=sched.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(sched.warmup_steps, total, sched.min_lr_ratio)
    )
    model.train()
    step, last = 0, {}
    t0 = time.perf_counter()
    for _ in range(sched.epochs):
        for img_idx, cap_idx in epoch_batches(data, rng, sched.batch_size):
            images, texts = data.gather("towers", img_idx, cap_idx)  # (B, 1280), (B, 384)
            t_img, t_txt = (None, None)
            if model.needs_teachers:
                t_img, t_txt = data.gather("teachers", img_idx, cap_idx)  # (B, Ti), (B, Tt)
            ids = torch.from_numpy(img_idx.astype(np.int64))
            batch = {"image": images, "text": texts, "image_id": ids}
            batch |= {"teacher_image": t_img, "teacher_text": t_txt}
            out, _ = train_step(model, batch, optimizer, scheduler)  # the trainer's step
            step += 1
            last = out
    seconds = time.perf_counter() - t0
    model.eval()
    if not math.isfinite(float(last["loss"].detach())):
        raise ConfigError(
            f"{variant} seed {seed}: the loss diverged to {float(last['loss'].detach())!r}; lower the lr"
        )
    return TrainRun(
        model=model,
        seconds=seconds,
        steps=step,
        final_losses={k: float(v.detach()) for k, v in last.items()},
        temperatures=model.temperature_values(),
    )


# ---- evaluation ----------------------------------------------------------------------------------


def _t2t(features: Tensor, labels: np.ndarray) -> tuple[float, float]:
    """text->text R@1 and mAP@R, positives: the other captions of the same image."""
    s = label_retrieval_metrics(features, features, labels, labels, ks=(1,), exclude_self=True)
    return s.recall[1], s.map_at_r


@torch.no_grad()
def evaluate_model(model: CusaModel, data: SplitFeatures) -> dict[str, float]:
    """Cross-modal and uni-modal metrics of a trained model on a split (percent).

    ``t2t_*`` use the cross-modal text embeddings (the retrieval space). ``t2t_uni_*`` follow the
    official uni-modal protocol (``encode_text(cross_modal=False)``): the uni-modal projector head
    when USA trained one, otherwise the backbone output (here: the adapter output).
    """
    n_img, n_cap = len(data.image_ids), len(data.caption_ids)
    tower_img, tower_txt = data.gather("towers", np.arange(n_img), np.arange(n_cap))
    img = model.encode_image(tower_img)  # (N, E) cross-modal head
    txt = model.encode_text(tower_txt)  # (M, E)
    report = evaluate_features(img, txt, data.caption_image, unimodal=True)
    metrics = {k: float(report.metrics[k]) for k in (*CROSS_KEYS, "t2t_r1", "t2t_map_at_r")}
    if model.uni_text_head is not None:
        uni = model.encode_text(tower_txt, uni_modal=True)
    else:
        uni = model.student.encode_text(tower_txt)
    metrics["t2t_uni_r1"], metrics["t2t_uni_map_at_r"] = _t2t(uni, data.caption_image)
    return metrics


def reference_t2t(data: SplitFeatures) -> dict[str, dict[str, float]]:
    """text->text of the untrained stored features: the student's MiniLM tower and the mpnet teacher."""
    idx = np.arange(len(data.caption_ids))
    out = {}
    for which in ("towers", "teachers"):
        src: TeacherFeatures = getattr(data, which)
        feats = torch.from_numpy(
            np.asarray(src.text.gather_rows(data.caption_rows[which][idx]), dtype=np.float32)
        )
        r1, mapr = _t2t(feats, data.caption_image)
        out[str(src.text.spec.get("name"))] = {"t2t_r1": r1, "t2t_map_at_r": mapr}
    return out


# ---- schedule choice on held-out train images ----------------------------------------------------


def holdout_split(
    cfg: ExperimentConfig, train: SplitFeatures
) -> tuple[SplitFeatures, SplitFeatures]:
    """The seeded (fit, held-out) split of the train images used to choose the schedule."""
    rng = np.random.default_rng(12345)
    perm = rng.permutation(len(train.image_ids))
    n_hold = max(2, round(len(perm) * cfg.holdout_fraction))
    return train.subset(np.sort(perm[n_hold:])), train.subset(np.sort(perm[:n_hold]))


def choose_schedule(
    cfg: ExperimentConfig,
    train: SplitFeatures,
    *,
    student_factory: StudentFactory | None = None,
) -> dict[str, Any]:
    """Pick ``lr`` and ``epochs`` for InfoNCE on a held-out part of the train split.

    The train images are split once (seeded) into fit / held-out; InfoNCE is trained on the fit
    part for each grid point with seed 0, scored by RSUM on the held-out part, and the best point
    becomes the schedule of every variant. The eval split plays no part.
    """
    fit, hold = holdout_split(cfg, train)
    grid = []
    for lr in cfg.tune_lrs:
        for epochs in cfg.tune_epochs:
            sched = replace(cfg.schedule, lr=lr, epochs=epochs)
            run = train_variant(
                cfg, "infonce", fit, seed=0, schedule=sched, student_factory=student_factory
            )
            rsum = evaluate_model(run.model, hold)["rsum"]
            grid.append(
                {
                    "lr": lr,
                    "epochs": epochs,
                    "holdout_rsum": round(rsum, 3),
                    "train_s": round(run.seconds, 2),
                }
            )
            log.info("tune: lr=%g epochs=%d -> held-out RSUM %.2f", lr, epochs, rsum)
    best = max(grid, key=lambda g: g["holdout_rsum"])
    return {
        "fit_images": len(fit.image_ids),
        "holdout_images": len(hold.image_ids),
        "variant": "infonce",
        "seed": 0,
        "grid": grid,
        "chosen": {"lr": best["lr"], "epochs": best["epochs"]},
    }
