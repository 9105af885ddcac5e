"""Score features of one split: cross-modal retrieval (R@K, RSUM, r_mean), mAP@R and
R-Precision on the dataset's own pairs, an explicit ground truth (ECCV Caption), uni-modal
retrieval through each head, and STS pairs. Features in, :class:`EvalReport` out; no model.

Metric definitions live in :mod:`cusa_train.evaluation.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError
from cusa_train.evaluation.eccv import CaptionGroundTruth, ground_truth_metrics
from cusa_train.evaluation.metrics import (
    DEFAULT_KS,
    RetrievalScores,
    StsPairs,
    as_features,
    cross_modal_recall,
    l2_normalize,
    label_retrieval_metrics,
    load_sts_pairs,
    rsum,
    sts_spearman,
)
from cusa_train.evaluation.report import USA, EvalReport


def text_to_image_rows(
    image_ids_of_texts: Sequence[Any], image_ids: Sequence[Any] | None, num_images: int
) -> np.ndarray:
    """Map each caption's image id to an image row; every image must have a caption.

    Raises:
        DatasetError: duplicate image ids, an id with no image row, or an image without captions.
    """
    if image_ids is None:
        idx = np.asarray(image_ids_of_texts)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DatasetError(
                "without image_ids, image_ids_of_texts must be integer image row indices; "
                "pass image_ids to map other ids"
            )
        out = idx.astype(np.int64)
        bad = np.flatnonzero((out < 0) | (out >= num_images))
        if bad.size:
            raise DatasetError(
                f"text row {int(bad[0])} points to image row {int(out[bad[0]])}, outside "
                f"0..{num_images - 1}"
            )
    else:
        ids = list(image_ids)
        if len(ids) != num_images:
            raise DatasetError(f"got {len(ids)} image ids for {num_images} image feature rows")
        row: dict[Any, int] = {}
        for i, x in enumerate(ids):
            if x in row:
                raise DatasetError(f"image id {x!r} appears twice (rows {row[x]} and {i})")
            row[x] = i
        out = np.empty(len(image_ids_of_texts), dtype=np.int64)
        for t, x in enumerate(image_ids_of_texts):
            try:
                out[t] = row[x]
            except KeyError:
                raise DatasetError(
                    f"text row {t} belongs to image id {x!r}, which is not among the "
                    f"{num_images} image ids; add its image or drop the caption"
                ) from None
    missing = np.setdiff1d(np.arange(num_images), out)
    if missing.size:
        first = missing[0] if image_ids is None else list(image_ids)[missing[0]]
        raise DatasetError(
            f"image {first!r} has no captions ({missing.size} images without captions); every "
            "image needs at least one caption for image->text retrieval - drop those images"
        )
    return out


def evaluate_features(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    image_ids_of_texts: Sequence[Any] | np.ndarray,
    *,
    image_ids: Sequence[Any] | None = None,
    image_labels: Sequence[Any] | None = None,
    text_labels: Sequence[Any] | None = None,
    eccv_gt: CaptionGroundTruth | None = None,
    sts: Mapping[str, Any] | None = None,
    usa_image_features: np.ndarray | torch.Tensor | None = None,
    usa_text_features: np.ndarray | torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    unimodal: bool = True,
    chunk_size: int = 512,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Score image and text features of one dataset split.

    Args:
        image_features: ``(N_img, D)`` one row per image (a model's cross-modal head).
        text_features: ``(N_txt, D)`` one row per caption, any number of captions per image.
        image_ids_of_texts: ``N_txt`` image ids, one per caption (image row indices when
            ``image_ids`` is None).
        image_ids: ``N_img`` ids of the image rows.
        image_labels: class label of each image; enables image->image retrieval.
        text_labels: class label of each caption for text->text retrieval; by default the
            positives of a caption are the other captions of its image (COCO protocol).
        eccv_gt: an explicit ground truth for mAP@R / R-Precision / R@1: the ECCV Caption one
            (see :func:`detect_eccv`, reported as ``eccv_*``) or your own (``gt_*``).
        sts: the result of :func:`evaluate_sts`, merged into the report; a ``"usa"`` entry in it
            adds ``sts_spearman_usa``.
        usa_image_features: ``(N_img, D')`` the same images through the USA head; adds the
            ``_usa`` uni-modal metrics.
        usa_text_features: ``(N_txt, D')`` the captions through the USA head.
        ks: recall cut-offs for cross-modal retrieval (RSUM sums them).
        unimodal: compute image->image / text->text retrieval.
        chunk_size: queries scored at once.
        info: extra metadata recorded in the report (source, model...).

    Returns:
        The :class:`EvalReport`.

    Raises:
        DatasetError: empty or non-finite features, mismatched shapes or ids, images without
            captions.
    """
    img = l2_normalize(as_features(image_features, "image_features"))
    txt = l2_normalize(as_features(text_features, "text_features"))
    if img.shape[1] != txt.shape[1]:
        raise DatasetError(
            f"image features have dimension {img.shape[1]} but text features have "
            f"{txt.shape[1]}; pass the student's joint-space embeddings of both modalities"
        )
    if len(image_ids_of_texts) != txt.shape[0]:
        raise DatasetError(
            f"got {len(image_ids_of_texts)} image ids of texts for {txt.shape[0]} text rows; "
            "give one per caption"
        )
    ks = tuple(int(k) for k in ks)
    t2i_rows = text_to_image_rows(image_ids_of_texts, image_ids, img.shape[0])
    i2t, t2i = cross_modal_recall(img, txt, t2i_rows, ks=ks, normalize=False, chunk_size=chunk_size)
    metrics: dict[str, float] = {}
    metrics.update({f"i2t_r{k}": v for k, v in i2t.recall.items()})
    metrics.update({f"t2i_r{k}": v for k, v in t2i.recall.items()})
    metrics["rsum"] = rsum(i2t, t2i, ks)
    metrics["r_mean"] = metrics["rsum"] / (2 * len(ks))
    counts = {"num_images": int(img.shape[0]), "num_texts": int(txt.shape[0])}
    info_out: dict[str, Any] = {"ks": list(ks), **dict(info or {})}

    # mAP@R and R-Precision with the dataset's own positives (an image's captions; a caption's
    # image). They are NOT the ECCV Caption metrics, whose positives were verified by people.
    for d, s in (("i2t", i2t), ("t2i", t2i)):
        metrics[f"{d}_map_at_r"] = s.map_at_r
        metrics[f"{d}_r_precision"] = s.r_precision
    if eccv_gt is not None:
        e_i2t, e_t2i = ground_truth_metrics(img, txt, eccv_gt)
        prefix = "eccv" if eccv_gt.name == "eccv" else "gt"
        info_out["gt" if prefix == "gt" else "eccv"] = (
            eccv_gt.name if prefix == "gt" else "ground truth of the eccv-caption package"
        )
        counts[f"{prefix}_i2t_queries"], counts[f"{prefix}_t2i_queries"] = (
            e_i2t.num_queries,
            e_t2i.num_queries,
        )
        for d, s in (("i2t", e_i2t), ("t2i", e_t2i)):
            metrics[f"{prefix}_{d}_map_at_r"] = s.map_at_r
            metrics[f"{prefix}_{d}_r_precision"] = s.r_precision
            metrics[f"{prefix}_{d}_r1"] = s.recall[1]

    if unimodal:
        heads: list[tuple[str, torch.Tensor, torch.Tensor]] = [("", img, txt)]
        if usa_image_features is not None or usa_text_features is not None:
            if usa_image_features is None or usa_text_features is None:
                raise ConfigError("give both usa_image_features and usa_text_features")
            u_img = l2_normalize(as_features(usa_image_features, "usa_image_features"))
            u_txt = l2_normalize(as_features(usa_text_features, "usa_text_features"))
            if u_img.shape[0] != img.shape[0] or u_txt.shape[0] != txt.shape[0]:
                raise DatasetError(
                    f"USA features have {u_img.shape[0]} image and {u_txt.shape[0]} text rows, "
                    f"the cross-modal ones {img.shape[0]} and {txt.shape[0]}"
                )
            heads.append((USA, u_img, u_txt))
        _unimodal_metrics(
            heads, image_labels, text_labels, t2i_rows, metrics, counts, info_out, chunk_size
        )

    if sts is not None:
        metrics["sts_spearman"] = float(sts["spearman"])
        if sts.get("usa") is not None:
            metrics["sts_spearman_usa"] = float(sts["usa"]["spearman"])
        counts["sts_pairs"] = int(sts["num_pairs"])
        info_out["sts_file"] = sts.get("source", "")
    return EvalReport(metrics, counts, info_out)


def _unimodal_metrics(
    heads: list[tuple[str, torch.Tensor, torch.Tensor]],
    image_labels: Sequence[Any] | None,
    text_labels: Sequence[Any] | None,
    t2i_rows: np.ndarray,
    metrics: dict[str, float],
    counts: dict[str, int],
    info: dict[str, Any],
    chunk_size: int,
) -> None:
    labels_t = text_labels if text_labels is not None else t2i_rows
    t2t_ok = text_labels is not None or np.bincount(t2i_rows).max() >= 2
    for sfx, img, txt in heads:
        if image_labels is not None:
            i2i = _unimodal(img, image_labels, "image_labels", chunk_size)
            metrics[f"i2i_r1{sfx}"], metrics[f"i2i_map_at_r{sfx}"] = i2i.recall[1], i2i.map_at_r
            counts["i2i_queries"], counts["i2i_skipped"] = i2i.num_queries, i2i.num_skipped
        if t2t_ok:
            t2t = _unimodal(txt, labels_t, "text_labels", chunk_size)
            metrics[f"t2t_r1{sfx}"], metrics[f"t2t_map_at_r{sfx}"] = t2t.recall[1], t2t.map_at_r
            counts["t2t_queries"], counts["t2t_skipped"] = t2t.num_queries, t2t.num_skipped
    info["i2i_positives"] = (
        "same class label" if image_labels is not None else "no image class labels given"
    )
    if not t2t_ok:
        info["t2t_positives"] = "no image has 2 captions; text->text not computed"
    else:
        info["t2t_positives"] = (
            "same class label" if text_labels is not None else "other captions of the same image"
        )


def _unimodal(
    x: torch.Tensor, labels: Sequence[Any], name: str, chunk_size: int
) -> RetrievalScores:
    if len(labels) != x.shape[0]:
        raise DatasetError(f"got {len(labels)} {name} for {x.shape[0]} rows; give one per row")
    # The query itself is removed from the gallery; positives share its label.
    return label_retrieval_metrics(
        x, x, labels, labels, ks=(1,), exclude_self=True, normalize=False, chunk_size=chunk_size
    )


def evaluate_sts(
    encode_text: Callable[[list[str]], Any],
    pairs: StsPairs | str | os.PathLike,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Spearman correlation between cosine similarities of ``encode_text`` and gold scores.

    Args:
        encode_text: list of sentences -> ``(N, D)`` array or tensor.
        pairs: loaded pairs or a path for :func:`cusa_train.evaluation.metrics.load_sts_pairs`.
        batch_size: sentences encoded at once.

    Returns:
        The ``sts`` argument of :func:`evaluate_features`: ``{"spearman": float in [-1, 1],
        "num_pairs": int, "source": str, "usa": None}``.
    """
    if not isinstance(pairs, StsPairs):
        pairs = load_sts_pairs(pairs)

    def enc(texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                e = encode_text(texts[s : s + batch_size])
                out.append(
                    e.detach().float().cpu().numpy()
                    if isinstance(e, torch.Tensor)
                    else np.asarray(e)
                )
        return np.concatenate(out)

    return sts_result(pairs, {"cross": enc(pairs.sentence1)}, {"cross": enc(pairs.sentence2)})


def sts_result(
    pairs: StsPairs, emb1: Mapping[str, np.ndarray], emb2: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The ``sts`` argument of :func:`evaluate_features` from each head's embeddings.

    Args:
        pairs: the pairs with their gold scores.
        emb1: ``{head: (N, D)}`` embeddings of the first sentences (``"cross"``, optionally
            ``"usa"``).
        emb2: the same for the second sentences.
    """
    rho = {head: sts_spearman(emb1[head], emb2[head], pairs.scores) for head in emb1}
    return {
        "spearman": rho["cross"],
        "num_pairs": len(pairs),
        "source": pairs.source,
        "usa": {"spearman": rho["usa"]} if "usa" in rho else None,
    }
