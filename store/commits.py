"""Committing one shard: its rows checked, its part folder written, its commit record.

A shard is written to a uniquely named part folder (``parts/<shard>.<token>/``) and becomes
visible only when its commit record ``commits/<shard>.json`` is created, exclusively: of two
writers racing on a shard, the one that creates the record wins (see :mod:`cusa.store.layout`).
:meth:`cusa.store.group.FeatureGroup.write_shard` runs these steps.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import uuid
import warnings
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError
from .fs import StoreFS
from .layout import MANIFEST, now, safe_name
from .ledger import manifest_table, parquet_bytes


@dataclass(frozen=True)
class WriteResult:
    """What ``write_shard`` did: ``committed``, ``skipped`` (already committed) or ``lost-race``."""

    shard: str
    status: str
    rows: int
    failed: int


def commit_rel(group_rel: str, shard: str) -> str:
    """Where the commit record of ``shard`` lives in the group at ``group_rel``."""
    return f"{group_rel}/commits/{safe_name(shard)}.json"


def new_part_name(shard: str) -> str:
    """A part folder name of ``shard`` that no other writer uses: ``<shard>.<token>``."""
    return f"{safe_name(shard)}.{uuid.uuid4().hex[:12]}"


def check_rows(
    shard: str,
    ids: list[str],
    features: np.ndarray,
    failures: list[tuple[str, str]],
    spec: dict[str, Any],
    url: str,
) -> np.ndarray:
    """``features`` as a C-order ``(len(ids), dim)`` array of the spec's dtype, once checked.

    Raises:
        StoreError: a shape that does not match the spec, NaN/inf after the cast, a duplicate
            sample id (among the rows and the failures), or an id that is not valid UTF-8.
    """
    dim, dtype = int(spec["dim"]), np.dtype(spec["dtype"])
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[0] != len(ids) or (len(ids) and arr.shape[1] != dim):
        raise StoreError(
            f"shard {shard!r}: features of shape {arr.shape} do not match {len(ids)} ids "
            f"x dim {dim} of teacher {spec['name']!r} in {url!r}"
        )
    with np.errstate(over="ignore"):  # an overflow to inf is caught just below
        arr = np.ascontiguousarray(arr.reshape(len(ids), dim), dtype=dtype)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        names = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise StoreError(
            f"shard {shard!r}: non-finite features (NaN/inf after casting to "
            f"{spec['dtype']}) for sample ids {names}; refusing to write them to "
            f"{url!r}. Record such samples as failures instead."
        )
    seen: set[str] = set()
    for sid in [*ids, *(f for f, _ in failures)]:
        if sid in seen:
            raise StoreError(f"shard {shard!r}: duplicate sample id {sid!r}; ids must be unique")
        try:
            sid.encode("utf-8")
        except UnicodeEncodeError:
            shown = sid.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")
            raise StoreError(
                f"shard {shard!r}: sample id {shown!r} is not valid UTF-8 text; zarr and "
                "Parquet store UTF-8 only — record such samples as failures under an "
                "escaped id"
            ) from None
        seen.add(sid)
    return arr


def write_part(
    fs: StoreFS,
    part_rel: str,
    shard: str,
    ids: list[str],
    arr: np.ndarray,
    failures: list[tuple[str, str]],
) -> str:
    """Write the part folder of one shard; returns the SHA-256 of its feature bytes."""
    import zarr

    root = zarr.open_group(store=fs.zarr_store(part_rel), mode="w")
    if ids:
        feats = root.create_array(
            "features",
            shape=arr.shape,
            chunks=arr.shape,
            dtype=arr.dtype,
            compressors=None,
            filters=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        feats[...] = arr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns that vlen strings are a v3 extension
            sid = root.create_array("sample_id", shape=(len(ids),), chunks=(len(ids),), dtype=str)
        sid[...] = np.array(ids, dtype=object)
    table = manifest_table(
        ids=[*ids, *(f for f, _ in failures)],
        rows=[*range(len(ids)), *([-1] * len(failures))],
        shard=shard,
        errors=[None] * len(ids) + [r for _, r in failures],
    )
    fs.write_bytes_atomic(f"{part_rel}/{MANIFEST}", parquet_bytes(table))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def new_commit_record(
    shard: str,
    part: str,
    rows: int,
    failed: int,
    spec: dict[str, Any],
    features_sha256: str,
    source: str,
) -> dict[str, Any]:
    """The commit record of a written part, naming this writer (host and process)."""
    return {
        "shard": shard,
        "part": part,
        "rows": rows,
        "failed": failed,
        "dim": int(spec["dim"]),
        "dtype": spec["dtype"],
        "features_sha256": features_sha256,
        "source": source,
        "committed": now(),
        "writer": f"{socket.gethostname()}:{os.getpid()}",
    }


def is_commit_record(rec: Any) -> bool:
    """Whether ``rec`` has a shard, a safe part name, a row count and a features hash."""
    return (
        isinstance(rec, dict)
        and isinstance(rec.get("shard"), str)
        and isinstance(rec.get("part"), str)
        and safe_name(rec["part"]) == rec["part"]
        and isinstance(rec.get("rows"), int)
        and not isinstance(rec.get("rows"), bool)
        and rec["rows"] >= 0
        and isinstance(rec.get("features_sha256"), str)
    )


def records_stamp(fs: StoreFS, group_rel: str) -> str | None:
    """A SHA-256 of what ``lstat`` says of each commit record of a local group: its name, inode
    number, change time (``st_ctime_ns``), size and modification time.

    Any write to a record, a record replaced (another inode), added or removed, a chmod or a new
    hard link changes it, and no system call sets a change time back. A seal records it
    (``commits_stamp`` in ``sealed.json``) after checking every record, so a reader that finds
    the same stamp knows the records are the ones the seal checked, at one ``stat`` each
    instead of reading and parsing each one (``open_by_shards`` in
    ``benchmarks/results/web_scale.json`` measures both); ``cusa store verify`` still reads them
    all. A copied store (new inodes) has another stamp: its readers read the
    records, as for a group sealed before stamps existed.

    Returns:
        The hex digest; None on object stores, without a ``commits`` folder, or when the folder
        or a record is not what it should be (a symlink, not a regular file): the caller then
        checks every record, which names the problem.
    """
    if not fs.is_local:
        return None
    try:
        fd = os.open(
            fs.local_path(f"{group_rel}/commits"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        )
    except OSError:  # missing, a symlink (ELOOP), not a folder
        return None
    try:
        names = sorted(n for n in os.listdir(fd) if n.endswith(".json"))
        stats = [os.stat(n, dir_fd=fd, follow_symlinks=False) for n in names]
    except OSError:  # a record removed while we look
        return None
    finally:
        os.close(fd)
    if not all(stat.S_ISREG(s.st_mode) for s in stats):
        return None
    digest = hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape"))
    digest.update(array("Q", [s.st_ino for s in stats]).tobytes())
    digest.update(array("q", [s.st_ctime_ns for s in stats]).tobytes())
    # size and modification time too: with coarse file times, a rewrite in the same clock tick
    # as the record's creation keeps its change time
    digest.update(array("q", [s.st_size for s in stats]).tobytes())
    digest.update(array("q", [s.st_mtime_ns for s in stats]).tobytes())
    return digest.hexdigest()


def _id_key(sample_id: str) -> int:
    """A 64-bit hash of an id: the registry keeps ints, not one Python string per id."""
    data = sample_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class CommittedIds:
    """Which shard committed each sample id of one group, so that an id a second shard brings
    is found when that shard is committed, not only when the group is sealed.

    Loaded once from the group's committed parts (a resumed run), then kept up to date with
    :meth:`add`. Ids are held as 64-bit hashes; a hash match is confirmed against the earlier
    shard's stored ids, so the answer is exact.
    """

    def __init__(self, group: Any) -> None:
        self._group = group
        self._where: dict[int, str] | None = None
        self._shard_ids: dict[str, set[str]] = {}  # ids of shards read to confirm a match

    def _load(self) -> dict[int, str]:
        if self._where is None:
            self._where = {}
            if not self._group.sealed:  # a sealed group takes no more commits
                for rec, seg in zip(
                    [r for r in self._group.commit_records() if r["rows"] > 0],
                    self._group.segments(),
                    strict=False,
                ):
                    for sid in self._group.read_ids(seg):
                        self._where.setdefault(_id_key(sid), rec["shard"])
        return self._where

    def _ids_of(self, shard: str) -> set[str]:
        if shard not in self._shard_ids:
            recs = [r for r in self._group.commit_records() if r["shard"] == shard]
            segs = [s for s in self._group.segments() if recs and f"/{recs[0]['part']}/" in s.rel]
            self._shard_ids[shard] = {i for s in segs for i in self._group.read_ids(s)}
        return self._shard_ids[shard]

    def duplicates(self, shard: str, ids: list[str]) -> dict[str, str]:
        """``{id: earlier shard}`` for each of ``ids`` another shard of the group committed."""
        where = self._load()
        out = {}
        for sid in ids:
            first = where.get(_id_key(sid))
            if first is not None and first != shard and sid in self._ids_of(first):
                out[sid] = first
        return out

    def add(self, shard: str, ids: list[str]) -> None:
        """Record ``ids`` as committed by ``shard``."""
        where = self._load()
        for sid in ids:
            where.setdefault(_id_key(sid), shard)
