"""The on-disk id index: lookups by id over memory maps, collisions, odd ids, old groups, reindex."""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_helpers import DIM, toy_spec, unit_rows

from cusa.errors import SampleNotFoundError, StoreError
from cusa.store import FeatureLookup, sealing
from cusa.store import id_index as id_index_mod
from cusa.store.id_index import mlh64, open_index_file, read_index_header
from cusa.store.layout import ID_INDEX, ID_INDEX_LOCK
from cusa.store.reindex import reindex_group
from cusa.store.verify import verify_group

ODD_IDS = [
    "plain",
    "",
    "é",
    "日本語のキャプション#0",
    "emoji 🦜#1",
    "x" * 10_000,
    "y" * 9_999 + "z",
    "a\x00b",
    "a",
    "ab",
    "000123456789",
    "000123456789#4",
]


def _write(group, ids, seed=0, shards=3):
    """Write ``ids`` over ``shards`` shards; returns {id: stored row as float32}."""
    rng = np.random.default_rng(seed)
    feats = unit_rows(rng, len(ids), group.dim)
    parts = np.array_split(np.arange(len(ids)), shards)
    for s in reversed(range(shards)):
        idx = parts[s]
        group.write_shard(f"shard-{s}", [ids[i] for i in idx], feats[idx])
    stored = feats.astype(group.dtype).astype(np.float32)
    return dict(zip(ids, stored, strict=True))


@pytest.fixture
def odd(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    return group, _write(group, ODD_IDS)


def _check_all(lookup, expected):
    ids = list(expected)
    got = lookup.gather(ids).astype(np.float32)
    np.testing.assert_array_equal(got, np.stack([expected[i] for i in ids]))
    assert len(lookup) == len(expected)
    assert all(i in lookup for i in ids)


@pytest.mark.parametrize("sealed", [False, True])
def test_unicode_long_and_nul_ids_are_found(odd, sealed):
    group, expected = odd
    if sealed:
        group.seal()
    lookup = FeatureLookup(group)
    _check_all(lookup, expected)
    # bytes and numpy arrays of ids go the same way as lists of str
    assert (
        lookup.rows([b"plain", "\u00e9".encode()]).tolist() == lookup.rows(["plain", "é"]).tolist()
    )
    arr = np.array(["ab", "a", "plain"])
    assert lookup.rows(arr).tolist() == lookup.rows(["ab", "a", "plain"]).tolist()
    # prefixes, extensions and NUL-padded variants of stored ids are not stored ids
    for absent in ["x" * 9_999, "x" * 10_001, "a\x00", "ab\x00", "日本語", "plain "]:
        assert absent not in lookup
    assert 3 not in lookup and None not in lookup
    with pytest.raises(SampleNotFoundError, match=re.escape("sample id 'a\\x00' is not in")):
        lookup.gather(["plain", "a\x00"])


def test_sealed_group_maps_its_index_file(odd):
    group, expected = odd
    group.seal()
    path = group.fs.local_path(f"{group.rel}/{ID_INDEX}")
    assert os.path.isfile(path)
    lookup = FeatureLookup(group)
    index = lookup._id_index()
    assert index.path == path and isinstance(index.hashes.base, np.memmap)
    assert "ids" not in lookup.__dict__  # no list of every id unless a tool asks for one
    assert lookup.ids == sorted(expected)  # sorted by code point, as Python sorts
    # a spawned worker gets the lookup without the map and maps the same file again
    state = lookup.__getstate__()
    assert state["_index"] is None and "ids" not in state
    clone = pickle.loads(pickle.dumps(lookup))
    _check_all(clone, expected)


def test_sealed_sample_id_chunk_is_what_zarr_writes(odd, tmp_path, monkeypatch):
    """The layout is unchanged: an older cusa (plain zarr) reads the sealed ids."""
    group, expected = odd
    group.seal()
    fs = group.fs
    mine = fs.read_bytes(f"{group.rel}/sample_id/c/0")
    ref = zarr.create_array(store=str(tmp_path / "ref"), shape=(len(expected),), dtype=str,
                            chunks=(len(expected),))  # fmt: skip
    ref[...] = np.array(sorted(expected), dtype=object)
    assert mine == (tmp_path / "ref" / "c" / "0").read_bytes()
    # above the frame size the chunk is several zstd frames; zarr still reads every id
    store2 = group.store.group("coco", "val", toy_spec(), create=True)
    ids = [f"{i:012d}#{i % 5}" for i in range(3000)]
    _write(store2, ids)
    monkeypatch.setattr(sealing, "SAMPLE_ID_FRAME_BYTES", 1000)
    store2.seal()
    arr = zarr.open_array(store=str(fs.local_path(f"{store2.rel}/sample_id")), mode="r")
    assert [str(x) for x in arr[:]] == sorted(ids)


def test_forced_collisions_are_resolved(store, monkeypatch):
    """A hash with 4 values: every lookup must walk a run of equal hashes and compare bytes."""

    def weak(data, starts, positions, lengths=None):
        return mlh64(data, starts, positions, lengths) % np.uint64(4)

    monkeypatch.setitem(id_index_mod.HASHES, "test-weak-4", weak)
    monkeypatch.setattr(id_index_mod, "DEFAULT_HASH", "test-weak-4")
    group = store.group("coco", "train", toy_spec(), create=True)
    ids = [f"img{i:05d}#{i % 5}" for i in range(200)] + ODD_IDS
    expected = _write(group, ids)
    unsealed = FeatureLookup(group)
    assert unsealed._id_index().max_run > 40
    _check_all(unsealed, expected)
    group.seal()
    lookup = FeatureLookup(group)
    index, header = open_index_file(lookup._id_index().path)
    assert header["hash"] == "test-weak-4" and header["max_run"] == index.max_run > 40
    _check_all(lookup, expected)
    with pytest.raises(SampleNotFoundError, match="sample id 'img00007#3' is not in"):
        lookup.rows(["img00001#1", "img00007#3"])


def test_duplicate_ids_in_one_hash_run_are_refused(store, monkeypatch):
    monkeypatch.setitem(
        id_index_mod.HASHES, "test-const", lambda d, s, p, n=None: np.zeros(len(s), np.uint64)
    )
    monkeypatch.setattr(id_index_mod, "DEFAULT_HASH", "test-const")
    group = store.group("coco", "train", toy_spec(), create=True)
    f = np.eye(DIM, dtype=np.float32)[:3]
    group.write_shard("a", ["p", "q", "r"], f)
    group.write_shard("b", ["s", "q", "t"], f)
    with pytest.raises(StoreError, match=r"duplicate sample id 'q' .*cusa store verify"):
        FeatureLookup(group)


def test_group_sealed_without_an_index_opens_and_reindexes(filled):
    """A group sealed by an older cusa: lookups read its ids; reindex writes the file once."""
    group = filled.group
    group.seal()
    index_file = group.fs.local_path(f"{group.rel}/{ID_INDEX}")
    os.unlink(index_file)
    old = FeatureLookup(group)
    assert old._index_path is None
    _check_all(old, filled.expected)
    report = verify_group(group)  # the index is an extra file: its absence is no error
    assert report.ok and any("cusa store reindex" in w for w in report.warnings)

    assert reindex_group(group) == "written"
    first = Path(index_file).read_bytes()
    assert reindex_group(group) == "up-to-date"
    assert reindex_group(group, force=True) == "written"
    again = Path(index_file).read_bytes()
    start = read_index_header(index_file)[1]  # the header records when it was built
    assert len(again) == len(first) and again[start:] == first[start:]
    new = FeatureLookup(group)
    assert new._index_path == index_file
    _check_all(new, filled.expected)
    assert reindex_group(FeatureLookup(group).group) == "up-to-date"


def test_unsealed_group_has_no_index_file_to_write(filled):
    assert reindex_group(filled.group) == "not-sealed"
    assert not filled.group.fs.exists(f"{filled.group.rel}/{ID_INDEX}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_reindex_after_a_kill_takes_over_the_stale_lock(filled):
    group = filled.group
    group.seal()
    root = group.fs.local_path(group.rel)
    os.unlink(os.path.join(root, ID_INDEX))
    # what a reindex killed mid-write leaves: its lock and a half-written temporary file
    with open(os.path.join(root, ID_INDEX_LOCK), "w") as fh:
        fh.write(f"{socket.gethostname()}:{_dead_pid()}")
    with open(os.path.join(root, f"{ID_INDEX}.deadbeef.partial"), "wb") as fh:
        fh.write(b"CUSAIDX\x01half")
    assert FeatureLookup(group)._index_path is None  # still readable meanwhile
    assert reindex_group(group) == "written"
    assert sorted(n for n in os.listdir(root) if "id_index" in n) == [ID_INDEX]
    assert FeatureLookup(group)._index_path is not None


def test_reindex_refuses_while_another_process_holds_the_lock(filled):
    group = filled.group
    group.seal()
    os.unlink(group.fs.local_path(f"{group.rel}/{ID_INDEX}"))
    holder = f"{socket.gethostname()}:{os.getpid()}"  # a running process
    lock = group.fs.local_path(f"{group.rel}/{ID_INDEX_LOCK}")
    with open(lock, "w") as fh:
        fh.write(holder)
    with pytest.raises(StoreError, match=rf"cannot reindex .*{re.escape(holder)!s}.* is writing"):
        reindex_group(group)
    assert os.path.exists(lock)


def test_damaged_or_stale_index_is_ignored_and_verify_reports_it(filled):
    group = filled.group
    group.seal()
    path = group.fs.local_path(f"{group.rel}/{ID_INDEX}")
    good = Path(path).read_bytes()
    with open(path, "r+b") as fh:
        fh.truncate(len(good) - 10)
    lookup = FeatureLookup(group)
    assert lookup._index_path is None  # fell back to the ids
    _check_all(lookup, filled.expected)
    report = verify_group(group)
    assert any(ID_INDEX in e and "reindex" in e for e in report.errors), report.errors

    # an index whose bytes disagree with the ids (one id byte flipped) is caught by verify
    data = bytearray(good)
    pos = data.rfind(b"s000_")  # an id inside the blob, the last array of the file
    data[pos] = ord("t")
    with open(path, "wb") as fh:
        fh.write(data)
    report = verify_group(group)
    assert any(ID_INDEX in e and "id bytes differ" in e for e in report.errors), report.errors
    assert reindex_group(group, force=True) == "written"
    assert verify_group(group).ok


def test_cli_reindex_writes_missing_indexes_once(filled):
    from typer.testing import CliRunner

    from cusa.cli import app

    group = filled.group
    group.seal()
    os.unlink(group.fs.local_path(f"{group.rel}/{ID_INDEX}"))
    runner = CliRunner()
    first = runner.invoke(app, ["store", "reindex", "--store", group.store.url])
    assert first.exit_code == 0, first.output
    assert f"{group.rel}: written" in first.output and "1 index(es) written" in first.output
    again = runner.invoke(app, ["store", "reindex", "--store", group.store.url, "--json"])
    assert again.exit_code == 0 and '"up-to-date"' in again.output
    bad = runner.invoke(app, ["store", "reindex", "--store", group.store.url, "-t", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_sealed_manifest_is_streamed_with_the_same_rows(filled, monkeypatch):
    """The sealed ledger, written a row group at a time, holds what merging the parts gives."""
    import pyarrow as pa

    from cusa.store.ledger import sealed_manifest

    group = filled.group
    expected = sealed_manifest(group.manifest(), pa.array(sorted(filled.expected)))
    monkeypatch.setattr(sealing, "MANIFEST_BLOCK_ROWS", 5)  # several row groups
    record = group.seal()
    got = group.manifest()
    assert got.to_pylist() == expected.to_pylist()
    assert record["failed"] == len(filled.failures) > 0
    assert verify_group(group).ok


def test_object_store_index_is_copied_once_and_mapped(s3_store_url, tmp_path):
    from cusa.store import FeatureStore

    url, options = s3_store_url
    store = FeatureStore.open(url, create=True, storage_options=options)
    group = store.group("coco", "train", toy_spec(), create=True)
    expected = _write(group, ODD_IDS)
    group.seal()
    assert group.fs.exists(f"{group.rel}/{ID_INDEX}")
    cache = tmp_path / "cache"
    lookup = FeatureLookup(group, cache_dir=cache)
    path = lookup._id_index().path
    assert path is not None and path.startswith(str(cache))
    _check_all(lookup, expected)
    assert FeatureLookup(group, cache_dir=cache)._id_index().path == path  # one copy per node
    assert reindex_group(group) == "written"  # remote indexes are not validated: rewritten
    _check_all(FeatureLookup(group, cache_dir=cache), expected)
