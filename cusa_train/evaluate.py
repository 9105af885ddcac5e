"""Evaluate a dual encoder: cross-modal, ECCV Caption, uni-modal retrieval and STS.

Three entry points, from cheapest to most complete:

- :func:`evaluate_features` scores features already in memory;
- :func:`evaluate_store` / :func:`load_features` score stored student features (``.npz``,
  ``.npy`` + ids, ``.parquet`` or a cusa store group);
- :func:`evaluate_model` / :func:`evaluate_checkpoint` encode a dataset with a student first.

Metric definitions live in :mod:`cusa_train.metrics`; everything is in percent except the STS
Spearman correlation, which stays in [-1, 1].
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError, StoreError
from cusa_train.metrics import (
    DEFAULT_KS,
    RetrievalScores,
    StsPairs,
    cross_modal_recall,
    label_retrieval_metrics,
    load_sts_pairs,
    rsum,
    similarity_metrics,
    sts_spearman,
)

log = logging.getLogger(__name__)

CAPTION_ID_SEP = "#"  # caption ids are ``<image_id>#<k>`` (cusa.extract.readers.base.caption_id)


# ---- report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """The result of one evaluation.

    Args:
        metrics: flat ``{name: value}``; percent for retrieval, [-1, 1] for ``sts_spearman``.
            Keys: ``i2t_r{K}``, ``t2i_r{K}``, ``rsum``, ``r_mean``;
            ``eccv_{i2t,t2i}_{map_at_r,r_precision,r1}``; ``i2i_r1``, ``i2i_map_at_r``
            (with image labels); ``t2t_r1``, ``t2t_map_at_r``; ``sts_spearman``.
        counts: sizes, e.g. ``num_images``, ``num_texts``, ``t2t_queries``, ``t2t_skipped``.
        info: how it was computed: ``ks``, ``eccv_gt``, ``i2i_positives``, ``t2t_positives``,
            ``sts_file`` and any caller metadata (``source``, ``model``...).
    """

    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        try:
            return self.metrics[key]
        except KeyError:
            raise KeyError(f"no metric {key!r}; this report has {sorted(self.metrics)}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"metrics", "counts", "info"}``."""
        return {
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "counts": {k: int(v) for k, v in self.counts.items()},
            "info": json.loads(json.dumps(self.info, default=str)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        return cls(dict(d["metrics"]), dict(d.get("counts", {})), dict(d.get("info", {})))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` (temporary name, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(p)

    def to_table(self) -> str:
        """A readable plain-text table of every metric present."""
        m, c, info = self.metrics, self.counts, self.info
        ks = [int(k) for k in info.get("ks", DEFAULT_KS)]
        lines: list[str] = []

        def row(label: str, values: Sequence[float | None]) -> str:
            cells = "".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in values)
            return f"  {label:<6}{cells}"

        lines.append(
            f"Cross-modal retrieval ({c.get('num_images', '?')} images, "
            f"{c.get('num_texts', '?')} captions)"
        )
        lines.append("  " + " " * 6 + "".join(f"{'R@' + str(k):>9}" for k in ks))
        for d in ("i2t", "t2i"):
            lines.append(row(d, [m.get(f"{d}_r{k}") for k in ks]))
        lines.append(
            f"  RSUM {m.get('rsum', float('nan')):.2f}   R-mean {m.get('r_mean', float('nan')):.2f}"
        )
        if any(k.startswith("eccv_") for k in m):
            lines.append("")
            lines.append(f"ECCV Caption metrics (ground truth: {info.get('eccv_gt', 'dataset')})")
            lines.append("  " + " " * 6 + "".join(f"{h:>9}" for h in ("mAP@R", "R-P", "R@1")))
            for d in ("i2t", "t2i"):
                lines.append(
                    row(d, [m.get(f"eccv_{d}_{x}") for x in ("map_at_r", "r_precision", "r1")])
                )
        if any(k.startswith(("i2i_", "t2t_")) for k in m):
            lines.append("")
            lines.append("Uni-modal retrieval")
            lines.append(
                "  " + " " * 6 + "".join(f"{h:>9}" for h in ("R@1", "mAP@R")) + "  positives"
            )
            for d in ("i2i", "t2t"):
                if f"{d}_r1" in m:
                    lines.append(
                        row(d, [m[f"{d}_r1"], m[f"{d}_map_at_r"]])
                        + f"  {info.get(f'{d}_positives', '')} ({c.get(f'{d}_queries', '?')} queries)"
                    )
                else:
                    lines.append(f"  {d:<6}{'not computed':>18}  {info.get(f'{d}_positives', '')}")
        if "sts_spearman" in m:
            lines.append("")
            lines.append(
                f"STS: Spearman {m['sts_spearman']:.4f} on {c.get('sts_pairs', '?')} pairs "
                f"({info.get('sts_file', '')})"
            )
        return "\n".join(lines)


# ---- explicit ground truth (ECCV Caption) ---------------------------------------------------


@dataclass(frozen=True)
class CaptionGroundTruth:
    """Positives of each query by row index, for ground truths with many positives per query.

    Args:
        i2t: ``{image_row: caption_rows}``; only these images are queried.
        t2i: ``{caption_row: image_rows}``; only these captions are queried.
        name: recorded in the report, e.g. ``"eccv"``.
    """

    i2t: dict[int, list[int]]
    t2i: dict[int, list[int]]
    name: str = "custom"


def eccv_ground_truth(
    image_coco_ids: Sequence[int], caption_coco_ids: Sequence[int]
) -> CaptionGroundTruth:
    """The ECCV Caption ground truth (Chun et al., ECCV 2022) mapped onto your rows.

    Reads the id-level ground truth shipped in the ``eccv-caption`` package (COCO 5k test
    images by COCO image id, captions by COCO annotation id). Queries that are not among your
    rows are dropped; positives that are not among your rows are dropped too.

    Args:
        image_coco_ids: the COCO image id of each image row.
        caption_coco_ids: the COCO caption annotation id of each text row.

    Raises:
        ConfigError: the ``eccv-caption`` package is not installed.
        DatasetError: none of your rows is part of the ECCV Caption query set.
    """
    try:
        from importlib.resources import files

        data = files("eccv_caption") / "data"
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the ECCV Caption ground truth needs the eccv-caption package: pip install eccv-caption"
        ) from exc
    i2t_raw = json.loads((data / "eccv_image_to_caption.json").read_text())
    t2i_raw = json.loads((data / "eccv_caption_to_image.json").read_text())
    img_row = {int(x): i for i, x in enumerate(image_coco_ids)}
    cap_row = {int(x): i for i, x in enumerate(caption_coco_ids)}
    i2t = {
        img_row[int(k)]: [cap_row[c] for c in v if c in cap_row]
        for k, v in i2t_raw.items()
        if int(k) in img_row
    }
    t2i = {
        cap_row[int(k)]: [img_row[i] for i in v if i in img_row]
        for k, v in t2i_raw.items()
        if int(k) in cap_row
    }
    i2t = {k: v for k, v in i2t.items() if v}
    t2i = {k: v for k, v in t2i.items() if v}
    if not i2t and not t2i:
        raise DatasetError(
            "none of the given images or captions is an ECCV Caption query (those are COCO 5k "
            "test items, by COCO image id and caption annotation id); evaluate without eccv_gt"
        )
    return CaptionGroundTruth(i2t, t2i, name="eccv")


def ground_truth_metrics(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    gt: CaptionGroundTruth,
) -> tuple[RetrievalScores, RetrievalScores]:
    """ECCV Caption metrics (mAP@R, R-Precision, R@1) of both directions under ``gt``.

    Only the queries in ``gt`` are scored, against the whole other side as gallery.

    Returns:
        ``(i2t, t2i)`` scores.
    """
    img = _features(image_features, "image_features")
    txt = _features(text_features, "text_features")
    return _gt_scores(img, txt, gt.i2t, (1,)), _gt_scores(txt, img, gt.t2i, (1,))


def _gt_scores(
    queries: torch.Tensor, gallery: torch.Tensor, gt: dict[int, list[int]], ks: Sequence[int]
) -> RetrievalScores:
    rows = sorted(gt)
    if not rows:
        raise DatasetError("the explicit ground truth has no query on this side")
    bad = [r for r in rows if not 0 <= r < queries.shape[0]] + [
        g for r in rows for g in gt[r] if not 0 <= g < gallery.shape[0]
    ]
    if bad:
        raise DatasetError(f"ground truth refers to row {bad[0]}, outside the features given")
    sim = queries[rows] @ gallery.T  # (Q, G) cosine
    mask = torch.zeros(sim.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, gt[r]] = True
    return similarity_metrics(sim, mask, ks=ks)


# ---- features -> report ---------------------------------------------------------------------


def _features(x: Any, name: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise DatasetError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise DatasetError(
            f"{name} is empty (shape {tuple(t.shape)}); there is nothing to evaluate"
        )
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t).all(dim=1)).nonzero()[0])
        raise DatasetError(f"{name} row {bad} has non-finite values; re-encode those samples")
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


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
    ks: Sequence[int] = DEFAULT_KS,
    unimodal: bool = True,
    chunk_size: int = 512,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Score image and text features of one dataset split.

    Args:
        image_features: ``(N_img, D)`` one row per image.
        text_features: ``(N_txt, D)`` one row per caption, any number of captions per image.
        image_ids_of_texts: ``N_txt`` image ids, one per caption (image row indices when
            ``image_ids`` is None).
        image_ids: ``N_img`` ids of the image rows.
        image_labels: class label of each image; enables image->image retrieval.
        text_labels: class label of each caption for text->text retrieval; by default the
            positives of a caption are the other captions of its image (COCO protocol).
        eccv_gt: an explicit ground truth (see :func:`eccv_ground_truth`) for the ECCV metrics;
            by default they use the dataset's own pairs.
        sts: the result of :func:`evaluate_sts`, merged into the report.
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
    img = _features(image_features, "image_features")
    txt = _features(text_features, "text_features")
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

    # ECCV Caption metrics: mAP@R, R-Precision, R@1 (definitions in cusa_train.metrics).
    if eccv_gt is None:
        e_i2t, e_t2i = i2t, t2i
        info_out["eccv_gt"] = "dataset pairs"
        if 1 not in ks:
            e_i2t, e_t2i = cross_modal_recall(img, txt, t2i_rows, ks=(1,), normalize=False)
    else:
        e_i2t, e_t2i = ground_truth_metrics(img, txt, eccv_gt)
        info_out["eccv_gt"] = eccv_gt.name
        counts["eccv_i2t_queries"], counts["eccv_t2i_queries"] = (
            e_i2t.num_queries,
            e_t2i.num_queries,
        )
    for d, s in (("i2t", e_i2t), ("t2i", e_t2i)):
        metrics[f"eccv_{d}_map_at_r"] = s.map_at_r
        metrics[f"eccv_{d}_r_precision"] = s.r_precision
        metrics[f"eccv_{d}_r1"] = s.recall[1]

    if unimodal:
        if image_labels is not None:
            i2i = _unimodal(img, image_labels, "image_labels", chunk_size)
            metrics["i2i_r1"], metrics["i2i_map_at_r"] = i2i.recall[1], i2i.map_at_r
            counts["i2i_queries"], counts["i2i_skipped"] = i2i.num_queries, i2i.num_skipped
            info_out["i2i_positives"] = "same class label"
        else:
            info_out["i2i_positives"] = "no image class labels given"
        labels = text_labels if text_labels is not None else t2i_rows
        if text_labels is None and np.bincount(t2i_rows).max() < 2:
            info_out["t2t_positives"] = "no image has 2 captions; text->text not computed"
        else:
            t2t = _unimodal(txt, labels, "text_labels", chunk_size)
            metrics["t2t_r1"], metrics["t2t_map_at_r"] = t2t.recall[1], t2t.map_at_r
            counts["t2t_queries"], counts["t2t_skipped"] = t2t.num_queries, t2t.num_skipped
            info_out["t2t_positives"] = (
                "same class label"
                if text_labels is not None
                else "other captions of the same image"
            )

    if sts is not None:
        metrics["sts_spearman"] = float(sts["spearman"])
        counts["sts_pairs"] = int(sts["num_pairs"])
        info_out["sts_file"] = sts.get("source", "")
    return EvalReport(metrics, counts, info_out)


def _unimodal(
    x: torch.Tensor, labels: Sequence[Any], name: str, chunk_size: int
) -> RetrievalScores:
    if len(labels) != x.shape[0]:
        raise DatasetError(f"got {len(labels)} {name} for {x.shape[0]} rows; give one per row")
    # The query itself is removed from the gallery; positives share its label.
    return label_retrieval_metrics(
        x, x, labels, labels, ks=(1,), exclude_self=True, normalize=False, chunk_size=chunk_size
    )


# ---- STS ------------------------------------------------------------------------------------


def evaluate_sts(
    encode_text: Callable[[list[str]], Any],
    pairs: StsPairs | str | os.PathLike,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Spearman correlation between cosine similarities of ``encode_text`` and gold scores.

    Args:
        encode_text: list of sentences -> ``(N, D)`` array or tensor.
        pairs: loaded pairs or a path for :func:`cusa_train.metrics.load_sts_pairs`.
        batch_size: sentences encoded at once.

    Returns:
        ``{"spearman": float in [-1, 1], "num_pairs": int, "source": str}``.
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

    rho = sts_spearman(enc(pairs.sentence1), enc(pairs.sentence2), pairs.scores)
    return {"spearman": rho, "num_pairs": len(pairs), "source": pairs.source}


# ---- stored features ------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureTable:
    """Feature rows and their sample ids, as read by :func:`load_features`."""

    ids: list[str]
    features: np.ndarray  # (N, D) float32
    image_ids: list[str] | None = None  # for captions: the image of each row, when recorded
    source: str = ""


def load_features(path: str | os.PathLike, *, ids: Sequence[str] | None = None) -> FeatureTable:
    """Read stored features with their ids.

    Formats:
        - ``.npz`` with arrays ``features`` (N, D) and ``ids`` (N,) strings, optionally
          ``image_ids`` (N,) for captions;
        - ``.npy`` (N, D) with ids from ``ids`` or a sibling ``<name>.ids.txt`` (one per line);
        - ``.parquet`` with columns ``id`` and ``features`` (list of floats), optionally ``image_id``.

    Raises:
        DatasetError: missing file, unknown format, missing ids, or a row count mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"feature file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        return _load_feature_file(p, suffix, ids)
    except DatasetError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DatasetError(
                f"feature file {str(p)!r} holds Python objects that need pickle to load; cusa "
                "never unpickles feature files — save plain numeric arrays (np.save of a float array)"
            ) from exc
        raise


def _load_feature_file(p: Path, suffix: str, ids: Any) -> FeatureTable:
    image_ids = None
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "features" not in z:
                raise DatasetError(f"{str(p)!r} has no 'features' array (has {sorted(z.files)})")
            feats = np.asarray(z["features"])
            file_ids = [str(x) for x in z["ids"]] if "ids" in z else None
            image_ids = [str(x) for x in z["image_ids"]] if "image_ids" in z else None
    elif suffix == ".npy":
        feats = np.load(p, allow_pickle=False)
        sidecar = p.with_name(p.stem + ".ids.txt")
        file_ids = sidecar.read_text(encoding="utf-8").splitlines() if sidecar.is_file() else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        for col in ("id", "features"):
            if col not in table.column_names:
                raise DatasetError(
                    f"{str(p)!r} has no column {col!r}; expected 'id' and 'features' "
                    f"(has {table.column_names})"
                )
        file_ids = [str(x) for x in table.column("id").to_pylist()]
        feats = np.asarray(table.column("features").to_pylist(), dtype=np.float32)
        if "image_id" in table.column_names:
            image_ids = [str(x) for x in table.column("image_id").to_pylist()]
    else:
        raise DatasetError(f"feature file {str(p)!r}: use .npz, .npy (+ .ids.txt) or .parquet")
    if ids is not None:
        file_ids = [str(x) for x in ids]
    if file_ids is None:
        raise DatasetError(
            f"{str(p)!r} holds no sample ids; write them to {p.stem}.ids.txt next to it "
            "(one per line, in row order) or use .npz with an 'ids' array"
        )
    if feats.ndim != 2 or feats.shape[0] != len(file_ids):
        raise DatasetError(
            f"{str(p)!r} has features of shape {feats.shape} but {len(file_ids)} ids; "
            "expected (num_ids, dim)"
        )
    return FeatureTable(file_ids, feats.astype(np.float32, copy=False), image_ids, str(p))


def load_store_features(
    store: str | os.PathLike | None, *, dataset: str, split: str, group: str
) -> FeatureTable:
    """Read every row of one cusa store group (``group`` = name, fingerprint or name@fp)."""
    from cusa.store.lookup import FeatureLookup

    lookup = FeatureLookup.open(store, dataset=dataset, split=split, teacher=group)
    if len(lookup) == 0:
        raise StoreError(f"store group {lookup.group.url!r} has no rows; extract it first")
    feats = lookup.gather_rows(np.arange(len(lookup))).astype(np.float32)
    return FeatureTable(list(lookup.ids), feats, None, str(lookup.group.url))


def image_id_of_caption(caption_id: str) -> str:
    """``"<image_id>#<k>"`` -> ``"<image_id>"``."""
    head, sep, tail = str(caption_id).rpartition(CAPTION_ID_SEP)
    if not sep or not head or not tail.isdigit():
        raise DatasetError(
            f"caption id {caption_id!r} is not of the form '<image_id>#<k>'; record the image "
            "id of each caption (an 'image_id' column or array) instead"
        )
    return head


def evaluate_tables(
    images: FeatureTable,
    texts: FeatureTable,
    *,
    sts: Mapping[str, Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    image_labels: Mapping[str, Any] | None = None,
    chunk_size: int = 512,
) -> EvalReport:
    """:func:`evaluate_features` on two id-keyed tables; captions are joined to images by id.

    Args:
        image_labels: optional ``{image_id: class}`` for image->image retrieval.
    """
    of_texts = texts.image_ids or [image_id_of_caption(c) for c in texts.ids]
    labels = None
    if image_labels is not None:
        missing = [i for i in images.ids if i not in image_labels]
        if missing:
            raise DatasetError(f"image {missing[0]!r} has no class label ({len(missing)} missing)")
        labels = [image_labels[i] for i in images.ids]
    return evaluate_features(
        images.features,
        texts.features,
        of_texts,
        image_ids=images.ids,
        image_labels=labels,
        sts=sts,
        ks=ks,
        chunk_size=chunk_size,
        info={"image_source": images.source, "text_source": texts.source},
    )


def evaluate_store(
    image_features: str | os.PathLike | FeatureTable,
    text_features: str | os.PathLike | FeatureTable,
    *,
    store: str | os.PathLike | None = None,
    dataset: str | None = None,
    split: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 512,
) -> EvalReport:
    """Evaluate stored student features.

    Args:
        image_features: a feature file (see :func:`load_features`) or, with ``store``, the name
            (or ``name@fingerprint``) of the image group in the cusa store.
        text_features: likewise for captions; caption ids are ``<image_id>#<k>``.
        store: a cusa store URL; then ``dataset`` and ``split`` are required.
        ks: recall cut-offs.
        chunk_size: queries scored at once.
    """
    tables = []
    for side in (image_features, text_features):
        if isinstance(side, FeatureTable):
            tables.append(side)
        elif store is not None:
            if not dataset or not split:
                raise ConfigError("reading features from a store needs dataset and split")
            tables.append(load_store_features(store, dataset=dataset, split=split, group=str(side)))
        else:
            tables.append(load_features(side))
    return evaluate_tables(tables[0], tables[1], ks=ks, chunk_size=chunk_size)


# ---- model -> features -> report ------------------------------------------------------------


@runtime_checkable
class EvalEncoder(Protocol):
    """What :func:`evaluate_model` needs from a model (the built-in student has it).

    A :class:`cusa_train.wrapper.CusaModel` qualifies too: its ``encode_*`` go through the
    cross-modal heads and ``preprocess_image`` is taken from its ``student``.
    """

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> ``(3, H, W)`` float tensor."""
        ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)`` joint-space embeddings."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``B`` captions -> ``(B, D)`` joint-space embeddings."""
        ...


@dataclass(frozen=True)
class CaptionDataset:
    """Images and their captions in evaluation order (images in first-appearance order)."""

    image_ids: list[str]
    image_paths: list[Path]
    captions: list[str]
    image_ids_of_texts: list[str]
    source: str = ""


def load_caption_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
) -> CaptionDataset:
    """Read an ALBEF/CUSA caption JSON (records ``{image_path|image, caption, image_id}``).

    Args:
        path: the JSON file (a list with one record per caption).
        image_root: folder the image paths are relative to; default the JSON's folder.
        max_images: keep only the first N images (in order of first appearance) and their captions.
    """
    p = Path(path)
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"caption file {str(p)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"caption file {str(p)!r} is not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise DatasetError(f"caption file {str(p)!r} must be a non-empty JSON list of records")
    root = Path(image_root) if image_root is not None else p.parent
    image_ids: list[str] = []
    paths: dict[str, Path] = {}
    captions: list[str] = []
    of_texts: list[str] = []
    for n, rec in enumerate(records):
        try:
            iid, rel, cap = (
                str(rec["image_id"]),
                rec.get("image_path", rec.get("image")),
                rec["caption"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(
                f"{str(p)!r} record {n}: expected keys image_id, image_path (or image), caption"
            ) from exc
        if rel is None:
            raise DatasetError(f"{str(p)!r} record {n} (image {iid!r}) has no image_path")
        if iid not in paths:
            if max_images is not None and len(image_ids) >= max_images:
                continue
            image_ids.append(iid)
            paths[iid] = root / rel
        captions.append(str(cap))
        of_texts.append(iid)
    return CaptionDataset(image_ids, [paths[i] for i in image_ids], captions, of_texts, str(p))


def encode_dataset(
    model: EvalEncoder, data: CaptionDataset, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Encode every image and caption of ``data`` with ``model`` (no grad, eval mode).

    Returns:
        ``(image_features (N_img, D), text_features (N_txt, D))`` float32.

    Raises:
        SampleError: an image file cannot be decoded (the message names it).
    """
    from cusa.errors import SampleError

    # A CusaModel wrapper encodes through its heads but preprocesses like its student.
    prep = getattr(model, "preprocess_image", None) or getattr(
        getattr(model, "student", None), "preprocess_image", None
    )
    if prep is None:
        raise ConfigError(
            f"model {type(model).__name__!r} has no preprocess_image(bytes) -> (3, H, W) tensor "
            "(nor has its .student); add one so images can be encoded for evaluation"
        )
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    img_out, txt_out = [], []
    try:
        with torch.no_grad():
            for s in range(0, len(data.image_paths), batch_size):
                batch = []
                for path in data.image_paths[s : s + batch_size]:
                    try:
                        batch.append(prep(Path(path).read_bytes()))
                    except (OSError, SampleError) as exc:
                        raise SampleError(f"cannot evaluate image {str(path)!r}: {exc}") from exc
                img_out.append(model.encode_image(torch.stack(batch)).float().cpu().numpy())
            for s in range(0, len(data.captions), batch_size):
                txt_out.append(
                    model.encode_text(data.captions[s : s + batch_size]).float().cpu().numpy()
                )
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return np.concatenate(img_out), np.concatenate(txt_out)


def evaluate_model(
    model: EvalEncoder,
    data: CaptionDataset | str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    batch_size: int = 32,
    sts_pairs: StsPairs | str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Encode a caption dataset with ``model`` and evaluate it (plus STS when pairs are given).

    Args:
        model: anything with ``preprocess_image``, ``encode_image`` and ``encode_text``.
        data: a :class:`CaptionDataset` or an ALBEF/CUSA caption JSON path.
        image_root: folder of the images (default: the JSON's folder).
        max_images: evaluate only the first N images and their captions.
        batch_size: items encoded at once.
        sts_pairs: an STS pairs file scored with ``model.encode_text``.
        ks: recall cut-offs.
        info: extra metadata recorded in the report.
    """
    if not isinstance(data, CaptionDataset):
        data = load_caption_json(data, image_root=image_root, max_images=max_images)
    img, txt = encode_dataset(model, data, batch_size=batch_size)
    sts = None
    if sts_pairs is not None:
        sts = evaluate_sts(model.encode_text, sts_pairs, batch_size=batch_size)
    return evaluate_features(
        img,
        txt,
        data.image_ids_of_texts,
        image_ids=data.image_ids,
        sts=sts,
        ks=ks,
        info={"dataset": data.source, **dict(info or {})},
    )


# ---- checkpoints ----------------------------------------------------------------------------


def load_checkpoint_model(
    path: str | os.PathLike, *, student: torch.nn.Module | None = None
) -> torch.nn.Module:
    """Rebuild the trained :class:`cusa_train.wrapper.CusaModel` from a ``cusa train`` checkpoint.

    The checkpoint (read by :func:`cusa_train.trainer.load_checkpoint`, ``weights_only=True``)
    holds ``"config"`` (``TrainConfig.to_dict()``) and ``"model"`` (the CusaModel ``state_dict``).

    Args:
        path: the checkpoint file.
        student: the student module when it is not a registered one (the trainer was given it
            directly); by default it is built from ``config.model``.

    Raises:
        ConfigError: the file is missing, unreadable, not a checkpoint, or does not fit its model.
        WeightsError: the student's pretrained towers cannot be built.
    """
    from cusa_train.config import TrainConfig
    from cusa_train.student import build_student
    from cusa_train.trainer import load_checkpoint
    from cusa_train.wrapper import CusaModel

    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    if student is None:
        student = build_student(config.model.student, **config.model.student_options)
    model = CusaModel(
        student,
        config.loss,
        embed_dim=config.model.embed_dim,
        head_init_std=config.model.head_init_std,
        gather=False,
    )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ConfigError(
            f"checkpoint {str(path)!r} does not fit the model its config describes: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: CaptionDataset | str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    batch_size: int = 32,
    sts_pairs: StsPairs | str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    student: torch.nn.Module | None = None,
) -> EvalReport:
    """Load a trainer checkpoint (:func:`load_checkpoint_model`) and run :func:`evaluate_model`.

    Retrieval uses the cross-modal head embeddings; STS uses the text side of the same space.
    """
    model = load_checkpoint_model(checkpoint, student=student)
    return evaluate_model(
        model,
        data,
        image_root=image_root,
        max_images=max_images,
        batch_size=batch_size,
        sts_pairs=sts_pairs,
        ks=ks,
        info={"checkpoint": str(checkpoint)},
    )


# ---- one entry point for the CLI ------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """What ``cusa eval`` was asked to do; exactly one source of features.

    Args:
        checkpoint: a trainer checkpoint; encodes ``data`` with it.
        data: ALBEF/CUSA caption JSON to encode (with ``checkpoint``).
        image_features: stored image features (a file, or a group name with ``store``).
        text_features: stored caption features (likewise).
        store: cusa store URL holding the feature groups (with ``dataset`` and ``split``).
        dataset: store dataset name.
        split: store split name.
        image_root: folder of the images of ``data``.
        max_images: evaluate only the first N images of ``data``.
        batch_size: items encoded at once.
        sts: STS pairs file (needs ``checkpoint``: features alone cannot encode new sentences).
        ks: recall cut-offs.
    """

    checkpoint: str | None = None
    data: str | None = None
    image_features: str | None = None
    text_features: str | None = None
    store: str | None = None
    dataset: str | None = None
    split: str | None = None
    image_root: str | None = None
    max_images: int | None = None
    batch_size: int = 32
    sts: str | None = None
    ks: tuple[int, ...] = DEFAULT_KS

    def __post_init__(self) -> None:
        has_feats = self.image_features is not None or self.text_features is not None
        if (self.checkpoint is None) == (not has_feats):
            raise ConfigError(
                "give either --checkpoint (with --data) or --image-features and --text-features"
            )
        if self.checkpoint is not None and self.data is None:
            raise ConfigError("--checkpoint needs --data, the caption JSON to encode and score")
        if has_feats and (self.image_features is None or self.text_features is None):
            raise ConfigError("stored features need both --image-features and --text-features")
        if has_feats and self.sts is not None:
            raise ConfigError(
                "--sts needs --checkpoint: stored features cannot encode new sentences"
            )
        if self.store is not None and not (self.dataset and self.split):
            raise ConfigError("--store needs --dataset and --split to find the feature groups")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1, got {self.max_images!r}")


def run_evaluation(config: EvalConfig) -> EvalReport:
    """Run what ``config`` describes and return the report."""
    if config.checkpoint is not None:
        return evaluate_checkpoint(
            config.checkpoint,
            config.data,  # type: ignore[arg-type]  # checked in EvalConfig
            image_root=config.image_root,
            max_images=config.max_images,
            batch_size=config.batch_size,
            sts_pairs=config.sts,
            ks=config.ks,
        )
    return evaluate_store(
        config.image_features,  # type: ignore[arg-type]
        config.text_features,  # type: ignore[arg-type]
        store=config.store,
        dataset=config.dataset,
        split=config.split,
        ks=config.ks,
    )
