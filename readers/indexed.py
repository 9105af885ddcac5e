"""Shared machinery for readers whose whole index is one small file (JSON, JSONL, TSV).

The index is parsed once per process and cached by file identity (path, size, mtime), so a
reader pickled to a Ray worker stays small and each worker parses the index at most once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import DatasetError
from ._common import (
    CONTENT_CHECK,
    CONTENT_SAMPLE_STRIDE,
    MANIFEST_HASH_FORMAT,
    captions_digest,
    check_split,
    image_fingerprint,
    json_shard_ranges,
    layout_hash,
    read_dataset_file,
)
from .base import Sample, ShardRef, caption_id

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000

_CACHE: OrderedDict[tuple, list[IndexItem]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 8


@dataclass(frozen=True)
class IndexItem:
    """One image of an indexed dataset: its id, image path relative to the root, captions."""

    image_id: str
    image_path: str
    captions: tuple[str | bytes, ...]
    ann_ids: tuple[int | None, ...]


class IndexedReader:
    """Base of the JSON/TSV readers: the index is a list of images cut into fixed-size shards.

    Subclasses set ``kind`` and implement :meth:`_index_file` and :meth:`_build_index`.

    Image files are read only when they are regular files inside the dataset root (symlinks
    resolved); an absolute path, a ``../`` path or a symlink leading out is ledgered with its
    reason unless ``allow_outside_root`` is set (``cusa extract --allow-outside-root``).
    """

    kind: ClassVar[str] = "indexed"

    def __init__(
        self,
        root: str | Path,
        split: str,
        shard_size: int,
        name: str,
        *,
        allow_outside_root: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = check_split(split)
        self.shard_size = int(shard_size)
        self.name = name
        self.allow_outside_root = bool(allow_outside_root)
        self._items: list[IndexItem] | None = None
        self._ranges: dict[str, tuple[int, int]] | None = None
        self._manifest: dict[str | None, dict[str, Any]] | None = None
        json_shard_ranges(0, self.shard_size)  # validates shard_size early

    # -- to implement ---------------------------------------------------------------------------
    def _index_file(self) -> Path:
        """The file the index is built from (it must exist; raise DatasetError otherwise)."""
        raise NotImplementedError

    def _build_index(self) -> list[IndexItem]:
        """Parse the index file; raise DatasetError on duplicate ids."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """Reader options that change which samples exist (part of the cache key and hash)."""
        return {}

    def _allowed_roots(self) -> list[str]:
        """Resolved folders image files may live in (the root; subclasses add explicit ones)."""
        return [os.path.realpath(self.root)]

    # -- the DatasetReader protocol -------------------------------------------------------------
    def items(self) -> list[IndexItem]:
        """All images of the split in dataset order (parsed once per process)."""
        if self._items is None:
            path = self._index_file()
            st = path.stat()
            key = (
                type(self).__name__,
                str(path.resolve()),
                st.st_size,
                st.st_mtime_ns,
                self.split,
                tuple(sorted(self._options().items())),
            )
            with _CACHE_LOCK:
                items = _CACHE.get(key)
                if items is not None:
                    _CACHE.move_to_end(key)
            if items is None:
                items = self._build_index()
                with _CACHE_LOCK:
                    _CACHE[key] = items
                    while len(_CACHE) > _CACHE_MAX:
                        _CACHE.popitem(last=False)
            self._items = items
        return self._items

    def shards(self) -> list[ShardRef]:
        items = self.items()
        source = str(self._index_file())
        return [
            ShardRef(key=key, source=f"{source}[{start}:{stop}]", num_samples=stop - start)
            for key, start, stop in json_shard_ranges(len(items), self.shard_size)
        ]

    def read(self, shard: ShardRef) -> Iterator[Sample]:
        items = self.items()
        if self._ranges is None:
            self._ranges = {
                key: (start, stop)
                for key, start, stop in json_shard_ranges(len(items), self.shard_size)
            }
        try:
            start, stop = self._ranges[shard.key]
        except KeyError:
            raise DatasetError(
                f"shard {shard.key!r} is not a shard of {self.name!r} split {self.split!r} "
                f"with shard_size={self.shard_size} ({len(self._ranges)} shards); "
                "list them with reader.shards()"
            ) from None
        roots = self._allowed_roots()
        for item in items[start:stop]:
            image, error = read_dataset_file(
                self.root,
                item.image_path,
                allowed_roots=roots,
                allow_outside_root=self.allow_outside_root,
            )
            yield Sample(
                image_id=item.image_id,
                image=image,
                captions=list(item.captions),
                caption_ids=[caption_id(item.image_id, k) for k in range(len(item.captions))],
                caption_ann_ids=list(item.ann_ids),
                image_error=error,
                shard=shard.key,
            )

    def manifest_info(self, modality: str | None = None) -> dict[str, Any]:
        """What the features of this split depend on, hashed (stored in each group's attributes).

        Args:
            modality: ``"image"`` hashes each image's id and path, ``"text"`` its id and exact
                captions, ``None`` both. So editing a caption changes the text hash only, and a
                resume re-extracts (or refuses) only what depends on it.

        Returns:
            ``hash`` (the layout, i.e. the cut into shards, plus that content), ``content_hash``
            (the content alone, so a changed ``--shard-size`` can be told apart from a changed
            dataset), ``shard_size``, ``shards``, ``images``, ``captions`` and ``modality``.
        """
        if self._manifest is None:
            self._manifest = {}
        if modality not in self._manifest:
            items = self.items()
            name = self._index_file().name

            with_images = modality in (None, "image")
            prints = self._image_fingerprints() if with_images else None

            def entry(i: int, it: IndexItem, content: bool = True) -> str:
                parts = [it.image_id]
                if with_images:
                    parts.append(it.image_path)
                    if content and prints is not None:
                        parts.append(prints[i])  # size (+ sampled hash): the image bytes
                if modality in (None, "text"):
                    parts.append(captions_digest(it.captions, it.ann_ids))
                return "\x02".join(parts)

            entries = [entry(i, it) for i, it in enumerate(items)]
            ranges = json_shard_ranges(len(items), self.shard_size)
            extra = {**self._options(), **({"modality": modality} if modality else {})}
            legacy = None
            if with_images:
                # The hash before image content was covered, so groups written then still
                # resume (their recorded hash is this one); see docs/extraction.md.
                old = [entry(i, it, content=False) for i, it in enumerate(items)]
                legacy = layout_hash(
                    self.kind,
                    self.split,
                    ((key, f"{name}[{a}:{b}]", old[a:b]) for key, a, b in ranges),
                    extra=extra,
                )
                extra = {**extra, "content": f"{CONTENT_CHECK}/{CONTENT_SAMPLE_STRIDE}"}
            self._manifest[modality] = {
                "format": MANIFEST_HASH_FORMAT,
                "modality": modality,
                "hash": layout_hash(
                    self.kind,
                    self.split,
                    ((key, f"{name}[{a}:{b}]", entries[a:b]) for key, a, b in ranges),
                    extra=extra,
                ),
                "content_hash": layout_hash(self.kind, self.split, [("", name, entries)], extra),
                "shard_size": self.shard_size,
                "shards": len(ranges),
                "images": len(items),
                "captions": sum(len(it.captions) for it in items),
                **(
                    {"content_check": CONTENT_CHECK, "legacy_hash": legacy}
                    if legacy is not None
                    else {}
                ),
            }
        return dict(self._manifest[modality])

    def _image_fingerprints(self) -> list[str]:
        """Each image's size, and one in CONTENT_SAMPLE_STRIDE's bytes hashed (see
        :func:`~cusa.readers._common.image_fingerprint`); computed once per reader."""
        if getattr(self, "_prints", None) is None:
            roots = self._allowed_roots()
            self._prints = [
                image_fingerprint(
                    self.root,
                    it.image_path,
                    sample=i % CONTENT_SAMPLE_STRIDE == 0,
                    allowed_roots=roots,
                    allow_outside_root=self.allow_outside_root,
                )
                for i, it in enumerate(self.items())
            ]
        return self._prints

    def manifest_hash(self) -> str:
        return self.manifest_info()["hash"]

    def __len__(self) -> int:
        return len(self.items())

    def __getstate__(self) -> dict[str, Any]:
        # Keep pickles small for Ray workers; they re-parse (once per process) from the cache.
        state = self.__dict__.copy()
        state["_items"] = None
        state["_ranges"] = None
        state["_manifest"] = None
        state["_prints"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, split={self.split!r})"


def check_duplicate(seen: dict[str, str], image_id: str, where: str, dataset: str) -> None:
    """Raise DatasetError when ``image_id`` was already seen at another place in the index."""
    first = seen.get(image_id)
    if first is not None:
        raise DatasetError(
            f"duplicate image id {image_id!r} in {dataset}: first at {first}, again at {where}; "
            "image ids must be unique within a dataset split"
        )
    seen[image_id] = where
