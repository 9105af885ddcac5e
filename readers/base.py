"""The interface every dataset reader implements, and the sample it yields."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import DatasetError


@dataclass(frozen=True)
class ShardRef:
    """One unit of work: a slice of a dataset that is read, encoded and committed together.

    Args:
        key: stable, filesystem-safe name of the shard within its dataset split.
        source: where it is read from (a tar URL, or the JSON file plus a row range).
        num_samples: number of images, when known without reading the shard.
    """

    key: str
    source: str
    num_samples: int | None = None


@dataclass
class Sample:
    """One image with its captions, as a reader yields it.

    ``image`` holds the raw encoded bytes; ``image_error`` says why there are none
    (e.g. a missing file), so the runner can record it instead of dropping the sample.
    Captions keep their raw form (``bytes`` when they were not valid UTF-8).
    """

    image_id: str
    image: bytes | None
    captions: list[str | bytes] = field(default_factory=list)
    caption_ids: list[str] = field(default_factory=list)
    caption_ann_ids: list[int | None] = field(default_factory=list)
    image_error: str | None = None
    shard: str = ""
    # Added for webdataset tars: why the captions could not be read (e.g. a malformed ``.json``
    # member); ``captions`` is then empty and the runner records this instead of dropping them.
    caption_error: str | None = None


CAPTION_ID_SEP = "#"


def caption_id(image_id: str, k: int) -> str:
    """The id of the k-th caption of an image: ``<image_id>#<k>``."""
    return f"{image_id}{CAPTION_ID_SEP}{k}"


def split_caption_id(sample_id: str) -> tuple[str, int]:
    """``"<image_id>#<k>"`` -> ``("<image_id>", k)``, the inverse of :func:`caption_id`.

    The image id may itself hold ``#``: only the last one separates ``k``.

    Raises:
        DatasetError: ``sample_id`` is not of that form.
    """
    head, sep, tail = str(sample_id).rpartition(CAPTION_ID_SEP)
    if not sep or not head or not tail.isdigit():
        raise DatasetError(f"caption id {sample_id!r} is not of the form '<image_id>#<k>'")
    return head, int(tail)


@runtime_checkable
class DatasetReader(Protocol):
    """What extraction, evaluation and ``cusa shard`` read a dataset through."""

    name: str
    split: str

    def shards(self) -> list[ShardRef]:
        """All shards, in a stable order that does not depend on workers or run order."""
        ...

    def read(self, shard: ShardRef) -> Iterator[Sample]:
        """Yield the samples of one shard."""
        ...

    def manifest_hash(self) -> str:
        """SHA-256 identifying the dataset's content layout (ids and sources), stored in the group."""
        ...

    def manifest_info(self, modality: str | None = None) -> dict[str, Any] | None:
        """What the features of ``modality`` (``None``: both) depend on, hashed, or ``None``.

        A dict holds at least ``hash`` (stored as the group's manifest hash, so a caption edit
        changes the text group's hash only) and is recorded in the group's attributes; ``None``
        means the reader keeps no per-modality manifest and :meth:`manifest_hash` is stored.
        """
        ...
