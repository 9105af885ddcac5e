"""The stored features both CUSA experiments train on: extraction, one split joined by id, batches.

1. **Extraction** (:func:`extract_job`, :func:`extract_features`): ``cusa.extract`` with the local
   runner on CPU fills the store with the teachers' and the student's towers' features.
2. **One split** (:class:`SplitFeatures`, :func:`load_split`): the towers' and the teachers'
   features of one split, joined by sample id; each caption row knows its image row.
3. **Batches** (:func:`epoch_batches`): one epoch of images, shuffled, one random caption each.
4. **Soft labels** (:func:`soft_label_stats`, :func:`soft_label_entropy`): how peaked the
   teachers' in-batch targets ``softmax(teacher_cos / tau)`` are on training batches.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.cusa_config import ExperimentConfig
from cusa.errors import StoreError
from cusa_train.data import TeacherFeatures
from cusa_train.losses import cosine_similarity_matrix

log = logging.getLogger("benchmarks.cusa_features")


# ---- extraction ----------------------------------------------------------------------------------


def extract_job(
    dataset: str,
    split: str,
    store: str,
    *,
    image_teacher: str,
    text_teacher: str,
    modalities: tuple[str, ...],
    batch_size: int,
    key: str,
) -> tuple[Any, float]:
    """One local CPU extraction into ``store``; returns its summary and its seconds.

    Raises:
        StoreError: the job reported failed samples (the message names ``key`` and the ledger).
    """
    from cusa.extract.runner import ExtractConfig, extract

    t0 = time.perf_counter()
    summary = extract(
        ExtractConfig(
            dataset=dataset,
            split=split,
            store=store,
            image_teacher=image_teacher,
            text_teacher=text_teacher,
            modalities=modalities,
            runner="local",
            device="cpu",
            batch_size=batch_size,
        )
    )
    seconds = time.perf_counter() - t0
    log.info("extracted %s in %.1f s: rows %s", key, seconds, summary.rows)
    if not summary.ok:
        raise StoreError(
            f"extraction {key} of {dataset!r} failed on {summary.total_failed} samples; "
            f"`cusa store verify --store {store}` lists the failed ids with their reasons"
        )
    return summary, seconds


def extract_features(cfg: ExperimentConfig, store: str) -> dict[str, Any]:
    """Fill ``store`` with the teachers' and the towers' features of both splits.

    Returns:
        ``{"<split>/<image model>+<text model>": {"seconds", "rows", "failed"}}`` per job, and
        ``"total_s"``.

    Raises:
        StoreError: a job reported failed samples (the message names the job and the ledger).
    """
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
            key = f"{split}/{image_model}+{text_model}"
            summary, seconds = extract_job(
                dataset,
                split,
                store,
                image_teacher=image_model,
                text_teacher=text_model,
                modalities=modalities,
                batch_size=cfg.extract_batch_size,
                key=key,
            )
            out[key] = {
                "seconds": round(seconds, 2),
                "rows": dict(summary.rows),
                "failed": dict(summary.failed),
            }
    out["total_s"] = round(time.perf_counter() - t_all, 2)
    return out


# ---- one split -----------------------------------------------------------------------------------


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
    from cusa.readers import open_dataset

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


# ---- batches and soft labels --------------------------------------------------------------------


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


def teacher_similarities(
    data: SplitFeatures, batch_size: int, n_batches: int = 20
) -> dict[str, list[Tensor]]:
    """The teachers' in-batch cosine similarities, ``{"image"|"text": [(B, B), ...]}``, over the
    first batch of ``n_batches`` epochs (one random caption per image, as in training; seed 0)."""
    rng = np.random.default_rng(0)
    batches = [epoch_batches(data, rng, batch_size)[0] for _ in range(n_batches)]
    sims: dict[str, list[Tensor]] = {"image": [], "text": []}
    for img_idx, cap_idx in batches:
        t_img, t_txt = data.gather("teachers", img_idx, cap_idx)  # (B, Ti), (B, Tt)
        sims["image"].append(cosine_similarity_matrix(t_img))
        sims["text"].append(cosine_similarity_matrix(t_txt))
    return sims


@torch.no_grad()
def soft_label_stats(data: SplitFeatures, batch_size: int, tau: float = 1.0) -> dict[str, Any]:
    """How peaked the teachers' soft labels are on training batches.

    For 20 random batches: the rows of ``softmax(teacher_cos / tau)`` (the CSA/USA targets), their
    mean probability on the item itself (uniform would be ``1/B``), their effective number of
    neighbours ``exp(entropy)`` (``B`` is uniform) and the spread of off-diagonal cosines.
    """
    out: dict[str, Any] = {"batch_size": batch_size, "teacher_tau": tau}
    for side, sims in teacher_similarities(data, batch_size).items():
        self_p, eff, cos_mean, cos_std = [], [], [], []
        for sim in sims:
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


@torch.no_grad()
def soft_label_entropy(
    data: SplitFeatures, taus: Sequence[float], batch_size: int, n_batches: int = 20
) -> dict[str, Any]:
    """Entropy of the rows of ``softmax(teacher_cos / τ)`` (the CSA/USA targets) per τ.

    Over ``n_batches`` training batches (one random caption per image, as in training): mean
    entropy in nats, ``exp(entropy)`` (effective neighbours; ``B`` is uniform) and the mean
    probability of the item itself (uniform is ``1/B``).
    """
    out: dict[str, Any] = {}
    for side, sims in teacher_similarities(data, batch_size, n_batches).items():
        b = sims[0].shape[0]
        per_tau = {}
        for tau in taus:
            ent, selfp = [], []
            for sim in sims:
                p = torch.softmax(sim / tau, dim=1)
                ent.append(float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()))
                selfp.append(float(p.diagonal().mean()))
            h = statistics.fmean(ent)
            per_tau[f"{tau:g}"] = {
                "entropy_nats": round(h, 4),
                "effective_neighbours": round(math.exp(h), 2),
                "self_probability": round(statistics.fmean(selfp), 4),
            }
        offdiag = torch.cat([s[~torch.eye(b, dtype=torch.bool)] for s in sims])
        out[side] = {
            "teacher": str(getattr(data.teachers, side).spec.get("name")),
            "batch_size": b,
            "uniform_entropy_nats": round(math.log(b), 4),
            "offdiag_cosine_mean": round(float(offdiag.mean()), 4),
            "offdiag_cosine_std": round(float(offdiag.std()), 4),
            "per_tau": per_tau,
        }
    return out
