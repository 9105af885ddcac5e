"""Evaluation of a model during training, on a split read through a dataset reader.

The trainer calls :func:`evaluate_split` after every epoch for each ``eval.splits`` entry, as the
official ``retrieval.py`` evaluates val and test after every epoch, and keeps the checkpoint with
the best ``eval.metric`` on ``eval.select_on``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cusa.readers import DatasetReader
from cusa_train.evaluation.encoding import HeadEncoder
from cusa_train.evaluation.scores import evaluate_features


def evaluate_split(
    model: Any,
    reader: DatasetReader,
    *,
    preprocess_image: Callable[[bytes], torch.Tensor],
    caption_transform: Callable[[str], str] | None = None,
    batch_size: int = 128,
    max_images: int | None = None,
) -> dict[str, float]:
    """Encode every image and caption of ``reader`` with ``model`` and score retrieval.

    Images and captions (after ``caption_transform``, the same normalisation as training) are
    encoded through the model's cross-modal heads by
    :meth:`cusa_train.evaluation.encoding.HeadEncoder.encode_reader`, the path ``cusa eval`` takes too.
    A sample whose image cannot be decoded is an error here, not a skip: a score over a silently
    smaller set is not comparable.

    Args:
        model: a :class:`cusa_train.wrapper.CusaModel` (or anything with ``encode_image`` /
            ``encode_text``).
        reader: a dataset reader of the split.
        preprocess_image: encoded bytes -> (3, H, W) tensor (the student's).
        caption_transform: applied to each caption first (e.g. ``pre_caption``).
        batch_size: items encoded at once.
        max_images: evaluate only the first N images.

    Returns:
        The retrieval metrics (``i2t_r1`` ... ``rsum``, ``r_mean``) of
        :func:`cusa_train.evaluation.scores.evaluate_features`, cross-modal only.

    Raises:
        SampleError: an image cannot be read or decoded (the message names it).
        DatasetError: the split has no images.
    """
    split = HeadEncoder(model, heads=("cross",), preprocess=preprocess_image).encode_reader(
        reader, batch_size=batch_size, max_images=max_images, caption_transform=caption_transform
    )
    report = evaluate_features(
        split.images["cross"],
        split.texts["cross"],
        split.image_ids_of_texts,
        image_ids=split.image_ids,
        unimodal=False,
    )
    return dict(report.metrics)
