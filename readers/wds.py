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
  :data:`~cusa.readers._common.MAX_IMAGE_BYTES`, or whose name appears twice in the tar is
  never read: its sample's image (or captions, for a ``.json``/``.txt`` member) is ledgered with
  the reason, so the sample cannot vanish and no copy silently wins;
- ``manifest.json`` may only name tars inside its own folder (no ``/``, no ``..``, no symlink
  leading out) unless ``allow_outside_root`` is set;
- a truncated or corrupt tar yields every complete sample read before the fault, then one
  error sample whose ``image_error`` starts with ``"truncated tar"``; its ``image_id`` is the key
  that was being read (its members are discarded) or ``"<shard key>:truncated"``;
- when ``manifest.json`` (written by :mod:`cusa.readers.wds_writer`) lists fewer or more
  samples than were read, an error sample says so.

S3: credentials and endpoint come from the usual AWS variables; for an S3-compatible server set
``AWS_ENDPOINT_URL`` (or ``FSSPEC_S3_ENDPOINT_URL``), or pass ``storage_options``.
``pipe:`` URLs run a shell command: use them only with commands you trust.

This module finds the tars and walks them; the format they follow (keys, member rules, how one
key's members become a sample, the manifest) is :mod:`.wds_format`, shared with
:mod:`cusa.readers.wds_writer`, and the URLs and byte streams are :mod:`.wds_streams`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ._common import (
    MANIFEST_HASH_FORMAT,
    MAX_INDEX_BYTES,
    check_split,
    file_kind,
    is_inside,
    layout_hash,
    loads_json_member,
    read_regular_file,
    short_repr,
)
from .base import Sample, ShardRef
from .wds_format import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    TAR_SUFFIXES,
    PendingSample,
    build_sample,
    check_manifest,
    is_unsafe_member,
    member_problem,
    shard_key_for_url,
    split_member_name,
)
from .wds_streams import (
    PipeStream,
    TrackingStream,
    expand_urls,
    is_local,
    local_path,
    open_regular,
)

log = logging.getLogger(__name__)


def _error_sample(image_id: str, shard: ShardRef, reason: str) -> Sample:
    return Sample(image_id=image_id, image=None, image_error=reason, shard=shard.key)


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
        if isinstance(urls, str) and is_local(urls) and local_path(urls).is_dir():
            return self._resolve_folder(local_path(urls))
        expanded = expand_urls(urls)
        if not expanded:
            raise DatasetError(f"no shards in {urls!r}")
        for url in expanded:
            if is_local(url) and local_path(url).exists() and not local_path(url).is_file():
                raise DatasetError(
                    f"webdataset shard {url!r} is {file_kind(local_path(url).stat().st_mode)}, "
                    "not a regular file; cusa reads tars from regular files only (stream one "
                    "with a pipe: URL if you must)"
                )
            if is_local(url) and not local_path(url).is_file():
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
        if is_local(manifest_url):
            path = local_path(manifest_url)
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
                check_manifest(data, manifest_url)
        self._manifests[manifest_url] = data
        return data

    def _locate(self, url: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(split entry, shard entry)`` of ``url`` in the manifest beside it, if any."""
        if url.startswith("pipe:"):
            return None
        parent, base = posixpath.split(url if "://" in url else str(local_path(url)))
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
            source = posixpath.basename(ref.source) if is_local(ref.source) else ref.source
            ids = None
            if entry is not None:
                source = f"{entry['file']}@{entry.get('sha256', '')}"
                ids = entry.get("image_ids")
            elif is_local(ref.source):
                with contextlib.suppress(OSError):
                    source += f":{local_path(ref.source).stat().st_size}"
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
            return PipeStream(url[5:])
        if is_local(url):
            return open_regular(local_path(url))
        import fsspec

        return fsspec.open(url, "rb", **self.storage_options).open()

    def read(self, shard: ShardRef) -> Iterator[Sample]:
        try:
            raw = self._open(shard.source)
        except (OSError, ValueError, ImportError) as exc:
            raise DatasetError(
                f"cannot open webdataset shard {shard.key!r} at {shard.source!r}: {exc}"
            ) from exc
        stream = TrackingStream(raw)
        count = 0
        error: str | None = None
        pending: PendingSample | None = None
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
                        sample = build_sample(pending, shard)
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
                        pending = PendingSample(key)
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
            sample = build_sample(pending, shard)
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


__all__ = ["WebDatasetReader", "looks_like_webdataset"]
