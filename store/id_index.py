"""The id index of a group: sample id -> row with no Python object per id.

A sealed group carries ``id_index.bin`` (see :mod:`cusa.store.layout`), which
:class:`cusa.store.FeatureLookup` memory-maps. The file holds, after a JSON header:

* ``hashes`` (N,) ``<u8``: a 64-bit hash of every id's UTF-8 bytes, sorted;
* ``rows`` (N,) ``<u4`` (``<u8`` from 2**32 rows): the row of each hash entry;
* ``offsets`` (N+1,) ``<i8`` and ``blob``: the id bytes in row order (the sealed rows
  are sorted by id), so a hash hit is confirmed by comparing the id bytes themselves;
* ``buckets`` (2**b+1,) ``<u4`` (``<u8`` from 2**32 rows): where the hashes of each value of
  their top ``b`` bits start, ``2**b`` between N/2 and N (2-4 bytes per id). A file without
  it (written before it existed) is searched with ``np.searchsorted`` instead.

A lookup hashes the query ids in one vectorised pass, reads the bucket of each hash and finds
it among the few hashes of that bucket (at most ``bucket_max``, counted when the index is
built): two random reads per id however large N is, where a binary search makes ~log2(N). It
then compares the ids' bytes with the mapped blob; equal hashes of different ids
(collisions) sit next to each other and are probed, at most ``max_run`` entries (counted when
the index is built). Nothing in it is a Python object, so forked DataLoader workers share its
pages instead of copying them (reading a Python object writes its reference count).

The hash (``mlh64-v1``) is multilinear over the id bytes with fixed 64-bit keys (splitmix64 of
the byte position): at most 2**-57 per pair of ids (see :func:`mlh64`). Groups being written (unsealed) and sealed groups without the file
(sealed by an older cusa) get the same index built in memory when a lookup opens them.
Sealing writes the file with :class:`IndexFileBuilder`, whose memory does not grow with N.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import StoreError

MAGIC = b"CUSAIDX\x01"
#: The index format this cusa reads and writes; a newer one is ignored (the ids are read instead).
INDEX_VERSION = 1
_ALIGN = 64
#: Ids hashed per block while building: bounds the build's scratch memory (~40 bytes per id byte).
_BUILD_BLOCK_BYTES = 4 * 2**20

HashFn = Callable[..., np.ndarray]


# -- the hash ------------------------------------------------------------------------------------


def _splitmix64(i: np.ndarray) -> np.ndarray:
    z = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


_keys_cache = np.zeros(0, dtype=np.uint64)


def _keys(positions: int) -> np.ndarray:
    """(positions,) uint64 keys, one per byte position (grown on demand, cached)."""
    global _keys_cache
    if len(_keys_cache) < positions:
        size = max(positions, 2 * len(_keys_cache), 256)
        _keys_cache = _splitmix64(np.arange(size, dtype=np.uint64))
    return _keys_cache


def mlh64(
    data: np.ndarray, starts: np.ndarray, positions: np.ndarray, lengths: np.ndarray | None = None
) -> np.ndarray:
    """64-bit multilinear hash of ids laid out in ``data``: ``sum_j byte_j * key_j mod 2**64``.

    With random 64-bit keys and byte-sized inputs, two different ids collide with probability
    at most 2**-57 (a byte difference has at most 7 trailing zero bits), and the sums are
    uniform in their high bits, which is what a sorted search needs.

    Args:
        data: (T,) uint8 bytes; bytes of value 0 between ids (separators) add nothing.
        starts: (n,) int64 index of each id's first byte in ``data``, ascending.
        positions: (T,) int64 position of each byte inside its id.
        lengths: (n,) byte lengths; needed only when ``data`` has no separators (an empty id
            then shares its start with the next id, or starts past the end). Without them
            every start must lie inside ``data``.

    Returns:
        (n,) uint64 hashes.
    """
    n = len(starts)
    if len(data) == 0:
        return np.zeros(n, dtype=np.uint64)
    # every position is below len(data): the cached keys cover them without a max() pass
    keys = _keys_cache if len(data) <= len(_keys_cache) else _keys(int(positions.max()) + 1)
    prod = keys.take(positions)  # (T,) uint64; products wrap mod 2**64
    prod *= data.astype(np.uint64)
    if lengths is None:  # separated ids: every start is inside data
        return np.add.reduceat(prod, starts)
    sums = np.add.reduceat(prod, np.minimum(starts, len(data) - 1))
    sums[lengths == 0] = 0  # reduceat gives an element, not 0, for an empty range
    return sums


#: Hash functions by the name an index records; tests register weak ones to force collisions.
HASHES: dict[str, HashFn] = {"mlh64-v1": mlh64}
#: The hash new indexes are built with.
DEFAULT_HASH = "mlh64-v1"


def _hash_fn(name: str) -> HashFn:
    try:
        return HASHES[name]
    except KeyError:
        raise StoreError(
            f"id index hash {name!r} is unknown to this cusa (it knows {sorted(HASHES)}); "
            "upgrade cusa, or rebuild the index with `cusa store reindex`"
        ) from None


def hash_ids(offsets: np.ndarray, blob: np.ndarray, hash_name: str = DEFAULT_HASH) -> np.ndarray:
    """Hashes of the ids ``blob[offsets[i]:offsets[i+1]]``, computed block by block."""
    fn = _hash_fn(hash_name)
    n = len(offsets) - 1
    out = np.empty(n, dtype=np.uint64)
    lo = 0
    while lo < n:
        # the next block: ids until about _BUILD_BLOCK_BYTES bytes (at least one id)
        target = int(offsets[lo]) + _BUILD_BLOCK_BYTES
        hi = int(np.searchsorted(offsets, target, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        base = int(offsets[lo])
        starts = np.asarray(offsets[lo:hi], dtype=np.int64) - base
        lengths = np.diff(np.asarray(offsets[lo : hi + 1], dtype=np.int64))
        data = np.asarray(blob[base : int(offsets[hi])])
        positions = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
        out[lo:hi] = fn(data, starts, positions, lengths)
        lo = hi
    return out


# -- encoding query ids --------------------------------------------------------------------------


class _Query:
    """Query ids as one uint8 stream ``data`` (T,): id ``k`` is ``data[starts[k]:][:lengths[k]]``
    and spans ``span[k]`` bytes of the stream (its separator included); ``positions`` (T,) is
    each byte's position inside its id, and ``seps`` the separators' indices (None without)."""

    __slots__ = ("data", "starts", "lengths", "span", "positions", "seps")

    def __init__(self, sample_ids: Sequence[Any]) -> None:
        # Per batch of ~128 ids each numpy call's overhead (~1 us) is what this costs: few calls.
        n = len(sample_ids)
        try:
            # Fast path: one C call joins and encodes the whole batch; 0 bytes separate the ids.
            data = ("\x00".join(sample_ids) + "\x00").encode("utf-8")
        except (TypeError, UnicodeEncodeError):  # bytes ids, lone surrogates
            data = None
        if data is not None:
            arr = np.frombuffer(data, dtype=np.uint8)
            seps = (arr == 0).nonzero()[0]
            if len(seps) != n:  # an id holds a NUL character itself
                data = None
        if data is None:
            self._slow(sample_ids)
            return
        span = np.empty(n, dtype=np.int64)  # each id's bytes and its separator
        span[0] = seps[0] + 1
        np.subtract(seps[1:], seps[:-1], out=span[1:])  # (np.diff with prepend: 6x slower)
        starts = seps - span
        starts += 1
        self.data = arr
        self.starts = starts
        self.lengths = span - 1
        self.span = span
        self.positions = np.arange(len(arr), dtype=np.int64) - starts.repeat(span)
        self.seps = seps

    def _slow(self, sample_ids: Sequence[Any]) -> None:
        encoded = [_id_bytes(s) for s in sample_ids]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths
        self.data = data
        self.starts = starts
        self.lengths = lengths
        self.span = lengths
        self.positions = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
        self.seps = None


def _id_bytes(sample_id: Any) -> bytes:
    if isinstance(sample_id, bytes | bytearray | np.bytes_):
        return bytes(sample_id)
    # surrogatepass: an id that is not valid UTF-8 text is simply not found
    return str(sample_id).encode("utf-8", "surrogatepass")


# -- the index -----------------------------------------------------------------------------------


class IdIndex:
    """Sample id -> row over numpy arrays (memory-mapped from ``id_index.bin``, or built in RAM).

    Args:
        hashes: (N,) uint64, sorted.
        rows: (N,) unsigned rows, ``rows[i]`` the row of the id hashed to ``hashes[i]``.
        offsets: (N+1,) id byte offsets into ``blob``, in row order.
        blob: uint8 id bytes.
        max_run: longest run of equal hashes (1 without collisions).
        buckets: (2**b+1,) start of each bucket of hashes (see :func:`bucket_table`); None
            (a file written before buckets existed): lookups binary-search the hashes.
        bucket_max: the most hashes in one bucket.
    """

    def __init__(
        self,
        hashes: np.ndarray,
        rows: np.ndarray,
        offsets: np.ndarray,
        blob: np.ndarray,
        max_run: int,
        hash_name: str = DEFAULT_HASH,
        path: str | None = None,
        buckets: np.ndarray | None = None,
        bucket_max: int = 0,
    ) -> None:
        self.hashes, self.rows_of_hash = hashes, rows
        self.offsets = np.asarray(offsets, dtype=np.int64)  # a view when already int64
        self.blob = blob
        self.max_run = max(1, int(max_run))
        self.hash_name = hash_name
        self._hash = _hash_fn(hash_name)
        self.path = path  # set when memory-mapped from a file
        self.buckets = buckets
        self._window: np.ndarray | None = None
        if buckets is not None and len(hashes):
            bits = (len(buckets) - 1).bit_length() - 1
            self._shift = np.uint64(64 - bits) if bits else None  # None: one bucket
            self._window = np.arange(max(1, int(bucket_max)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        arrays = (self.hashes, self.rows_of_hash, self.offsets, self.blob, self.buckets)
        return sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def build(
        cls,
        offsets: np.ndarray,
        blob: np.ndarray,
        *,
        hash_name: str | None = None,
        what: str = "the ids",
    ) -> IdIndex:
        """The index of the ids ``blob[offsets[i]:offsets[i+1]]`` (row ``i``), in memory.

        Raises:
            StoreError: an id occurs twice; the message names it and ``what``.
        """
        hash_name = hash_name or DEFAULT_HASH
        hashes = hash_ids(offsets, blob, hash_name)
        order = np.argsort(hashes, kind="stable")
        hashes = np.take(hashes, order)  # the unsorted hashes are freed here
        rows = order.astype(_rows_dtype(len(order)))
        del order
        max_run = _check_runs(hashes, rows, offsets, blob, what)
        buckets = bucket_table(hashes, bucket_bits(len(hashes)))
        bucket_max = int(np.diff(buckets).max()) if len(hashes) else 0
        return cls(hashes, rows, offsets, blob, max_run, hash_name, None, buckets, bucket_max)

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, sample_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, found)``: (n,) int64 rows (-1 where not found) and (n,) bool."""
        n = len(sample_ids)
        if n == 0 or len(self.hashes) == 0:
            return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
        q = _Query(sample_ids)
        # With separators every id, empty ones too, starts inside the stream: no length fix-up.
        qh = self._hash(q.data, q.starts, q.positions, None if q.seps is not None else q.lengths)
        pos = self._first_at_or_after(qh)
        # "clip": a hash past the last one reads the last entry, which then differs
        hit = self.hashes.take(pos, mode="clip") == qh
        rows = self.rows_of_hash.take(pos, mode="clip").astype(np.int64)
        found = hit & self._same_bytes(q, rows)
        if not found.all():
            self._probe(q, qh, pos, hit, found, rows)
            rows[~found] = -1
        return rows, found

    def _first_at_or_after(self, qh: np.ndarray) -> np.ndarray:
        """(n,) int64: where each hash of ``qh`` is, or would be, in the sorted hashes (N when
        past the last one).

        Methods (``a.take``), not ``np.take``, and ``mode="clip"`` rather than a bounds pass:
        the batches are small (128 ids), so each numpy call's overhead is what this costs.
        """
        if self._window is None:  # no bucket table: a binary search, ~log2(N) reads per id
            return np.searchsorted(self.hashes, qh)
        # The bucket of each hash, then the first hash of the window from there that is not
        # smaller: the window (the bucket and what follows) is sorted, so that is argmin of
        # "smaller". All smaller (argmin 0): the hash is not in its bucket, and the entry at
        # the bucket's start, which differs from it, says so.
        if self._shift is None:
            lo = np.zeros(len(qh), dtype=np.int64)
        else:
            lo = self.buckets.take((qh >> self._shift).view(np.int64)).astype(np.int64)
        win = self.hashes.take(lo[:, None] + self._window, mode="clip")  # (n, bucket_max)
        return lo + (win < qh[:, None]).argmin(axis=1)

    def _same_bytes(self, q: _Query, rows: np.ndarray) -> np.ndarray:
        """(n,) whether the stored id of ``rows[k]`` has the bytes of query id ``k``."""
        start = self.offsets.take(rows)
        same = (self.offsets.take(rows + 1) - start) == q.lengths
        if len(q.data) and len(self.blob):
            src = start.repeat(q.span)  # (T,) the stored byte under each query byte
            src += q.positions
            differs = self.blob.take(src, mode="clip") != q.data
            if q.seps is not None:
                differs[q.seps] = False  # a separator faces whatever byte follows the stored id
            if differs.any():
                owner = np.repeat(np.arange(len(q.starts)), q.span)
                same[np.unique(owner[differs])] = False
        return same

    def _probe(
        self,
        q: _Query,
        qh: np.ndarray,
        pos: np.ndarray,
        hit: np.ndarray,
        found: np.ndarray,
        rows: np.ndarray,
    ) -> None:
        """Resolve ids whose first equal hash was another id: look further along the run."""
        todo = np.flatnonzero(hit & ~found)
        for step in range(1, self.max_run):
            if not len(todo):
                return
            p = pos[todo] + step
            inside = p < len(self.hashes)
            todo, p = todo[inside], p[inside]
            same_hash = self.hashes[p] == qh[todo]
            todo, p = todo[same_hash], p[same_hash]
            cand = rows.copy()
            cand[todo] = self.rows_of_hash[p].astype(np.int64)
            ok = self._same_bytes(q, cand)[todo]
            rows[todo[ok]] = cand[todo[ok]]
            found[todo[ok]] = True
            todo = todo[~ok]

    def id_at(self, row: int) -> str:
        """The id of ``row`` (one string; for messages)."""
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        return bytes(self.blob[a:b]).decode("utf-8", "surrogateescape")

    def iter_ids(self, block: int = 65536) -> Iterator[list[str]]:
        """Every id in row order, ``block`` at a time (lists of at most ``block`` strings)."""
        n = len(self.offsets) - 1
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            off = np.asarray(self.offsets[lo : hi + 1], dtype=np.int64)
            raw = bytes(self.blob[off[0] : off[-1]])
            rel = (off - off[0]).tolist()
            yield [raw[a:b].decode("utf-8") for a, b in zip(rel, rel[1:])]  # noqa: B905


def _check_runs(
    hashes: np.ndarray, rows: np.ndarray, offsets: np.ndarray, blob: np.ndarray, what: str
) -> int:
    """Longest run of equal hashes; ids within a run must differ (else: a duplicate id)."""
    if len(hashes) < 2:
        return 1
    same = hashes[1:] == hashes[:-1]
    if not same.any():
        return 1
    starts = np.flatnonzero(same & ~np.concatenate(([False], same[:-1])))
    max_run = 1
    for s in starts.tolist():
        e = s + 1
        while e < len(hashes) and hashes[e] == hashes[s]:
            e += 1
        max_run = max(max_run, e - s)
        seen: dict[bytes, int] = {}
        for r in rows[s:e].tolist():
            key = bytes(blob[int(offsets[r]) : int(offsets[r + 1])])
            if key in seen:
                sid = key.decode("utf-8", "surrogateescape")
                raise StoreError(
                    f"duplicate sample id {sid!r} in {what} (rows {min(seen[key], r)} and "
                    f"{max(seen[key], r)}); run `cusa store verify` on the store"
                )
            seen[key] = r
    return max_run


def _rows_dtype(n: int) -> np.dtype:
    return np.dtype(np.uint32 if n < 2**32 else np.uint64)


def bucket_bits(n: int) -> int:
    """Bits of the bucket table of ``n`` hashes: ``2**b`` buckets, between n/2 and n.

    One or two hashes per bucket on average and ~12 at most at 100M: fewer buckets (n/8) made
    the search within one twice as slow (``np.take`` of a wider window), more saved little.
    """
    return max(0, n.bit_length() - 1)


def bucket_table(
    hashes: np.ndarray,
    bits: int,
    *,
    base: int = 0,
    lo: int = 0,
    hi: int | None = None,
    dtype: np.dtype | None = None,
) -> np.ndarray:
    """Where each bucket ``lo:hi`` (of ``2**bits``, by the top bits) starts in sorted ``hashes``,
    plus ``base``; ``hi`` None: every bucket and the end (``2**bits + 1`` entries)."""
    end = hi is None
    hi = 2**bits if hi is None else hi
    if bits == 0:
        starts = np.zeros(hi - lo, dtype=np.int64)
    else:
        tops = hashes >> np.uint64(64 - bits)
        starts = np.searchsorted(tops, np.arange(lo, hi, dtype=np.uint64))
    if end:
        starts = np.append(starts, len(hashes))
    return (starts + base).astype(dtype or _rows_dtype(base + len(hashes)))


# -- the file ------------------------------------------------------------------------------------


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(n: int, blob_bytes: int, buckets: int) -> dict[str, dict[str, Any]]:
    """Where each array of an index file of ``n`` ids starts (after the header), and its type."""
    rows_dtype = _rows_dtype(n).newbyteorder("<").str
    arrays = [
        ("hashes", n, "<u8"),
        ("rows", n, rows_dtype),
        ("offsets", n + 1, "<i8"),  # int64: lookups subtract them from int64 rows
        ("blob", blob_bytes, "|u1"),
        ("buckets", buckets, rows_dtype),
    ]
    layout, pos = {}, 0
    for name, length, dtype in arrays:
        layout[name] = {"offset": pos, "dtype": dtype, "shape": [length]}
        pos = _aligned(pos + length * np.dtype(dtype).itemsize)
    return layout


def _file_blocks(
    fields: dict[str, Any],
    layout: dict[str, dict[str, Any]],
    sources: dict[str, Iterator[np.ndarray]],
) -> Iterator[bytes | memoryview]:
    """The bytes of an index file: its header (``fields`` and ``layout``), then each array from
    its ``sources`` blocks, padded to the layout's offsets."""
    header = {"format": "cusa-id-index", "version": INDEX_VERSION, **fields, "arrays": layout}
    head = json.dumps(header, sort_keys=True).encode()
    data_start = _aligned(len(MAGIC) + 8 + len(head))
    yield MAGIC + len(head).to_bytes(8, "little") + head
    yield bytes(data_start - len(MAGIC) - 8 - len(head))
    written = 0
    for name, spec in layout.items():
        pad = spec["offset"] - written
        if pad:
            yield bytes(pad)
            written += pad
        dtype = np.dtype(spec["dtype"])
        count = 0
        for block in sources[name]:
            block = np.ascontiguousarray(block, dtype=dtype)
            yield memoryview(block).cast("B")
            written += block.nbytes
            count += len(block)
        if count != spec["shape"][0]:  # a bug, never a user's error: refuse to write the file
            raise AssertionError(f"id index array {name}: {count} entries for {spec['shape']}")


def _blocks_of(arr: np.ndarray, step: int = 2**22) -> Iterator[np.ndarray]:
    for lo in range(0, len(arr), step):
        yield arr[lo : lo + step]


def index_file_blocks(index: IdIndex, extra: dict[str, Any]) -> Iterator[bytes | memoryview]:
    """The bytes of ``id_index.bin`` for an in-memory ``index``, block by block.

    ``extra`` (e.g. the row count and the sample_id chunk it was built from) goes into the
    header, which readers check before trusting the file.
    """
    buckets = index.buckets
    if buckets is None:
        buckets = bucket_table(index.hashes, bucket_bits(len(index)))
    fields = {
        "hash": index.hash_name,
        "n": len(index),
        "max_run": index.max_run,
        "bucket_max": int(np.diff(buckets).max()) if len(index) else 0,
        **extra,
    }
    layout = _layout(len(index), len(index.blob), len(buckets))
    arrays = {
        "hashes": index.hashes,
        "rows": index.rows_of_hash,
        "offsets": index.offsets,
        "blob": index.blob,
        "buckets": buckets,
    }
    yield from _file_blocks(fields, layout, {k: _blocks_of(v) for k, v in arrays.items()})


#: The top bits of a hash that pick its spill partition in :class:`IndexFileBuilder`.
SPILL_BITS = 6
_SPILL = np.dtype([("hash", "<u8"), ("row", "<u8")])
_COPY_BYTES = 4 * 2**20


class IndexFileBuilder:
    """``id_index.bin`` of ids fed block by block in row order, with memory that does not grow
    with N (sealing: 100M ids).

    :meth:`add` hashes each block and appends ``(hash, row)`` to one of ``2**SPILL_BITS`` files
    in ``tmpdir`` by the hash's top bits, and the ids' bytes to two more; :meth:`blocks` sorts
    one spill file at a time (N/64 entries: 16 bytes each, e.g. 25 MB at 100M ids), which
    together are the sorted hashes, and streams the file. ``tmpdir`` needs about 50 bytes per id.

    Example:
        >>> builder = IndexFileBuilder(tmp, what=repr(url))
        >>> for offsets, blob in id_blocks:      # (k+1,) offsets into blob, row order
        ...     builder.add(offsets, blob)
        >>> fs.write_stream_atomic(path, builder.blocks({"rows": n}))
    """

    def __init__(self, tmpdir: str, *, hash_name: str | None = None, what: str = "the ids"):
        self.hash_name = hash_name or DEFAULT_HASH
        _hash_fn(self.hash_name)  # an unknown name fails here, not after the spill
        self.what = what
        self.dir = os.path.join(tmpdir, "id-index")
        os.makedirs(self.dir, exist_ok=True)
        self.n = 0
        self.blob_bytes = 0
        self._spill = [os.path.join(self.dir, f"spill-{p:03d}") for p in range(2**SPILL_BITS)]
        self._offsets = open(os.path.join(self.dir, "offsets"), "wb")  # noqa: SIM115
        self._blob = open(os.path.join(self.dir, "blob"), "wb")  # noqa: SIM115
        self._offsets.write(np.zeros(1, dtype="<i8").tobytes())

    def add(self, offsets: np.ndarray, blob: np.ndarray) -> None:
        """The next ids in row order: ``blob[offsets[i]:offsets[i+1]]``."""
        offsets = np.asarray(offsets, dtype=np.int64)
        k = len(offsets) - 1
        if k <= 0:
            return
        base = int(offsets[0])
        rel = offsets - base
        data = np.ascontiguousarray(blob[base : int(offsets[-1])], dtype=np.uint8)
        hashes = hash_ids(rel, data, self.hash_name)
        part = (hashes >> np.uint64(64 - SPILL_BITS)).astype(np.intp)
        order = np.argsort(part, kind="stable")  # rows stay ascending within a partition
        spill = np.empty(k, dtype=_SPILL)
        spill["hash"] = hashes[order]
        spill["row"] = order + self.n
        ends = np.cumsum(np.bincount(part, minlength=2**SPILL_BITS))
        lo = 0
        for p, hi in enumerate(ends.tolist()):
            if hi > lo:
                with open(self._spill[p], "ab") as fh:
                    fh.write(memoryview(spill[lo:hi]).cast("B"))
            lo = hi
        self._offsets.write((rel[1:] + self.blob_bytes).astype("<i8").tobytes())
        self._blob.write(memoryview(data).cast("B"))
        self.n += k
        self.blob_bytes += len(data)

    def blocks(self, extra: dict[str, Any]) -> Iterator[bytes | memoryview]:
        """The bytes of the file, once every id is added; sorts the spills first.

        Raises:
            StoreError: an id occurs twice; the message names it and ``what``.
        """
        self._offsets.close()
        self._blob.close()
        n, bits = self.n, bucket_bits(self.n)
        rows_dtype = _rows_dtype(n)
        offsets = np.memmap(self._offsets.name, dtype="<i8", mode="r")
        blob = np.memmap(self._blob.name, dtype=np.uint8, mode="r") if self.blob_bytes else None
        blob = blob if blob is not None else np.zeros(0, dtype=np.uint8)
        sorted_hashes = os.path.join(self.dir, "hashes")
        sorted_rows = os.path.join(self.dir, "rows")
        table = os.path.join(self.dir, "buckets")
        max_run, start, bucket_max = 1, 0, 0
        with (
            open(sorted_hashes, "wb") as fh,
            open(sorted_rows, "wb") as fr,
            open(table, "wb") as ft,
        ):
            for p, path in enumerate(self._spill):
                spill = np.fromfile(path, dtype=_SPILL) if os.path.exists(path) else None
                spill = spill if spill is not None else np.zeros(0, dtype=_SPILL)
                order = np.argsort(spill["hash"], kind="stable")
                hashes = spill["hash"][order]
                rows = spill["row"][order].astype(rows_dtype)
                del spill, order
                max_run = max(max_run, _check_runs(hashes, rows, offsets, blob, self.what))
                fh.write(hashes.astype("<u8").tobytes())
                fr.write(rows.tobytes())
                if bits >= SPILL_BITS:  # this partition is exactly buckets lo:hi
                    per = 2 ** (bits - SPILL_BITS)
                    part = bucket_table(
                        hashes, bits, base=start, lo=p * per, hi=(p + 1) * per, dtype=rows_dtype
                    )
                    ft.write(part.tobytes())
                    if len(hashes):  # the largest bucket of this partition
                        sizes = np.diff(part, append=start + len(hashes))
                        bucket_max = max(bucket_max, int(sizes.max()))
                start += len(hashes)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if bits >= SPILL_BITS:
                ft.write(np.array([n], dtype=rows_dtype).tobytes())
        if bits < SPILL_BITS:  # a small index (N < 64): one table from every hash
            hashes = np.fromfile(sorted_hashes, dtype="<u8") if n else np.zeros(0, np.uint64)
            buckets = bucket_table(hashes, bits, dtype=rows_dtype)
            buckets.tofile(table)
            bucket_max = int(np.diff(buckets).max()) if n else 0
        fields = {
            "hash": self.hash_name,
            "n": n,
            "max_run": max_run,
            "bucket_max": bucket_max,
            **extra,
        }
        del offsets, blob
        layout = _layout(n, self.blob_bytes, 2**bits + 1)
        sources = {
            "hashes": _file_blocks_of(sorted_hashes, "<u8"),
            "rows": _file_blocks_of(sorted_rows, rows_dtype),
            "offsets": _file_blocks_of(self._offsets.name, "<i8"),
            "blob": _file_blocks_of(self._blob.name, np.uint8),
            "buckets": _file_blocks_of(table, rows_dtype),
        }
        try:
            yield from _file_blocks(fields, layout, sources)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _file_blocks_of(path: str, dtype: Any) -> Iterator[np.ndarray]:
    """The array in the file ``path``, read ``_COPY_BYTES`` at a time."""
    dtype = np.dtype(dtype)
    with open(path, "rb") as fh:
        while raw := fh.read(_COPY_BYTES // dtype.itemsize * dtype.itemsize):
            yield np.frombuffer(raw, dtype=dtype)


def read_index_header(path: str) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of an index file.

    Raises:
        StoreError: not an index file, or a malformed header.
    """
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC) + 8)
        if len(head) != len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise StoreError(f"{path!r} is not a cusa id index (bad magic bytes)")
        size = int.from_bytes(head[len(MAGIC) :], "little")
        if size > 2**20:
            raise StoreError(f"{path!r}: id index header of {size} bytes is implausible")
        raw = fh.read(size)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{path!r}: id index header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != "cusa-id-index":
        raise StoreError(f"{path!r}: id index header is not a cusa-id-index header")
    return header, _aligned(len(MAGIC) + 8 + size)


def open_index_file(path: str) -> tuple[IdIndex, dict[str, Any]]:
    """Memory-map ``id_index.bin``; returns the index and its header.

    Raises:
        StoreError: a malformed, truncated or newer-version file (the caller falls back).
    """
    header, start = read_index_header(path)
    version = header.get("version")
    if version != INDEX_VERSION:
        raise StoreError(
            f"{path!r} is an id index of version {version!r}; this cusa reads version "
            f"{INDEX_VERSION} (upgrade cusa to use it, or run `cusa store reindex`)"
        )
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    views = {}
    try:
        for name in ("hashes", "rows", "offsets", "blob"):
            spec = header["arrays"][name]
            dtype = np.dtype(spec["dtype"])
            (length,) = spec["shape"]
            lo = start + int(spec["offset"])
            hi = lo + int(length) * dtype.itemsize
            if hi > size:
                raise StoreError(
                    f"{path!r} is truncated: array {name!r} ends at byte {hi} of {size}; "
                    "run `cusa store reindex`"
                )
            views[name] = np.ndarray((int(length),), dtype=dtype, buffer=mm, offset=lo)
        n = int(header["n"])
        if len(views["hashes"]) != n or len(views["rows"]) != n or len(views["offsets"]) != n + 1:
            raise StoreError(f"{path!r}: id index arrays disagree with n={n}")
        buckets = _map_buckets(path, header, start, size, mm, n)
        index = IdIndex(
            views["hashes"],
            views["rows"],
            views["offsets"],
            views["blob"],
            int(header.get("max_run", 1)),
            str(header.get("hash")),
            path=path,
            buckets=buckets,
            bucket_max=int(header.get("bucket_max", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path!r}: malformed id index header ({exc})") from exc
    return index, header


def _map_buckets(
    path: str, header: dict[str, Any], start: int, size: int, mm: np.ndarray, n: int
) -> np.ndarray | None:
    """The bucket table of an index file; None for a file written before tables existed."""
    spec = header["arrays"].get("buckets")
    if spec is None or not n:
        return None
    dtype = np.dtype(spec["dtype"])
    (length,) = spec["shape"]
    lo = start + int(spec["offset"])
    if lo + int(length) * dtype.itemsize > size:
        raise StoreError(f"{path!r} is truncated in its bucket table; run `cusa store reindex`")
    count = int(length) - 1  # 2**b buckets
    if count < 1 or count & (count - 1) or int(header.get("bucket_max", 0)) < 1:
        raise StoreError(f"{path!r}: malformed bucket table of {length} entries")
    return np.ndarray((int(length),), dtype=dtype, buffer=mm, offset=lo)
