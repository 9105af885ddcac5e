"""The id index of a group: sample id -> row with no Python object per id.

A sealed group carries ``id_index.bin`` (see :mod:`cusa.store.layout`), which
:class:`cusa.store.FeatureLookup` memory-maps. The file holds, after a JSON header:

* ``hashes`` (N,) ``<u8``: a 64-bit hash of every id's UTF-8 bytes, sorted;
* ``rows`` (N,) ``<u4`` (``<u8`` from 2**32 rows): the row of each hash entry;
* ``offsets`` (N+1,) ``<i8`` and ``blob``: the id bytes in row order (the sealed rows
  are sorted by id), so a hash hit is confirmed by comparing the id bytes themselves.

A lookup hashes the query ids in one vectorised pass, finds them with ``np.searchsorted`` over
the mapped hashes and compares their bytes with the mapped blob; equal hashes of different ids
(collisions) sit next to each other and are probed, at most ``max_run`` entries (counted when
the index is built). Nothing in it is a Python object, so forked DataLoader workers share its
pages instead of copying them (reading a Python object writes its reference count).

The hash (``mlh64-v1``) is multilinear over the id bytes with fixed 64-bit keys (splitmix64 of
the byte position): at most 2**-57 per pair of ids (see :func:`mlh64`). Groups being written (unsealed) and sealed groups without the file
(sealed by an older cusa) get the same index built in memory when a lookup opens them.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    keys = _keys(int(positions.max()) + 1)
    prod = np.take(keys, positions)  # (T,) uint64; products wrap mod 2**64
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
        n = len(sample_ids)
        data = None
        with contextlib.suppress(TypeError, UnicodeEncodeError):
            # Fast path: one C call joins and encodes the whole batch; 0 bytes separate the ids.
            data = ("\x00".join(sample_ids) + "\x00").encode("utf-8")
        if data is not None:
            arr = np.frombuffer(data, dtype=np.uint8)
            seps = np.flatnonzero(arr == 0)
            if len(seps) != n:  # an id holds a NUL character itself
                data = None
        if data is None:
            self._slow(sample_ids)
            return
        starts = np.empty(n, dtype=np.int64)
        starts[:1] = 0
        starts[1:] = seps[:-1] + 1
        self.data = arr
        self.starts = starts
        self.lengths = seps - starts
        self.span = self.lengths + 1
        self.positions = np.arange(len(arr), dtype=np.int64) - np.repeat(starts, self.span)
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
    ) -> None:
        self.hashes, self.rows_of_hash = hashes, rows
        self.offsets = np.asarray(offsets, dtype=np.int64)  # a view when already int64
        self.blob = blob
        self.max_run = max(1, int(max_run))
        self.hash_name = hash_name
        self._hash = _hash_fn(hash_name)
        self.path = path  # set when memory-mapped from a file

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hashes, self.rows_of_hash, self.offsets, self.blob))

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
        rows = order.astype(np.uint32 if len(order) < 2**32 else np.uint64)
        del order
        max_run = _check_runs(hashes, rows, offsets, blob, what)
        return cls(hashes, rows, offsets, blob, max_run, hash_name)

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, sample_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, found)``: (n,) int64 rows (-1 where not found) and (n,) bool."""
        n = len(sample_ids)
        if n == 0 or len(self.hashes) == 0:
            return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
        q = _Query(sample_ids)
        # With separators every id, empty ones too, starts inside the stream: no length fix-up.
        qh = self._hash(q.data, q.starts, q.positions, None if q.seps is not None else q.lengths)
        pos = np.searchsorted(self.hashes, qh)
        np.minimum(pos, len(self.hashes) - 1, out=pos)
        hit = np.take(self.hashes, pos) == qh
        rows = np.take(self.rows_of_hash, pos).astype(np.int64)
        found = hit & self._same_bytes(q, rows)
        if not found.all():
            self._probe(q, qh, pos, hit, found, rows)
            rows[~found] = -1
        return rows, found

    def _same_bytes(self, q: _Query, rows: np.ndarray) -> np.ndarray:
        """(n,) whether the stored id of ``rows[k]`` has the bytes of query id ``k``."""
        start = np.take(self.offsets, rows)
        same = (np.take(self.offsets, rows + 1) - start) == q.lengths
        if len(q.data) and len(self.blob):
            src = np.repeat(start, q.span)  # (T,) the stored byte under each query byte
            src += q.positions
            np.minimum(src, len(self.blob) - 1, out=src)
            differs = np.take(self.blob, src) != q.data
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


# -- the file ------------------------------------------------------------------------------------


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def index_file_blocks(index: IdIndex, extra: dict[str, Any]) -> Iterator[bytes | memoryview]:
    """The bytes of ``id_index.bin`` for ``index``, block by block (the file is never whole).

    ``extra`` (e.g. the row count and the sample_id chunk it was built from) goes into the
    header, which readers check before trusting the file.
    """
    rows_dtype = "<u4" if len(index.hashes) < 2**32 else "<u8"
    arrays = [
        ("hashes", index.hashes, "<u8"),
        ("rows", index.rows_of_hash, rows_dtype),
        ("offsets", index.offsets, "<i8"),  # int64: lookups subtract them from int64 rows
        ("blob", index.blob, "|u1"),
    ]
    layout, pos = {}, 0
    for name, arr, dtype in arrays:
        layout[name] = {"offset": pos, "dtype": dtype, "shape": [len(arr)]}
        pos = _aligned(pos + len(arr) * np.dtype(dtype).itemsize)
    header = {
        "format": "cusa-id-index",
        "version": INDEX_VERSION,
        "hash": index.hash_name,
        "n": len(index.hashes),
        "max_run": index.max_run,
        "arrays": layout,
        **extra,
    }
    head = json.dumps(header, sort_keys=True).encode()
    data_start = _aligned(len(MAGIC) + 8 + len(head))
    yield MAGIC + len(head).to_bytes(8, "little") + head
    yield bytes(data_start - len(MAGIC) - 8 - len(head))
    written = 0
    step = 2**22
    for name, arr, dtype in arrays:
        pad = layout[name]["offset"] - written
        if pad:
            yield bytes(pad)
            written += pad
        for lo in range(0, len(arr), step):
            block = np.ascontiguousarray(arr[lo : lo + step], dtype=np.dtype(dtype))
            yield memoryview(block).cast("B")
            written += block.nbytes


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
        index = IdIndex(
            views["hashes"],
            views["rows"],
            views["offsets"],
            views["blob"],
            int(header.get("max_run", 1)),
            str(header.get("hash")),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path!r}: malformed id index header ({exc})") from exc
    return index, header
