"""Sealing: a group's committed parts consolidated into arrays sorted by sample id.

The sorted ``features`` are streamed chunk by chunk, and each chunk block by block: a block
gathers its rows from memory maps of the parts that are unmapped again right after, so sealing
memory is bounded by :func:`seal_block_bytes`, not by the number of rows. The seal record
``sealed.json`` is written last (see :mod:`cusa.store.layout`);
:meth:`cusa.store.group.FeatureGroup.seal` runs these steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from .fs import StoreFS
from .layout import Segment, now

# A sealed chunk holds at most this many bytes, so one chunk file stays mmap- and zarr-friendly.
MAX_CHUNK_BYTES = 2**31 - 1
#: Sealing assembles the sorted rows this many bytes at a time (environment variable
#: ``CUSA_SEAL_BLOCK_BYTES`` overrides it): seal memory is bounded by this setting, not by N.
SEAL_BLOCK_BYTES = 64 * 2**20
SEAL_ATTEMPTS = 3


def seal_block_bytes() -> int:
    """Bytes of sorted rows sealing holds at a time: ``CUSA_SEAL_BLOCK_BYTES`` or the default.

    Raises:
        ConfigError: the variable is not a positive integer.
    """
    raw = os.environ.get("CUSA_SEAL_BLOCK_BYTES", "").strip()
    if not raw:
        return SEAL_BLOCK_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"CUSA_SEAL_BLOCK_BYTES={raw!r} is invalid; use a positive number of bytes "
            f"(default {SEAL_BLOCK_BYTES})"
        )
    return value


def sort_unique_ids(ids: list[str], url: str) -> tuple[list[int], list[str]]:
    """``(order, sorted_ids)``: the positions of ``ids`` in sorted-id order, and those ids.

    Raises:
        StoreError: an id occurs twice (two shards committed it).
    """
    order = sorted(range(len(ids)), key=ids.__getitem__)
    sorted_ids = [ids[i] for i in order]
    for a, b in zip(sorted_ids, sorted_ids[1:]):  # noqa: B905 (offset by one on purpose)
        if a == b:
            raise StoreError(
                f"cannot seal {url!r}: sample id {a!r} was committed by two shards; "
                "ids must be unique across the dataset — fix the dataset (duplicate ids) "
                "and re-extract into a new store"
            )
    return order, sorted_ids


def write_sorted_arrays(
    fs: StoreFS,
    rel: str,
    segs: list[Segment],
    order: list[int],
    sorted_ids: list[str],
    dim: int,
    dtype: np.dtype,
) -> tuple[list[int], list[str]]:
    """Write the group-level ``features`` and ``sample_id`` of the group at ``rel``, sorted by id.

    Row ``i`` of ``features`` is row ``order[i]`` of the segments read one after the other;
    without rows, the arrays are removed.

    Returns:
        ``(chunk_rows, chunk_sha256)``: the rows and the SHA-256 of each ``features`` chunk.
    """
    n = len(order)
    row_bytes = max(dim * dtype.itemsize, 1)
    chunk = max(1, min(n, MAX_CHUNK_BYTES // row_bytes)) if n else 1

    # Map global (unsorted) rows to their segment. Each output chunk is streamed to its file
    # block by block, and a block gathers its rows from memory maps of the parts that are
    # unmapped again right after: memory stays bounded by the block setting, not by N.
    offsets = np.cumsum([0] + [s.rows for s in segs])
    order_arr = np.asarray(order, dtype=np.int64)
    chunk_rows: list[int] = []
    chunk_sha: list[str] = []
    group_store = fs.zarr_store(rel)
    if not n:
        for name in ("features", "sample_id"):
            fs.remove(f"{rel}/{name}")
        return chunk_rows, chunk_sha
    _seal_array(
        group_store,
        "features",
        shape=(n, dim),
        chunks=(chunk, dim),
        dtype=dtype,
        compressors=None,
        filters=None,
        fill_value=0,
    )
    block = max(1, seal_block_bytes() // row_bytes)
    with contextlib.ExitStack() as stack:
        local = _local_segment_files(fs, segs, dim, dtype, stack)
        for ci, start in enumerate(range(0, n, chunk)):
            stop = min(start + chunk, n)
            digest = hashlib.sha256()
            blocks = _sorted_blocks(
                segs, local, order_arr, offsets, start, stop, block, digest, dim, dtype
            )
            fs.write_stream_atomic(f"{rel}/features/c/{ci}/0", blocks)
            chunk_rows.append(stop - start)
            chunk_sha.append(digest.hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sid = _seal_array(group_store, "sample_id", shape=(n,), chunks=(n,), dtype=str)
    sid[...] = np.array(sorted_ids, dtype=object)
    return chunk_rows, chunk_sha


def _local_segment_files(
    fs: StoreFS, segs: list[Segment], dim: int, dtype: np.dtype, stack: contextlib.ExitStack
) -> list[str]:
    """A local file per segment, each checked for its size, to memory-map while sealing.

    Parts of an object store are copied to a temporary folder first (removed by ``stack``),
    so sealing there needs local disk for the parts but no more memory than on a disk.
    """
    tmpdir = (
        None
        if fs.is_local
        else stack.enter_context(tempfile.TemporaryDirectory(prefix="cusa-seal-"))
    )
    files = []
    for i, seg in enumerate(segs):
        if tmpdir is None:
            path = fs.local_path(seg.rel)
        else:
            path = os.path.join(tmpdir, f"{i}.bin")
            fs.fs.get_file(fs.path(seg.rel), path)
        size, expected = os.path.getsize(path), seg.rows * dim * dtype.itemsize
        if size != expected:
            raise StoreError(
                f"chunk file {fs.path(seg.rel)!r} has {size} bytes, expected {expected} "
                f"({seg.rows} rows x {dim} x {dtype}); it is truncated or corrupt "
                "— run `cusa store verify` and re-extract the shard"
            )
        files.append(path)
    return files


def _sorted_blocks(
    segs: list[Segment],
    files: list[str],
    order: np.ndarray,
    offsets: np.ndarray,
    start: int,
    stop: int,
    block: int,
    digest: Any,
    dim: int,
    dtype: np.dtype,
) -> Iterator[np.ndarray]:
    """Sorted rows ``start:stop`` in blocks of ``block`` rows, each added to ``digest``.

    The two block buffers are reused (the consumer writes each block before asking for the
    next), so no per-block allocation can fragment the heap.
    """
    size = min(block, stop - start)
    out = np.empty((size, dim), dtype=dtype)
    buf = np.empty((size, dim), dtype=dtype)
    for b0 in range(start, stop, block):
        src = order[b0 : min(b0 + block, stop)]  # global unsorted rows, in sorted-id order
        seg_of = np.searchsorted(offsets, src, side="right") - 1
        by_seg = np.argsort(seg_of, kind="stable")
        present, firsts = np.unique(seg_of[by_seg], return_index=True)
        for s, lo, hi in zip(present, firsts, [*firsts[1:], len(src)], strict=True):
            pick = by_seg[lo:hi]
            part = np.memmap(files[s], dtype=dtype, mode="r", shape=(segs[s].rows, dim))
            # mode="clip" writes straight into buf (mode="raise" would buffer a copy first)
            np.take(part, src[pick] - offsets[s], axis=0, out=buf[: len(pick)], mode="clip")
            del part  # unmap now: only this block's pages are ever resident
            out[pick] = buf[: len(pick)]
        digest.update(out[: len(src)])
        yield out[: len(src)]


def _seal_array(store: Any, name: str, **kwargs: Any) -> Any:
    """The group-level array ``name``, created unless one of that shape already exists.

    Sealing writes deterministic bytes with atomic renames, so two writers sealing at once (or a
    re-seal after a crash) can both write safely; but ``overwrite=True`` would first delete the
    other writer's finished chunks, so an existing array of the right shape is reused instead.
    """
    import zarr

    try:
        arr = zarr.open_array(store=store, path=name, mode="r+")
        if arr.shape == kwargs["shape"] and arr.chunks == kwargs["chunks"]:
            return arr
    except FileNotFoundError:  # zarr's ArrayNotFoundError
        pass
    return zarr.create_array(store=store, name=name, overwrite=True, **kwargs)


def new_seal_record(
    rows: int, failed: int, shards: list[str], chunk_rows: list[int], chunk_sha256: list[str]
) -> dict[str, Any]:
    """The seal record of a group sealed now."""
    return {
        "rows": rows,
        "failed": failed,
        "shards": shards,
        "chunk_rows": chunk_rows,
        "chunk_sha256": chunk_sha256,
        "sealed": now(),
    }


def is_seal_record(record: Any) -> bool:
    """Whether ``record`` has rows, chunk_rows and chunk_sha256 that agree."""
    rows = record.get("chunk_rows") if isinstance(record, dict) else None
    sums = record.get("chunk_sha256") if isinstance(record, dict) else None
    return (
        isinstance(record, dict)
        and isinstance(record.get("rows"), int)
        and isinstance(record.get("failed", 0), int)
        and isinstance(record.get("shards", []), list)
        and isinstance(rows, list)
        and isinstance(sums, list)
        and len(rows) == len(sums)
        and all(isinstance(r, int) and r > 0 for r in rows)
        and all(isinstance(h, str) for h in sums)
        and sum(rows) == record.get("rows")
    )


def remove_temp_files(fs: StoreFS, rel: str) -> None:
    """Delete ``*.partial`` files that writers killed mid-write left in the sealed group ``rel``.

    Every file of a sealed group is final, so a temporary file can only be garbage, or the
    in-flight write of a writer that lost a race (its rename then fails harmlessly).
    Object stores write whole objects and have none.
    """
    if not fs.is_local:
        return
    for dirpath, _, filenames in os.walk(fs.local_path(rel)):
        for name in filenames:
            if name.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
