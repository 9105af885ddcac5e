"""Webdataset tar shards: local paths, brace patterns, ``s3://`` (fsspec) and ``pipe:`` URLs.

One sample is the run of tar members sharing a ``__key__`` (the member path up to the first
``.`` of its file name, as in the ``webdataset`` package). It holds one image member
(``jpg``, ``jpeg``, ``png`` or ``webp``) and its captions:

- ``<key>.json`` as a list of captions, or an object ``{"captions": [...]}`` with optional
  ``"caption_ann_ids"`` (one int or null per caption), ``"image_id"`` (the true image id, which
  then replaces the key) and ``"image_error"`` (why the image is absent). A caption that is not
  valid UTF-8 is written as ``{"b64": "<base64 of the raw bytes>"}``;
- otherwise ``<key>.txt``: one caption, its exact bytes (UTF-8 text, or ``bytes`` if invalid);
- otherwise an object's ``"caption"`` string (the img2dataset layout).

Faults are never silent:

- a key that reappears after another key in the same tar raises :class:`DatasetError` naming the
  tar and key (webdataset would silently split it into two samples);
- a member whose path is absolute or contains ``..`` is never read and is ledgered as
  ``<shard>:<member>``;
- a member that is not a regular file (symlink, hard link, device, FIFO), that is larger than
  :data:`~cusa.extract.readers._common.MAX_IMAGE_BYTES`, or whose name appears twice in the tar is
  never read: its sample's image (or captions, for a ``.json``/``.txt`` member) is ledgered with
  the reason, so the sample cannot vanish and no copy silently wins;
- ``manifest.json`` may only name tars inside its own folder (no ``/``, no ``..``, no symlink
  leading out) unless ``allow_outside_root`` is set;
- a truncated or corrupt tar yields every complete sample read before the fault, then one
  error sample whose ``image_error`` starts with ``"truncated tar"``; its ``image_id`` is the key
  that was being read (its members are discarded) or ``"<shard key>:truncated"``;
- when ``manifest.json`` (written by :mod:`cusa.extract.shard_writer`) lists fewer or more
  samples than were read, an error sample says so.

S3: credentials and endpoint come from the usual AWS variables; for an S3-compatible server set
``AWS_ENDPOINT_URL`` (or ``FSSPEC_S3_ENDPOINT_URL``), or pass ``storage_options``.
``pipe:`` URLs run a shell command: use them only with commands you trust.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import posixpath
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlparse

import braceexpand

from cusa.errors import DatasetError
from cusa.extract.readers import _common
from cusa.extract.readers._common import (
    IMAGE_EXTENSIONS,
    MANIFEST_HASH_FORMAT,
    MAX_INDEX_BYTES,
    check_split,
    decode_caption,
    file_kind,
    is_inside,
    layout_hash,
    loads_json_member,
    raw_caption,
    read_regular_file,
    safe_key,
    short_repr,
)
from cusa.extract.readers.base import Sample, ShardRef, caption_id

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cusa-webdataset"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Characters kept as they are in a tar key; everything else is percent-encoded (see encode_key).
_KEY_SAFE = "-_"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


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


def is_unsafe_member(name: str) -> bool:
    """True when a member path is absolute or climbs out with ``..``."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


# -- opening --------------------------------------------------------------------------------
def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace-expand a URL pattern (``shard-{000000..000009}.tar``); ``::`` separates patterns."""
    specs = spec if isinstance(spec, list) else spec.split("::")
    return [u for s in specs for u in braceexpand.braceexpand(s)]


def _is_local(url: str) -> bool:
    return ("://" not in url and not url.startswith("pipe:")) or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file://") else url).expanduser()


def _open_regular(path: Path) -> Any:
    """Open a local tar for reading; a FIFO or device is refused before anything is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"it is {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _PipeStream:
    """Read the stdout of a trusted shell command (a ``pipe:`` URL) and check its exit status."""

    def __init__(self, command: str) -> None:
        self.command = command
        # A shell on purpose: ``pipe:`` URLs are shell commands the user wrote (webdataset's form).
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if not data:
            self.eof = True
        return data

    def close(self) -> str | None:
        """Close; return an error message when the command failed."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self.eof and self.proc.poll() is None:
            self.proc.kill()  # the reader stopped early; the command has nothing more to give
            self.proc.wait()
            return None
        code = self.proc.wait()
        if code not in (0, -13, 141):  # 141 / -SIGPIPE: we closed the pipe first
            return f"command {self.command!r} exited with status {code}"
        return None


class _TrackingStream:
    """Counts the bytes read and keeps the last ones, to check the tar's end-of-archive block."""

    KEEP = 1 << 18

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.pos = 0
        self.head = b""
        self.tail = bytearray()
        self.tail_start = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            drop = len(self.tail) - self.KEEP
            del self.tail[:drop]
            self.tail_start += drop
        return data

    def drain(self, limit: int = 1 << 20) -> None:
        while limit > 0:
            data = self.read(min(65536, limit))
            if not data:
                return
            limit -= len(data)

    def compressed(self) -> bool:
        return self.head.startswith(_COMPRESSED_MAGIC)

    def zero_block_at(self, offset: int) -> bool | None:
        """Whether a full zero 512-byte block starts at ``offset``; None if no longer known."""
        start = offset - self.tail_start
        if start < 0:
            return None
        block = bytes(self.tail[start : start + 512])
        return len(block) == 512 and not any(block)


# -- samples --------------------------------------------------------------------------------
@dataclass
class _Pending:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    # extension -> why that member was not read (a link, a device, too large, a duplicate name)
    refused: dict[str, str] = field(default_factory=dict)


_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}
_CAPTION_EXTS = ("json", "txt")


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


def _caption_value(value: Any) -> str | bytes:
    if isinstance(value, str):
        return raw_caption(value)
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        return base64.b64decode(value["b64"], validate=True)
    raise TypeError(f"a caption must be a string or {{'b64': ...}}, got {value!r}")


def _build_sample(pending: _Pending, shard: ShardRef) -> Sample:
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


def _error_sample(image_id: str, shard: ShardRef, reason: str) -> Sample:
    return Sample(image_id=image_id, image=None, image_error=reason, shard=shard.key)


def _check_manifest(data: dict[str, Any], url: str) -> None:
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


# -- the reader -----------------------------------------------------------------------------
class WebDatasetReader:
    """Reads webdataset tars given as a path, URL, brace pattern, list, or folder.

    Args:
        urls: a tar path or URL, a brace pattern (``shards/train-{000000..000009}.tar``),
            several joined by ``::``, a list of them, or a folder holding ``manifest.json``
            (as written by ``cusa shard``) or ``*.tar`` files.
        split: the split; selects ``manifest.json``'s split, or ``{split}-*.tar`` in a folder.
        storage_options: passed to ``fsspec.open`` for remote URLs (e.g. ``endpoint_url``).
        use_manifest: read counts, ids and the source identity from ``manifest.json`` next to
            the tars when there is one.
        name: the dataset name reported by the reader; by default the source dataset's name
            recorded in ``manifest.json`` (so shards of ``coco`` read as ``coco``), else
            ``"webdataset"``.
        allow_outside_root: let ``manifest.json`` name tars outside its folder (absolute paths,
            ``../``, symlinks leading out); refused by default.
    """

    kind = "webdataset"

    def __init__(
        self,
        urls: str | list[str],
        split: str = "train",
        *,
        storage_options: dict[str, Any] | None = None,
        use_manifest: bool = True,
        name: str | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.spec = urls
        self.allow_outside_root = bool(allow_outside_root)
        self.split = check_split(split)
        self.storage_options = dict(storage_options or {})
        self.use_manifest = use_manifest
        self._manifests: dict[str, dict[str, Any] | None] = {}
        self.urls = self._resolve(urls)
        self._refs: list[ShardRef] | None = None
        self.name = name or self._source_name() or "webdataset"

    def _source_name(self) -> str | None:
        """The source dataset's name when every shard comes from one manifest split."""
        names = set()
        for url in self.urls:
            found = self._locate(url)
            source = (found[0].get("source") if found else None) or {}
            names.add(source.get("dataset"))
        name = names.pop() if len(names) == 1 else None
        return name if isinstance(name, str) and name else None

    # -- resolution -------------------------------------------------------------------------
    def _resolve(self, urls: str | list[str]) -> list[str]:
        if isinstance(urls, str) and _is_local(urls) and _local_path(urls).is_dir():
            return self._resolve_folder(_local_path(urls))
        expanded = expand_urls(urls)
        if not expanded:
            raise DatasetError(f"no shards in {urls!r}")
        for url in expanded:
            if _is_local(url) and _local_path(url).exists() and not _local_path(url).is_file():
                raise DatasetError(
                    f"webdataset shard {url!r} is {file_kind(_local_path(url).stat().st_mode)}, "
                    "not a regular file; cusa reads tars from regular files only (stream one "
                    "with a pipe: URL if you must)"
                )
            if _is_local(url) and not _local_path(url).is_file():
                raise DatasetError(
                    f"webdataset shard {url!r} does not exist; check the path or brace pattern "
                    f"{urls!r}"
                )
        return expanded

    def _resolve_folder(self, folder: Path) -> list[str]:
        manifest = self._manifest_for(str(folder / MANIFEST_NAME))
        if manifest is not None:
            splits = manifest["splits"]
            if self.split not in splits:
                raise DatasetError(
                    f"{str(folder / MANIFEST_NAME)!r} has no split {self.split!r}; it has "
                    f"{', '.join(sorted(splits)) or '(none)'}"
                )
            return [self._manifest_tar(folder, e["file"]) for e in splits[self.split]["shards"]]
        tars = sorted(folder.glob(f"{self.split}-*.tar")) or sorted(folder.glob("*.tar"))
        if not tars:
            raise DatasetError(
                f"no webdataset shards in folder {str(folder)!r}: expected manifest.json or *.tar"
            )
        return [str(p) for p in tars]

    def _manifest_tar(self, folder: Path, name: str) -> str:
        """The path of a tar that ``manifest.json`` names; it must stay inside ``folder``."""
        path = folder / name
        plain = (
            name not in ("", ".", "..") and "/" not in name and "\\" not in name and ":" not in name
        )
        inside = plain and is_inside(os.path.realpath(path), [os.path.realpath(folder)])
        if not inside and not self.allow_outside_root:
            raise DatasetError(
                f"{str(folder / MANIFEST_NAME)!r} names shard file {short_repr(name)}, which is "
                f"outside {str(folder)!r}; cusa reads only tars inside the manifest's folder. "
                "Move the tars there, or pass --allow-outside-root if you trust this manifest"
            )
        return str(path)

    def _manifest_for(self, manifest_url: str) -> dict[str, Any] | None:
        if not self.use_manifest:
            return None
        if manifest_url in self._manifests:
            return self._manifests[manifest_url]
        data = None
        raw: bytes | None = None
        if _is_local(manifest_url):
            path = _local_path(manifest_url)
            if path.exists() or path.is_symlink():
                raw, reason = read_regular_file(path, MAX_INDEX_BYTES, what="manifest")
                if raw is None:
                    raise DatasetError(f"{reason}; remove it or replace it with a regular file")
        else:
            try:
                import fsspec

                fs, path = fsspec.core.url_to_fs(manifest_url, **self.storage_options)
                raw = fs.cat_file(path) if fs.exists(path) else None
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s: %s", manifest_url, exc)
        if raw is not None:
            try:
                data = loads_json_member(raw.decode("utf-8", "surrogateescape"))
            except ValueError as exc:
                log.warning("ignoring unreadable %s: %s", manifest_url, exc)
                data = None
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                log.warning("ignoring %s: not a %s manifest", manifest_url, MANIFEST_FORMAT)
                data = None
            else:
                _check_manifest(data, manifest_url)
        self._manifests[manifest_url] = data
        return data

    def _locate(self, url: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(split entry, shard entry)`` of ``url`` in the manifest beside it, if any."""
        if url.startswith("pipe:"):
            return None
        parent, base = posixpath.split(url if "://" in url else str(_local_path(url)))
        manifest = self._manifest_for(posixpath.join(parent, MANIFEST_NAME))
        if manifest is None:
            return None
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                if entry["file"] == base:
                    return split, entry
        return None

    def _manifest_entry(self, url: str) -> dict[str, Any] | None:
        found = self._locate(url)
        return found[1] if found else None

    # -- the DatasetReader protocol ---------------------------------------------------------
    def shards(self) -> list[ShardRef]:
        if self._refs is None:
            refs: list[ShardRef] = []
            owner: dict[str, str] = {}
            ids_owner: dict[str, str] = {}
            for url in self.urls:
                key = shard_key_for_url(url)
                if key in owner:
                    raise DatasetError(
                        f"two shards have the same key {key!r}: {owner[key]!r} and {url!r}; "
                        "shard file names must be unique"
                    )
                owner[key] = url
                entry = self._manifest_entry(url)
                count = entry.get("samples") if entry else None
                for image_id in (entry or {}).get("image_ids", []):
                    if image_id in ids_owner:
                        raise DatasetError(
                            f"duplicate image id {image_id!r} in shards {ids_owner[image_id]!r} "
                            f"and {url!r} (from manifest.json); image ids must be unique"
                        )
                    ids_owner[image_id] = url
                refs.append(ShardRef(key=key, source=url, num_samples=count))
            self._refs = refs
        return list(self._refs)

    def manifest_info(self, modality: str | None = None) -> dict[str, Any]:
        """What the features depend on, hashed (see ``IndexedReader.manifest_info``).

        Per tar: its file name and, from ``manifest.json``, its SHA-256 and image ids (which
        cover every caption byte); for a local tar without a manifest, its size. Tars are their
        own shards, so the layout and the content hash are the same.
        """
        rows = []
        for ref in self.shards():
            entry = self._manifest_entry(ref.source)
            source = posixpath.basename(ref.source) if _is_local(ref.source) else ref.source
            ids = None
            if entry is not None:
                source = f"{entry['file']}@{entry.get('sha256', '')}"
                ids = entry.get("image_ids")
            elif _is_local(ref.source):
                with contextlib.suppress(OSError):
                    source += f":{_local_path(ref.source).stat().st_size}"
            rows.append((ref.key, source, ids))
        digest = layout_hash(self.kind, self.split, rows)
        return {
            "format": MANIFEST_HASH_FORMAT,
            "modality": None,  # a tar's identity covers its images and captions alike
            "hash": digest,
            "content_hash": digest,
            "shard_size": None,
            "shards": len(rows),
        }

    def manifest_hash(self) -> str:
        return self.manifest_info()["hash"]

    def _open(self, url: str) -> Any:
        if url.startswith("pipe:"):
            return _PipeStream(url[5:])
        if _is_local(url):
            return _open_regular(_local_path(url))
        import fsspec

        return fsspec.open(url, "rb", **self.storage_options).open()

    def read(self, shard: ShardRef) -> Iterator[Sample]:
        try:
            raw = self._open(shard.source)
        except (OSError, ValueError, ImportError) as exc:
            raise DatasetError(
                f"cannot open webdataset shard {shard.key!r} at {shard.source!r}: {exc}"
            ) from exc
        stream = _TrackingStream(raw)
        count = 0
        error: str | None = None
        pending: _Pending | None = None
        seen_keys: set[str] = set()
        seen_ids: dict[str, str] = {}
        try:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|*")  # type: ignore[arg-type]  # noqa: SIM115
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise DatasetError(
                    f"webdataset shard {shard.key!r} at {shard.source!r} is not a readable tar: "
                    f"{exc}"
                ) from exc
            try:
                for member in tar:
                    name = member.name
                    if is_unsafe_member(name):
                        log.warning(
                            "skipping member %r of %s: its path escapes the archive",
                            name,
                            shard.source,
                        )
                        # Never read, never written anywhere, but ledgered: not silently dropped.
                        yield Sample(
                            image_id=f"{shard.key}:{name}",
                            image=None,
                            image_error=f"tar member {name!r} escapes the archive; not read",
                            shard=shard.key,
                        )
                        continue
                    if member.isdir():
                        continue
                    problem = member_problem(member)
                    key, ext = split_member_name(name)
                    if key is None or ext is None:
                        if problem is not None:
                            # No sample to attach it to: ledger the member itself.
                            log.warning("member %r of %s %s", name, shard.source, problem)
                            yield _error_sample(
                                f"{shard.key}:{name}",
                                shard,
                                f"tar member {name!r} of {shard.source} {problem}; not read",
                            )
                        else:
                            log.debug("skipping member %r of %s: no extension", name, shard.source)
                        continue
                    if pending is not None and key != pending.key:
                        sample = _build_sample(pending, shard)
                        self._check_id(sample, seen_ids, pending.key, shard)
                        seen_keys.add(pending.key)
                        pending = None
                        count += 1
                        yield sample
                    if pending is None:
                        if key in seen_keys:
                            raise DatasetError(
                                f"non-contiguous key {key!r} in webdataset shard {shard.source!r}: "
                                "its members are split by other keys; group each sample's "
                                "members together (e.g. re-shard with 'cusa shard')"
                            )
                        pending = _Pending(key)
                    if ext in pending.members or ext in pending.refused:
                        log.warning("member %r appears twice in %s", name, shard.source)
                        pending.members.pop(ext, None)
                        pending.refused[ext] = (
                            "appears more than once in the tar, so which copy is meant is "
                            "ambiguous; re-shard with unique member names"
                        )
                        continue
                    if problem is not None:
                        log.warning("member %r of %s %s", name, shard.source, problem)
                        pending.refused[ext] = problem
                        continue
                    fileobj = tar.extractfile(member)
                    data = fileobj.read() if fileobj is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    pending.members[ext] = data
                if not stream.compressed():
                    end = tar.offset
                    stream.drain()
                    if stream.zero_block_at(end) is False:
                        error = "the tar ends without its end-of-archive block"
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                error = str(exc) or type(exc).__name__
        finally:
            closer = getattr(raw, "close", None)
            status = closer() if closer is not None else None
            if isinstance(status, str) and error is None:
                error = status
        if error is not None:
            where = f"webdataset shard {shard.key!r} at {shard.source!r}"
            if pending is not None:
                yield _error_sample(
                    pending.key,
                    shard,
                    f"truncated tar: {where} broke off while reading sample {pending.key!r} "
                    f"({error}); the samples before it were read",
                )
            else:
                yield _error_sample(
                    f"{shard.key}:truncated",
                    shard,
                    f"truncated tar: {where} broke off after {count} samples ({error})",
                )
            return
        if pending is not None:
            sample = _build_sample(pending, shard)
            self._check_id(sample, seen_ids, pending.key, shard)
            count += 1
            yield sample
        if shard.num_samples is not None and count != shard.num_samples:
            yield _error_sample(
                f"{shard.key}:truncated",
                shard,
                f"truncated tar: webdataset shard {shard.key!r} at {shard.source!r} holds "
                f"{count} samples but manifest.json lists {shard.num_samples}",
            )

    @staticmethod
    def _check_id(sample: Sample, seen: dict[str, str], key: str, shard: ShardRef) -> None:
        first = seen.get(sample.image_id)
        if first is not None:
            raise DatasetError(
                f"duplicate image id {sample.image_id!r} in webdataset shard {shard.source!r}: "
                f"keys {first!r} and {key!r}; image ids must be unique"
            )
        seen[sample.image_id] = key

    def __getstate__(self) -> dict[str, Any]:
        # read() needs only the shard refs; the manifests (with every image id) stay behind so
        # the reader pickled to each Ray task stays small. They are reloaded if asked for.
        state = self.__dict__.copy()
        state["_manifests"] = {}
        return state

    def __repr__(self) -> str:
        return f"WebDatasetReader({self.spec!r}, split={self.split!r})"


def looks_like_webdataset(spec: str) -> bool:
    """Whether a dataset spec names tars: ``*.tar``, a brace pattern, ``pipe:`` or a URL."""
    if spec.startswith("pipe:") or "://" in spec:
        return True
    if "{" in spec and ".." in spec and "}" in spec:
        return True
    return any(spec.endswith(s) for s in TAR_SUFFIXES)


__all__ = [
    "MANIFEST_NAME",
    "WebDatasetReader",
    "decode_key",
    "encode_key",
    "expand_urls",
    "looks_like_webdataset",
    "shard_key_for_url",
    "split_member_name",
]
