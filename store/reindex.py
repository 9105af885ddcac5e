"""The id index file of a sealed group: checked against the group, rebuilt (``cusa store reindex``),
and verified against the sealed ids (``cusa store verify``).

Building it is :mod:`cusa.store.id_index`; sealing writes it (:mod:`cusa.store.sealing`).
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

import numpy as np

from ..errors import StoreError
from .fs import StoreFS
from .id_index import hash_ids, open_index_file
from .layout import ID_INDEX, ID_INDEX_LOCK
from .sealing import id_buffers, read_sealed_ids, remove_temp_files, write_id_index


def check_index_header(header: dict[str, Any], group: Any) -> None:
    """Refuse an index that does not belong to the group's sealed arrays as they are now.

    Raises:
        StoreError: the rows or the ``sample_id`` chunk size differ from the header's.
    """
    sealed = group.sealed or {}
    rows = int(sealed.get("rows", -1))
    if header.get("rows") != rows or header.get("n") != rows:
        raise StoreError(
            f"{ID_INDEX} of {group.url!r} indexes {header.get('rows')!r} ids but the group is "
            f"sealed with {rows} rows; run `cusa store reindex`"
        )
    size = group.fs.size(f"{group.rel}/sample_id/c/0") if rows else 0
    if header.get("sample_id_chunk_bytes") != size:
        raise StoreError(
            f"{ID_INDEX} of {group.url!r} was built from a sample_id chunk of "
            f"{header.get('sample_id_chunk_bytes')!r} bytes, which now has {size}; run "
            "`cusa store reindex`"
        )


def reindex_group(group: Any, *, force: bool = False) -> str:
    """Write the id index of a sealed group that lacks a valid one (a group sealed by an older
    cusa). Idempotent and crash-safe (the file is written under a temporary name, then renamed).

    A lock file, created exclusively (the store's commit mechanism: ``os.link`` on a disk),
    refuses a second reindex of the same group running at once; a lock left by a killed process
    on this host is taken over.

    Returns:
        ``"written"``, ``"up-to-date"`` (a valid index was there; ``force`` rewrites it) or
        ``"not-sealed"`` (an unsealed group's lookups index its parts in memory).

    Raises:
        StoreError: another process holds the lock (the message names it), or an id is
            duplicated.
    """
    sealed = group.sealed
    if not sealed:
        return "not-sealed"
    fs, rel = group.fs, group.rel
    if not force and _index_is_valid(group):
        return "up-to-date"
    lock = f"{rel}/{ID_INDEX_LOCK}"
    me = f"{socket.gethostname()}:{os.getpid()}"
    if not fs.create_exclusive(lock, me.encode()):
        holder = _lock_holder(fs, lock)
        if not _is_stale(holder):
            raise StoreError(
                f"cannot reindex {group.url!r}: {holder!r} is writing its id index now "
                f"({lock} exists); wait for it to finish, or delete that file if the process "
                "is gone"
            )
        fs.remove(lock)  # left by a process of this host that no longer runs
        if not fs.create_exclusive(lock, me.encode()):
            raise StoreError(
                f"cannot reindex {group.url!r}: another process took its lock {lock} just now"
            )
    try:
        remove_temp_files(fs, rel)
        write_id_index(fs, rel, read_sealed_ids(group))
    finally:
        fs.remove(lock)
    return "written"


def check_id_index(group: Any) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of a sealed group's id index, checked against its sealed ids.

    The file must match the sealed arrays (rows, ``sample_id`` chunk), hold exactly the sealed
    ids in row order, and every hash must be the hash of its row's id, sorted, each row once.
    All of it is numpy over the whole index (memory about 30 bytes per id), no Python object
    per id. A group without the file (sealed by an older cusa) only gets a warning.
    """
    rel, fs = group.rel, group.fs
    fix = "run `cusa store reindex --force` to rebuild it"
    if not fs.exists(f"{rel}/{ID_INDEX}"):
        return [], [
            f"{rel}: no {ID_INDEX} (sealed by an older cusa): every lookup reads all its ids "
            "when it opens; `cusa store reindex` writes the index"
        ]
    if fs.is_local:
        return _check_index_file(group, fs.local_path(f"{rel}/{ID_INDEX}"), fix)
    # An object store: the index is checked from a local copy (a temporary file, removed after).
    with tempfile.TemporaryDirectory(prefix="cusa-verify-") as tmp:
        local = os.path.join(tmp, ID_INDEX)
        try:
            fs.copy_to_local(
                f"{rel}/{ID_INDEX}", local, sha256=fs.recorded_sha256(f"{rel}/{ID_INDEX}")
            )
        except StoreError as exc:
            return [f"{rel}: {ID_INDEX} is unusable ({exc}); {fix}"], []
        return _check_index_file(group, local, fix)


def _check_index_file(group: Any, path: str, fix: str) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of the id index file at the local ``path`` of ``group``."""
    rel = group.rel
    try:
        index, header = open_index_file(path)
        check_index_header(header, group)
    except StoreError as exc:
        return [f"{rel}: {ID_INDEX} is unusable ({exc}); {fix}"], []
    offsets, blob = id_buffers(read_sealed_ids(group))
    problems = []
    if not (np.array_equal(index.offsets, offsets) and np.array_equal(index.blob, blob)):
        problems.append("its id bytes differ from the sealed sample_id array")
    else:
        n = len(index)
        rows = np.asarray(index.rows_of_hash, dtype=np.int64)
        if n and (rows.min() < 0 or rows.max() >= n or np.bincount(rows, minlength=n).max() > 1):
            problems.append("its rows are not each row once")
        elif n and not np.array_equal(index.hashes, hash_ids(offsets, blob, index.hash_name)[rows]):
            problems.append("a hash is not the hash of its row's id")
        elif n > 1 and bool((index.hashes[1:] < index.hashes[:-1]).any()):
            problems.append("its hashes are not sorted")
    return [f"{rel}: {ID_INDEX} does not match the sealed ids: {p}; {fix}" for p in problems], []


def _index_is_valid(group: Any) -> bool:
    rel = f"{group.rel}/{ID_INDEX}"
    if not group.fs.is_local or not group.fs.exists(rel):
        return False
    try:
        _, header = open_index_file(group.fs.local_path(rel))
        check_index_header(header, group)
    except (StoreError, OSError):
        return False
    return True


def _lock_holder(fs: StoreFS, lock: str) -> str:
    try:
        return fs.read_bytes(lock).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return ""


def _is_stale(holder: str) -> bool:
    """Whether a lock names a process of this host that is not running (or names nothing)."""
    host, _, pid = holder.rpartition(":")
    if not holder:
        return True
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
