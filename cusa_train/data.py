"""Soft labels from the feature store, attached to training batches by sample id.

A batch never runs a teacher: :class:`TeacherFeatures` gathers the stored image-teacher feature
of every pair's image id and the stored text-teacher feature of every caption id from
memory-mapped :class:`cusa.store.FeatureLookup` files. Three ways to use it:

- :class:`SoftLabelCollate` wraps a DataLoader ``collate_fn``;
- :class:`SoftLabelStage` is a webdataset pipeline stage (``wds.DataPipeline(..., stage, ...)``)
  and its :meth:`SoftLabelStage.attach` a ``.map(...)`` function;
- :class:`PairDataset` turns any :class:`cusa.readers.base.DatasetReader` into
  (image, caption) training pairs keyed by ``image_id`` and ``caption_id``.

Ids the store lacks raise :class:`cusa.errors.SampleNotFoundError` naming the id; there is no
silent zero vector.

Lookups go through each group's id index (:mod:`cusa.store.id_index`): no Python object per
stored id exists in the trainer or its DataLoader workers, so a webdataset run
(:class:`SoftLabelStage`, keyed by ``__key__``-derived ids) has constant memory per worker
whatever the store's size. :class:`PairDataset` is the one reader that lists every sample (the
ALBEF/Karpathy JSON path: it holds each image's bytes); stream larger sets through webdataset. A store whose teacher spec differs from the configured one is refused with
:class:`cusa.errors.StoreSpecMismatchError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cusa.errors import DatasetError, SampleNotFoundError
from cusa.readers import DatasetReader, Sample
from cusa.store import FeatureLookup, FeatureStore

logger = logging.getLogger(__name__)

IMAGE_ID_KEY = "image_id"
CAPTION_ID_KEY = "caption_id"
TEACHER_IMAGE_KEY = "teacher_image"
TEACHER_TEXT_KEY = "teacher_text"
#: Why :class:`PairDataset` left a sample out when the store has no features for it.
IMAGE_NOT_IN_STORE = "image not in the image teacher's features"
CAPTION_NOT_IN_STORE = "caption not in the text teacher's features"


class TeacherFeatures:
    """The stored image- and text-teacher features of one dataset split.

    Args:
        image: lookup of the image teacher, keyed by image id.
        text: lookup of the text teacher, keyed by caption id ``<image_id>#<k>``.
    """

    def __init__(self, image: FeatureLookup, text: FeatureLookup) -> None:
        self.image = image
        self.text = text

    @classmethod
    def open(
        cls,
        store: str | os.PathLike | FeatureStore | None,
        *,
        dataset: str,
        split: str,
        image_teacher: str,
        text_teacher: str,
        image_spec: Mapping[str, Any] | Any | None = None,
        text_spec: Mapping[str, Any] | Any | None = None,
    ) -> TeacherFeatures:
        """Open both lookups and check them against the configured teachers.

        Args:
            store: store path or URL (``None``: the default store).
            dataset, split: the group's dataset and split.
            image_teacher, text_teacher: teacher names or fingerprints in the store.
            image_spec, text_spec: expected spec fields (dict subset or a ``TeacherSpec``).

        Raises:
            StoreError: a group is missing (the message lists the teachers there).
            StoreSpecMismatchError: a recorded spec differs from the configured one.
        """
        fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        image, text = (
            FeatureLookup.open(
                fs,
                dataset=dataset,
                split=split,
                teacher=teacher,
                expected_spec={"modality": modality, **(_as_dict(spec) or {})},
                expected_label="configured",
            )
            for teacher, modality, spec in (
                (image_teacher, "image", image_spec),
                (text_teacher, "text", text_spec),
            )
        )
        return cls(image, text)

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.dim, self.text.dim

    def gather(
        self,
        image_ids: Sequence[str],
        caption_ids: Sequence[str],
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Teacher features ``(B, Ti)`` of the images and ``(B, Tt)`` of the captions, in id order.

        Raises:
            SampleNotFoundError: an id is not in the store; the message names it.
        """
        image_ids, caption_ids = _as_str_list(image_ids), _as_str_list(caption_ids)
        return self.image.gather_torch(image_ids, dtype=dtype), self.text.gather_torch(
            caption_ids, dtype=dtype
        )

    def ledgered_ids(self) -> set[str]:
        """Ids the extraction recorded as failed (the failure ledger of both groups)."""
        return {
            str(row["sample_id"])
            for lookup in (self.image, self.text)
            for row in lookup.group.failures()
        }

    def __repr__(self) -> str:
        return f"TeacherFeatures(image={self.image!r}, text={self.text!r})"


def _as_dict(spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return None
    return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _as_str_list(values: Sequence[Any]) -> list[str]:
    return [_as_str(v) for v in values]


# ---- DataLoader ------------------------------------------------------------------------------


def pair_collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Default collate for :class:`PairDataset` items: stack ``image`` tensors, keep lists of
    ``text``, ``image_id`` and ``caption_id``."""
    if not samples:
        raise DatasetError("pair_collate got an empty batch")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out


def apply_text_transform(
    batch: dict[str, Any], text_transform: Callable[[list[str]], Any] | None
) -> dict[str, Any]:
    """Run ``text_transform`` (a tokenizer) over ``batch["text"]`` unless it is already a tensor
    of token ids."""
    if text_transform is not None and not isinstance(batch["text"], Tensor):
        batch["text"] = text_transform(batch["text"])
    return batch


class SoftLabelCollate:
    """A ``collate_fn`` that collates with ``base`` and then attaches teacher features.

    The collated batch must hold lists ``image_id`` and ``caption_id``; it gains
    ``teacher_image`` (B, Ti) and ``teacher_text`` (B, Tt) float32 tensors. Picklable, so it
    runs inside DataLoader workers (the memory maps are reopened there).

    Args:
        teachers: the stored features.
        base: the collate to run first (default :func:`pair_collate`).
        text_transform: optional function applied to the list of captions (e.g. a tokenizer)
            so tokenisation also happens in the workers.
    """

    def __init__(
        self,
        teachers: TeacherFeatures,
        base: Callable[[Sequence[Any]], dict[str, Any]] = pair_collate,
        text_transform: Callable[[list[str]], Any] | None = None,
    ) -> None:
        self.teachers = teachers
        self.base = base
        self.text_transform = text_transform

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        batch = self.base(samples)
        batch[TEACHER_IMAGE_KEY], batch[TEACHER_TEXT_KEY] = self.teachers.gather(
            batch[IMAGE_ID_KEY], batch[CAPTION_ID_KEY]
        )
        return apply_text_transform(batch, self.text_transform)


def check_left_out(dataset: PairDataset, teachers: TeacherFeatures) -> None:
    """Accept samples left out because extraction ledgered them; refuse any other missing id.

    An id the dataset has but the store neither holds nor ledgered means the store was made from
    other data (an edited or extended dataset): training on it would be silently wrong.

    Raises:
        SampleNotFoundError: names the first ids and how to fix the store.
    """
    missing = [
        i for i, why in dataset.skipped.items() if why in (IMAGE_NOT_IN_STORE, CAPTION_NOT_IN_STORE)
    ]
    if not missing:
        return
    unexplained = sorted(set(missing) - teachers.ledgered_ids())
    if unexplained:
        raise SampleNotFoundError(
            f"{len(unexplained)} sample(s) of the dataset have no teacher features in "
            f"{teachers.image.group.url!r} / {teachers.text.group.url!r} and are not in its failure "
            f"ledger, e.g. {unexplained[:3]}; the store was made from other data: run `cusa extract` "
            "on this dataset again (or train on the dataset the store was made from)"
        )
    logger.warning(
        "left out %d sample(s) that extraction recorded as failed (see `cusa store verify`)",
        len(missing),
    )


class PairDataset(Dataset):
    """(image, caption) training pairs from a dataset reader, one pair per caption.

    Each item is ``{"image": preprocess_image(bytes), "text": str, "image_id": str,
    "caption_id": str}``. Encoded image bytes are held in memory once per image (fine for
    COCO/Flickr-sized splits; stream larger sets through webdataset and :class:`SoftLabelStage`).

    Args:
        reader: any :class:`cusa.readers.base.DatasetReader`.
        preprocess_image: encoded bytes -> (3, S, S) tensor (the student's ``preprocess_image``).
        max_images: keep only the first N images (in shard order).
        require_ids: when given (the image and text :class:`FeatureLookup`, or any collections of
            ids), images or captions not in them are left out and counted in :attr:`skipped`;
            otherwise they would fail at collate time with :class:`SampleNotFoundError`. A
            lookup answers for all ids at once through its id index.
        caption_transform: applied to every caption once, here (e.g. the official
            ``pre_caption``); a caption it rejects with ``ValueError`` is left out and counted
            in :attr:`skipped` with the reason.
    """

    def __init__(
        self,
        reader: DatasetReader,
        preprocess_image: Callable[[bytes], Tensor],
        *,
        max_images: int | None = None,
        require_ids: tuple[IdFilter, IdFilter] | None = None,
        caption_transform: Callable[[str], str] | None = None,
    ) -> None:
        self.preprocess_image = preprocess_image
        self.images: dict[str, bytes] = {}
        self.pairs: list[tuple[str, str, str]] = []  # (image_id, caption_id, caption)
        self.skipped: dict[str, str] = {}  # id -> reason
        chunk_size = min(_MEMBERSHIP_CHUNK, max(max_images or _MEMBERSHIP_CHUNK, 1))
        for chunk in _chunks(_samples(reader), chunk_size):
            if max_images is not None and len(self.images) >= max_images:
                break
            self._add(chunk, max_images, require_ids, caption_transform)
        if self.skipped:
            first = ", ".join(f"{k!r} ({v})" for k, v in list(self.skipped.items())[:3])
            logger.warning(
                "left out %d images/captions of %r: %s ...", len(self.skipped), reader, first
            )
        if not self.pairs:
            raise DatasetError(
                f"no usable (image, caption) pairs in {reader!r}; check the dataset and the store"
            )

    def _add(
        self,
        samples: list[Any],
        max_images: int | None,
        require_ids: tuple[IdFilter, IdFilter] | None,
        caption_transform: Callable[[str], str] | None,
    ) -> None:
        image_ok = text_ok = None
        if require_ids is not None:
            # One vectorised membership test per modality and chunk against the stored ids (a
            # FeatureLookup's id index), instead of a Python set of every stored id.
            image_ok = _members(require_ids[0], [s.image_id for s in samples])
            text_ok = _members(require_ids[1], [c for s in samples for c in s.caption_ids])
        caption_k = -1
        for k, sample in enumerate(samples):
            if max_images is not None and len(self.images) >= max_images:
                return
            first_caption = caption_k + 1
            caption_k += len(sample.caption_ids)
            if sample.image is None:
                self.skipped[sample.image_id] = f"unreadable image: {sample.image_error}"
                continue
            if image_ok is not None and not image_ok[k]:
                self.skipped[sample.image_id] = IMAGE_NOT_IN_STORE
                continue
            kept = 0
            for j, (cid, caption) in enumerate(
                zip(sample.caption_ids, sample.captions, strict=True)
            ):
                if text_ok is not None and not text_ok[first_caption + j]:
                    self.skipped[cid] = CAPTION_NOT_IN_STORE
                    continue
                text = (
                    caption.decode("utf-8", errors="replace")
                    if isinstance(caption, bytes)
                    else caption
                )
                if caption_transform is not None:
                    try:
                        text = caption_transform(text)
                    except ValueError as exc:
                        name = getattr(caption_transform, "__name__", "caption_transform")
                        self.skipped[cid] = f"caption rejected by {name}: {exc}"
                        continue
                self.pairs.append((sample.image_id, cid, text))
                kept += 1
            if kept:
                self.images[sample.image_id] = sample.image

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, caption_id, text = self.pairs[index]
        return {
            "image": self.preprocess_image(self.images[image_id]),
            "text": text,
            IMAGE_ID_KEY: image_id,
            CAPTION_ID_KEY: caption_id,
        }


#: What ``PairDataset(require_ids=...)`` takes per modality: a lookup or a collection of ids.
IdFilter = FeatureLookup | Iterable[str]


def _members(allowed: IdFilter, ids: list[str]) -> Sequence[bool]:
    """Whether each of ``ids`` is in ``allowed``: one index lookup for a FeatureLookup."""
    if isinstance(allowed, FeatureLookup):
        return allowed.contains(ids).tolist() if ids else []
    allowed = allowed if isinstance(allowed, set | frozenset) else set(allowed)
    return [i in allowed for i in ids]


#: Samples whose ids ``PairDataset`` checks against the store in one call.
_MEMBERSHIP_CHUNK = 4096


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _samples(reader: DatasetReader) -> Iterator[Sample]:
    for shard in reader.shards():
        yield from reader.read(shard)


# ---- webdataset ------------------------------------------------------------------------------


class SoftLabelStage:
    """A webdataset pipeline stage that adds teacher features to every sample (or batch).

    Use it as a stage, ``wds.DataPipeline(..., SoftLabelStage(teachers), ...)``, or per sample,
    ``dataset.map(stage.attach)``. As a stage it looks up ``lookahead`` samples at a time (one
    vectorised index lookup per teacher instead of one per sample) and yields them in order. A sample's ids are read from ``image_id_key`` and
    ``caption_id_key`` (str, bytes, or lists of them for batched samples); features go to
    ``teacher_image`` / ``teacher_text`` as (Ti,) / (Tt,) tensors, or (B, Ti) / (B, Tt) for batches.

    Raises:
        SampleNotFoundError: an id is not in the store.
        DatasetError: a sample lacks an id key (the message lists its keys).
    """

    def __init__(
        self,
        teachers: TeacherFeatures,
        image_id_key: str = IMAGE_ID_KEY,
        caption_id_key: str = CAPTION_ID_KEY,
        lookahead: int = 64,
    ) -> None:
        self.teachers = teachers
        self.image_id_key = image_id_key
        self.caption_id_key = caption_id_key
        self.lookahead = max(1, int(lookahead))

    def _ids(self, sample: dict[str, Any]) -> tuple[bool, list[Any], list[Any]]:
        """``(single, image_ids, caption_ids)`` of a sample (or of an already batched one)."""
        try:
            image_ids, caption_ids = sample[self.image_id_key], sample[self.caption_id_key]
        except KeyError as exc:
            raise DatasetError(
                f"webdataset sample {sample.get('__key__')!r} has no {exc.args[0]!r}; its keys are "
                f"{sorted(sample)}; map the ids to {self.image_id_key!r}/{self.caption_id_key!r} first"
            ) from None
        single = isinstance(image_ids, (str, bytes))
        if single:
            return True, [image_ids], [caption_ids]
        return False, list(image_ids), list(caption_ids)

    def attach(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self._attach_many([sample])[0]

    def _attach_many(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        parts = [self._ids(s) for s in samples]
        image_ids = [i for _, ids, _ in parts for i in ids]
        caption_ids = [c for _, _, ids in parts for c in ids]
        t_img, t_txt = self.teachers.gather(image_ids, caption_ids)  # (sum B, Ti), (sum B, Tt)
        out, start = [], 0
        for sample, (single, ids, _) in zip(samples, parts, strict=True):
            stop = start + len(ids)
            sample = dict(sample)
            sample[TEACHER_IMAGE_KEY] = t_img[start] if single else t_img[start:stop]
            sample[TEACHER_TEXT_KEY] = t_txt[start] if single else t_txt[start:stop]
            out.append(sample)
            start = stop
        return out

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for chunk in _chunks(source, self.lookahead):
            yield from self._attach_many(chunk)
