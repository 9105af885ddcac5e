"""Does CUSA help on real COCO images? InfoNCE vs +CSA vs +USA vs +CUSA (issue 6).

The experiment, end to end, from an empty feature store:

1. **Extract** with ``cusa.extract`` (local runner, CPU) for the train and eval splits:
   the teachers (image: ``efficientnet-lite0``, an ImageNet CNN standing in for Unicom, which
   cannot be downloaded here; text: ``all-mpnet-base-v2``, the paper's) and the student's frozen
   towers (``mobilenetv2`` pooled 1280-d, ``all-MiniLM-L6-v2`` mean-pooled 384-d). The towers are
   registered as "teachers" too, so their pooled features land in the same store; they are the
   towers of ``cusa_train.student``'s ``mobilenetv2-minilm`` student up to L2 normalisation.
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
4. **Evaluate** on the eval split with :func:`cusa_train.evaluate.evaluate_features`: i2t/t2i
   R@1/5/10 and RSUM, text->text R@1 and mAP@R (positives: the other captions of the same image).

Run::

    python -m benchmarks.cusa_vs_infonce --train ../shared/data/coco-example \\
        --eval ../shared/data/coco-example [--seeds 5] [--store DIR]

Writes ``benchmarks/results/cusa_vs_infonce.json`` and ``docs/img/cusa_vs_infonce_rsum.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cusa.errors import ConfigError, StoreError
from cusa_train.config import LossConfig, to_dict
from cusa_train.data import TeacherFeatures
from cusa_train.evaluate import evaluate_features
from cusa_train.metrics import label_retrieval_metrics
from cusa_train.trainer import cosine_schedule, param_groups
from cusa_train.wrapper import CusaModel

log = logging.getLogger("benchmarks.cusa_vs_infonce")

REPO = Path(__file__).resolve().parents[1]
RESULTS_JSON = REPO / "benchmarks" / "results" / "cusa_vs_infonce.json"
PLOT_PNG = REPO / "docs" / "img" / "cusa_vs_infonce_rsum.png"

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

CROSS_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
UNI_KEYS = ("t2t_r1", "t2t_map_at_r", "t2t_uni_r1", "t2t_uni_map_at_r")


# ---- configuration -----------------------------------------------------------------------------


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


# ---- stage 1: extraction -----------------------------------------------------------------------


def extract_features(cfg: ExperimentConfig, store: str) -> dict[str, Any]:
    """Fill ``store`` with the teachers' and the towers' features of both splits.

    Returns:
        ``{"<split>/<image model>+<text model>": {"seconds", "rows", "failed"}}`` per job, and
        ``"total_s"``.

    Raises:
        StoreError: a job reported failed samples (the message names the job and the ledger).
    """
    from cusa.extract.runner import ExtractConfig, extract

    jobs = [(cfg.train, cfg.train_split), (cfg.eval, cfg.eval_split)]
    if (cfg.eval, cfg.eval_split) == (cfg.train, cfg.train_split):
        jobs = jobs[:1]
    out: dict[str, Any] = {}
    t_all = time.perf_counter()
    for dataset, split in jobs:
        done: set[tuple[str, str]] = set()  # (modality, model) already extracted for this split
        for image_model, text_model in (
            (cfg.image_tower, cfg.text_tower),
            (cfg.image_teacher, cfg.text_teacher),
        ):
            modalities = tuple(
                m
                for m, name in (("image", image_model), ("text", text_model))
                if (m, name) not in done
            )
            done |= {("image", image_model), ("text", text_model)}
            if not modalities:
                continue
            t0 = time.perf_counter()
            summary = extract(
                ExtractConfig(
                    dataset=dataset,
                    split=split,
                    store=store,
                    image_teacher=image_model,
                    text_teacher=text_model,
                    modalities=modalities,
                    runner="local",
                    device="cpu",
                    batch_size=cfg.extract_batch_size,
                )
            )
            seconds = time.perf_counter() - t0
            key = f"{split}/{image_model}+{text_model}"
            out[key] = {
                "seconds": round(seconds, 2),
                "rows": dict(summary.rows),
                "failed": dict(summary.failed),
            }
            log.info("extracted %s in %.1f s: rows %s", key, seconds, summary.rows)
            if not summary.ok:
                raise StoreError(
                    f"extraction {key} of {dataset!r} failed on {summary.total_failed} samples; "
                    f"see `cusa store info {store}` for the failure ledger"
                )
    out["total_s"] = round(time.perf_counter() - t_all, 2)
    return out


# ---- stage 2: stored features of one split -----------------------------------------------------


@dataclass
class SplitFeatures:
    """The stored features of one split, joined by sample id.

    ``towers`` holds the student's frozen tower features (inputs of the trainable part) and
    ``teachers`` the soft-label teachers; each caption row belongs to image row ``caption_image[j]``.
    """

    dataset: str
    split: str
    image_ids: list[str]
    caption_ids: list[str]
    caption_image: np.ndarray  # (M,) int64 image row of each caption
    towers: TeacherFeatures
    teachers: TeacherFeatures
    image_rows: dict[str, np.ndarray] = field(default_factory=dict)  # "towers"/"teachers" -> (N,)
    caption_rows: dict[str, np.ndarray] = field(default_factory=dict)  # -> (M,)

    def subset(self, image_index: np.ndarray) -> SplitFeatures:
        """The same split restricted to some image rows (and their captions)."""
        keep = np.zeros(len(self.image_ids), dtype=bool)
        keep[image_index] = True
        new_row = np.cumsum(keep) - 1
        cap_keep = keep[self.caption_image]
        return SplitFeatures(
            dataset=self.dataset,
            split=self.split,
            image_ids=[i for i, k in zip(self.image_ids, keep, strict=True) if k],
            caption_ids=[c for c, k in zip(self.caption_ids, cap_keep, strict=True) if k],
            caption_image=new_row[self.caption_image[cap_keep]],
            towers=self.towers,
            teachers=self.teachers,
            image_rows={k: v[keep] for k, v in self.image_rows.items()},
            caption_rows={k: v[cap_keep] for k, v in self.caption_rows.items()},
        )

    def gather(
        self, which: str, image_index: np.ndarray, caption_index: np.ndarray
    ) -> tuple[Tensor, Tensor]:
        """``(B, Di)`` image and ``(B, Dt)`` caption features of ``which`` ("towers"/"teachers")."""
        src: TeacherFeatures = getattr(self, which)
        img = src.image.gather_rows(self.image_rows[which][image_index])
        txt = src.text.gather_rows(self.caption_rows[which][caption_index])
        return torch.from_numpy(np.asarray(img, dtype=np.float32)), torch.from_numpy(
            np.asarray(txt, dtype=np.float32)
        )


def caption_image_id(caption_id: str) -> str:
    """``"<image_id>#<k>"`` -> ``"<image_id>"``."""
    return caption_id.rpartition("#")[0]


def load_split(cfg: ExperimentConfig, store: str, dataset: str, split: str) -> SplitFeatures:
    """Open the towers' and teachers' features of one split and join them by id.

    Raises:
        StoreError: the four feature groups do not hold the same ids (a failed sample), or a
            caption's image is missing.
    """
    from cusa.extract.readers import open_dataset

    name = open_dataset(dataset, split=split).name
    towers = TeacherFeatures.open(
        store, dataset=name, split=split, image_teacher=cfg.image_tower, text_teacher=cfg.text_tower
    )
    teachers = TeacherFeatures.open(
        store,
        dataset=name,
        split=split,
        image_teacher=cfg.image_teacher,
        text_teacher=cfg.text_teacher,
    )
    image_ids = sorted(towers.image.ids)
    caption_ids = sorted(
        towers.text.ids, key=lambda c: (caption_image_id(c), int(c.rpartition("#")[2]))
    )
    for label, lookup, ids in (
        ("image teacher", teachers.image, image_ids),
        ("text teacher", teachers.text, caption_ids),
    ):
        if set(lookup.ids) != set(ids):
            raise StoreError(
                f"{dataset!r}/{split}: the {label} {lookup.spec.get('name')!r} and the student tower hold "
                f"different ids ({len(lookup.ids)} vs {len(ids)}); a sample failed extraction - see "
                "`cusa store info` and re-extract"
            )
    row_of = {i: r for r, i in enumerate(image_ids)}
    try:
        caption_image = np.array([row_of[caption_image_id(c)] for c in caption_ids], dtype=np.int64)
    except KeyError as exc:
        raise StoreError(f"caption of image {exc.args[0]!r} has no stored image features") from None
    out = SplitFeatures(name, split, image_ids, caption_ids, caption_image, towers, teachers)
    for which, src in (("towers", towers), ("teachers", teachers)):
        out.image_rows[which] = src.image.rows(image_ids)
        out.caption_rows[which] = src.text.rows(caption_ids)
    return out


# ---- stage 3: the student and its training -----------------------------------------------------


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
            self.image_adapter: nn.Module = _mlp(image_in, hidden, embed_dim)
            self.text_adapter: nn.Module = _mlp(text_in, hidden, embed_dim)
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


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
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


def epoch_batches(
    data: SplitFeatures, rng: np.random.Generator, batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch: images shuffled, one random caption each, cut into batches (last may be short)."""
    n = len(data.image_ids)
    by_image: list[list[int]] = [[] for _ in range(n)]
    for j, i in enumerate(data.caption_image.tolist()):
        by_image[i].append(j)
    order = rng.permutation(n)
    captions = np.array(
        [by_image[i][rng.integers(len(by_image[i]))] for i in order], dtype=np.int64
    )
    out = []
    for s in range(0, n, batch_size):
        if n - s < 2:  # a batch of one has no negatives
            break
        out.append((order[s : s + batch_size], captions[s : s + batch_size]))
    return out


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
            out = model(images, texts, ids, t_img, t_txt)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            scheduler.step()
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


# ---- stage 4: evaluation -----------------------------------------------------------------------


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


@torch.no_grad()
def soft_label_stats(data: SplitFeatures, batch_size: int, tau: float = 1.0) -> dict[str, Any]:
    """How peaked the teachers' soft labels are on training batches.

    For 20 random batches: the rows of ``softmax(teacher_cos / tau)`` (the CSA/USA targets), their
    mean probability on the item itself (uniform would be ``1/B``), their effective number of
    neighbours ``exp(entropy)`` (``B`` is uniform) and the spread of off-diagonal cosines.
    """
    from cusa_train.losses import cosine_similarity_matrix

    rng = np.random.default_rng(0)
    batches = [b for _ in range(20) for b in epoch_batches(data, rng, batch_size)[:1]]
    out: dict[str, Any] = {"batch_size": batch_size, "teacher_tau": tau}
    for side in ("image", "text"):
        self_p, eff, cos_mean, cos_std = [], [], [], []
        for img_idx, cap_idx in batches:
            t_img, t_txt = data.gather("teachers", img_idx, cap_idx)
            sim = cosine_similarity_matrix(t_img if side == "image" else t_txt)  # (B, B)
            p = torch.softmax(sim / tau, dim=1)
            n = sim.shape[0]
            self_p.append(float(p.diagonal().mean()))
            eff.append(float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum(1)).mean()))
            off = sim[~torch.eye(n, dtype=torch.bool)]
            cos_mean.append(float(off.mean()))
            cos_std.append(float(off.std()))
        name = getattr(data.teachers, side).spec.get("name")
        out[side] = {
            "teacher": name,
            "self_probability": round(statistics.fmean(self_p), 5),
            "uniform_probability": round(1.0 / batch_size, 5),
            "effective_neighbours": round(statistics.fmean(eff), 2),
            "offdiag_cosine_mean": round(statistics.fmean(cos_mean), 4),
            "offdiag_cosine_std": round(statistics.fmean(cos_std), 4),
        }
    return out


# ---- schedule choice on held-out train images --------------------------------------------------


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


# ---- aggregation, plot ------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = [float(x) for x in values]
    return {
        "mean": statistics.fmean(v),
        "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        "n": len(v),
    }


def aggregate(runs: dict[str, dict[int, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-variant mean ± std of every metric, and paired (same seed) differences from InfoNCE."""
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
    return agg, deltas


def plot_rsum(results: dict[str, Any], path: Path) -> None:
    """Left: RSUM per variant (mean ± std over seeds, dots = seeds). Right: paired Δ RSUM vs InfoNCE,
    ours next to the paper's Table 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["aggregate"])
    labels = [VARIANT_LABELS[v] for v in variants]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    means = [results["aggregate"][v]["rsum"]["mean"] for v in variants]
    stds = [results["aggregate"][v]["rsum"]["std"] for v in variants]
    colors = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728"][: len(variants)]
    ax.bar(labels, means, yerr=stds, capsize=6, color=colors, alpha=0.8)
    for x, v in enumerate(variants):
        pts = [r["metrics"]["rsum"] for r in results["runs"][v].values()]
        ax.scatter([x] * len(pts), pts, color="black", s=10, zorder=3)
    lo = min(
        min(m - s for m, s in zip(means, stds, strict=True)),
        min(r["metrics"]["rsum"] for v in variants for r in results["runs"][v].values()),
    )
    hi = max(
        max(m + s for m, s in zip(means, stds, strict=True)),
        max(r["metrics"]["rsum"] for v in variants for r in results["runs"][v].values()),
    )
    pad = max(2.0, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    n_seeds = len(next(iter(results["runs"].values())))
    ax.set_ylabel("RSUM on eval split (max 600)")
    ax.set_title(
        f"Ours: frozen towers, trained heads\nmean ± std over {n_seeds} seeds (dots: seeds)",
        fontsize=10,
    )

    others = [v for v in variants if v != "infonce" and v in results["deltas_vs_infonce"]]
    xs = np.arange(len(others))
    ours = [results["deltas_vs_infonce"][v]["rsum"]["mean"] for v in others]
    ours_err = [results["deltas_vs_infonce"][v]["rsum"]["std"] for v in others]
    paper = [PAPER_TABLE5_RSUM[v] - PAPER_TABLE5_RSUM["infonce"] for v in others]
    ax2.bar(
        xs - 0.18,
        ours,
        0.36,
        yerr=ours_err,
        capsize=5,
        label="ours (paired Δ, mean ± std)",
        color="#1f77b4",
    )
    ax2.bar(xs + 0.18, paper, 0.36, label="paper Table 5 (CLIP, MSCOCO)", color="#ff7f0e")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xticks(xs, [VARIANT_LABELS[v] for v in others])
    ax2.set_ylabel("Δ RSUM vs InfoNCE")
    ax2.set_title("Difference from InfoNCE", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle("CUSA vs InfoNCE on COCO (coco-example: 600 train / 201 eval images)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "numpy", "zarr", "sentence-transformers", "transformers", "cusa"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import subprocess

        out["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        out["git_commit"] = "unknown"
    out["torch_threads"] = str(torch.get_num_threads())
    out["cpu_count"] = str(os.cpu_count())
    return out


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


def _format_table(results: dict[str, Any]) -> str:
    lines = [
        f"{'variant':<9}{'RSUM':>16}{'Δ RSUM':>16}{'t2t R@1':>16}{'t2t mAP@R':>16}{'train s':>9}"
    ]
    for v, a in results["aggregate"].items():
        d = results["deltas_vs_infonce"].get(v)
        dr = f"{d['rsum']['mean']:+.2f}±{d['rsum']['std']:.2f}" if d else "-"
        lines.append(
            f"{v:<9}{a['rsum']['mean']:>10.2f}±{a['rsum']['std']:<5.2f}{dr:>16}"
            f"{a['t2t_r1']['mean']:>10.2f}±{a['t2t_r1']['std']:<5.2f}"
            f"{a['t2t_map_at_r']['mean']:>10.2f}±{a['t2t_map_at_r']['std']:<5.2f}{a['train_s']['mean']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--train", required=True, help="train dataset folder (ALBEF/CUSA layout) or name"
    )
    ap.add_argument("--eval", required=True, help="eval dataset folder or name")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--eval-split", default="val")
    ap.add_argument(
        "--store", default=None, help="feature store to fill (default: a temporary one)"
    )
    ap.add_argument("--seeds", type=int, default=5, help="seeds per variant (0..N-1)")
    ap.add_argument("--adapter", choices=("mlp", "none"), default="mlp")
    ap.add_argument("--no-tune", action="store_true", help="skip the held-out schedule choice")
    ap.add_argument("--epochs", type=int, default=None, help="with --no-tune: epochs")
    ap.add_argument("--lr", type=float, default=None, help="with --no-tune: learning rate")
    ap.add_argument("--out", default=str(RESULTS_JSON))
    ap.add_argument("--plot", default=str(PLOT_PNG))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "sentence_transformers", "cusa.extract"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
    tmp = None
    store = args.store
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="cusa_vs_infonce_")
        store = os.path.join(tmp.name, "store")
    try:
        results = run_experiment(cfg, store)
    finally:
        if tmp is not None:
            tmp.cleanup()
    results["config"]["store"] = "temporary" if args.store is None else args.store
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(out)
    plot_rsum(results, Path(args.plot))
    sys.stdout.write(_format_table(results) + "\n")
    sys.stdout.write(f"total {results['timings_s']['total']:.0f} s; wrote {out} and {args.plot}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
