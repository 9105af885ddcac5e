"""Evaluate a dual encoder: cross-modal retrieval, ECCV Caption, uni-modal retrieval and STS.

Entry points, from cheapest to most complete:

- :func:`evaluate_features` scores features already in memory;
- :func:`evaluate_store` / :func:`load_features` score stored student features (``.npz``,
  ``.npy`` + ids, ``.parquet`` or a cusa store group);
- :func:`evaluate_model` / :func:`evaluate_checkpoint` encode a caption dataset with a model
  first, through the cross-modal head and, when the model has them, the USA (uni-modal) heads;
- :func:`evaluate_image_benchmarks` and :func:`evaluate_sts_benchmarks` run the paper's
  uni-modal benchmarks (CUB, SOP, In-Shop, iNaturalist, Cars; SentEval STS12-16, STS-B,
  SICK-R) with the official protocols.

Metric definitions live in :mod:`cusa_train.metrics`. Retrieval numbers are percentages; the
``sts_spearman`` of a pairs file stays in [-1, 1]; the SentEval STS numbers are Spearman x 100,
as the official script prints them and the paper reports them.

Metric keys without a suffix come from the features given, i.e. the cross-modal head of a
model; the suffix ``_usa`` marks the same metric through the USA head (the official choice for
uni-modal retrieval and STS).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError, SampleError, StoreError
from cusa_train.metrics import (
    DEFAULT_KS,
    RetrievalScores,
    StsPairs,
    cross_modal_recall,
    label_retrieval_metrics,
    load_sts_pairs,
    nearest_neighbour_rank1,
    rsum,
    similarity_metrics,
    sts_spearman,
)

log = logging.getLogger(__name__)

CAPTION_ID_SEP = "#"  # caption ids are ``<image_id>#<k>`` (cusa.extract.readers.base.caption_id)
USA = "_usa"  # suffix of metrics computed through the USA (uni-modal) heads
TASKS = ("retrieval", "image-retrieval", "sts")
CAPTION_MODES = ("raw", "pre_caption")


# ---- report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """The result of one evaluation.

    Args:
        metrics: flat ``{name: value}``; percent for retrieval, [-1, 1] for ``sts_spearman``,
            Spearman x 100 for the SentEval tasks. Keys (``_usa``: through the USA head):

            - cross-modal: ``i2t_r{K}``, ``t2i_r{K}``, ``rsum``, ``r_mean`` (= RSUM / 6, the
              official model-selection number);
            - on the dataset's own pairs: ``{i2t,t2i}_{map_at_r,r_precision}``;
            - ECCV Caption (only on the COCO 5K test split, real ground truth):
              ``eccv_{i2t,t2i}_{map_at_r,r_precision,r1}``; another explicit ground truth:
              ``gt_{i2t,t2i}_{map_at_r,r_precision,r1}``;
            - uni-modal: ``i2i_r1``, ``i2i_map_at_r`` (with image labels), ``t2t_r1``,
              ``t2t_map_at_r``, and their ``_usa`` twins;
            - STS pairs file: ``sts_spearman``, ``sts_spearman_usa``;
            - image retrieval benchmarks: ``{cub,sop,inshop,inat,cars}_r1`` (+ ``_usa``),
              ``image_avg_r1`` (+ ``_usa``);
            - SentEval: ``sts12`` ... ``sts16``, ``stsb``, ``sickr``, ``sts_avg`` (+ ``_usa``).
        counts: sizes, e.g. ``num_images``, ``num_texts``, ``t2t_queries``, ``cub_queries``.
        info: how it was computed: ``task``, ``ks``, ``heads``, ``eccv``, ``i2i_positives``,
            ``t2t_positives``, ``sts_file`` and any caller metadata (``checkpoint``...).
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
        lines: list[str] = []

        def cells(values: Sequence[float | None], width: int = 9) -> str:
            return "".join(f"{'-' if v is None else f'{v:.2f}':>{width}}" for v in values)

        def row(label: str, values: Sequence[float | None]) -> str:
            return f"  {label:<6}{cells(values)}"

        def header(names: Sequence[str], pad: int = 6) -> str:
            return "  " + " " * pad + "".join(f"{h:>9}" for h in names)

        def section(title: str) -> None:
            if lines:
                lines.append("")
            lines.append(title)

        if "rsum" in m:
            ks = [int(k) for k in info.get("ks", DEFAULT_KS)]
            section(
                f"Cross-modal retrieval ({c.get('num_images', '?')} images, "
                f"{c.get('num_texts', '?')} captions)"
                + (f" - {info['benchmark']}" if info.get("benchmark") else "")
            )
            lines.append(header([f"R@{k}" for k in ks]))
            for d in ("i2t", "t2i"):
                lines.append(row(d, [m.get(f"{d}_r{k}") for k in ks]))
            lines.append(f"  RSUM {m['rsum']:.2f}   R-mean {m.get('r_mean', float('nan')):.2f}")
        if "i2t_map_at_r" in m:
            section("mAP@R and R-Precision on the dataset's own pairs (not ECCV Caption)")
            lines.append(header(("mAP@R", "R-P")))
            for d in ("i2t", "t2i"):
                lines.append(row(d, [m.get(f"{d}_map_at_r"), m.get(f"{d}_r_precision")]))
        for prefix, title in (
            ("eccv", "ECCV Caption (COCO 5K test, ground truth of the eccv-caption package)"),
            ("gt", f"Explicit ground truth {info.get('gt', '')!r}"),
        ):
            if any(k.startswith(prefix + "_") for k in m):
                section(title)
                lines.append(header(("mAP@R", "R-P", "R@1")))
                for d in ("i2t", "t2i"):
                    keys = ("map_at_r", "r_precision", "r1")
                    lines.append(row(d, [m.get(f"{prefix}_{d}_{x}") for x in keys]))
        if "rsum" in m and info.get("eccv") and not any(k.startswith("eccv_") for k in m):
            lines.append(f"  ECCV Caption: not computed ({info['eccv']})")

        two = any(k.endswith(USA) for k in m)  # a USA column exists
        cols = ("USA head", "cross") if two else ("cross",)
        if any(k.startswith(("i2i_", "t2t_")) for k in m):
            section("Uni-modal retrieval" + (" (USA head: the official protocol)" if two else ""))
            sub = [f"{x} {h.split()[0]}" for h in cols for x in ("R@1", "mAP@R")]
            lines.append("  " + " " * 6 + "".join(f"{h:>13}" for h in sub) + "  positives")
            for d in ("i2i", "t2t"):
                if f"{d}_r1" not in m:
                    lines.append(f"  {d:<6}{'not computed':>18}  {info.get(f'{d}_positives', '')}")
                    continue
                vals = []
                for sfx in (USA, "") if two else ("",):
                    vals += [m.get(f"{d}_r1{sfx}"), m.get(f"{d}_map_at_r{sfx}")]
                lines.append(
                    f"  {d:<6}{cells(vals, 13)}  {info.get(f'{d}_positives', '')} "
                    f"({c.get(f'{d}_queries', '?')} queries)"
                )
        if "sts_spearman" in m:
            section(f"STS pairs file {info.get('sts_file', '')} ({c.get('sts_pairs', '?')} pairs)")
            lines.append(header(cols, 10))
            vals = [m.get("sts_spearman_usa"), m["sts_spearman"]] if two else [m["sts_spearman"]]
            lines.append(f"  {'Spearman':<10}" + "".join(f"{v:>9.4f}" for v in vals))

        bench = info.get("image_benchmarks") or []
        if bench:
            section("Image retrieval, rank-1 (official evaluation_img.py protocol)")
            lines.append(header(cols, 26))
            for name in bench:
                title = info.get("image_benchmark_titles", {}).get(name, name)
                vals = [m.get(f"{name}_r1{USA}"), m.get(f"{name}_r1")] if two else [m[f"{name}_r1"]]
                lines.append(f"  {title:<26}{cells(vals)}")
            if "image_avg_r1" in m:
                vals = (
                    [m.get(f"image_avg_r1{USA}"), m["image_avg_r1"]] if two else [m["image_avg_r1"]]
                )
                lines.append(f"  {'Avg.':<26}{cells(vals)}")
        sts_tasks = info.get("sts_tasks") or []
        if sts_tasks:
            section("STS, Spearman x 100 (SentEval; official aggregation)")
            lines.append(header(cols, 18))
            for key, name in sts_tasks:
                vals = [m.get(f"{key}{USA}"), m.get(key)] if two else [m.get(key)]
                lines.append(f"  {name:<18}{cells(vals)}")
            if "sts_avg" in m:
                vals = [m.get(f"sts_avg{USA}"), m["sts_avg"]] if two else [m["sts_avg"]]
                lines.append(f"  {'Avg.':<18}{cells(vals)}")
        if info.get("heads") and not two and (bench or sts_tasks or "t2t_r1" in m):
            lines.append(f"  ({info['heads']})")
        return "\n".join(lines)


# ---- explicit ground truth (ECCV Caption) ---------------------------------------------------


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
        from importlib.resources import files

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
    image_paths: Sequence[str | os.PathLike],
    caption_ann_ids: Sequence[int | None] | None,
) -> tuple[CaptionGroundTruth | None, str]:
    """The ECCV Caption ground truth when the eval set is the COCO 5K test split.

    The split is recognised by its images: exactly the 5,000 COCO image ids of the Karpathy
    test split (the ids the ``eccv-caption`` package ships). Captions need their COCO caption
    annotation ids (Karpathy's ``dataset_coco.json`` has them as ``sentid``).

    Returns:
        ``(ground truth, "")``, or ``(None, why not)``.
    """
    try:
        test_images, _ = coco_5k_test_ids()
    except ConfigError as exc:
        return None, str(exc)
    coco = [coco_image_id(i, p) for i, p in zip(image_ids, image_paths, strict=True)]
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
    img = _features(image_features, "image_features")
    txt = _features(text_features, "text_features")
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
            u_img = _features(usa_image_features, "usa_image_features")
            u_txt = _features(usa_text_features, "usa_text_features")
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
    cross-modal heads, its USA heads give the ``_usa`` columns, and ``preprocess_image`` is
    taken from its ``student``.
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


NO_USA_HEADS = "cross-modal head only: this model has no USA (uni-modal) heads (loss.usa was off)"
NOT_CUSA = "the model's own joint space only (not a CusaModel, so there are no USA heads)"


class HeadEncoder:
    """Encodes through every head a model has: ``"cross"`` always, ``"usa"`` when present.

    For a :class:`cusa_train.wrapper.CusaModel` the student runs once per batch and both heads
    read its output. Any other :class:`EvalEncoder` has one head, ``"cross"`` (its own
    ``encode_image`` / ``encode_text``). Inputs go to the device of the model's parameters.

    Args:
        model: the model.
        workers: threads decoding and preprocessing images.
    """

    def __init__(self, model: Any, *, workers: int | None = None) -> None:
        from cusa_train.wrapper import CusaModel

        self.model = model
        self.cusa = model if isinstance(model, CusaModel) else None
        has_usa = (
            self.cusa is not None
            and self.cusa.uni_image_head is not None
            and self.cusa.uni_text_head is not None
        )
        self.heads: tuple[str, ...] = ("cross", "usa") if has_usa else ("cross",)
        if has_usa:
            self.note = "usa+cross: USA (uni-modal) heads and the cross-modal head"
        else:
            self.note = NO_USA_HEADS if self.cusa is not None else NOT_CUSA
        params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
        self.device = next((p.device for p in params), torch.device("cpu"))
        self.workers = max(1, int(workers or min(8, os.cpu_count() or 1)))

    def preprocess(self) -> Callable[[bytes], torch.Tensor]:
        # A CusaModel wrapper encodes through its heads but preprocesses like its student.
        prep = getattr(self.model, "preprocess_image", None) or getattr(
            getattr(self.model, "student", None), "preprocess_image", None
        )
        if prep is None:
            raise ConfigError(
                f"model {type(self.model).__name__!r} has no preprocess_image(bytes) -> (3, H, W) "
                "tensor (nor has its .student); add one so images can be encoded for evaluation"
            )
        return prep

    def image_batch(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = pixels.to(self.device)
        if self.cusa is None:
            return {"cross": self.model.encode_image(pixels)}
        feats = self.cusa.student.encode_image(pixels)  # (B, image_dim) backbone, once
        out = {"cross": self.cusa.cross_image_head(feats)}
        if "usa" in self.heads:
            out["usa"] = self.cusa.uni_image_head(feats)  # type: ignore[misc]
        return out

    def text_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.cusa is None:
            return {"cross": self.model.encode_text(texts)}
        feats = self.cusa.student.encode_text(texts)  # (B, text_dim) backbone, once
        out = {"cross": self.cusa.cross_text_head(feats)}
        if "usa" in self.heads:
            out["usa"] = self.cusa.uni_text_head(feats)  # type: ignore[misc]
        return out

    def _pixel_batches(self, paths: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
        prep = self.preprocess()

        def load(path: Path) -> torch.Tensor:
            try:
                return prep(Path(path).read_bytes())
            except (OSError, SampleError) as exc:
                raise SampleError(f"cannot evaluate image {str(path)!r}: {exc}") from exc

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for s in range(0, len(paths), batch_size):
                yield torch.stack(list(pool.map(load, paths[s : s + batch_size])))

    def encode_images(self, paths: Sequence[Path], batch_size: int = 32) -> dict[str, np.ndarray]:
        """Every image through every head: ``{head: (N, D) float32}`` (no grad, eval mode)."""
        parts: dict[str, list[np.ndarray]] = {h: [] for h in self.heads}
        with self._eval_mode(), torch.no_grad():
            for pixels in self._pixel_batches(paths, batch_size):
                for h, t in self.image_batch(pixels).items():
                    parts[h].append(t.float().cpu().numpy())
        return {h: np.concatenate(v) for h, v in parts.items()}

    def encode_texts(self, texts: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
        """Every text through every head: ``{head: (N, D) float32}`` (no grad, eval mode)."""
        parts: dict[str, list[np.ndarray]] = {h: [] for h in self.heads}
        with self._eval_mode(), torch.no_grad():
            for s in range(0, len(texts), batch_size):
                for h, t in self.text_batch(list(texts[s : s + batch_size])).items():
                    parts[h].append(t.float().cpu().numpy())
        return {h: np.concatenate(v) for h, v in parts.items()}

    def _eval_mode(self) -> _EvalMode:
        return _EvalMode(self.model)


class _EvalMode:
    """Put a module in eval mode for a block and restore its training flag afterwards."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        if hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training and hasattr(self.model, "train"):
            self.model.train()


@dataclass(frozen=True)
class CaptionDataset:
    """Images and their captions in evaluation order (images in first-appearance order).

    Args:
        image_ids: one id per image.
        image_paths: the image files.
        captions: every caption.
        image_ids_of_texts: the image id of each caption.
        source: the file it was read from.
        caption_ann_ids: the COCO caption annotation id of each caption when known (Karpathy's
            ``sentid``); needed for the ECCV Caption ground truth.
        benchmark: a name for the split when it is recognised, e.g. ``"Flickr30K 1K test"``.
    """

    image_ids: list[str]
    image_paths: list[Path]
    captions: list[str]
    image_ids_of_texts: list[str]
    source: str = ""
    caption_ann_ids: list[int | None] | None = None
    benchmark: str = ""


def load_caption_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    split: str = "test",
) -> CaptionDataset:
    """Read a caption file: the ALBEF/CUSA layout or a Karpathy split file.

    - ALBEF/CUSA: a JSON list of records ``{image_path | image, caption, image_id}``; ``caption``
      may be a list (ALBEF's test files) and ``image_id`` may be absent (then the file name is
      the id).
    - Karpathy (``dataset_coco.json`` / ``dataset_flickr30k.json``): an object with ``images``;
      the ``split`` images are read (``test``: COCO 5K, Flickr30K 1K), image paths are
      ``<filepath>/<filename>``, COCO image ids are ``cocoid`` and caption annotation ids
      ``sentid``.

    Args:
        path: the JSON file.
        image_root: folder the image paths are relative to; default the JSON's folder.
        max_images: keep only the first N images (in order of first appearance) and their captions.
        split: the Karpathy split to read (ignored for ALBEF/CUSA files).
    """
    p = Path(path)
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"caption file {str(p)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"caption file {str(p)!r} is not valid JSON: {exc}") from exc
    root = Path(image_root) if image_root is not None else p.parent
    if isinstance(records, dict) and isinstance(records.get("images"), list):
        return _load_karpathy(p, records["images"], root, split, max_images)
    if not isinstance(records, list) or not records:
        raise DatasetError(
            f"caption file {str(p)!r} must be a non-empty JSON list of records (ALBEF/CUSA) or "
            "a Karpathy split file (an object with 'images')"
        )
    image_ids: list[str] = []
    paths: dict[str, Path] = {}
    captions: list[str] = []
    of_texts: list[str] = []
    for n, rec in enumerate(records):
        try:
            rel = rec.get("image_path", rec.get("image"))
            caps = rec["caption"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(
                f"{str(p)!r} record {n}: expected keys image_path (or image), caption, image_id"
            ) from exc
        if not isinstance(rel, str) or not rel:
            raise DatasetError(f"{str(p)!r} record {n} has no image_path (or image)")
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DatasetError(
                f"{str(p)!r} record {n}: caption must be a string or a list of strings"
            )
        iid = str(rec["image_id"]) if rec.get("image_id") is not None else Path(rel).name
        if iid not in paths:
            if max_images is not None and len(image_ids) >= max_images:
                continue
            image_ids.append(iid)
            paths[iid] = root / rel
        captions.extend(caps)
        of_texts.extend([iid] * len(caps))
    return CaptionDataset(image_ids, [paths[i] for i in image_ids], captions, of_texts, str(p))


def _load_karpathy(
    p: Path, images: list[Any], root: Path, split: str, max_images: int | None
) -> CaptionDataset:
    selected = [im for im in images if isinstance(im, dict) and im.get("split") == split]
    if not selected:
        have = sorted({str(im.get("split")) for im in images if isinstance(im, dict)})
        raise DatasetError(f"{str(p)!r} has no {split!r} images (splits there: {', '.join(have)})")
    coco = all("cocoid" in im for im in selected)
    image_ids: list[str] = []
    paths: list[Path] = []
    captions: list[str] = []
    of_texts: list[str] = []
    ann_ids: list[int | None] = []
    for n, im in enumerate(selected[:max_images] if max_images else selected):
        try:
            iid = str(im["cocoid"]) if coco else str(im["filename"])
            rel = Path(str(im.get("filepath", ""))) / str(im["filename"])
            sents = [(str(s["raw"]), s.get("sentid")) for s in im["sentences"]]
        except (KeyError, TypeError) as exc:
            raise DatasetError(
                f"{str(p)!r}: {split} image {n} lacks {exc}; Karpathy entries need filename and "
                "sentences with raw"
            ) from exc
        image_ids.append(iid)
        paths.append(root / rel)
        for raw, sentid in sents:
            captions.append(raw)
            of_texts.append(iid)
            ann_ids.append(int(sentid) if coco and sentid is not None else None)
    n_img = len(selected)
    bench = ""
    if split == "test" and not max_images:
        if coco and n_img == 5000:
            bench = "COCO 5K test (Karpathy)"
        elif not coco and n_img == 1000:
            bench = "Flickr30K 1K test (Karpathy)"
    return CaptionDataset(
        image_ids, paths, captions, of_texts, str(p), ann_ids if coco else None, bench
    )


def _apply_captions(captions: Sequence[str], mode: str) -> list[str]:
    if mode not in CAPTION_MODES:
        raise ConfigError(f"captions must be one of {CAPTION_MODES}, got {mode!r}")
    if mode == "raw":
        return list(captions)
    from cusa.extract.teachers.text import pre_caption

    return [pre_caption(c) for c in captions]


def encode_dataset(
    model: EvalEncoder, data: CaptionDataset, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Encode every image and caption of ``data`` with ``model`` (no grad, eval mode).

    Returns:
        ``(image_features (N_img, D), text_features (N_txt, D))`` float32, the model's
        cross-modal (retrieval) embeddings.

    Raises:
        SampleError: an image file cannot be decoded (the message names it).
    """
    enc = HeadEncoder(model)
    return (
        enc.encode_images(data.image_paths, batch_size)["cross"],
        enc.encode_texts(data.captions, batch_size)["cross"],
    )


def evaluate_model(
    model: EvalEncoder,
    data: CaptionDataset | str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    split: str = "test",
    batch_size: int = 32,
    sts_pairs: StsPairs | str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    eccv: bool | None = None,
    captions: str = "raw",
    image_labels: Sequence[Any] | None = None,
    workers: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Encode a caption dataset with ``model`` and evaluate it (plus STS when pairs are given).

    Cross-modal retrieval uses the cross-modal head. Uni-modal retrieval and STS are reported
    through the cross-modal head and, when the model has them, through the USA heads
    (``_usa`` keys, the official protocol). ECCV Caption is added when the images are the COCO
    5K test split and the captions carry COCO annotation ids (a Karpathy ``dataset_coco.json``).

    Args:
        model: anything with ``preprocess_image``, ``encode_image`` and ``encode_text``, e.g.
            a :class:`cusa_train.wrapper.CusaModel`.
        data: a :class:`CaptionDataset` or a caption file (:func:`load_caption_json`).
        image_root: folder of the images (default: the JSON's folder).
        max_images: evaluate only the first N images and their captions.
        split: the split of a Karpathy file.
        batch_size: items encoded at once.
        sts_pairs: an STS pairs file scored with the text tower.
        ks: recall cut-offs.
        eccv: ``None`` adds ECCV Caption when the split allows it (and says why not otherwise);
            ``True`` requires it; ``False`` skips it.
        captions: ``"raw"`` or ``"pre_caption"`` (the official caption normalisation, which the
            official evaluation applies to test captions; use what the model was trained with).
        image_labels: class label of each image, for image->image retrieval.
        workers: threads decoding images.
        info: extra metadata recorded in the report.
    """
    if not isinstance(data, CaptionDataset):
        data = load_caption_json(data, image_root=image_root, max_images=max_images, split=split)
    gt, why_not = (None, "skipped (eccv=False)")
    if eccv is not False:
        gt, why_not = detect_eccv(data.image_ids, data.image_paths, data.caption_ann_ids)
        if eccv and gt is None:
            raise DatasetError(f"ECCV Caption requested but {why_not}")
    enc = HeadEncoder(model, workers=workers)
    imgs = enc.encode_images(data.image_paths, batch_size)
    txts = enc.encode_texts(_apply_captions(data.captions, captions), batch_size)
    sts = None
    if sts_pairs is not None:
        pairs = sts_pairs if isinstance(sts_pairs, StsPairs) else load_sts_pairs(sts_pairs)
        e1 = enc.encode_texts(pairs.sentence1, batch_size)
        e2 = enc.encode_texts(pairs.sentence2, batch_size)
        rho = {h: sts_spearman(e1[h], e2[h], pairs.scores) for h in enc.heads}
        sts = {
            "spearman": rho["cross"],
            "num_pairs": len(pairs),
            "source": pairs.source,
            "usa": {"spearman": rho["usa"]} if "usa" in rho else None,
        }
    meta = {
        "task": "retrieval",
        "dataset": data.source,
        "captions": captions,
        "heads": enc.note,
        **({"benchmark": data.benchmark} if data.benchmark else {}),
        **({} if gt is not None else {"eccv": why_not}),
        **dict(info or {}),
    }
    return evaluate_features(
        imgs["cross"],
        txts["cross"],
        data.image_ids_of_texts,
        image_ids=data.image_ids,
        image_labels=image_labels,
        eccv_gt=gt,
        sts=sts,
        usa_image_features=imgs.get("usa"),
        usa_text_features=txts.get("usa"),
        ks=ks,
        info=meta,
    )


# ---- the paper's uni-modal benchmarks -------------------------------------------------------


def evaluate_image_benchmarks(
    model: EvalEncoder,
    names: str | Sequence[str],
    root: str | os.PathLike,
    *,
    batch_size: int = 128,
    workers: int | None = None,
    chunk_size: int = 1024,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Rank-1 image retrieval on the paper's benchmarks (Table 3), official layout and protocol.

    Each benchmark is read by :mod:`cusa_train.image_benchmarks`, encoded through every head
    of ``model`` and scored with :func:`cusa_train.metrics.nearest_neighbour_rank1`
    (Euclidean nearest neighbour on L2-normalised features; the query excluded; In-Shop:
    queries against the gallery).

    Args:
        model: the model (a CusaModel gives the USA column, the official one).
        names: benchmark names (``cub``, ``sop``, ``inshop``, ``inat``, ``cars``), a
            comma-separated string, or ``"all"`` (the paper's four).
        root: the folder holding ``cub/``, ``sop/``, ``inshop/``, ``inaturalist/``, ``cars/``
            (or, for a single benchmark, its own folder).
        batch_size: images encoded at once.
        workers: threads decoding images.
        chunk_size: queries scored at once.
        info: extra metadata recorded in the report.

    Returns:
        Metrics ``{name}_r1`` (cross-modal head), ``{name}_r1_usa`` (USA head) and, for two or
        more benchmarks, ``image_avg_r1`` (+ ``_usa``), the mean as the official script prints it.
    """
    from cusa_train.image_benchmarks import get_image_benchmark, parse_benchmark_names

    benches = [get_image_benchmark(n) for n in parse_benchmark_names(names)]
    splits = [b.open(root) for b in benches]  # read every index before encoding anything
    enc = HeadEncoder(model, workers=workers)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for bench, split in zip(benches, splits, strict=True):
        log.info("%s: encoding %d images", bench.title, split.num_images)
        feats = enc.encode_images(split.all_paths(), batch_size)
        nq = len(split.query_paths)
        for head, x in feats.items():
            sfx = USA if head == "usa" else ""
            gallery = None if split.gallery_paths is None else x[nq:]
            res = nearest_neighbour_rank1(
                x[:nq], split.query_labels, gallery, split.gallery_labels,
                chunk_size=chunk_size, device=enc.device,
            )  # fmt: skip
            metrics[f"{bench.name}_r1{sfx}"] = res.r1
        counts[f"{bench.name}_queries"] = nq
        counts[f"{bench.name}_gallery"] = len(split.gallery_paths or split.query_paths) - (
            0 if split.gallery_paths else 1
        )
        counts[f"{bench.name}_classes"] = split.num_classes
    if len(benches) > 1:
        for sfx in ("", USA) if "usa" in enc.heads else ("",):
            metrics[f"image_avg_r1{sfx}"] = float(
                np.mean([metrics[f"{b.name}_r1{sfx}"] for b in benches])
            )
    return EvalReport(
        metrics,
        counts,
        {
            "task": "image-retrieval",
            "root": str(root),
            "heads": enc.note,
            "image_benchmarks": [b.name for b in benches],
            "image_benchmark_titles": {b.name: b.title for b in benches},
            "protocols": {b.name: b.protocol for b in benches},
            "sources": {s.name: s.source for s in splits},
            **dict(info or {}),
        },
    )


def evaluate_sts_benchmarks(
    model: EvalEncoder,
    root: str | os.PathLike,
    *,
    tasks: str | Sequence[str] | None = None,
    batch_size: int = 128,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """SentEval STS12-16, STS-B and SICK-R (paper Table 4) through every text head of ``model``.

    Args:
        model: the model (a CusaModel gives the USA column, the official one).
        root: SentEval's data folder (holding ``downstream/STS`` and ``downstream/SICK``).
        tasks: a subset, e.g. ``"STS12,STSBenchmark"``; default all seven.
        batch_size: sentences encoded at once.
        info: extra metadata recorded in the report.

    Returns:
        Spearman x 100 per task (``sts12`` ... ``sickr``) and ``sts_avg``, as the official
        script prints them (see :mod:`cusa_train.sts_benchmarks`), plus ``_usa`` twins.
    """
    from cusa_train.sts_benchmarks import (
        load_sts_task,
        official_average,
        parse_sts_tasks,
        score_sts_task,
    )

    chosen = parse_sts_tasks(tasks)
    data = {t.name: load_sts_task(root, t) for t in chosen}  # every file before any encoding
    unique = sorted(
        {s for d in data.values() for p in d.values() for s in (*p.sentence1, *p.sentence2)}
    )
    enc = HeadEncoder(model)
    feats = enc.encode_texts(unique, batch_size)  # each distinct sentence once
    row = {s: i for i, s in enumerate(unique)}
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    details: dict[str, Any] = {}
    for head, x in feats.items():
        sfx = USA if head == "usa" else ""

        def embed(sentences: list[str], x: np.ndarray = x) -> np.ndarray:
            return x[[row[s] for s in sentences]]

        scores = {t.name: score_sts_task(t, data[t.name], embed) for t in chosen}
        for t in chosen:
            metrics[f"{t.key}{sfx}"] = scores[t.name].spearman
            counts[f"{t.key}_pairs"] = scores[t.name].num_pairs
        metrics[f"sts_avg{sfx}"] = official_average([scores[t.name].spearman for t in chosen])
        details[head] = {
            t.name: {"subsets": s.subsets, "mean": s.mean, "wmean": s.wmean}
            for t, s in ((t, scores[t.name]) for t in chosen)
        }
    return EvalReport(
        metrics,
        counts,
        {
            "task": "sts",
            "root": str(root),
            "heads": enc.note,
            "sts_tasks": [(t.key, t.name) for t in chosen],
            "sts_aggregation": "STS12-16: Spearman over all pairs of the year's subsets "
            "('all'); STS-B, SICK-R: the test split; Avg.: mean of the %.2f-rounded values",
            "sts_details": details,
            **dict(info or {}),
        },
    )


# ---- checkpoints ----------------------------------------------------------------------------


def load_checkpoint_model(
    path: str | os.PathLike,
    *,
    student: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Rebuild the trained :class:`cusa_train.wrapper.CusaModel` from a ``cusa train`` checkpoint.

    The checkpoint (read by :func:`cusa_train.trainer.load_checkpoint`, ``weights_only=True``)
    holds ``"config"`` (``TrainConfig.to_dict()``) and ``"model"`` (the CusaModel ``state_dict``).

    Args:
        path: the checkpoint file.
        student: the student module when it is not a registered one (the trainer was given it
            directly); by default it is built from ``config.model``.
        device: where to put the model (default: CPU).

    Raises:
        ConfigError: the file is missing, unreadable, not a checkpoint, or does not fit its model.
        WeightsError: the student's pretrained towers cannot be built.
    """
    return _load_checkpoint(path, student, device)[0]


def _load_checkpoint(
    path: str | os.PathLike, student: torch.nn.Module | None, device: str | torch.device | None
) -> tuple[torch.nn.Module, Any]:
    from cusa_train.config import TrainConfig
    from cusa_train.student import build_student_skeleton
    from cusa_train.trainer import load_checkpoint
    from cusa_train.wrapper import CusaModel

    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    if student is None:
        # The checkpoint holds the student's weights: no pretrained release is fetched first.
        student = build_student_skeleton(config.model.student, **config.model.student_options)
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
    if device is not None:
        model = model.to(device)
    return model.eval(), config


def _trained_captions(config: Any) -> str:
    """How the checkpoint's student read captions in training (``data.captions``)."""
    mode = getattr(getattr(config, "data", None), "captions", "raw")
    return mode if mode in CAPTION_MODES else "raw"


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: CaptionDataset | str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    split: str = "test",
    batch_size: int = 32,
    sts_pairs: StsPairs | str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    student: torch.nn.Module | None = None,
    eccv: bool | None = None,
    captions: str | None = None,
    device: str | torch.device | None = None,
    workers: int | None = None,
) -> EvalReport:
    """Load a trainer checkpoint (:func:`load_checkpoint_model`) and run :func:`evaluate_model`.

    ``captions=None`` reads the captions as the checkpoint's student read them in training
    (its config's ``data.captions``).
    """
    model, config = _load_checkpoint(checkpoint, student, device)
    captions = captions or _trained_captions(config)
    return evaluate_model(
        model,
        data,
        image_root=image_root,
        max_images=max_images,
        split=split,
        batch_size=batch_size,
        sts_pairs=sts_pairs,
        ks=ks,
        eccv=eccv,
        captions=captions,
        workers=workers,
        info={"checkpoint": str(checkpoint)},
    )


# ---- one entry point for the CLI ------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device: {exc}") from exc


@dataclass(frozen=True)
class EvalConfig:
    """What ``cusa eval`` was asked to do.

    Args:
        task: ``retrieval`` (image-text; a checkpoint with a caption file, or stored features),
            ``image-retrieval`` (the paper's image benchmarks) or ``sts`` (SentEval STS).
        checkpoint: a trainer checkpoint.
        data: caption file to encode (with ``checkpoint``, task ``retrieval``).
        image_features: stored image features (a file, or a group name with ``store``).
        text_features: stored caption features (likewise).
        store: cusa store URL holding the feature groups (with ``dataset`` and ``split``).
        dataset: store dataset name (stored features), or the benchmark names for
            ``image-retrieval`` (``cub,sop,inshop,inat,cars`` or ``all``).
        split: store split name, or the split of a Karpathy caption file (default ``test``).
        root: benchmark root (``image-retrieval``) or SentEval data folder (``sts``).
        image_root: folder of the images of ``data``.
        max_images: evaluate only the first N images of ``data``.
        batch_size: items encoded at once.
        sts: STS pairs file (needs ``checkpoint``: features alone cannot encode new sentences).
        sts_tasks: SentEval tasks for ``sts`` (default all seven).
        ks: recall cut-offs.
        eccv: ``None`` auto, ``True`` required, ``False`` off.
        captions: ``raw`` or ``pre_caption``, applied to the captions of ``data``; default:
            as the checkpoint's student read them in training.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        workers: threads decoding images.
    """

    task: str = "retrieval"
    checkpoint: str | None = None
    data: str | None = None
    image_features: str | None = None
    text_features: str | None = None
    store: str | None = None
    dataset: str | None = None
    split: str | None = None
    root: str | None = None
    image_root: str | None = None
    max_images: int | None = None
    batch_size: int = 32
    sts: str | None = None
    sts_tasks: str | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    eccv: bool | None = None
    captions: str | None = None
    device: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1, got {self.max_images!r}")
        if self.captions is not None and self.captions not in CAPTION_MODES:
            raise ConfigError(f"--captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if self.task == "retrieval":
            self._check_retrieval()
            return
        what = "--task image-retrieval" if self.task == "image-retrieval" else "--task sts"
        if self.checkpoint is None:
            raise ConfigError(f"{what} needs --checkpoint: the images or sentences are encoded")
        extra = [
            flag
            for flag, v in (
                ("--data", self.data), ("--image-features", self.image_features),
                ("--text-features", self.text_features), ("--store", self.store),
                ("--sts", self.sts),
            )
            if v is not None
        ]  # fmt: skip
        if extra:
            raise ConfigError(f"{what} takes no {', '.join(extra)}")
        if self.root is None:
            raise ConfigError(
                f"{what} needs --root: "
                + (
                    "the folder holding cub/, sop/, inshop/, inaturalist/ (official layout)"
                    if self.task == "image-retrieval"
                    else "SentEval's data folder (holding downstream/STS and downstream/SICK)"
                )
            )
        if self.task == "image-retrieval":
            if not self.dataset:
                raise ConfigError(
                    "--task image-retrieval needs --dataset: cub, sop, inshop, inat, cars, a "
                    "comma-separated list, or all"
                )
            from cusa_train.image_benchmarks import parse_benchmark_names

            parse_benchmark_names(self.dataset)
        else:
            from cusa_train.sts_benchmarks import parse_sts_tasks

            parse_sts_tasks(self.sts_tasks)

    def _check_retrieval(self) -> None:
        has_feats = self.image_features is not None or self.text_features is not None
        if (self.checkpoint is None) == (not has_feats):
            raise ConfigError(
                "give either --checkpoint (with --data) or --image-features and --text-features"
            )
        if self.checkpoint is not None and self.data is None:
            raise ConfigError(
                "--checkpoint needs --data, the caption file to encode and score (ALBEF/CUSA "
                "JSON or Karpathy dataset_coco.json / dataset_flickr30k.json)"
            )
        if has_feats and (self.image_features is None or self.text_features is None):
            raise ConfigError("stored features need both --image-features and --text-features")
        if has_feats and self.sts is not None:
            raise ConfigError(
                "--sts needs --checkpoint: stored features cannot encode new sentences"
            )
        if self.store is not None and not (self.dataset and self.split):
            raise ConfigError("--store needs --dataset and --split to find the feature groups")
        if self.root is not None:
            raise ConfigError(
                "--root is for --task image-retrieval and --task sts; give the images of "
                "--data with --image-root"
            )


def run_evaluation(config: EvalConfig) -> EvalReport:
    """Run what ``config`` describes and return the report."""
    if config.checkpoint is None:
        return evaluate_store(
            config.image_features,  # type: ignore[arg-type]  # checked in EvalConfig
            config.text_features,  # type: ignore[arg-type]
            store=config.store,
            dataset=config.dataset,
            split=config.split,
            ks=config.ks,
        )
    device = resolve_device(config.device)
    model, train_config = _load_checkpoint(config.checkpoint, None, device)
    meta = {"checkpoint": config.checkpoint, "device": str(device)}
    if config.task == "image-retrieval":
        return evaluate_image_benchmarks(
            model, config.dataset, config.root,  # type: ignore[arg-type]
            batch_size=config.batch_size, workers=config.workers, info=meta,
        )  # fmt: skip
    if config.task == "sts":
        return evaluate_sts_benchmarks(
            model, config.root, tasks=config.sts_tasks,  # type: ignore[arg-type]
            batch_size=config.batch_size, info=meta,
        )  # fmt: skip
    return evaluate_model(
        model,
        config.data,  # type: ignore[arg-type]
        image_root=config.image_root,
        max_images=config.max_images,
        split=config.split or "test",
        batch_size=config.batch_size,
        sts_pairs=config.sts,
        ks=config.ks,
        eccv=config.eccv,
        captions=config.captions or _trained_captions(train_config),
        workers=config.workers,
        info=meta,
    )
