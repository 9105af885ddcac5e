"""Sealing: a group's committed parts consolidated into arrays sorted by sample id.

Sealing memory does not grow with the number of rows N. The ids are sorted out of core
(:func:`sort_ids_external`: sorted runs in temporary Arrow files, merged partition by partition)
into one temporary file of ``(sample_id, src)`` in sorted order, which every step then streams:
the ``features`` chunk by chunk, and each chunk block by block (a block gathers its rows from
memory maps of the parts that are unmapped again right after, :func:`seal_block_bytes`), the
sealed ``sample_id`` chunk frame by frame, the id index (spilled by its builder) and the manifest
a row group at a time. The seal record ``sealed.json`` is written last (see
:mod:`cusa.store.layout`); :meth:`cusa.store.group.FeatureGroup.seal` runs these steps.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError, StoreError
from .fs import StoreFS
from .id_index import IdIndex, IndexFileBuilder, index_file_blocks
from .layout import ID_INDEX, MANIFEST, Segment, now
from .ledger import MANIFEST_SCHEMA, failed_rows, manifest_batches

log = logging.getLogger(__name__)

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
    chunks = [_read_part_ids(group, seg) for seg in segs]
    if not chunks:
        return empty_ids()
    return pa.concat_arrays(chunks)


def _read_part_ids(group: Any, seg: Segment) -> pa.LargeStringArray:
    """The ids of one committed part (see :func:`read_segment_ids` for what it raises)."""
    try:
        return _zarr_ids(group.fs, seg.ids_rel)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        name = seg.ids_rel[len(group.rel) + 1 :]
        raise group._broken(
            f"the sample_id array {name} is unreadable ({type(exc).__name__})"
        ) from exc


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


def duplicate_id_error(url: str, sample_id: str) -> StoreError:
    """The refusal to seal ``url`` because ``sample_id`` was committed twice."""
    return StoreError(
        f"cannot seal {url!r}: sample id {sample_id!r} was committed by "
        "two shards; ids must be unique across the dataset — fix the dataset "
        "(duplicate ids) and re-extract into a new store"
    )


# -- the ids sorted out of core: runs, then partitions merged in order ----------------------------

#: Consecutive rows of the committed parts sorted together into one run (a temporary file). A
#: run's sort holds about 80 bytes per id of it, and the ids of the part being read.
SEAL_RUN_ROWS = 1_000_000
#: Ids sorted at a time when the runs are merged: the runs are cut at common splitter ids into
#: partitions of about this many ids, each sorted in memory (~100 bytes per id) and appended to
#: the sorted file. Together with :data:`SEAL_RUN_ROWS` it bounds what sorting the ids holds.
SEAL_PARTITION_ROWS = 1_000_000
#: Rows per record batch of the temporary files: what a pass over the sorted ids reads at a time.
SEAL_TEMP_BATCH_ROWS = 65_536
_TEMP_SCHEMA = pa.schema([("sample_id", pa.large_string()), ("src", pa.int64())])


class SortedIds:
    """A group's sample ids in sorted order, in a temporary Arrow IPC file.

    Row ``i`` of the file is row ``i`` of the sealed group: its ``sample_id``, and ``src``, its
    row in the committed parts read one after the other (the unsorted row). Passes over it read
    one record batch at a time (:meth:`reader`), so none of its consumers holds N of anything.
    """

    def __init__(self, path: str, rows: int, temp_bytes: int) -> None:
        self.path = path
        self.rows = rows
        #: Most bytes of temporary files the sort had on disk at once.
        self.temp_bytes = temp_bytes

    def reader(self) -> SortedReader:
        return SortedReader(self.path)

    def id_blocks(self, rows: int = 0) -> Iterator[pa.LargeStringArray]:
        """Every id in row order, ``rows`` (default one record batch) at a time."""
        with self.reader() as reader:
            while True:
                ids, _ = reader.take(rows or SEAL_TEMP_BATCH_ROWS, src=False)
                if not len(ids):
                    return
                yield ids


class SortedReader:
    """Consecutive rows of a :class:`SortedIds` file, read (not mapped) a batch at a time, so a
    pass over N ids holds what it asked for, not the pages it went through."""

    def __init__(self, path: str) -> None:
        self._file = pa.OSFile(path)
        self._reader = pa.ipc.open_file(self._file)
        self._next = 0
        self._pending: list[pa.RecordBatch] = []
        self._have = 0

    def __enter__(self) -> SortedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pending = []
        self._file.close()

    def take(
        self, k: int, *, ids: bool = True, src: bool = True
    ) -> tuple[pa.LargeStringArray, np.ndarray]:
        """The next ``k`` rows (fewer at the end): ``(sample_ids, src)``, one contiguous Arrow
        array and an int64 array (each empty when not asked for)."""
        while self._have < k and self._next < self._reader.num_record_batches:
            batch = self._reader.get_batch(self._next)
            self._next += 1
            self._pending.append(batch)
            self._have += batch.num_rows
        k = min(k, self._have)
        table = pa.Table.from_batches(self._pending, schema=_TEMP_SCHEMA)
        head = table.slice(0, k)
        self._pending = table.slice(k).to_batches()
        self._have -= k
        sample_ids = head.column(0).combine_chunks() if ids else empty_ids()
        rows = head.column(1).to_numpy() if src else np.zeros(0, dtype=np.int64)
        return sample_ids, np.asarray(rows, dtype=np.int64)


def _release_memory() -> None:
    """Hand back to the system what Arrow's allocator freed (it keeps it for reuse otherwise), so
    that each step of a seal starts from what is live, not from the previous step's peak."""
    pa.default_memory_pool().release_unused()


class _Run:
    """A sorted run: consecutive rows ``start:start+rows`` of the parts, sorted by id."""

    def __init__(self, path: str, rows: int) -> None:
        self.path, self.rows = path, rows


def _write_temp(path: str, table: pa.Table) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, _TEMP_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=SEAL_TEMP_BATCH_ROWS)


def sort_ids_external(group: Any, segs: list[Segment], tmpdir: str) -> SortedIds:
    """Sort the ids of the committed parts ``segs`` with memory that does not grow with N.

    1. Runs: the parts' ids, :data:`SEAL_RUN_ROWS` rows at a time, sorted by Arrow and written
       with their unsorted rows to temporary files (every k-th id of each kept as a sample).
    2. Splitters: ids from the sample cut every run into partitions of about
       :data:`SEAL_PARTITION_ROWS` ids (a binary search per splitter and run).
    3. Merge: partition by partition, in order, its slices of every run (memory-mapped) are
       sorted together and appended to one file; equal neighbours are a duplicate id.

    Arrow sorts UTF-8 bytes, which is code point order (Python's); splitters compare bytes too.
    The run files are removed once merged; until then ``tmpdir`` holds the ids twice (with their
    offsets and rows: ~60 bytes per 14-byte id).

    Raises:
        StoreError: an id occurs twice (two shards committed it); the message names it.
        FileNotFoundError: a part vanished (a concurrent seal: the caller retries).
        BrokenGroupError: an id array is unreadable or disagrees with its commit record.
    """
    total = sum(seg.rows for seg in segs)
    run_rows, part_rows = max(1, SEAL_RUN_ROWS), max(1, SEAL_PARTITION_ROWS)
    partitions = max(1, -(-total // part_rows))
    # Every step-th id of each run: a partition then holds part_rows + runs * step <= 1.25 *
    # part_rows ids at most, from a sample of 4 * runs * partitions ids (40k at 100M ids).
    step = max(1, part_rows // (4 * max(1, -(-total // run_rows))))
    runs, samples = _write_runs(group, segs, tmpdir, run_rows, step if partitions > 1 else 0)
    run_bytes = sum(os.path.getsize(r.path) for r in runs)
    splitters = _splitters(samples, partitions)
    del samples
    bounds = [_run_bounds(run, splitters) for run in runs]  # (runs, partitions + 1)
    path = os.path.join(tmpdir, "sorted.arrow")
    rows, previous = 0, None
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, _TEMP_SCHEMA) as writer:
        for p in range(len(splitters) + 1):
            table = _merge_partition(runs, [b[p] for b in bounds], [b[p + 1] for b in bounds])
            if not len(table):
                continue
            ids = table.column(0).chunk(0)
            # An id equal to a splitter falls in the same partition in every run, so copies of
            # an id never straddle two partitions; the check across the boundary is cheap.
            if previous is not None and ids[0].as_py() == previous:
                raise duplicate_id_error(group.url, previous)
            if len(ids) > 1:
                same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
                if pc.any(same).as_py():
                    raise duplicate_id_error(group.url, ids[pc.index(same, True).as_py()].as_py())
            previous = ids[len(ids) - 1].as_py()
            writer.write_table(table, max_chunksize=SEAL_TEMP_BATCH_ROWS)
            rows += len(table)
            del table, ids
            _release_memory()
    temp_bytes = run_bytes + os.path.getsize(path)
    for run in runs:
        os.unlink(run.path)
    log.info("sorted %d ids in %d run(s), %d partition(s); %d temporary bytes in %s",
             rows, len(runs), len(splitters) + 1, temp_bytes, tmpdir)  # fmt: skip
    return SortedIds(path, rows, temp_bytes)


def _write_runs(
    group: Any, segs: list[Segment], tmpdir: str, run_rows: int, step: int
) -> tuple[list[_Run], list[pa.LargeStringArray]]:
    """The sorted runs of the parts' ids, and every ``step``-th id of each (none for 0)."""
    runs: list[_Run] = []
    samples: list[pa.LargeStringArray] = []
    pending: list[pa.LargeStringArray] = []
    have = start = 0

    def flush(k: int) -> None:
        nonlocal pending, have, start
        ids = pending[0] if len(pending) == 1 else pa.concat_arrays(pending)
        run, rest = ids.slice(0, k), ids.slice(k)
        order = pc.sort_indices(run)
        sorted_ids = run.take(order)
        src = order.to_numpy().view(np.int64) + start  # Arrow's uint64 indices are < 2**63
        del order, run, ids
        path = os.path.join(tmpdir, f"run-{len(runs):06d}.arrow")
        _write_temp(path, pa.table([sorted_ids, pa.array(src)], schema=_TEMP_SCHEMA))
        runs.append(_Run(path, k))
        if step:
            samples.append(sorted_ids.take(pa.array(np.arange(0, k, step, dtype=np.int64))))
        pending = [rest] if len(rest) else []
        have -= k
        start += k
        del sorted_ids, src
        _release_memory()

    for seg in segs:
        ids = _read_part_ids(group, seg)
        if len(ids) != seg.rows:
            name = seg.ids_rel[len(group.rel) + 1 :]
            raise group._broken(
                f"the sample_id array {name} holds {len(ids)} ids where its commit record says "
                f"{seg.rows} rows"
            )
        pending.append(ids)
        have += len(ids)
        while have >= run_rows:
            flush(run_rows)
    if have:
        flush(have)
    return runs, samples


def _splitters(samples: list[pa.LargeStringArray], partitions: int) -> list[bytes]:
    """``partitions - 1`` ids (UTF-8 bytes, ascending) that cut the sample into equal parts."""
    if partitions <= 1 or not samples:
        return []
    sample = pa.concat_arrays(samples).cast(pa.large_binary())
    sample = sample.take(pc.sort_indices(sample))
    picks = [len(sample) * j // partitions for j in range(1, partitions)]
    return [sample[i].as_py() for i in picks if i < len(sample)]


class _RunKeys:
    """The ids of a run file as UTF-8 bytes, by position (for :mod:`bisect`)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column.cast(pa.large_binary())  # a zero-copy view of the string bytes

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> bytes:
        return self.column[i].as_py()


def _run_bounds(run: _Run, splitters: list[bytes]) -> list[int]:
    """Where each splitter cuts ``run``: ``[0, b_1, ..., b_{P-1}, rows]`` (each id equal to a
    splitter goes to the partition it starts, in every run alike)."""
    bounds = [0]
    if splitters:
        with pa.memory_map(run.path) as source:
            keys = _RunKeys(pa.ipc.open_file(source).read_all().column(0))
            for s in splitters:
                bounds.append(bisect.bisect_left(keys, s, bounds[-1]))
            del keys
    bounds.append(run.rows)
    return bounds


def _merge_partition(runs: list[_Run], los: list[int], his: list[int]) -> pa.Table:
    """Rows ``los[r]:his[r]`` of every run, sorted by id, as a one-chunk table. The runs are
    memory-mapped only while their slices are copied out, so their pages are not kept."""
    ids, src = [], []
    with contextlib.ExitStack() as stack:
        for run, lo, hi in zip(runs, los, his, strict=True):
            if hi > lo:
                source = stack.enter_context(pa.memory_map(run.path))
                table = pa.ipc.open_file(source).read_all().slice(lo, hi - lo)
                ids.extend(table.column(0).chunks)
                src.extend(table.column(1).chunks)
        if not ids:
            return _TEMP_SCHEMA.empty_table()
        all_ids = pa.concat_arrays(ids)
        all_src = np.concatenate([c.to_numpy() for c in src])
        del ids, src, table
    order = pc.sort_indices(all_ids)
    sorted_ids = all_ids.take(order)
    del all_ids
    sorted_src = np.take(all_src, order.to_numpy().view(np.int64))
    return pa.table([sorted_ids, pa.array(sorted_src)], schema=_TEMP_SCHEMA)


# -- the sealed manifest, streamed ----------------------------------------------------------------

#: Rows per Parquet row group of the sealed manifest (what sealing holds of it at a time).
MANIFEST_BLOCK_ROWS = 1_000_000


def write_sealed_manifest(group: Any, segs: list[Segment], ids: SortedIds, tmpdir: str) -> int:
    """Write the group's sealed ``manifest.parquet`` block by block; returns the failed count.

    Its rows are those of :func:`cusa.store.ledger.sealed_manifest` (ok samples sorted by id with
    their sealed row, then failed ones sorted by id), but it is not built from the merged
    manifests: the ok rows come straight from the sorted ids that sealed the features (row ``p``
    is their id ``p``, from the part that holds its unsorted row), written one Parquet row group
    at a time, and only the failed entries of the parts are read. So its memory is a block plus
    the failures, not the whole ledger (100M rows: ~5 GB as one Arrow table). The file is
    written in ``tmpdir`` first, then copied into the store.
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
        # a part's ledger a batch at a time, keeping its failures only (not its ok rows)
        rel = f"{group.rel}/parts/{rec['part']}/{MANIFEST}"
        fs = group.fs
        source = fs.local_path(rel) if fs.is_local else io.BytesIO(fs.read_bytes(rel))
        failed.extend(failed_rows(t) for t in manifest_batches(source, SEAL_TEMP_BATCH_ROWS))
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
    n = ids.rows
    local = os.path.join(tmpdir, MANIFEST)
    with pq.ParquetWriter(local, MANIFEST_SCHEMA) as writer, ids.reader() as reader:
        for lo in range(0, n, MANIFEST_BLOCK_ROWS):
            hi = min(n, lo + MANIFEST_BLOCK_ROWS)
            sample_ids, src = reader.take(hi - lo)
            seg = np.searchsorted(seg_starts, src, side="right") - 1
            block = pa.table(
                {
                    "sample_id": sample_ids.cast(pa.string()),
                    "row": pa.array(np.arange(lo, hi, dtype=np.int64)),
                    "shard": seg_shards.take(pa.array(seg)),
                    "status": pa.array(["ok"]).take(pa.array(np.zeros(hi - lo, np.int64))),
                    "error": pa.nulls(hi - lo, pa.string()),
                },
                schema=MANIFEST_SCHEMA,
            )
            writer.write_table(block)
            del block, sample_ids, src
            _release_memory()
        if len(failed_table) or not n:
            writer.write_table(failed_table)

    def blocks() -> Iterator[bytes]:
        with open(local, "rb") as fh:
            while chunk := fh.read(8 * 2**20):
                yield chunk

    group.fs.write_stream_atomic(f"{group.rel}/{MANIFEST}", blocks())
    os.unlink(local)
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


def write_sealed_index(fs: StoreFS, rel: str, ids: SortedIds, tmpdir: str) -> dict[str, Any]:
    """Write ``id_index.bin`` of the group sealed at ``rel`` from its sorted ids, streamed.

    :class:`cusa.store.id_index.IndexFileBuilder` takes the ids block by block and spills to
    ``tmpdir``, so the memory does not grow with N; the file is what :func:`write_id_index`
    writes from the same ids in memory.

    Returns:
        The header fields it recorded.

    Raises:
        StoreError: an id occurs twice.
    """
    builder = IndexFileBuilder(tmpdir, what=repr(fs.path(rel)))
    for block in ids.id_blocks():
        offsets, blob = _raw_buffers(block)
        builder.add(offsets, blob)
    extra = {
        "rows": ids.rows,
        "sample_id_chunk_bytes": fs.size(f"{rel}/sample_id/c/0") if ids.rows else 0,
        "built": now(),
    }
    fs.write_stream_atomic(f"{rel}/{ID_INDEX}", builder.blocks(extra))
    return extra


def _raw_buffers(ids: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, blob)`` of an Arrow large_string array without re-basing a slice: the
    offsets may start above 0 (no copy at all)."""
    bufs = ids.buffers()
    n = len(ids)
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[ids.offset : ids.offset + n + 1]
    blob = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, blob


def write_sorted_arrays(
    fs: StoreFS,
    rel: str,
    segs: list[Segment],
    ids: SortedIds,
    dim: int,
    dtype: np.dtype,
    tmpdir: str | None = None,
) -> tuple[list[int], list[str]]:
    """Write the group-level ``features`` and ``sample_id`` of the group at ``rel``, sorted by id.

    Row ``i`` of ``features`` is the unsorted row ``src`` of the sorted ids' row ``i`` (the rows
    of the segments read one after the other); without rows, the arrays are removed. The parts
    of an object store are copied into ``tmpdir`` (or a temporary folder) while it runs.

    Returns:
        ``(chunk_rows, chunk_sha256)``: the rows and the SHA-256 of each ``features`` chunk.
    """
    n = ids.rows
    row_bytes = max(dim * dtype.itemsize, 1)
    chunk = max(1, min(n, MAX_CHUNK_BYTES // row_bytes)) if n else 1

    # Map global (unsorted) rows to their segment. Each output chunk is streamed to its file
    # block by block, and a block gathers its rows from memory maps of the parts that are
    # unmapped again right after: memory stays bounded by the block setting, not by N.
    offsets = np.cumsum([0] + [s.rows for s in segs])
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
    # rows per block: the block setting, and at most SEAL_BLOCK_MAX_ROWS (each row of a block
    # also costs ~32 bytes of int64 bookkeeping, which would dominate for narrow rows)
    block = max(1, min(seal_block_bytes() // row_bytes, SEAL_BLOCK_MAX_ROWS, chunk))
    with contextlib.ExitStack() as stack:
        local = _local_segment_files(fs, segs, dim, dtype, stack, tmpdir)
        reader = stack.enter_context(ids.reader())
        for ci, start in enumerate(range(0, n, chunk)):
            stop = min(start + chunk, n)
            digest = hashlib.sha256()
            srcs = _src_blocks(reader, stop - start, block)
            blocks = _sorted_blocks(segs, local, srcs, offsets, block, digest, dim, dtype)
            fs.write_stream_atomic(f"{rel}/features/c/{ci}/0", blocks)
            chunk_rows.append(stop - start)
            chunk_sha.append(digest.hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sid = _seal_array(group_store, "sample_id", shape=(n,), chunks=(n,), dtype=str)
    write_sealed_ids(fs, rel, sid, n, ids.id_blocks())
    return chunk_rows, chunk_sha


#: Most rows a block of sorted features holds (see :func:`seal_block_bytes` for its bytes).
SEAL_BLOCK_MAX_ROWS = 2**20


def _src_blocks(reader: SortedReader, rows: int, block: int) -> Iterator[np.ndarray]:
    """The unsorted rows of the next ``rows`` sorted rows, ``block`` at a time."""
    for lo in range(0, rows, block):
        _, src = reader.take(min(block, rows - lo), ids=False)
        yield src
        del src
        _release_memory()


#: Ids encoded per zstd frame of the sealed ``sample_id`` chunk: its bytes stream to disk, and a
#: chunk below this is a single frame, byte for byte what zarr itself writes.
SAMPLE_ID_FRAME_BYTES = 8 * 2**20


def write_sealed_ids(
    fs: StoreFS, rel: str, sid: Any, n: int, id_blocks: Iterable[pa.LargeStringArray]
) -> None:
    """Write the one chunk of the sealed ``sample_id`` array of ``n`` ids, streamed.

    ``id_blocks`` are the sorted ids in row order, in Arrow arrays of any size. Zarr's codecs for
    strings are ``vlen-utf8`` (a u32 count, then a u32 length and the bytes of each id) and
    ``zstd``; the chunk is built from the Arrow buffers a frame at a time (ids up to
    :data:`SAMPLE_ID_FRAME_BYTES`), each a zstd frame (numcodecs decodes concatenated frames),
    so sealing never holds a Python string per id nor the whole chunk. Another codec
    configuration is left to zarr (one Python string per id).
    """
    codecs = [c.to_dict() for c in (*sid.metadata.codecs,)]
    names = [c.get("name") for c in codecs]
    if names != ["vlen-utf8", "zstd"]:
        sid[...] = np.array([x for b in id_blocks for x in b.to_pylist()], dtype=object)
        return
    import numcodecs

    conf = codecs[1].get("configuration", {})
    zstd = numcodecs.Zstd(level=int(conf.get("level", 0)), checksum=bool(conf.get("checksum")))

    def frames() -> Iterator[bytes]:
        # A frame is the longest run of ids from its first whose bytes stay within
        # SAMPLE_ID_FRAME_BYTES (at least one id): held ids are topped up until they exceed it.
        held: list[pa.LargeStringArray] = []
        held_bytes, first = 0, True
        blocks = iter(id_blocks)
        done = False
        while True:
            while not done and held_bytes <= SAMPLE_ID_FRAME_BYTES:
                block = next(blocks, None)
                if block is None:
                    done = True
                elif len(block):
                    held.append(block)
                    held_bytes += _id_bytes_of(block)
            if not held:
                return
            ids = held[0] if len(held) == 1 else pa.concat_arrays(held)
            offsets, blob = id_buffers(ids)
            k = len(ids)
            hi = int(np.searchsorted(offsets, SAMPLE_ID_FRAME_BYTES, "right")) - 1
            hi = min(k, max(hi, 1))
            # the frame's bytes, built 64k ids at a time (_vlen_block's scratch: 8 bytes a byte)
            parts = [
                _vlen_block(offsets[a : min(a + 65536, hi) + 1], blob, header=None)
                for a in range(0, hi, 65536)
            ]
            if first:
                parts.insert(0, np.frombuffer(np.uint32(n).astype("<u4").tobytes(), np.uint8))
            yield zstd.encode(np.concatenate(parts))
            del parts
            first = False
            rest = ids.slice(hi)
            held = [rest] if len(rest) else []
            held_bytes = int(offsets[k] - offsets[hi])
            del ids, offsets, blob, rest
            _release_memory()

    fs.write_stream_atomic(f"{rel}/sample_id/c/0", frames())


def _id_bytes_of(ids: pa.LargeStringArray) -> int:
    offsets, _ = _raw_buffers(ids)
    return int(offsets[-1] - offsets[0])


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
    fs: StoreFS,
    segs: list[Segment],
    dim: int,
    dtype: np.dtype,
    stack: contextlib.ExitStack,
    parent: str | None = None,
) -> list[str]:
    """A local file per segment, each checked for its size, to memory-map while sealing.

    Parts of an object store are copied to a temporary folder (in ``parent`` when given) first,
    removed by ``stack``, so sealing there needs local disk for the parts but no more memory
    than on a disk.
    """
    tmpdir = (
        None
        if fs.is_local
        else stack.enter_context(tempfile.TemporaryDirectory(prefix="cusa-seal-", dir=parent))
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
    srcs: Iterable[np.ndarray],
    offsets: np.ndarray,
    block: int,
    digest: Any,
    dim: int,
    dtype: np.dtype,
) -> Iterator[np.ndarray]:
    """The sorted rows whose unsorted rows are ``srcs`` (blocks of at most ``block``), each block
    added to ``digest``.

    The two block buffers are reused (the consumer writes each block before asking for the
    next), so no per-block allocation can fragment the heap.
    """
    out = np.empty((block, dim), dtype=dtype)
    buf = np.empty((block, dim), dtype=dtype)
    for src in srcs:  # global unsorted rows, in sorted-id order
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
    rows: int,
    failed: int,
    shards: list[str],
    chunk_rows: list[int],
    chunk_sha256: list[str],
    commits_stamp: str | None = None,
) -> dict[str, Any]:
    """The seal record of a group sealed now; ``commits_stamp`` (see
    :func:`cusa.store.commits.records_stamp`) when its commit records were checked with it."""
    record: dict[str, Any] = {
        "rows": rows,
        "failed": failed,
        "shards": shards,
        "chunk_rows": chunk_rows,
        "chunk_sha256": chunk_sha256,
        "sealed": now(),
    }
    if commits_stamp is not None:
        record["commits_stamp"] = commits_stamp
    return record


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
