"""The cusa webdataset format, shared by the reader (:mod:`.wds`) and the writer
(:mod:`cusa.readers.wds_writer`).

- names: ``manifest.json`` (:data:`MANIFEST_NAME`) whose ``"format"`` is :data:`MANIFEST_FORMAT`,
  tars ending in one of :data:`TAR_SUFFIXES`, and a shard's key from its tar's file stem
  (:func:`shard_key_for_url`);
- keys: a tar ``__key__`` is :func:`encode_key` of the image id (reversed by :func:`decode_key`);
  a member name splits into key and extension at the first dot of its file name
  (:func:`split_member_name`);
- member rules: a member whose path escapes the archive (:func:`is_unsafe_member`), that is not a
  regular file or that is over the size cap (:func:`member_problem`) is never read;
- samples: :func:`build_sample` turns the members of one key (a :class:`PendingSample`) into a
  :class:`~cusa.readers.base.Sample`, reading the image member and the captions from
  ``<key>.json`` or ``<key>.txt`` (the layout described in :mod:`.wds`);
- the manifest's structure (:func:`check_manifest`), as ``cusa shard`` writes it.

Reading the tars (finding them, streaming them, grouping members by key) is :mod:`.wds`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlparse

from ..errors import DatasetError
from . import _common
from ._common import (
    IMAGE_EXTENSIONS,
    decode_caption,
    loads_json_member,
    raw_caption,
    safe_key,
    short_repr,
)
from .base import Sample, ShardRef, caption_id

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cusa-webdataset"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Characters kept as they are in a tar key; everything else is percent-encoded (see encode_key).
_KEY_SAFE = "-_"


# -- keys -------------------------------------------------------------------------------------
def encode_key(image_id: str) -> str:
    """A tar-safe ``__key__`` for ``image_id``: percent-encoding of all but ``[A-Za-z0-9_-]``.

    It has no ``.`` (which would split the key from the extension), no ``/`` and no ``%`` other
    than escapes, so it is reversible with :func:`decode_key`. A leading ``__`` (webdataset's
    metadata prefix) is escaped too. Example: ``COCO_x.jpg`` -> ``COCO_x%2Ejpg``.
    """
    key = quote(image_id, safe=_KEY_SAFE, errors="surrogatepass").replace(".", "%2E")
    if key.startswith("__"):
        key = "%5F" + key[1:]
    return key or "%00empty"


def decode_key(key: str) -> str:
    """The image id that :func:`encode_key` turned into ``key``."""
    if key == "%00empty":
        return ""
    return unquote(key, errors="surrogatepass")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``"a/b.c.jpg"`` -> ``("a/b", "c.jpg")``: key up to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, None
    return (posixpath.join(directory, stem) if directory else stem), ext


def shard_key_for_url(url: str) -> str:
    """A stable, filesystem-safe shard key: the tar's file stem (``shard-000001``)."""
    target = url
    if url.startswith("pipe:"):
        tokens = [t for t in url[5:].split() if any(s in t for s in TAR_SUFFIXES)]
        if not tokens:
            return safe_key("pipe-" + url[5:])
        target = tokens[-1]
    base = posixpath.basename(urlparse(target).path if "://" in target else target)
    for suffix in TAR_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return safe_key(base)


# -- members ---------------------------------------------------------------------------------
def is_unsafe_member(name: str) -> bool:
    """True when a member path is absolute or climbs out with ``..``."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def member_problem(member: tarfile.TarInfo, max_bytes: int | None = None) -> str | None:
    """Why a tar member must not be read, or None for a regular member within the size cap."""
    max_bytes = _common.MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    if not member.isfile():
        kind = _MEMBER_KINDS.get(member.type, f"of tar type {member.type!r}")
        target = (
            f" to {short_repr(member.linkname, 80)}" if member.issym() or member.islnk() else ""
        )
        return f"is {kind}{target}, not a regular file; cusa reads regular members only"
    if member.size > max_bytes:
        return f"is {member.size:,} bytes, over the limit of {max_bytes:,}"
    return None


# -- samples ---------------------------------------------------------------------------------
@dataclass
class PendingSample:
    """The members read so far for one ``__key__`` of a tar, and those refused."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    # extension -> why that member was not read (a link, a device, too large, a duplicate name)
    refused: dict[str, str] = field(default_factory=dict)


_CAPTION_EXTS = ("json", "txt")


def _caption_value(value: Any) -> str | bytes:
    if isinstance(value, str):
        return raw_caption(value)
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        return base64.b64decode(value["b64"], validate=True)
    raise TypeError(f"a caption must be a string or {{'b64': ...}}, got {value!r}")


def build_sample(pending: PendingSample, shard: ShardRef) -> Sample:
    members = pending.members
    refused_image = [
        (ext, why)
        for ext, why in pending.refused.items()
        if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
    ]
    refused_caption = [(ext, why) for ext, why in pending.refused.items() if ext in _CAPTION_EXTS]
    image_exts = [ext for ext in members if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    image_exts.sort(key=lambda e: IMAGE_EXTENSIONS.index(e.rsplit(".", 1)[-1].lower()))
    if len(image_exts) > 1:
        log.warning(
            "sample %r in %s has several images (%s); using %r",
            pending.key,
            shard.source,
            ", ".join(image_exts),
            image_exts[0],
        )
    image = members[image_exts[0]] if image_exts else None
    image_id = pending.key
    captions: list[str | bytes] = []
    ann_ids: list[int | None] = []
    caption_error = None
    image_error = None
    meta: Any = None
    if "json" in members:
        try:
            meta = loads_json_member(members["json"].decode("utf-8", "surrogateescape"))
            if isinstance(meta, list):
                captions = [_caption_value(c) for c in meta]
            elif isinstance(meta, dict):
                if meta.get("image_id") is not None:
                    image_id = str(meta["image_id"])
                if meta.get("image_error") is not None:
                    image_error = str(meta["image_error"])
                if meta.get("caption_error") is not None:
                    caption_error = str(meta["caption_error"])
                if "captions" in meta:
                    captions = [_caption_value(c) for c in meta["captions"]]
                    raw_ids = meta.get("caption_ann_ids")
                    if raw_ids is not None:
                        if len(raw_ids) != len(captions):
                            raise ValueError("'caption_ann_ids' must have one entry per caption")
                        ann_ids = [None if a is None else int(a) for a in raw_ids]
            else:
                raise TypeError(f"expected a list or an object, got {type(meta).__name__}")
        except (json.JSONDecodeError, TypeError, ValueError, binascii.Error) as exc:
            caption_error = f"malformed {pending.key}.json in {shard.source}: {exc}"
            captions, meta = [], None
    if not captions and caption_error is None:
        if "txt" in members:
            captions = [decode_caption(members["txt"])]
        elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            captions = [raw_caption(meta["caption"])]
    if refused_caption:
        ext, why = refused_caption[0]
        caption_error = f"tar member {pending.key + '.' + ext!r} of {shard.source} {why}; not read"
        captions, meta = [], None
    if refused_image:
        # The sample's image is unusable (or ambiguous): never fall back to another copy.
        ext, why = refused_image[0]
        image = None
        image_error = f"tar member {pending.key + '.' + ext!r} of {shard.source} {why}; not read"
    if not ann_ids or len(ann_ids) != len(captions):
        ann_ids = [None] * len(captions)
    if image is None and image_error is None:
        image_error = (
            f"no image member ({', '.join(IMAGE_EXTENSIONS)}) for key {pending.key!r} "
            f"in {shard.source}"
        )
    return Sample(
        image_id=image_id,
        image=image,
        captions=captions,
        caption_ids=[caption_id(image_id, k) for k in range(len(captions))],
        caption_ann_ids=ann_ids,
        image_error=image_error if image is None else None,
        shard=shard.key,
        caption_error=caption_error,
    )


# -- the manifest ----------------------------------------------------------------------------
def check_manifest(data: dict[str, Any], url: str) -> None:
    """Refuse a ``manifest.json`` whose structure is not what ``cusa shard`` writes."""

    def bad(what: str) -> DatasetError:
        return DatasetError(
            f"{url!r} is a {MANIFEST_FORMAT} manifest but {what}; rewrite it with `cusa shard` "
            "or remove it"
        )

    splits = data.setdefault("splits", {})
    if not isinstance(splits, dict):
        raise bad("'splits' is not an object")
    for split_name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards", []), list):
            raise bad(f"split {short_repr(split_name)} has no 'shards' list")
        split.setdefault("shards", [])
        for entry in split["shards"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise bad(f"a shard of split {short_repr(split_name)} has no 'file' name")
            ids = entry.get("image_ids")
            if ids is not None and not (
                isinstance(ids, list) and all(isinstance(i, str) for i in ids)
            ):
                raise bad(f"'image_ids' of {short_repr(entry['file'])} is not a list of strings")
            count = entry.get("samples")
            if count is not None and (not isinstance(count, int) or count < 0):
                raise bad(f"'samples' of {short_repr(entry['file'])} is not a count")
            if not isinstance(entry.get("sha256", ""), str):
                raise bad(f"'sha256' of {short_repr(entry['file'])} is not a string")
        source = split.get("source")
        if source is not None and not isinstance(source, dict):
            raise bad(f"'source' of split {short_repr(split_name)} is not an object")


__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "TAR_SUFFIXES",
    "PendingSample",
    "build_sample",
    "check_manifest",
    "decode_key",
    "encode_key",
    "is_unsafe_member",
    "member_problem",
    "shard_key_for_url",
    "split_member_name",
]
