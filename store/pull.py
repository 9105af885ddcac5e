"""``cusa store pull``: copy groups of a published store into a store of your own, verified.

Every file is streamed with its SHA-256 checked against the published index before it becomes
visible. A group's ``zarr.json`` is written last (exclusively), so until the pull of a group
is complete no reader sees it. A killed pull is resumed by running it again: files already
copied are kept when their bytes still match the index, the rest are copied. A group already
present with the same fingerprint and the same sealed chunk hashes is skipped; one present
with other bytes (or still being extracted) is refused, since features of one fingerprint must
be the same everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, StoreError
from .feature_store import FeatureStore
from .fs import read_published_index
from .group import FeatureGroup
from .layout import SEALED
from .publish import Progress, copy_file, file_sha256, group_matches

log = logging.getLogger(__name__)


class PullConflictError(StoreError):
    """The destination holds the same fingerprint with other bytes; pulling would mix them."""


@dataclass
class PullResult:
    """Per group: ``pulled``, ``present`` (skipped, same bytes) or ``resumed``."""

    source: str
    dest: str
    groups: dict[str, str] = field(default_factory=dict)
    copied_bytes: int = 0
    kept_files: int = 0


def _same_seal(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    keys = ("rows", "chunk_rows", "chunk_sha256", "scale_sha256")
    return all(mine.get(k) == theirs.get(k) for k in keys)


def _check_present(dest: FeatureStore, entry: dict[str, Any]) -> bool:
    """True when ``dest`` already holds this group with the same bytes; raises on a conflict."""
    rel = entry["path"]
    if not dest.fs.exists(f"{rel}/zarr.json"):
        return False
    group = FeatureGroup(dest, rel)
    sealed = group.sealed
    where = f"{dest.url.rstrip('/')}/{rel}"
    if sealed is None:
        raise PullConflictError(
            f"{where!r} holds an unsealed group of the same fingerprint (an extraction is "
            "writing it); let it finish and compare, or pull into another --store"
        )
    if _same_seal(sealed, entry["sealed"]):
        return True
    mine, theirs = sealed.get("chunk_sha256") or ["-"], entry["sealed"].get("chunk_sha256") or ["-"]
    raise PullConflictError(
        f"{where!r} already holds fingerprint {entry['fingerprint']!r} of teacher "
        f"{entry['teacher']!r} with other bytes (rows {sealed.get('rows')} vs "
        f"{entry['sealed'].get('rows')}, chunk 0 SHA-256 {mine[0][:12]}... vs "
        f"{theirs[0][:12]}...); refused, so the two are never mixed - remove the local group, "
        "or pull into another --store"
    )


def _clean_partials(dest: FeatureStore, rel: str) -> None:
    """Remove temporary files that a killed pull left in the group folder (local stores)."""
    if not dest.fs.is_local:
        return
    for dirpath, _, names in os.walk(dest.fs.local_path(rel)):
        for name in names:
            if name.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))


def pull_store(
    source: str | FeatureStore,
    dest: str | FeatureStore | None,
    *,
    dataset: str | None = None,
    split: str | None = None,
    teacher: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> PullResult:
    """Copy the selected groups of the published store ``source`` into ``dest`` (created if new).

    Raises:
        ConfigError: ``source`` is not a published store, or nothing matches the filters.
        PullConflictError: ``dest`` holds a selected fingerprint with other bytes.
        StoreError: a file's bytes do not match the index (named), or the host went away.
    """
    src = (
        source
        if isinstance(source, FeatureStore)
        else FeatureStore.open(source, storage_options=storage_options)
    )
    index = read_published_index(src.fs) if src.published else None
    if index is None:
        raise ConfigError(
            f"{src.url!r} is not a published store (no cusa_index.json); publish it with "
            "`cusa store publish`, or use it directly with --store"
        )
    out = dest if isinstance(dest, FeatureStore) else FeatureStore.open(dest, create=True)
    entries = [g for g in index["groups"] if group_matches(g, dataset, split, teacher)]
    if not entries:
        known = ", ".join(g["path"] for g in index["groups"]) or "(none)"
        raise ConfigError(
            f"no group of {src.url!r} matches dataset={dataset!r} split={split!r} "
            f"teacher={teacher!r}; groups there: {known}"
        )
    result = PullResult(source=src.url, dest=out.url)
    for entry in entries:  # check every conflict before copying anything
        if _check_present(out, entry):
            result.groups[entry["path"]] = "present"
    for entry in entries:
        rel = entry["path"]
        if rel in result.groups:
            continue
        _clean_partials(out, rel)
        files = {k: v for k, v in index["files"].items() if k.startswith(f"{rel}/")}
        # zarr.json makes the group visible, so it goes last; the seal record just before it.
        order = sorted(files, key=lambda k: (k == f"{rel}/zarr.json", k == f"{rel}/{SEALED}", k))
        kept = 0
        for name in order:
            want = files[name]
            if name == f"{rel}/zarr.json":
                data = src.fs.read_bytes(name)
                if hashlib.sha256(data).hexdigest() != want["sha256"]:
                    raise StoreError(
                        f"{src.fs.path(name)!r} does not match its recorded SHA-256; refused"
                    )
                # another writer created it meanwhile: same bytes, or refused
                if not out.fs.create_exclusive(name, data) and not _check_present(out, entry):
                    raise PullConflictError(
                        f"{out.url.rstrip('/')}/{rel} appeared while pulling it; run again"
                    )
                continue
            if (
                out.fs.exists(name)
                and out.fs.size(name) == want["size"]
                and file_sha256(out.fs, name) == want["sha256"]
            ):
                kept += 1
                continue
            n, _ = copy_file(
                src.fs, out.fs, name, sha256=want["sha256"], size=want["size"], progress=progress
            )
            result.copied_bytes += n
        result.kept_files += kept
        group = FeatureGroup(out, rel)
        if not group.sealed or not _same_seal(group.sealed, entry["sealed"]):
            raise StoreError(f"pulled group {group.url!r} does not read back as published")
        result.groups[rel] = "resumed" if kept else "pulled"
        log.info("pulled %s into %s", rel, out.url)
    return result
