"""ECCV Caption (Chun et al., ECCV 2022): its ground truth mapped onto an eval set's rows, the
recognition of the COCO 5K test split it is defined on, and its metrics (mAP@R, R-Precision,
R@1) under any explicit ground truth.

The id-level ground truth comes from the ``eccv-caption`` package (COCO image ids and caption
annotation ids; no images, no captions).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError
from cusa_train.evaluation.metrics import (
    RetrievalScores,
    as_features,
    l2_normalize,
    similarity_metrics,
)


@dataclass(frozen=True)
class CaptionGroundTruth:
    """Positives of each query by row index, for ground truths with many positives per query.

    Args:
        i2t: ``{image_row: caption_rows}``; only these images are queried.
        t2i: ``{caption_row: image_rows}``; only these captions are queried.
        name: ``"eccv"`` for the ECCV Caption ground truth (reported as ``eccv_*``); any other
            name is reported as ``gt_*``.
        text_gallery: caption rows that image queries search (default: every caption).
        image_gallery: image rows that caption queries search (default: every image).
    """

    i2t: dict[int, list[int]]
    t2i: dict[int, list[int]]
    name: str = "custom"
    text_gallery: list[int] | None = None
    image_gallery: list[int] | None = None


def _eccv_data() -> Any:
    try:
        return files("eccv_caption") / "data"
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the ECCV Caption ground truth needs the eccv-caption package: pip install eccv-caption"
        ) from exc


def _eccv_json(name: str) -> dict[int, list[int]]:
    raw = json.loads((_eccv_data() / name).read_text())
    return {int(k): [int(x) for x in v] for k, v in raw.items()}


def coco_5k_test_ids() -> tuple[set[int], set[int]]:
    """The COCO image ids and caption annotation ids of the COCO 5K (Karpathy) test split, as
    the ``eccv-caption`` package ships them (5,000 images, 25,000 captions)."""
    i2t = _eccv_json("original_image_to_caption.json")
    return set(i2t), {c for v in i2t.values() for c in v}


def eccv_ground_truth(
    image_coco_ids: Sequence[int], caption_coco_ids: Sequence[int]
) -> CaptionGroundTruth:
    """The ECCV Caption ground truth (Chun et al., ECCV 2022) mapped onto your rows.

    Reads the id-level ground truth shipped in the ``eccv-caption`` package (COCO 5k test
    images by COCO image id, captions by COCO annotation id). Queries that are not among your
    rows are dropped; positives that are not among your rows are dropped too. Image queries
    search only the captions of the package's 25,000 COCO 5K caption ids, as the official
    ECCV evaluation does (the Karpathy split has 10 more).

    Args:
        image_coco_ids: the COCO image id of each image row.
        caption_coco_ids: the COCO caption annotation id of each text row.

    Raises:
        ConfigError: the ``eccv-caption`` package is not installed.
        DatasetError: none of your rows is part of the ECCV Caption query set.
    """
    i2t_raw = _eccv_json("eccv_image_to_caption.json")
    t2i_raw = _eccv_json("eccv_caption_to_image.json")
    _, test_captions = coco_5k_test_ids()
    img_row = {int(x): i for i, x in enumerate(image_coco_ids)}
    cap_row = {int(x): i for i, x in enumerate(caption_coco_ids)}
    i2t = {
        img_row[k]: [cap_row[c] for c in v if c in cap_row]
        for k, v in i2t_raw.items()
        if k in img_row
    }
    t2i = {
        cap_row[k]: [img_row[i] for i in v if i in img_row]
        for k, v in t2i_raw.items()
        if k in cap_row
    }
    i2t = {k: v for k, v in i2t.items() if v}
    t2i = {k: v for k, v in t2i.items() if v}
    if not i2t and not t2i:
        raise DatasetError(
            "none of the given images or captions is an ECCV Caption query (those are COCO 5k "
            "test items, by COCO image id and caption annotation id); evaluate without eccv_gt"
        )
    text_gallery = sorted(r for c, r in cap_row.items() if c in test_captions)
    full = len(text_gallery) == len(cap_row)
    return CaptionGroundTruth(i2t, t2i, "eccv", None if full else text_gallery, None)


_COCO_FILE = re.compile(r"(?:COCO_(?:train|val|test)2014_)?(\d{12})\.jpg$")


def coco_image_id(image_id: str, image_path: str | os.PathLike = "") -> int | None:
    """The COCO image id of an image: its id when that is a number, else the number in a COCO
    file name (``COCO_val2014_000000391895.jpg`` or ``000000391895.jpg``); ``None`` otherwise."""
    text = str(image_id)
    if text.isdigit():
        return int(text)
    for cand in (Path(text).name, Path(str(image_path)).name):
        match = _COCO_FILE.search(cand)
        if match:
            return int(match.group(1))
    return None


def detect_eccv(
    image_ids: Sequence[str],
    image_paths: Sequence[str | os.PathLike] | None,
    caption_ann_ids: Sequence[int | None] | None,
) -> tuple[CaptionGroundTruth | None, str]:
    """The ECCV Caption ground truth when the eval set is the COCO 5K test split.

    The split is recognised by its images: exactly the 5,000 COCO image ids of the Karpathy
    test split (the ids the ``eccv-caption`` package ships). Captions need their COCO caption
    annotation ids (Karpathy's ``dataset_coco.json`` has them as ``sentid``).

    Args:
        image_ids: the id of each image (a COCO id, or a COCO file name).
        image_paths: the file of each image, consulted when an id is neither; or None.
        caption_ann_ids: the COCO annotation id of each caption, when known.

    Returns:
        ``(ground truth, "")``, or ``(None, why not)``.
    """
    try:
        test_images, _ = coco_5k_test_ids()
    except ConfigError as exc:
        return None, str(exc)
    paths = [""] * len(image_ids) if image_paths is None else image_paths
    coco = [coco_image_id(i, p) for i, p in zip(image_ids, paths, strict=True)]
    known = {x for x in coco if x is not None}
    if None in coco or known != test_images or len(coco) != len(test_images):
        inside = len(known & test_images)
        return None, (
            f"the eval set is not the COCO 5K test split ({len(coco)} images, {inside} of them "
            "in it); ECCV Caption is defined on exactly those 5,000 images"
        )
    if caption_ann_ids is None or any(a is None for a in caption_ann_ids):
        return None, (
            "COCO 5K test images, but the captions carry no COCO annotation ids; evaluate "
            "Karpathy's dataset_coco.json (its sentids are the annotation ids)"
        )
    return eccv_ground_truth([int(x) for x in coco], [int(a) for a in caption_ann_ids]), ""  # type: ignore[arg-type]


def ground_truth_metrics(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    gt: CaptionGroundTruth,
) -> tuple[RetrievalScores, RetrievalScores]:
    """ECCV Caption metrics (mAP@R, R-Precision, R@1) of both directions under ``gt``.

    Only the queries in ``gt`` are scored, against the gallery rows of ``gt`` (default: the
    whole other side).

    Returns:
        ``(i2t, t2i)`` scores.
    """
    img = l2_normalize(as_features(image_features, "image_features"))
    txt = l2_normalize(as_features(text_features, "text_features"))
    return (
        _gt_scores(img, txt, gt.i2t, gt.text_gallery),
        _gt_scores(txt, img, gt.t2i, gt.image_gallery),
    )


def _gt_scores(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    gt: dict[int, list[int]],
    gallery_rows: list[int] | None,
) -> RetrievalScores:
    rows = sorted(gt)
    if not rows:
        raise DatasetError("the explicit ground truth has no query on this side")
    bad = [r for r in rows if not 0 <= r < queries.shape[0]] + [
        g for r in rows for g in gt[r] if not 0 <= g < gallery.shape[0]
    ]
    if bad:
        raise DatasetError(f"ground truth refers to row {bad[0]}, outside the features given")
    cols = list(range(gallery.shape[0])) if gallery_rows is None else list(gallery_rows)
    col_of = {g: j for j, g in enumerate(cols)}
    sim = queries[rows] @ gallery[cols].T  # (Q, G) cosine
    mask = torch.zeros(sim.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, [col_of[g] for g in gt[r] if g in col_of]] = True
    return similarity_metrics(sim, mask, ks=(1,))
