"""Helpers shared by the dataset readers: raw captions, safe keys, hashing, image bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from ..safe_files import (  # the one rule for every file cusa reads; re-exported for readers
    MAX_IMAGE_BYTES,
    MAX_INDEX_BYTES,
    file_kind,  # noqa: F401 - re-exported for the readers
    is_inside,
    read_regular_file,
    short_repr,
)

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


def load_json_file(path: Path, max_bytes: int | None = None) -> Any:
    """Load a JSON index file, keeping non-UTF-8 bytes recoverable (see :func:`raw_caption`).

    Only a regular file of at most ``max_bytes`` (default :data:`MAX_INDEX_BYTES`) is read, so a
    FIFO or device named as the index cannot hang or exhaust memory; JSON nested too deeply for
    the parser is refused instead of raising ``RecursionError``.
    """
    limit = MAX_INDEX_BYTES if max_bytes is None else max_bytes
    data, reason = read_regular_file(path, limit, what="dataset file")
    if data is None:
        if reason is not None and "not found" in reason:
            raise DatasetError(f"dataset file {str(path)!r} does not exist")
        raise DatasetError(f"{reason}; point the dataset at a regular JSON file")
    try:
        return json.loads(data.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"dataset file {str(path)!r} is not valid JSON ({exc}); check that it is complete"
        ) from exc
    except RecursionError as exc:
        raise DatasetError(
            f"dataset file {str(path)!r} nests JSON arrays/objects too deeply to parse; a "
            "dataset index needs only a few levels — regenerate the file"
        ) from exc


def loads_json_member(text: str) -> Any:
    """``json.loads`` that reports over-deep nesting as a ``ValueError`` like other bad JSON."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply to parse") from exc


def safe_key(name: str) -> str:
    """A stable, filesystem-safe shard key made from ``name``.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; when that changed anything, a short hash
    of the original name is appended so two different names never share a key.
    """
    cleaned = _SAFE_KEY.sub("_", name).strip(".") or "shard"
    if cleaned != name:
        cleaned += "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return cleaned


#: Version of the dataset manifest hash; 2 covers captions as well as ids (1 covered ids only).
MANIFEST_HASH_FORMAT = 2


def captions_digest(captions: Sequence[str | bytes], ann_ids: Sequence[int | None] = ()) -> str:
    """A short SHA-256 of an image's captions (exact text or bytes) and annotation ids."""
    h = hashlib.sha256()
    for caption in captions:
        raw = caption if isinstance(caption, bytes) else caption.encode("utf-8", "surrogatepass")
        h.update(b"\x03" + (b"b" if isinstance(caption, bytes) else b"s") + raw)
    for ann in ann_ids:
        h.update(b"\x04" + str(ann).encode())
    return h.hexdigest()[:32]


def layout_hash(
    kind: str,
    split: str,
    shards: Iterable[tuple[str, str, Sequence[str] | None]],
    extra: dict[str, Any] | None = None,
) -> str:
    """SHA-256 over a dataset's layout: reader kind, split, and per shard its key, source and items.

    An item is an image id, optionally followed by a digest of what its features depend on
    (``"<id>\\x02<captions digest>"``). Sources must be location-independent (file names
    relative to the root), so moving a dataset does not change its hash, while re-cutting it into
    other shards, or editing, adding or removing a caption or an image, does.
    """
    h = hashlib.sha256()
    head = {"format": MANIFEST_HASH_FORMAT, "kind": kind, "split": split, "extra": extra or {}}
    h.update(json.dumps(head, sort_keys=True).encode())
    for key, source, ids in shards:
        h.update(
            b"\x00shard\x00" + key.encode() + b"\x00" + source.encode("utf-8", "surrogatepass")
        )
        if ids is not None:
            for image_id in ids:
                h.update(b"\x01" + image_id.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def read_dataset_file(
    root: Path,
    rel: str,
    *,
    allowed_roots: Sequence[str] | None = None,
    allow_outside_root: bool = False,
    max_bytes: int | None = None,
) -> tuple[bytes | None, str | None]:
    """Read ``root / rel`` as an image file of the dataset, or return ``(None, reason)``.

    Symlinks are resolved first; unless ``allow_outside_root``, the resolved file must lie inside
    ``root`` (or one of ``allowed_roots``, already resolved), so an absolute path, a ``../`` path
    or a symlink to ``/etc/passwd`` in a dataset is ledgered instead of read.
    """
    path = root / rel
    try:
        real = os.path.realpath(path)
    except ValueError as exc:  # an embedded NUL byte
        return None, f"image path {short_repr(rel)} is not a valid file name ({exc})"
    if not allow_outside_root:
        roots = allowed_roots if allowed_roots is not None else [os.path.realpath(root)]
        if not is_inside(real, roots):
            how = "resolves" if real != os.path.abspath(path) else "lies"
            return None, (
                f"image path {rel!r} {how} outside the dataset root {str(root)!r}; not read "
                "(pass --allow-outside-root to read files outside the dataset root)"
            )
    return read_regular_file(real, MAX_IMAGE_BYTES if max_bytes is None else max_bytes)


#: The content check of an image manifest: every image's size, plus the SHA-256 of one image in
#: :data:`CONTENT_SAMPLE_STRIDE` (by position in the index). Measured and compared with the
#: other options in docs/extraction.md (benchmarks/dataset_identity.py).
CONTENT_CHECK = "size+sampled-sha256"
CONTENT_SAMPLE_STRIDE = 1000


def image_fingerprint(
    root: Path,
    rel: str,
    *,
    sample: bool,
    allowed_roots: Sequence[str] | None = None,
    allow_outside_root: bool = False,
) -> str:
    """What an image manifest records of one image file: its size (``stat``, no read), and
    with ``sample`` a short SHA-256 of its bytes, read under the dataset-root rules. A file
    that cannot be stat'ed or read gives ``-`` (its sample is ledgered when extracted)."""
    try:
        size = str(os.stat(root / rel).st_size)
    except (OSError, ValueError):
        size = "-"
    if not sample:
        return size
    data, _ = read_dataset_file(
        root, rel, allowed_roots=allowed_roots, allow_outside_root=allow_outside_root
    )
    return f"{size}:{hashlib.sha256(data).hexdigest()[:16] if data is not None else '-'}"


def read_image_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """Raw bytes of an image file, or ``(None, reason)`` when it cannot be read.

    Only regular files up to :data:`MAX_IMAGE_BYTES` are read (see :func:`read_regular_file`).
    """
    return read_regular_file(path, MAX_IMAGE_BYTES)


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
