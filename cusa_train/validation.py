"""Evaluation of a model during training, on a split read through a dataset reader.

The trainer calls :func:`evaluate_split` after every epoch for each ``eval.splits`` entry, as the
official ``retrieval.py`` evaluates val and test after every epoch, and keeps the checkpoint with
the best ``eval.metric`` on ``eval.select_on``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cusa.errors import DatasetError, SampleError

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_split(
    model: Any,
    reader: Any,
    *,
    preprocess_image: Callable[[bytes], torch.Tensor],
    caption_transform: Callable[[str], str] | None = None,
    batch_size: int = 128,
    max_images: int | None = None,
) -> dict[str, float]:
    """Encode every image and caption of ``reader`` with ``model`` and score retrieval.

    Images are encoded through the model's cross-modal heads (``model.encode_image``), captions
    after ``caption_transform`` (the same normalisation as training). A sample whose image cannot
    be decoded is an error here, not a skip: a score over a silently smaller set is not comparable.

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
        :func:`cusa_train.evaluate.evaluate_features`, cross-modal only.

    Raises:
        SampleError: an image cannot be read or decoded (the message names it).
        DatasetError: the split has no images.
    """
    from cusa_train.evaluate import evaluate_features

    was_training = model.training
    model.eval()
    image_ids: list[str] = []
    captions: list[str] = []
    image_ids_of_texts: list[str] = []
    image_rows: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush_images() -> None:
        if pending:
            image_rows.append(model.encode_image(torch.stack(pending)).float().cpu().numpy())
            pending.clear()

    try:
        for shard in reader.shards():
            for sample in reader.read(shard):
                if max_images is not None and len(image_ids) >= max_images:
                    break
                if sample.image is None:
                    raise SampleError(
                        f"cannot evaluate image {sample.image_id!r} of {reader!r}: {sample.image_error}"
                    )
                pending.append(preprocess_image(sample.image))
                image_ids.append(sample.image_id)
                for caption in sample.captions:
                    text = (
                        caption.decode("utf-8", errors="replace")
                        if isinstance(caption, bytes)
                        else caption
                    )
                    captions.append(caption_transform(text) if caption_transform else text)
                    image_ids_of_texts.append(sample.image_id)
                if len(pending) >= batch_size:
                    flush_images()
        flush_images()
        if not image_ids or not captions:
            raise DatasetError(f"{reader!r} has no images with captions to evaluate")
        text_rows = [
            model.encode_text(captions[s : s + batch_size]).float().cpu().numpy()
            for s in range(0, len(captions), batch_size)
        ]
    finally:
        model.train(was_training)
    report = evaluate_features(
        np.concatenate(image_rows),
        np.concatenate(text_rows),
        image_ids_of_texts,
        image_ids=image_ids,
        unimodal=False,
    )
    return dict(report.metrics)
