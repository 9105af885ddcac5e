"""Encoding for evaluation: a model over a dataset reader (or image files, or sentences), through
every head it has.

:meth:`HeadEncoder.encode_reader` is the one path that turns a reader's split into features: the
per-epoch evaluation of the trainer (:mod:`cusa_train.evaluation.validation`) and ``cusa eval``
(:func:`cusa_train.evaluation.evaluate.evaluate_model`) both go through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError, SampleError
from cusa.readers import DatasetReader, Sample
from cusa.safe_files import MAX_IMAGE_BYTES, read_regular_file
from cusa_train.evaluation.data import CaptionDataset, CaptionDatasetReader
from cusa_train.wrapper import CusaModel

T = TypeVar("T")

HEADS = ("cross", "usa", "backbone")
NO_USA_HEADS = "cross-modal head only: this model has no USA (uni-modal) heads (loss.usa was off)"
BACKBONE_NOTE = (
    "backbone+cross: this model has no USA (uni-modal) heads (loss.usa was off), so the uni-modal "
    "column is the student's backbone features, what the official encode_*(cross_modal=False) "
    "returns for such a model"
)
NOT_CUSA = "the model's own joint space only (not a CusaModel, so there are no USA heads)"


@runtime_checkable
class EvalEncoder(Protocol):
    """What evaluation needs from a model (the built-in student has it).

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


@dataclass(frozen=True)
class EncodedSplit:
    """A reader's split encoded through each head, in the order the reader yields it.

    Args:
        image_ids: one id per image row.
        image_ids_of_texts: the image id of each caption row.
        captions: the captions as encoded (after the caption transform).
        caption_ann_ids: the COCO annotation id of each caption, or None when no caption has one.
        images: ``{head: (N_img, D) float32}``.
        texts: ``{head: (N_txt, D) float32}``.
    """

    image_ids: list[str]
    image_ids_of_texts: list[str]
    captions: list[str]
    caption_ann_ids: list[int | None] | None
    images: dict[str, np.ndarray]
    texts: dict[str, np.ndarray]


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


class HeadEncoder:
    """Encodes through every head a model has: ``"cross"`` always, ``"usa"`` when present.

    For a :class:`cusa_train.wrapper.CusaModel` the student runs once per batch and both heads
    read its output. Any other :class:`EvalEncoder` has one head, ``"cross"`` (its own
    ``encode_image`` / ``encode_text``). Inputs go to the device of the model's parameters; the
    model is in eval mode while it encodes and gets its training flag back afterwards.

    Args:
        model: the model.
        workers: threads decoding and preprocessing images.
        heads: encode only these of the model's heads (default: all it has).
        preprocess: image bytes -> ``(3, H, W)`` tensor; default the model's (or its
            student's) ``preprocess_image``.
        official_uni: also encode the features the official ``evaluation_img.py`` /
            ``evaluation_sts.py`` score, ``encode_*(cross_modal=False)``: for a CusaModel without
            USA heads that is the student's backbone output (head ``"backbone"``); with USA heads
            it is the USA head, encoded anyway. :attr:`uni_head` names it.
    """

    def __init__(
        self,
        model: Any,
        *,
        workers: int | None = None,
        heads: Sequence[str] | None = None,
        preprocess: Callable[[bytes], torch.Tensor] | None = None,
        official_uni: bool = False,
    ) -> None:
        unknown = sorted(set(heads or ()) - set(HEADS))
        if unknown:
            raise ConfigError(f"unknown head {unknown[0]!r}; heads are {HEADS}")
        self.model = model
        self.cusa = model if isinstance(model, CusaModel) else None
        has_usa = (
            self.cusa is not None
            and self.cusa.uni_image_head is not None
            and self.cusa.uni_text_head is not None
        )
        backbone = official_uni and self.cusa is not None and not has_usa
        own = ("cross", "usa") if has_usa else ("cross", "backbone") if backbone else ("cross",)
        self.heads: tuple[str, ...] = tuple(h for h in own if heads is None or h in heads)
        #: the head of the official uni-modal protocol (``encode_*(cross_modal=False)``), if any
        self.uni_head: str | None = next((h for h in ("usa", "backbone") if h in self.heads), None)
        if has_usa:
            self.note = "usa+cross: USA (uni-modal) heads and the cross-modal head"
        elif backbone:
            self.note = BACKBONE_NOTE
        else:
            self.note = NO_USA_HEADS if self.cusa is not None else NOT_CUSA
        params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
        self.device = next((p.device for p in params), torch.device("cpu"))
        self.workers = max(1, int(workers or min(8, os.cpu_count() or 1)))
        self._preprocess = preprocess

    def preprocess(self) -> Callable[[bytes], torch.Tensor]:
        """The image preprocessing: the one given, else the model's or its student's."""
        # A CusaModel wrapper encodes through its heads but preprocesses like its student.
        prep = (
            self._preprocess
            or getattr(self.model, "preprocess_image", None)
            or getattr(getattr(self.model, "student", None), "preprocess_image", None)
        )
        if prep is None:
            raise ConfigError(
                f"model {type(self.model).__name__!r} has no preprocess_image(bytes) -> (3, H, W) "
                "tensor (nor has its .student); add one so images can be encoded for evaluation"
            )
        return prep

    # ---- one batch --------------------------------------------------------------------------

    def image_batch(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{head: (B, D)}``."""
        pixels = pixels.to(self.device)
        if self.cusa is None:
            return {"cross": self.model.encode_image(pixels)}
        feats = self.cusa.student.encode_image(pixels)  # (B, image_dim) backbone, once
        return self._heads(feats, self.cusa.cross_image_head, self.cusa.uni_image_head)

    def text_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``B`` texts -> ``{head: (B, D)}``."""
        if self.cusa is None:
            return {"cross": self.model.encode_text(texts)}
        feats = self.cusa.student.encode_text(texts)  # (B, text_dim) backbone, once
        return self._heads(feats, self.cusa.cross_text_head, self.cusa.uni_text_head)

    def _heads(self, feats: torch.Tensor, cross: Any, usa: Any) -> dict[str, torch.Tensor]:
        out = {"cross": cross(feats)} if "cross" in self.heads else {}
        if "usa" in self.heads:
            out["usa"] = usa(feats)
        if "backbone" in self.heads:
            out["backbone"] = feats  # official encode_*(cross_modal=False) without USA heads
        return out

    # ---- many -------------------------------------------------------------------------------

    def encode_images(self, paths: Sequence[Path], batch_size: int = 32) -> dict[str, np.ndarray]:
        """Image files through every head: ``{head: (N, D) float32}`` (no grad, eval mode)."""
        prep = self.preprocess()

        def load(path: Path) -> torch.Tensor:
            # regular files <= MAX_IMAGE_BYTES only, as extraction (a FIFO never blocks)
            data, reason = read_regular_file(path, MAX_IMAGE_BYTES, what="image file")
            try:
                if data is None:
                    raise SampleError(reason)
                return prep(data)
            except (OSError, SampleError) as exc:
                raise SampleError(f"cannot evaluate image {str(path)!r}: {exc}") from exc

        return self._encode_images(paths, load, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
        """Every text through every head: ``{head: (N, D) float32}`` (no grad, eval mode)."""
        parts: dict[str, list[np.ndarray]] = {h: [] for h in self.heads}
        with _EvalMode(self.model), torch.no_grad():
            for batch in _batches(texts, batch_size):
                for h, t in self.text_batch(list(batch)).items():
                    parts[h].append(t.float().cpu().numpy())
        return _stack(parts, "texts")

    def encode_reader(
        self,
        reader: DatasetReader,
        *,
        batch_size: int = 32,
        max_images: int | None = None,
        caption_transform: Callable[[str], str] | None = None,
    ) -> EncodedSplit:
        """Every image and caption of a reader's split through every head.

        A sample whose image or captions cannot be read is an error here, not a skip: a score
        over a silently smaller set is not comparable.

        Args:
            reader: the split, e.g. from :func:`cusa_train.evaluation.data.open_eval_data`.
            batch_size: items encoded at once.
            max_images: encode only the first N images (in the reader's order).
            caption_transform: applied to each caption first (e.g. ``pre_caption``).

        Raises:
            SampleError: an image or a sample's captions cannot be read (the message names it).
            DatasetError: the split has no images with captions.
        """
        prep = self.preprocess()
        image_ids: list[str] = []
        of_texts: list[str] = []
        captions: list[str] = []
        ann_ids: list[int | None] = []

        def samples() -> Iterator[Sample]:
            for shard in reader.shards():
                for sample in reader.read(shard):
                    if max_images is not None and len(image_ids) >= max_images:
                        return
                    why = sample.image_error if sample.image is None else sample.caption_error
                    if why is not None or sample.image is None:
                        raise SampleError(
                            f"cannot evaluate sample {sample.image_id!r} of {reader!r}: {why}"
                        )
                    image_ids.append(sample.image_id)
                    anns = sample.caption_ann_ids or [None] * len(sample.captions)
                    for caption, ann in zip(sample.captions, anns, strict=True):
                        text = (
                            caption.decode("utf-8", errors="replace")
                            if isinstance(caption, bytes)
                            else caption
                        )
                        captions.append(caption_transform(text) if caption_transform else text)
                        of_texts.append(sample.image_id)
                        ann_ids.append(ann)
                    yield sample

        def load(sample: Sample) -> torch.Tensor:
            try:
                return prep(sample.image)  # type: ignore[arg-type]  # checked in samples()
            except SampleError as exc:
                raise SampleError(
                    f"cannot evaluate image {sample.image_id!r} of {reader!r}: {exc}"
                ) from exc

        images = self._encode_images(samples(), load, batch_size)
        if not image_ids or not captions:
            raise DatasetError(f"{reader!r} has no images with captions to evaluate")
        return EncodedSplit(
            image_ids=image_ids,
            image_ids_of_texts=of_texts,
            captions=captions,
            caption_ann_ids=ann_ids if any(a is not None for a in ann_ids) else None,
            images=images,
            texts=self.encode_texts(captions, batch_size),
        )

    def _encode_images(
        self, items: Iterable[T], load: Callable[[T], torch.Tensor], batch_size: int
    ) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {h: [] for h in self.heads}
        with (
            _EvalMode(self.model),
            torch.no_grad(),
            ThreadPoolExecutor(max_workers=self.workers) as pool,
        ):
            for batch in _batches(items, batch_size):
                pixels = torch.stack(list(pool.map(load, batch)))  # decoded in threads
                for h, t in self.image_batch(pixels).items():
                    parts[h].append(t.float().cpu().numpy())
        return _stack(parts, "images")


def _stack(parts: dict[str, list[np.ndarray]], what: str) -> dict[str, np.ndarray]:
    if not all(parts.values()):
        raise DatasetError(f"there are no {what} to encode")
    return {h: np.concatenate(v) for h, v in parts.items()}


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


def encode_dataset(
    model: EvalEncoder, data: CaptionDataset, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Encode every image and caption of ``data`` with ``model`` (no grad, eval mode).

    Returns:
        ``(image_features (N_img, D), text_features (N_txt, D))`` float32, the model's
        cross-modal (retrieval) embeddings, in the order of ``data.image_ids`` and
        ``data.captions``.

    Raises:
        SampleError: an image file cannot be decoded (the message names it).
    """
    reader = CaptionDatasetReader(data)
    split = HeadEncoder(model, heads=("cross",)).encode_reader(reader, batch_size=batch_size)
    texts = np.empty_like(split.texts["cross"])
    texts[reader.caption_order()] = split.texts["cross"]  # back to the order of data.captions
    return split.images["cross"], texts
