"""The id index file built with bounded memory (``IndexFileBuilder``, what sealing uses) is the
file of the in-memory index, byte for byte, and its bucket table finds every id."""

from __future__ import annotations

import numpy as np
import pytest

from cusa.errors import StoreError
from cusa.store import id_index as id_index_mod
from cusa.store.id_index import (
    IdIndex,
    IndexFileBuilder,
    bucket_bits,
    index_file_blocks,
    mlh64,
    open_index_file,
)

ODD = ["", "é", "日本語#0", "emoji 🦜#1", "x" * 5000, "a\x00b", "a", "ab", "000123456789#4"]


def _buffers(ids):
    enc = [s.encode("utf-8") for s in ids]
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in enc], out=offsets[1:])
    return offsets, np.frombuffer(b"".join(enc), dtype=np.uint8)


def _ids(n):
    return sorted(ODD + [f"{(i * 999_999_937) % 10**12:012d}#{i % 5}" for i in range(n)])


def _built_file(tmp_path, ids, block, name="built.bin"):
    offsets, blob = _buffers(ids)
    builder = IndexFileBuilder(str(tmp_path / "tmp"), what="'test'")
    for lo in range(0, len(ids), block):  # blocks of rows, offsets not re-based
        hi = min(len(ids), lo + block)
        builder.add(offsets[lo : hi + 1], blob)
    path = tmp_path / name
    with open(path, "wb") as fh:
        for chunk in builder.blocks({"rows": len(ids)}):
            fh.write(chunk)
    assert not (tmp_path / "tmp" / "id-index").exists()  # its spill files are gone
    return path


def _memory_file(tmp_path, ids):
    offsets, blob = _buffers(ids)
    path = tmp_path / "memory.bin"
    with open(path, "wb") as fh:
        for chunk in index_file_blocks(IdIndex.build(offsets, blob), {"rows": len(ids)}):
            fh.write(chunk)
    return path


@pytest.mark.parametrize("n,block", [(0, 7), (40, 7), (5000, 333), (5000, 10**6)])
def test_builder_writes_the_in_memory_index_file_byte_for_byte(tmp_path, n, block):
    ids = _ids(n)
    built = _built_file(tmp_path, ids, block)
    assert built.read_bytes() == _memory_file(tmp_path, ids).read_bytes()
    index, header = open_index_file(str(built))
    assert len(index.buckets) == 2 ** bucket_bits(len(ids)) + 1
    assert header["bucket_max"] == int(np.diff(index.buckets).max())
    rows, found = index.lookup(ids + ["absent", "a\x00", "00012345678"])
    assert found[: len(ids)].all() and not found[len(ids) :].any()
    assert rows[: len(ids)].tolist() == list(range(len(ids)))


def test_forced_collisions_across_blocks_resolve_and_duplicates_are_named(tmp_path, monkeypatch):
    def weak(data, starts, positions, lengths=None):  # 8 hash values: long runs everywhere
        return mlh64(data, starts, positions, lengths) % np.uint64(8) << np.uint64(58)

    monkeypatch.setitem(id_index_mod.HASHES, "test-weak-8", weak)
    monkeypatch.setattr(id_index_mod, "DEFAULT_HASH", "test-weak-8")
    ids = _ids(300)
    index, header = open_index_file(str(_built_file(tmp_path, ids, 50)))
    assert header["max_run"] > 20 and header["hash"] == "test-weak-8"
    rows, found = index.lookup(ids)
    assert found.all() and rows.tolist() == list(range(len(ids)))
    with pytest.raises(StoreError, match=r"duplicate sample id '000000000000#0' in 'test'"):
        _built_file(tmp_path, sorted(ids + ["000000000000#0"]), 50, "dup.bin")


def test_an_index_without_bucket_table_is_binary_searched(tmp_path):
    """A file written before bucket tables existed has no ``buckets`` array: same answers."""
    ids = _ids(2000)
    offsets, blob = _buffers(ids)
    full = IdIndex.build(offsets, blob)
    plain = IdIndex(full.hashes, full.rows_of_hash, offsets, blob, full.max_run)
    queries = ids[::7] + ["nope", ""]
    for a, b in zip(full.lookup(queries), plain.lookup(queries), strict=True):
        np.testing.assert_array_equal(a, b)
