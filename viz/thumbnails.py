"""Thumbnails made from a dataset's images, and the captions that go with them.

Originals are never copied into a report: every picture is decoded, shrunk to at most
``max_side`` pixels and re-encoded as a small JPEG, then embedded as a ``data:`` URI.
"""

from __future__ import annotations

import base64
import io
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

from ..readers.base import DatasetReader, Sample

log = logging.getLogger(__name__)

THUMB_SIDE = 160
THUMB_QUALITY = 82


def make_thumbnail(data: bytes, max_side: int = THUMB_SIDE, quality: int = THUMB_QUALITY) -> bytes:
    """Decode encoded image bytes and return a JPEG of at most ``max_side`` pixels a side.

    Raises:
        OSError: the bytes are not a decodable image (PIL's ``UnidentifiedImageError`` is one).
    """
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (max_side * 2, max_side * 2))  # JPEG: decode at a reduced scale, fast
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` for embedding ``data`` in a self-contained page."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def caption_text(caption: str | bytes) -> str:
    """A caption as text; undecodable bytes are shown with replacement characters."""
    return caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else caption


@dataclass
class DatasetView:
    """Thumbnails and captions of the part of a dataset that a report shows.

    Attributes:
        thumbs: ``image_id -> data URI`` of the thumbnails made so far.
        thumb_errors: ``image_id -> reason`` for images that could not be shown.
        captions: ``caption_id -> text``.
        caption_image: ``caption_id -> image_id``.
        image_captions: ``image_id -> [caption_id, ...]`` in dataset order.
        pool: image ids of the pool, in the order they were read.
        missing_reason: why there are no thumbnails at all (no dataset given...), else None.
        scanned: images read from the dataset so far.
    """

    thumbs: dict[str, str] = field(default_factory=dict)
    thumb_errors: dict[str, str] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    caption_image: dict[str, str] = field(default_factory=dict)
    image_captions: dict[str, list[str]] = field(default_factory=dict)
    pool: list[str] = field(default_factory=list)
    missing_reason: str | None = None
    scanned: int = 0
    reader: DatasetReader | None = None
    max_side: int = THUMB_SIDE
    _shard_order: list = field(default_factory=list)
    _next_shard: int = 0

    @property
    def has_images(self) -> bool:
        return self.reader is not None

    @classmethod
    def without_dataset(cls, reason: str) -> DatasetView:
        """A view with no thumbnails or caption text; ``reason`` is shown on the page."""
        return cls(missing_reason=reason)

    @classmethod
    def from_reader(
        cls,
        reader: DatasetReader,
        pool_size: int,
        seed: int = 0,
        keep: Iterable[str] | None = None,
        max_side: int = THUMB_SIDE,
    ) -> DatasetView:
        """Read shards in a seeded random order until ``pool_size`` images are pooled.

        Args:
            reader: an open dataset reader.
            pool_size: images to pool (thumbnails and captions of each are kept).
            seed: shuffles the shard order, so big datasets are not always shown from shard 0.
            keep: when given, only images in this set join the pool (e.g. ids with features).
            max_side: thumbnail size in pixels.
        """
        view = cls(reader=reader, max_side=max_side)
        shards = list(reader.shards())
        random.Random(seed).shuffle(shards)
        view._shard_order = shards
        keep_set = set(keep) if keep is not None else None
        while len(view.pool) < pool_size and view._next_shard < len(shards):
            for sample in view._read_next_shard():
                if len(view.pool) >= pool_size:
                    break
                if keep_set is not None and sample.image_id not in keep_set:
                    continue
                view.pool.append(sample.image_id)
                view._add_thumb(sample)
        return view

    def _read_next_shard(self) -> Iterable[Sample]:
        shard = self._shard_order[self._next_shard]
        self._next_shard += 1
        for sample in self.reader.read(shard):
            self.scanned += 1
            self._add_text(sample)
            yield sample

    def _add_text(self, sample: Sample) -> None:
        ids = self.image_captions.setdefault(sample.image_id, [])
        for cid, cap in zip(sample.caption_ids, sample.captions, strict=False):
            if cid not in self.captions:
                self.captions[cid] = caption_text(cap)
                self.caption_image[cid] = sample.image_id
                ids.append(cid)

    def _add_thumb(self, sample: Sample) -> None:
        if sample.image_id in self.thumbs or sample.image_id in self.thumb_errors:
            return
        if sample.image is None:
            self.thumb_errors[sample.image_id] = (
                sample.image_error or "the dataset has no image bytes"
            )
            return
        try:
            self.thumbs[sample.image_id] = data_uri(
                make_thumbnail(sample.image, self.max_side), "image/jpeg"
            )
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            self.thumb_errors[sample.image_id] = f"cannot decode image: {exc}"

    def ensure(self, image_ids: Iterable[str], max_scan: int) -> None:
        """Read further shards until every image in ``image_ids`` has a thumbnail or an error.

        Stops after ``max_scan`` images read in total, so a report on a large dataset does not
        read all of it; images not reached simply have no thumbnail.
        """
        if self.reader is None:
            return
        wanted = {i for i in image_ids if i not in self.thumbs and i not in self.thumb_errors}
        # Samples already read but not pooled were not thumbnailed: this needs a re-read of
        # their shards, so restart from the first shard for them (bounded by max_scan).
        if wanted and self._next_shard >= len(self._shard_order):
            self._next_shard = 0
        restarts = 0
        while wanted and self.scanned < max_scan and restarts < 2:
            if self._next_shard >= len(self._shard_order):
                self._next_shard, restarts = 0, restarts + 1
                continue
            for sample in self._read_next_shard():
                if sample.image_id in wanted:
                    self._add_thumb(sample)
                    wanted.discard(sample.image_id)
                if not wanted:
                    break
        if wanted:
            log.info(
                "no thumbnails for %d image(s) after scanning %d images", len(wanted), self.scanned
            )

    def thumb(self, image_id: str) -> str | None:
        return self.thumbs.get(image_id)
