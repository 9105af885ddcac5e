"""Helpers shared by the dataset readers: raw captions, safe keys, hashing, image bytes."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cusa.errors import ConfigError, DatasetError

#: File extensions treated as images (lower case, without the dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_SAFE_KEY = re.compile(r"[^A-Za-z0-9._-]")


def raw_caption(text: str) -> str | bytes:
    """Return ``text``, or its original bytes when it holds undecodable bytes.

    Files are decoded with ``errors="surrogateescape"`` so that bytes which are not valid UTF-8
    survive as lone surrogates; they are turned back into the exact original ``bytes`` here.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogatepass")


def decode_caption(data: bytes) -> str | bytes:
    """UTF-8 text, or the raw ``bytes`` when ``data`` is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def load_json_file(path: Path) -> Any:
    """Load a JSON file, keeping non-UTF-8 bytes recoverable (see :func:`raw_caption`)."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
        return json.loads(text)
    except FileNotFoundError as exc:
        raise DatasetError(f"dataset file {str(path)!r} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"dataset file {str(path)!r} is not valid JSON ({exc}); check that it is complete"
        ) from exc


def safe_key(name: str) -> str:
    """A stable, filesystem-safe shard key made from ``name``.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; when that changed anything, a short hash
    of the original name is appended so two different names never share a key.
    """
    cleaned = _SAFE_KEY.sub("_", name).strip(".") or "shard"
    if cleaned != name:
        cleaned += "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return cleaned


def layout_hash(
    kind: str,
    split: str,
    shards: Iterable[tuple[str, str, Sequence[str] | None]],
    extra: dict[str, Any] | None = None,
) -> str:
    """SHA-256 over a dataset's layout: reader kind, split, and per shard its key, source and ids.

    Sources must be location-independent (file names relative to the root), so moving a dataset
    does not change its hash, while re-cutting it into other shards does.
    """
    h = hashlib.sha256()
    head = {"format": 1, "kind": kind, "split": split, "extra": extra or {}}
    h.update(json.dumps(head, sort_keys=True).encode())
    for key, source, ids in shards:
        h.update(
            b"\x00shard\x00" + key.encode() + b"\x00" + source.encode("utf-8", "surrogatepass")
        )
        if ids is not None:
            for image_id in ids:
                h.update(b"\x01" + image_id.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def read_image_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """Raw bytes of an image file, or ``(None, reason)`` when it cannot be read."""
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        return None, f"image file not found: {str(path)!r}"
    except IsADirectoryError:
        return None, f"image path is a directory, not a file: {str(path)!r}"
    except OSError as exc:
        return None, f"cannot read image file {str(path)!r}: {exc}"


def json_shard_ranges(n_items: int, shard_size: int) -> list[tuple[str, int, int]]:
    """Cut ``n_items`` in dataset order into ``(key, start, stop)`` ranges of ``shard_size``."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size!r}")
    return [
        (f"{i // shard_size:06d}", i, min(i + shard_size, n_items))
        for i in range(0, n_items, shard_size)
    ]


def check_split(split: str) -> str:
    """Reject split names that could escape a folder or break a file name."""
    if not split or not re.fullmatch(r"[A-Za-z0-9_.+-]+", split) or split.startswith("."):
        raise DatasetError(
            f"invalid split {split!r}; use letters, digits, '_', '-', '+' or '.' (e.g. 'train')"
        )
    return split
