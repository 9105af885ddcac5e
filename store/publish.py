"""``cusa store publish``: a self-contained, read-only copy of sealed groups for any file host.

A published store is an ordinary store folder that holds only sealed, verified groups, plus a
consolidated index ``cusa_index.json`` at its root::

    OUT/cusa_store.json                      the store marker (as in every store)
    OUT/cusa_index.json                      the consolidated index, written last (below)
    OUT/<dataset>/<split>/<teacher>@<fp>[-<dtype>]/
        zarr.json  sealed.json  manifest.parquet  commits/*.json  id_index.bin (when present)
        features/zarr.json  features/c/<i>/0      the sealed feature chunks
        sample_id/zarr.json sample_id/c/0         the sorted sample ids
        scale/zarr.json     scale/c/<i>           int8 groups only (cusa.store.quant)

The index lists every file with its size and SHA-256 (``files``) and every group with its
spec, counts, seal record and size (``groups``), so a reader never lists a folder: a static
HTTP server, a Hugging Face dataset repository or a release asset serves it as it is, and
:meth:`cusa.store.FeatureStore.open` reads it read-only through fsspec. ``cusa store pull``
copies its groups into a store of your own (:mod:`cusa.store.pull`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, StoreError
from .feature_store import FeatureStore
from .fs import (
    COPY_BLOCK_BYTES,
    PUBLISHED_FORMAT,
    PUBLISHED_INDEX_VERSION,
    CheckedBlocks,
    StoreFS,
    is_writable_url,
    read_published_index,
)
from .group import FeatureGroup
from .layout import LAYOUT_VERSION, MARKER, PUBLISHED_INDEX, is_junk, json_bytes, now
from .verify import verify_group

log = logging.getLogger(__name__)

#: Files of a sealed group that are never published: writer leftovers and lock files.
_SKIP_SUFFIXES = (".partial", ".lock")

Progress = Callable[[int], None]


class PublishRefusedError(StoreError):
    """Some selected groups are not sealed or do not verify; the message names each one."""


@dataclass
class PublishResult:
    """What ``publish_store`` wrote: the output URL, the groups, bytes copied and skipped."""

    out: str
    groups: list[dict[str, Any]] = field(default_factory=list)
    copied_bytes: int = 0
    skipped_files: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(int(g["bytes"]) for g in self.groups)


def group_matches(
    entry: dict[str, Any], dataset: str | None, split: str | None, teacher: str | None
) -> bool:
    """Whether an index group entry (or group summary) is selected by the filters."""
    if dataset is not None and entry["dataset"] != dataset:
        return False
    if split is not None and entry["split"] != split:
        return False
    if teacher is None:
        return True
    name, fp = entry["teacher"], entry["fingerprint"]
    leaf = entry["path"].rsplit("/", 1)[-1]
    return teacher in (name, fp, f"{name}@{fp}", leaf)


def _summary(group: FeatureGroup) -> dict[str, Any]:
    return {
        "path": group.rel,
        "dataset": group.dataset,
        "split": group.split,
        "teacher": group.spec["name"],
        "fingerprint": group.fingerprint,
        "dtype": group.spec["dtype"],
    }


def select_groups(
    store: FeatureStore,
    dataset: str | None = None,
    split: str | None = None,
    teacher: str | None = None,
) -> list[FeatureGroup]:
    """The groups of ``store`` that the filters select, refusing any that cannot be published.

    Raises:
        ConfigError: nothing matches the filters.
        PublishRefusedError: a selected group is broken, not sealed, or fails ``verify``; the
            message names every such group and why.
    """
    good, broken = store.scan()
    chosen = [g for g in good if group_matches(_summary(g), dataset, split, teacher)]
    problems = [
        f"{b.rel} (broken: {b.error[:120]})"
        for b in broken
        if _broken_selected(b.rel, dataset, split, teacher)
    ]
    if not chosen and not problems:
        known = ", ".join(g.rel for g in good) or "(none)"
        raise ConfigError(
            f"no group of {store.url!r} matches dataset={dataset!r} split={split!r} "
            f"teacher={teacher!r}; groups there: {known}"
        )
    for g in chosen:
        if not g.sealed:
            problems.append(f"{g.rel} (not sealed: finish its extraction first)")
            continue
        report = verify_group(g)
        if not report.ok:
            first = report.errors[0].replace(f"{store.fs.root}/", "").replace(f"{g.rel}: ", "")
            problems.append(f"{g.rel} (verify: {first[:200]})")
    if problems:
        raise PublishRefusedError(
            f"only sealed, verified groups are published; refused {len(problems)} group(s) of "
            f"{store.url!r}: {'; '.join(problems)}"[:480]
            + "; run `cusa store verify` and finish or fix them, or narrow the selection"
        )
    return chosen


def _broken_selected(rel: str, dataset: str | None, split: str | None, teacher: str | None) -> bool:
    parts = rel.split("/")
    if len(parts) != 3:
        return False
    entry = {"path": rel, "dataset": parts[0], "split": parts[1]}
    name, _, rest = parts[2].partition("@")
    entry.update(teacher=name, fingerprint=rest.split("-", 1)[0])
    return group_matches(entry, dataset, split, teacher)


def group_files(group: FeatureGroup) -> list[str]:
    """Every file of a sealed group to publish, relative to the store root, sorted.

    Writer leftovers (``parts/``, ``*.partial``, lock files) and desktop junk are left out.
    """
    sfs = group.fs
    base = sfs.path(group.rel)
    out = []
    for full in sfs.fs.find(base):
        rel = f"{group.rel}/{full[len(base) :].lstrip('/')}"
        name = rel.rsplit("/", 1)[-1]
        inner = rel[len(group.rel) + 1 :]
        if inner.startswith("parts/") or name.endswith(_SKIP_SUFFIXES) or is_junk(name):
            continue
        if sfs.is_local and os.path.islink(full):  # never follow a link out of the store
            raise PublishRefusedError(
                f"{full!r} is a symbolic link; a published store holds regular files only - "
                "replace it with the file it points to, or remove it"
            )
        out.append(rel)
    return sorted(out)


def _sealed_chunk_sums(group: FeatureGroup, sealed: dict[str, Any]) -> dict[str, str]:
    """``{file: sha256}`` of the chunks whose hashes the seal record holds."""
    sums = {f"{group.rel}/features/c/{i}/0": h for i, h in enumerate(sealed["chunk_sha256"])}
    for i, h in enumerate(sealed.get("scale_sha256") or []):
        sums[f"{group.rel}/scale/c/{i}"] = h
    return sums


def copy_file(
    src: StoreFS,
    dst: StoreFS,
    rel: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """Stream ``rel`` from ``src`` to ``dst`` atomically; returns ``(bytes, sha256)``.

    With ``sha256``/``size`` given, a copy whose bytes differ is refused before it becomes
    visible (the error names the file and both hashes).
    """
    blocks = CheckedBlocks(src, rel, size=size, sha256=sha256, progress=progress)
    dst.write_stream_atomic(rel, blocks)
    return blocks.nbytes, blocks.sha256


def file_sha256(sfs: StoreFS, rel: str) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with sfs.open_read(rel) as fh:
        while block := fh.read(COPY_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _already_there(
    dst: StoreFS, rel: str, size: int, prev: dict[str, Any] | None, sealed_sha: str | None
) -> bool:
    """Whether a publish before this one left ``rel`` in ``dst`` with the same bytes."""
    return (
        prev is not None
        and prev["size"] == size
        and sealed_sha in (None, prev["sha256"])
        and dst.exists(rel)
        and dst.size(rel) == size
        and file_sha256(dst, rel) == prev["sha256"]
    )


def _open_out(out: str, storage_options: dict[str, Any] | None) -> tuple[StoreFS, dict | None]:
    if not is_writable_url(str(out)):
        raise ConfigError(
            f"cannot publish straight to {out!r}: publish to a folder (or s3://), then upload "
            "that folder to the host (docs/store.md, 'share with another lab')"
        )
    sfs = StoreFS.from_url(str(out), **(storage_options or {}))
    index = read_published_index(sfs)
    if index is None:
        foreign = [n for n in sfs.ls("") if not is_junk(n)]
        if foreign:
            what = "a writable cusa store" if MARKER in foreign else "not empty"
            raise ConfigError(
                f"cannot publish into {sfs.url!r}: it is {what} and not a published store; "
                "publish into a new or empty folder"
            )
    return sfs, index


def publish_store(
    store: FeatureStore,
    out: str,
    *,
    dataset: str | None = None,
    split: str | None = None,
    teacher: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> PublishResult:
    """Copy the selected sealed, verified groups of ``store`` into a published store at ``out``.

    ``out`` is a new or empty folder (or ``s3://`` prefix), or a store published before: its
    groups are kept and the index is rewritten with the new ones (a group published again is
    replaced, files with the same bytes are not copied again). Each feature chunk is checked
    against its seal record while it is copied. The index is written last.

    Raises:
        PublishRefusedError: a selected group is not sealed or does not verify.
        ConfigError: nothing selected, or ``out`` is not a place to publish to.
    """
    if store.published:
        raise ConfigError(
            f"{store.url!r} is itself a published store; pull it (`cusa store pull`) or serve "
            "it as it is"
        )
    groups = select_groups(store, dataset, split, teacher)
    dst, old = _open_out(out, storage_options)
    files: dict[str, dict[str, Any]] = dict(old["files"]) if old else {}
    entries = {g["path"]: g for g in (old["groups"] if old else [])}
    result = PublishResult(out=dst.url)
    for group in groups:
        sealed = group.sealed
        assert sealed is not None  # select_groups refused unsealed groups
        for rel in [k for k in files if k.startswith(f"{group.rel}/")]:
            del files[rel]
        known = _sealed_chunk_sums(group, sealed)
        total = 0
        for rel in group_files(group):
            size = group.fs.size(rel)
            prev = (old or {}).get("files", {}).get(rel)
            if _already_there(dst, rel, size, prev, known.get(rel)):
                files[rel] = prev
                total += size
                result.skipped_files += 1
                continue
            n, digest = copy_file(
                group.fs, dst, rel, sha256=known.get(rel), size=size, progress=progress
            )
            files[rel] = {"size": n, "sha256": digest}
            total += n
            result.copied_bytes += n
        entry = {
            **_summary(group),
            "dim": group.dim,
            "rows": int(sealed["rows"]),
            "failed": int(sealed.get("failed", 0)),
            "bytes": total,
            "spec": group.spec,
            "sealed": sealed,
            "manifest_hash": group.attrs.get("manifest_hash"),
        }
        entries[group.rel] = entry
        result.groups.append(entry)
        log.info("published %s (%d bytes)", group.rel, total)
    marker = {"format": "cusa-store", "layout_version": LAYOUT_VERSION, "published": True}
    data = json_bytes(marker)
    dst.write_bytes_atomic(MARKER, data)
    files[MARKER] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    index = {
        "format": PUBLISHED_FORMAT,
        "index_version": PUBLISHED_INDEX_VERSION,
        "layout_version": LAYOUT_VERSION,
        "published": now(),
        "groups": [entries[k] for k in sorted(entries)],
        "files": dict(sorted(files.items())),
    }
    dst.write_bytes_atomic(PUBLISHED_INDEX, json_bytes(index))
    return result
