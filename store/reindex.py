"""The id index file of a sealed group: checked against the group, rebuilt (``cusa store reindex``),
and verified against the sealed ids (``cusa store verify``).

Building it is :mod:`cusa.store.id_index`; sealing writes it (:mod:`cusa.store.sealing`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import StoreError
from .commits import records_stamp
from .fs import StoreFS
from .id_index import IdIndex, hash_ids, open_index_file
from .layout import ID_INDEX, ID_INDEX_LOCK, SEALED, json_bytes
from .sealing import read_sealed_ids, remove_temp_files, write_id_index


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

    On a local store it also renews the seal record's stamp of the commit records
    (:func:`cusa.store.commits.records_stamp`) when it is missing or no longer matches (a group
    sealed by an older cusa, a copied or chmod-ed store), after checking every record again, so
    that readers ``stat`` the records instead of reading them.

    A lock file, created exclusively (the store's commit mechanism: ``os.link`` on a disk),
    refuses a second reindex of the same group running at once; a lock left by a killed process
    on this host is taken over.

    Returns:
        ``"written"`` (the index), ``"restamped"`` (a valid index was there, the stamp was
        renewed), ``"up-to-date"`` (both were; ``force`` rewrites the index) or ``"not-sealed"``
        (an unsealed group's lookups index its parts in memory).

    Raises:
        StoreError: another process holds the lock (the message names it), or an id is
            duplicated. BrokenGroupError: a commit record is unreadable (before restamping).
    """
    sealed = group.sealed
    if not sealed:
        return "not-sealed"
    fs, rel = group.fs, group.rel
    index_ok = not force and _index_is_valid(group)
    stamp_ok = not fs.is_local or records_stamp(fs, rel) == sealed.get("commits_stamp")
    if index_ok and stamp_ok:
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
        if not index_ok:
            remove_temp_files(fs, rel)
            write_id_index(fs, rel, read_sealed_ids(group))
        if not stamp_ok:
            record = dict(sealed)
            record.pop("commits_stamp", None)
            stamp = group.checked_records_stamp()  # every record read and checked again
            if stamp is not None:
                record["commits_stamp"] = stamp
            fs.write_bytes_atomic(f"{rel}/{SEALED}", json_bytes(record))
    finally:
        fs.remove(lock)
    return "restamped" if index_ok else "written"


# -- verify: the index file checked against the sealed ids, streamed ------------------------------

#: Ids per block of verify's streamed passes: its scratch memory is a few hundred bytes per id of
#: a block, whatever N is (tests make it small so that block boundaries are exercised).
VERIFY_BLOCK_IDS = 2**17
# Runs of equal hashes kept for the duplicate check (a run is a collision or a duplicate id).
_RUNS_KEPT = 10_000
_FIX = "run `cusa store reindex --force` to rebuild it"


class SealedIds:
    """The ids of a sealed group in row order, with an :class:`IdIndex` over them for lookups.

    The arrays are those of ``id_index.bin`` (memory-mapped) or built in memory. Verify reads them
    block by block and calls :meth:`release` after each block: the mapped pages are then dropped
    from the process (``MADV_DONTNEED``; they stay in the page cache), so its resident memory is
    a block, not the file.
    """

    def __init__(self, index: IdIndex) -> None:
        self.index = index
        self.offsets = np.asarray(index.offsets, dtype=np.int64)
        self.blob = index.blob
        base = getattr(index.hashes, "base", None)  # the np.memmap of a mapped file
        self._mmap = getattr(base, "_mmap", None)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def release(self) -> None:
        """Drop the mapped pages read so far from this process (no-op in memory)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                self._mmap.madvise(mmap.MADV_DONTNEED)

    def bounds(self, block: int | None = None) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` row ranges of ``block`` ids (default :data:`VERIFY_BLOCK_IDS`)."""
        step = max(1, block or VERIFY_BLOCK_IDS)
        n = len(self)
        for lo in range(0, n, step):
            yield lo, min(n, lo + step)

    def block(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, blob)`` of rows ``lo:hi``: offsets re-based to 0 (a copy), blob a view."""
        off = np.array(self.offsets[lo : hi + 1], dtype=np.int64)
        blob = self.blob[int(off[0]) : int(off[-1])]
        off -= off[0]
        return off, blob

    def binary(self, lo: int, hi: int) -> pa.LargeBinaryArray:
        """Rows ``lo:hi`` as an Arrow ``large_binary`` array (its offsets copied, bytes not)."""
        off, blob = self.block(lo, hi)
        data = pa.py_buffer(np.ascontiguousarray(blob)) if len(blob) else pa.py_buffer(b"")
        return pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), hi - lo, [None, pa.py_buffer(off), data]
        )

    def id_bytes(self, row: int) -> bytes:
        return bytes(self.blob[int(self.offsets[row]) : int(self.offsets[row + 1])])

    def id_at(self, row: int) -> str:
        """The id of ``row`` (one string, for messages)."""
        return self.id_bytes(row).decode("utf-8", "surrogateescape")


def open_mapped_ids(group: Any, path: str) -> SealedIds:
    """The id index file at the local ``path`` of ``group``, mapped and checked against the
    group's seal record (rows, ``sample_id`` chunk size).

    Raises:
        StoreError: a malformed or stale file.
    """
    index, header = open_index_file(path)
    check_index_header(header, group)
    return SealedIds(index)


def memory_ids(offsets: np.ndarray, blob: np.ndarray) -> tuple[SealedIds, list[tuple[int, int]]]:
    """The ids ``blob[offsets[i]:offsets[i+1]]`` with an index built in memory (about 30 bytes
    per id: a group without a usable index file), and the row pairs of duplicate ids."""
    hashes = hash_ids(offsets, blob)
    order = np.argsort(hashes, kind="stable")
    hashes = np.take(hashes, order)
    rows = order.astype(np.uint32 if len(order) < 2**32 else np.uint64)
    del order
    index = IdIndex(hashes, rows, offsets, blob, 1)
    ids = SealedIds(index)
    eq = np.flatnonzero(hashes[1:] == hashes[:-1]) if len(hashes) > 1 else np.zeros(0, np.int64)
    pairs, max_run = _duplicates(ids, eq)
    index.max_run = max(1, max_run)
    return ids, pairs


def chunk_matches(group: Any, ids: SealedIds) -> bool | None:
    """Whether the sealed ``sample_id`` chunk decompresses to exactly the ``vlen-utf8`` bytes of
    ``ids`` (a u32 count, then a u32 length and the bytes of each id): compared block by block
    as it streams, nothing parsed. None when its codecs are not ``vlen-utf8`` + ``zstd``, or the
    chunk is missing (the caller reads the array with zarr instead)."""
    fs, rel = group.fs, group.rel
    try:
        meta = fs.read_json(f"{rel}/sample_id/zarr.json")
        names = [c.get("name") for c in meta.get("codecs", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if names != ["vlen-utf8", "zstd"] or not fs.exists(f"{rel}/sample_id/c/0"):
        return None
    n = len(ids)
    try:
        with fs.open_read(f"{rel}/sample_id/c/0") as raw:
            stream = pa.CompressedInputStream(pa.PythonFile(_Readable(raw), mode="r"), "zstd")
            if not n and stream.read(4) != (0).to_bytes(4, "little"):
                return False
            for lo, hi in ids.bounds():
                off, blob = ids.block(lo, hi)
                expected = _vlen_bytes(off, blob, header=n if lo == 0 else None)
                ids.release()
                got = stream.read(len(expected))
                if len(got) != len(expected) or not np.array_equal(
                    np.frombuffer(got, dtype=np.uint8), expected
                ):
                    return False
            return stream.read(1) == b""
    except (OSError, ValueError, pa.ArrowException):
        return False  # not zstd, or truncated: the zarr read says what is wrong


class _Readable:
    """A file-like with only ``read`` (a store's streamed file) made acceptable to Arrow."""

    closed = False

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def _vlen_bytes(offsets: np.ndarray, blob: np.ndarray, header: int | None) -> np.ndarray:
    """``vlen-utf8`` bytes of the ids ``blob[offsets[i]:offsets[i+1]]`` (offsets from 0), with
    the count header when ``header`` is given."""
    k = len(offsets) - 1
    base = 4 if header is not None else 0
    lengths = np.diff(offsets)
    start = base + 4 * np.arange(k, dtype=np.int64) + offsets[:-1]  # (k,) each length's place
    out = np.empty(base + 4 * k + int(offsets[-1]), dtype=np.uint8)
    if header is not None:
        out[:4] = np.frombuffer(np.uint32(header).tobytes(), dtype=np.uint8)
    out[start[:, None] + np.arange(4)] = lengths.astype("<u4").view(np.uint8).reshape(k, 4)
    dst = np.repeat(start + 4 - offsets[:-1], lengths)  # (bytes,) the shift of each id byte
    dst += np.arange(int(offsets[-1]), dtype=np.int64)
    out[dst] = blob
    return out


def index_problems(ids: SealedIds) -> tuple[str | None, list[tuple[int, int]]]:
    """``(problem, duplicates)`` of a mapped index whose ids are the sealed ids: every row
    once, hashes sorted, each hash that of its row's id, the bucket table and ``max_run`` right;
    and the row pairs of duplicate ids (equal hashes, equal bytes).

    Streamed: the hash entries block by block, then the ids in row order block by block. That
    each hash is its row's id's hash is checked as multisets: with every row once, the sum of
    ``mix(hash, row)`` over the entries equals the sum of ``mix(hash(id_r), r)`` over the rows
    exactly when each entry's hash is its row's (a wrong one slips through with probability
    2**-64). Memory: a block, plus one byte per row (the rows seen).
    """
    index, n = ids.index, len(ids)
    hashes, rows = index.hashes, index.rows_of_hash
    seen = np.zeros(n, dtype=bool)
    unsorted, total, prev = False, 0, None
    eq_parts: list[np.ndarray] = []
    kept = 0
    for lo, hi in ids.bounds():
        h = np.array(hashes[lo:hi])
        r = np.asarray(rows[lo:hi]).astype(np.int64)
        if r.min() < 0 or r.max() >= n:
            return "its rows are not each row once", []
        seen[r] = True
        unsorted = unsorted or bool((h[1:] < h[:-1]).any()) or (prev is not None and h[0] < prev)
        if kept < _RUNS_KEPT:
            eq = np.flatnonzero(h[1:] == h[:-1]) + lo
            if prev is not None and h[0] == prev:
                eq = np.concatenate(([lo - 1], eq))
            eq_parts.append(eq[: _RUNS_KEPT - kept])
            kept += len(eq_parts[-1])
        total = (total + _pair_sum(h, r)) % 2**64
        prev = h[-1]
        ids.release()
    if not seen.all():
        return "its rows are not each row once", []
    del seen
    recomputed = 0
    for lo, hi in ids.bounds():
        off, blob = ids.block(lo, hi)
        hashed = hash_ids(off, blob, index.hash_name)
        recomputed = (recomputed + _pair_sum(hashed, np.arange(lo, hi))) % 2**64
        ids.release()
    if recomputed != total:
        return "a hash is not the hash of its row's id", []
    if unsorted:
        return "its hashes are not sorted", []
    if index.buckets is not None and not _buckets_ok(ids):
        return "its bucket table does not match its hashes", []
    eq = np.concatenate(eq_parts) if eq_parts else np.zeros(0, np.int64)
    pairs, max_run = _duplicates(ids, eq)
    if max_run > index.max_run:
        return (
            f"it records runs of at most {index.max_run} equal hashes but has one of {max_run}"
        ), pairs
    return None, pairs


def _pair_sum(hashes: np.ndarray, rows: np.ndarray) -> int:
    """Sum (mod 2**64) of a 64-bit mix of each (hash, row) pair."""
    x = hashes.astype(np.uint64) ^ _fmix64(rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    return int(np.sum(_fmix64(x), dtype=np.uint64))


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _buckets_ok(ids: SealedIds) -> bool:
    """Whether bucket ``b`` starts at the first hash whose top bits are ``b``, for every b.

    Streamed: the table must rise from 0 to N, and each entry ``i`` of top bits ``t`` must lie in
    ``buckets[t]:buckets[t+1]``; together these pin every bucket start, empty ones included.
    """
    index, n = ids.index, len(ids)
    buckets = index.buckets
    bits = (len(buckets) - 1).bit_length() - 1
    if len(buckets) != 2**bits + 1 or int(buckets[0]) != 0 or int(buckets[-1]) != n:
        return False
    step = VERIFY_BLOCK_IDS
    last = 0
    for lo in range(0, len(buckets), step):
        b = np.asarray(buckets[lo : lo + step]).astype(np.int64)
        if (np.diff(b) < 0).any() or b[0] < last:
            return False
        last = int(b[-1])
    widest = 0
    for lo, hi in ids.bounds():
        h = np.asarray(index.hashes[lo:hi])
        tops = (h >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(hi - lo, np.int64)
        at = np.arange(lo, hi)
        start = np.asarray(buckets[tops]).astype(np.int64)
        end = np.asarray(buckets[tops + 1]).astype(np.int64)
        if ((at < start) | (at >= end)).any():
            return False
        widest = max(widest, int((end - start).max()))
        ids.release()
    window = getattr(index, "_window", None)  # lookups search this many hashes from a start
    return window is None or widest <= len(window)


def _duplicates(ids: SealedIds, eq: np.ndarray) -> tuple[list[tuple[int, int]], int]:
    """``(pairs, max_run)``: from the entries ``eq`` whose hash equals the next entry's, the
    row pairs of equal ids (first row, later row) and the longest run of equal hashes."""
    if not len(eq):
        return [], 1
    index = ids.index
    pairs: list[tuple[int, int]] = []
    max_run = 1
    breaks = np.flatnonzero(np.diff(eq) != 1) + 1
    for run in np.split(eq, breaks):
        entries = np.append(run, run[-1] + 1)
        max_run = max(max_run, len(entries))
        first: dict[bytes, int] = {}
        for r in sorted(int(x) for x in np.asarray(index.rows_of_hash[entries])):
            key = ids.id_bytes(r)
            if key in first:
                pairs.append((first[key], r))
            else:
                first[key] = r
    return pairs, max_run


def read_sealed_id_array(group: Any) -> pa.LargeStringArray:
    """The sealed ``sample_id`` array read by zarr, as Arrow (no Python object per id)."""
    import zarr

    arr = zarr.open_array(
        store=group.fs.zarr_store(f"{group.rel}/sample_id", read_only=True), mode="r"
    )
    values = arr[:]
    if values.dtype == object:  # older numpy/zarr: objects, converted once here
        return pa.array(values.tolist(), type=pa.large_string())
    return pa.array(values, type=pa.large_string())


def arrow_buffers(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, blob)``: (N+1,) int64 from 0 and uint8 of an Arrow string/binary array."""
    if isinstance(ids, pa.ChunkedArray):
        ids = pa.concat_arrays(ids.chunks) if ids.num_chunks else pa.array([], pa.large_binary())
    ids = ids.cast(pa.large_binary())
    n = len(ids)
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    bufs = ids.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[ids.offset : ids.offset + n + 1]
    blob = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    blob = blob[int(offsets[0]) : int(offsets[-1])]
    return offsets - offsets[0], blob


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
