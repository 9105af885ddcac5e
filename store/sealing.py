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
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError, StoreError
from .fs import StoreFS
from .id_index import IdIndex, index_file_blocks
from .layout import ID_INDEX, MANIFEST, Segment, now
from .ledger import MANIFEST_SCHEMA, read_manifest

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


# -- sample ids as Arrow arrays: no Python object per id -------------------------------------------


def empty_ids() -> pa.LargeStringArray:
    return pa.array([], type=pa.large_string())


def _zarr_ids(fs: StoreFS, rel: str) -> pa.LargeStringArray:
    """The string array at ``rel`` as Arrow: zarr decodes it to numpy's ``StringDType`` (no Python
    object per id), which Arrow converts in C."""
    import zarr

    arr = zarr.open_array(store=fs.zarr_store(rel, read_only=True), mode="r")
    values = arr[:]
    if values.dtype == object:  # older numpy/zarr: objects, converted once here
        return pa.array(values.tolist(), type=pa.large_string())
    return pa.array(values, type=pa.large_string())


def read_segment_ids(group: Any, segs: list[Segment]) -> pa.LargeStringArray:
    """The ids of the committed parts ``segs``, one after the other (row order of an unsealed
    group).

    Raises:
        FileNotFoundError: a part vanished (a concurrent seal: callers retry from the seal).
        BrokenGroupError: an id array is unreadable.
    """
    chunks = []
    for seg in segs:
        try:
            chunks.append(_zarr_ids(group.fs, seg.ids_rel))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            name = seg.ids_rel[len(group.rel) + 1 :]
            raise group._broken(
                f"the sample_id array {name} is unreadable ({type(exc).__name__})"
            ) from exc
    if not chunks:
        return empty_ids()
    return pa.concat_arrays(chunks)


def read_sealed_ids(group: Any) -> pa.LargeStringArray:
    """The sealed ``sample_id`` array of ``group`` as Arrow (sorted; row order)."""
    try:
        return _zarr_ids(group.fs, f"{group.rel}/sample_id")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise group._broken(
            f"the sealed sample_id array is unreadable ({type(exc).__name__})"
        ) from exc


def id_buffers(ids: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, blob)``: (N+1,) int64 and uint8 views of an Arrow large_string array."""
    if isinstance(ids, pa.ChunkedArray):
        ids = pa.concat_arrays(ids.chunks) if ids.num_chunks else empty_ids()
    ids = ids.cast(pa.large_string())
    bufs = ids.buffers()
    n = len(ids)
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[ids.offset : ids.offset + n + 1]
    if n == 0:
        offsets = np.zeros(1, dtype=np.int64)
    blob = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    if n and offsets[0] != 0:  # a slice: re-base (copies only the offsets)
        blob = blob[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
    return offsets, blob


def build_index_from_ids(ids: pa.LargeStringArray, url: str) -> IdIndex:
    """An in-memory id index of ``ids`` (row ``i`` is ``ids[i]``).

    Raises:
        StoreError: an id occurs twice; the message names it and the group.
    """
    offsets, blob = id_buffers(ids)
    return IdIndex.build(offsets, blob, what=repr(url))


def sort_unique_ids(ids: pa.LargeStringArray, url: str) -> tuple[np.ndarray, pa.LargeStringArray]:
    """``(order, sorted_ids)``: the positions of ``ids`` in sorted-id order, and those ids.

    Sorted by Arrow (UTF-8 byte order, which is code point order, as in Python), so no Python
    string is made per id.

    Raises:
        StoreError: an id occurs twice (two shards committed it).
    """
    order = pc.sort_indices(ids)
    sorted_ids = ids.take(order)
    n = len(sorted_ids)
    if n > 1:
        same = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, n - 1))
        if pc.any(same).as_py():
            first = pc.index(same, True).as_py()
            raise StoreError(
                f"cannot seal {url!r}: sample id {sorted_ids[first].as_py()!r} was committed by "
                "two shards; ids must be unique across the dataset — fix the dataset "
                "(duplicate ids) and re-extract into a new store"
            )
    # a view, not a copy: Arrow's uint64 indices are < 2**63
    return order.to_numpy().view(np.int64), sorted_ids


# -- the sealed manifest, streamed ----------------------------------------------------------------

#: Rows per Parquet row group of the sealed manifest (what sealing holds of it at a time).
MANIFEST_BLOCK_ROWS = 1_000_000


def write_sealed_manifest(
    group: Any, segs: list[Segment], order: np.ndarray, sorted_ids: pa.LargeStringArray
) -> int:
    """Write the group's sealed ``manifest.parquet`` block by block; returns the failed count.

    Its rows are those of :func:`cusa.store.ledger.sealed_manifest` (ok samples sorted by id with
    their sealed row, then failed ones sorted by id), but it is not built from the merged
    manifests: the ok rows come straight from the sorted ids and the order that sealed the
    features (row ``p`` is ``sorted_ids[p]``, from the part of ``order[p]``), written one Parquet
    row group at a time, and only the failed entries of the parts are read. So its memory is a
    block plus the failures, not the whole ledger (100M rows: ~5 GB as one Arrow table).
    """
    import pyarrow.parquet as pq

    shard_of_part = {r["part"]: r["shard"] for r in group.commit_records()}
    seg_shards = pa.array(
        [shard_of_part[seg.rel.split("/parts/", 1)[1].split("/", 1)[0]] for seg in segs],
        pa.string(),
    )
    seg_starts = np.cumsum([0] + [s.rows for s in segs])[:-1]
    failed = []
    for rec in group.commit_records():
        table = read_manifest(group.fs.read_bytes(f"{group.rel}/parts/{rec['part']}/{MANIFEST}"))
        failed.append(table.filter(pc.fill_null(pc.not_equal(table["status"], "ok"), True)))
    failed_table = (
        pa.concat_tables(failed).sort_by([("sample_id", "ascending")])
        if failed
        else MANIFEST_SCHEMA.empty_table()
    )
    failed_table = failed_table.set_column(
        failed_table.schema.get_field_index("row"),
        "row",
        pa.array(np.full(len(failed_table), -1, dtype=np.int64)),
    ).cast(MANIFEST_SCHEMA)
    n = len(order)
    with tempfile.TemporaryDirectory(prefix="cusa-manifest-") as tmp:
        local = os.path.join(tmp, MANIFEST)
        with pq.ParquetWriter(local, MANIFEST_SCHEMA) as writer:
            for lo in range(0, n, MANIFEST_BLOCK_ROWS):
                hi = min(n, lo + MANIFEST_BLOCK_ROWS)
                seg = np.searchsorted(seg_starts, order[lo:hi], side="right") - 1
                block = pa.table(
                    {
                        "sample_id": sorted_ids.slice(lo, hi - lo).cast(pa.string()),
                        "row": pa.array(np.arange(lo, hi, dtype=np.int64)),
                        "shard": seg_shards.take(pa.array(seg)),
                        "status": pa.array(["ok"]).take(pa.array(np.zeros(hi - lo, np.int64))),
                        "error": pa.nulls(hi - lo, pa.string()),
                    },
                    schema=MANIFEST_SCHEMA,
                )
                writer.write_table(block)
            if len(failed_table) or not n:
                writer.write_table(failed_table)

        def blocks() -> Iterator[bytes]:
            with open(local, "rb") as fh:
                while chunk := fh.read(8 * 2**20):
                    yield chunk

        group.fs.write_stream_atomic(f"{group.rel}/{MANIFEST}", blocks())
    return len(failed_table)


# -- the id index file -----------------------------------------------------------------------------


def write_id_index(fs: StoreFS, rel: str, sorted_ids: pa.LargeStringArray) -> dict[str, Any]:
    """Build and write ``id_index.bin`` of the sealed group at ``rel`` (temp file, then rename).

    Its header records the row count and the size of the ``sample_id`` chunk it was built from,
    which readers compare before trusting it.

    Returns:
        The header fields it recorded.

    Raises:
        StoreError: an id occurs twice.
    """
    offsets, blob = id_buffers(sorted_ids)
    index = IdIndex.build(offsets, blob, what=repr(fs.path(rel)))
    n = len(offsets) - 1
    extra = {
        "rows": n,
        "sample_id_chunk_bytes": fs.size(f"{rel}/sample_id/c/0") if n else 0,
        "built": now(),
    }
    fs.write_stream_atomic(f"{rel}/{ID_INDEX}", index_file_blocks(index, extra))
    return extra


def write_sorted_arrays(
    fs: StoreFS,
    rel: str,
    segs: list[Segment],
    order: np.ndarray,
    sorted_ids: pa.LargeStringArray,
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
    write_sealed_ids(fs, rel, sid, sorted_ids)
    return chunk_rows, chunk_sha


#: Ids encoded per zstd frame of the sealed ``sample_id`` chunk: its bytes stream to disk, and a
#: chunk below this is a single frame, byte for byte what zarr itself writes.
SAMPLE_ID_FRAME_BYTES = 8 * 2**20


def write_sealed_ids(fs: StoreFS, rel: str, sid: Any, sorted_ids: pa.LargeStringArray) -> None:
    """Write the one chunk of the sealed ``sample_id`` array from Arrow, streamed.

    Zarr's codecs for strings are ``vlen-utf8`` (a u32 count, then a u32 length and the bytes of
    each id) and ``zstd``; the chunk is built from the Arrow buffers block by block, each block a
    zstd frame (numcodecs decodes concatenated frames), so sealing never holds a Python string per
    id nor the whole chunk. Another codec configuration is left to zarr.
    """
    codecs = [c.to_dict() for c in (*sid.metadata.codecs,)]
    names = [c.get("name") for c in codecs]
    if names != ["vlen-utf8", "zstd"]:
        sid[...] = np.array(sorted_ids.to_pylist(), dtype=object)
        return
    import numcodecs

    conf = codecs[1].get("configuration", {})
    zstd = numcodecs.Zstd(level=int(conf.get("level", 0)), checksum=bool(conf.get("checksum")))
    offsets, blob = id_buffers(sorted_ids)
    n = len(offsets) - 1

    def frames() -> Iterator[bytes]:
        lo = 0
        while lo < n:
            hi = int(np.searchsorted(offsets, offsets[lo] + SAMPLE_ID_FRAME_BYTES, "right")) - 1
            hi = min(n, max(hi, lo + 1))
            raw = _vlen_block(offsets[lo : hi + 1], blob, header=n if lo == 0 else None)
            yield zstd.encode(raw)
            lo = hi

    fs.write_stream_atomic(f"{rel}/sample_id/c/0", frames())


def _vlen_block(offsets: np.ndarray, blob: np.ndarray, header: int | None) -> np.ndarray:
    """``vlen-utf8`` bytes of the ids ``blob[offsets[i]:offsets[i+1]]`` (+ the count header)."""
    k = len(offsets) - 1
    base = 4 if header is not None else 0
    lengths = np.diff(offsets)
    start = base + 4 * np.arange(k, dtype=np.int64) + (offsets[:-1] - offsets[0])  # (k,)
    out = np.empty(base + 4 * k + int(offsets[-1] - offsets[0]), dtype=np.uint8)
    if header is not None:
        out[:4] = np.frombuffer(np.uint32(header).tobytes(), dtype=np.uint8)
    len_bytes = lengths.astype("<u4").view(np.uint8).reshape(k, 4)
    out[start[:, None] + np.arange(4)] = len_bytes
    data_dst = np.repeat(start + 4 - offsets[:-1], lengths)  # (bytes,) shift of each byte
    data_dst += np.arange(offsets[0], offsets[-1], dtype=np.int64)
    out[data_dst] = blob[offsets[0] : offsets[-1]]
    return out


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
