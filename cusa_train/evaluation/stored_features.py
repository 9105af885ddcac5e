"""Stored student features: feature files (``.npz``, ``.npy`` + ids, ``.parquet``) and cusa
store groups, joined by sample id (caption ids are ``<image_id>#<k>``) and scored with
:func:`cusa_train.evaluation.scores.evaluate_features`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cusa.errors import ConfigError, DatasetError, StoreError
from cusa.readers import split_caption_id
from cusa.store import FeatureLookup
from cusa_train.evaluation.metrics import DEFAULT_KS
from cusa_train.evaluation.report import EvalReport
from cusa_train.evaluation.scores import evaluate_features


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
    lookup = FeatureLookup.open(store, dataset=dataset, split=split, teacher=group)
    if len(lookup) == 0:
        raise StoreError(f"store group {lookup.group.url!r} has no rows; extract it first")
    feats = lookup.gather_rows(np.arange(len(lookup))).astype(np.float32)
    return FeatureTable(list(lookup.ids), feats, None, str(lookup.group.url))


def image_id_of_caption(caption_id: str) -> str:
    """``"<image_id>#<k>"`` -> ``"<image_id>"`` (:func:`cusa.readers.split_caption_id`).

    Raises:
        DatasetError: not a caption id; the message says how to record the image ids instead.
    """
    try:
        return split_caption_id(caption_id)[0]
    except DatasetError as exc:
        raise DatasetError(
            f"{exc}; record the image id of each caption (an 'image_id' column or array) instead"
        ) from exc


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
