"""Sealing sorts the ids out of core (runs, splitters, partitions merged in order) and writes
exactly what the in-memory seal wrote: same arrays, chunk SHA-256s, manifest and id index."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import zarr
from store_helpers import fill_group, toy_spec, unit_rows

from cusa.errors import StoreError
from cusa.store import FeatureLookup, FeatureStore, sealing
from cusa.store.commits import records_stamp
from cusa.store.id_index import read_index_header
from cusa.store.layout import MANIFEST, json_bytes
from cusa.store.ledger import MANIFEST_SCHEMA, read_manifest
from cusa.store.verify import verify_group

# -- the seal before the external sort (commit f0a0efd), kept here as the reference ---------------


def _seal_in_memory(group) -> dict:
    """Seal ``group`` the old way: every id, the sort order and the features in memory."""
    records = group.commit_records()
    segs = group._part_segments(records)
    fs, rel, dim, dtype = group.fs, group.rel, group.dim, group.dtype
    ids = sealing.read_segment_ids(group, segs)
    order = pc.sort_indices(ids).to_numpy().astype(np.int64)
    sorted_ids = ids.take(pa.array(order))
    n = len(order)
    if n > 1:
        same = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, n - 1))
        if pc.any(same).as_py():
            dup = sorted_ids[pc.index(same, True).as_py()].as_py()
            raise sealing.duplicate_id_error(group.url, dup)
    parts = [np.fromfile(fs.local_path(s.rel), dtype=dtype).reshape(s.rows, dim) for s in segs]
    feats = np.concatenate(parts)[order] if parts else np.zeros((0, dim), dtype)
    chunk = max(1, min(n, sealing.MAX_CHUNK_BYTES // (dim * dtype.itemsize))) if n else 1
    chunk_rows, chunk_sha = [], []
    if n:
        store = fs.zarr_store(rel)
        sealing._seal_array(store, "features", shape=(n, dim), chunks=(chunk, dim), dtype=dtype,
                            compressors=None, filters=None, fill_value=0)  # fmt: skip
        for ci, start in enumerate(range(0, n, chunk)):
            data = feats[start : start + chunk].tobytes()
            fs.write_bytes_atomic(f"{rel}/features/c/{ci}/0", data)
            chunk_rows.append(len(feats[start : start + chunk]))
            chunk_sha.append(hashlib.sha256(data).hexdigest())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sid = sealing._seal_array(store, "sample_id", shape=(n,), chunks=(n,), dtype=str)
        fs.write_bytes_atomic(f"{rel}/sample_id/c/0", _old_sample_id_chunk(sid, sorted_ids))
    sealing.write_id_index(fs, rel, sorted_ids)
    failed = _old_manifest(group, segs, order, sorted_ids)
    shards = [r["shard"] for r in records]
    record = sealing.new_seal_record(n, failed, shards, chunk_rows, chunk_sha)
    fs.write_bytes_atomic(f"{rel}/sealed.json", json_bytes(record))
    fs.remove(f"{rel}/parts")
    return record


def _old_sample_id_chunk(sid, sorted_ids) -> bytes:
    import numcodecs

    conf = sid.metadata.codecs[1].to_dict().get("configuration", {})
    zstd = numcodecs.Zstd(level=int(conf.get("level", 0)), checksum=bool(conf.get("checksum")))
    offsets, blob = sealing.id_buffers(sorted_ids)
    n, lo, out = len(offsets) - 1, 0, []
    while lo < n:
        hi = int(np.searchsorted(offsets, offsets[lo] + sealing.SAMPLE_ID_FRAME_BYTES, "right")) - 1
        hi = min(n, max(hi, lo + 1))
        raw = sealing._vlen_block(offsets[lo : hi + 1], blob, header=n if lo == 0 else None)
        out.append(zstd.encode(raw))
        lo = hi
    return b"".join(out)


def _old_manifest(group, segs, order, sorted_ids) -> int:
    import pyarrow.parquet as pq

    shard_of_part = {r["part"]: r["shard"] for r in group.commit_records()}
    seg_shards = pa.array(
        [shard_of_part[s.rel.split("/parts/", 1)[1].split("/", 1)[0]] for s in segs], pa.string()
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
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MANIFEST)
        with pq.ParquetWriter(local, MANIFEST_SCHEMA) as writer:
            for lo in range(0, n, sealing.MANIFEST_BLOCK_ROWS):
                hi = min(n, lo + sealing.MANIFEST_BLOCK_ROWS)
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
        group.fs.write_bytes_atomic(f"{group.rel}/{MANIFEST}", Path(local).read_bytes())
    return len(failed_table)


# -- helpers -------------------------------------------------------------------------------------


def _sealed_files(group) -> dict[str, object]:
    """Every file of the sealed group, timestamps (``sealed``, the index's ``built``) and the
    commit records' stamp taken out."""
    root = Path(group.fs.local_path(group.rel))
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if name == "sealed.json":
            record = json.loads(data)
            assert record.pop("sealed")
            record.pop("commits_stamp", None)  # of the group's own record files
            out[name] = record
        elif name == "id_index.bin":
            header, start = read_index_header(str(path))
            assert header.pop("built")
            out[name] = (header, data[start:])
        else:
            out[name] = data
    return out


def _twin(group, tmp_path: Path):
    """The same unsealed group in a copy of its store."""
    src = Path(group.fs.local_path(""))
    dst = tmp_path / "twin"
    shutil.copytree(src, dst)
    return FeatureStore.open(dst).find_group("coco", "train", "toy-text")


def _assert_same_seal(group, tmp_path: Path) -> dict:
    """Seal ``group`` (the external sort) and its twin (the reference); every file is equal."""
    twin = _twin(group, tmp_path)
    record = group.seal()
    expected = _seal_in_memory(twin)
    # the time, and the stamp of the group's own commit record files (their inodes differ)
    own = ("sealed", "commits_stamp")
    assert {k: v for k, v in record.items() if k not in own} == {
        k: v for k, v in expected.items() if k not in own
    }
    assert record["commits_stamp"] == records_stamp(group.fs, group.rel)
    mine, ref = _sealed_files(group), _sealed_files(twin)
    assert sorted(mine) == sorted(ref)
    for name in ref:
        assert mine[name] == ref[name], name
    return record


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Every block of the seal a few rows: many runs, partitions, batches, frames, chunks."""
    monkeypatch.setattr(sealing, "SEAL_RUN_ROWS", 7)
    monkeypatch.setattr(sealing, "SEAL_PARTITION_ROWS", 5)
    monkeypatch.setattr(sealing, "SEAL_TEMP_BATCH_ROWS", 3)
    monkeypatch.setattr(sealing, "MANIFEST_BLOCK_ROWS", 4)
    monkeypatch.setattr(sealing, "SAMPLE_ID_FRAME_BYTES", 20)
    monkeypatch.setattr(sealing, "MAX_CHUNK_BYTES", 5 * 16 * 2)  # 5 rows of 16 fp16
    monkeypatch.setenv("CUSA_SEAL_BLOCK_BYTES", str(2 * 16 * 2))  # 2 rows
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    return tmp


def _group(tmp_path: Path, name: str = "store"):
    store = FeatureStore.open(tmp_path / name, create=True)
    return store.group("coco", "train", toy_spec(), manifest_hash="m" * 16, create=True)


def _write(group, shards: dict[str, list[str]], failures: dict[str, list[str]] | None = None):
    rng = np.random.default_rng(7)
    for shard, ids in shards.items():
        fails = [(f, f"bad {f}") for f in (failures or {}).get(shard, [])]
        group.write_shard(shard, ids, unit_rows(rng, len(ids)), failures=fails)


# -- tests ---------------------------------------------------------------------------------------


def test_default_settings_write_what_the_in_memory_seal_wrote(tmp_path):
    group = _group(tmp_path)
    filled = fill_group(group, shards=5, rows=40, fail_every=7)
    record = _assert_same_seal(group, tmp_path)
    assert record["rows"] == len(filled.expected) and record["failed"] == len(filled.failures)
    assert verify_group(group).ok


def test_many_small_partitions_write_the_same_bytes(tiny, tmp_path, caplog):
    group = _group(tmp_path)
    filled = fill_group(group, shards=6, rows=25, fail_every=5)
    with caplog.at_level(logging.INFO, logger="cusa.store.sealing"):
        _assert_same_seal(group, tmp_path)
    (message,) = [r.getMessage() for r in caplog.records if "partition(s)" in r.getMessage()]
    assert f"sorted {len(filled.expected)} ids in 18 run(s)" in message  # 120 ids / 7
    partitions = int(message.split(" run(s), ")[1].split(" partition")[0])
    assert partitions >= 20  # ~120 / 5
    assert str(tiny) in message  # TMPDIR holds the temporary files...
    assert list(tiny.iterdir()) == []  # ...and they are gone
    lookup = FeatureLookup(group)
    ids = list(filled.expected)
    np.testing.assert_array_equal(
        lookup.gather(ids).astype(np.float32), np.stack([filled.expected[i] for i in ids])
    )
    assert verify_group(group).ok
    assert len(group.manifest()) == len(filled.expected) + len(filled.failures)


def test_unicode_and_empty_ids_sort_by_code_point(tiny, tmp_path):
    # UTF-16 would put U+FFFF after the emoji; UTF-8 bytes and Python put it before
    odd = ["", "\uffff", "🦜", "é", "e\u0301", "日本語#0", "a\x00b", "a", "ab", "x" * 300, "Z"]
    shards = {"s0": odd[::2], "s1": odd[1::2], "s2": [f"k{i:03d}" for i in range(30)]}
    group = _group(tmp_path)
    _write(group, shards, {"s2": ["k999", "ünï"]})
    _assert_same_seal(group, tmp_path)
    arr = zarr.open_array(store=str(group.fs.local_path(f"{group.rel}/sample_id")), mode="r")
    assert [str(x) for x in arr[:]] == sorted(odd + shards["s2"])
    assert "" in FeatureLookup(group) and "🦜" in FeatureLookup(group)


def test_one_part_only(tiny, tmp_path):
    group = _group(tmp_path)
    _write(group, {"only": [f"id-{i * 7919 % 101:03d}" for i in range(101)]})
    assert _assert_same_seal(group, tmp_path)["rows"] == 101


def test_a_group_whose_parts_are_empty(tiny, tmp_path):
    group = _group(tmp_path)
    _write(group, {"a": [], "b": []}, {"a": ["x", "w"], "b": ["y"]})
    record = _assert_same_seal(group, tmp_path)
    assert record["rows"] == 0 and record["failed"] == 3 and record["chunk_rows"] == []
    assert group.manifest()["sample_id"].to_pylist() == ["w", "x", "y"]
    assert list(tiny.iterdir()) == []


def test_duplicate_id_across_parts_is_refused_like_before(tiny, tmp_path, monkeypatch):
    """Ids committed twice, in parts that sort into different runs; the smallest is named, in
    the old words, the group stays unsealed and no temporary file is left."""
    monkeypatch.setattr("cusa.store.group.time.sleep", lambda s: None)  # seal() retries
    shards = {f"s{k}": [f"k{i:03d}" for i in range(k, 60, 3)] for k in range(3)}
    shards["s0"].append("k031")  # also in s1 (31 % 3 == 1)
    shards["s2"].append("k040")  # also in s1, larger: not the one named
    group = _group(tmp_path)
    _write(group, shards)
    twin = _twin(group, tmp_path)
    with pytest.raises(StoreError) as mine:
        group.seal()
    with pytest.raises(StoreError) as ref:
        _seal_in_memory(twin)
    assert str(mine.value) == str(ref.value).replace(twin.url, group.url)
    assert "sample id 'k031' was committed by two shards; ids must be unique" in str(mine.value)
    assert not group.sealed and group.fs.exists(f"{group.rel}/parts")
    assert list(tiny.iterdir()) == []


def test_duplicate_at_a_partition_boundary(tiny, tmp_path, monkeypatch):
    """Every id twice: each partition starts with a duplicate; the first one is named."""
    monkeypatch.setattr("cusa.store.group.time.sleep", lambda s: None)
    ids = [f"d{i:02d}" for i in range(20)]
    group = _group(tmp_path)
    _write(group, {"a": ids, "b": ids[::-1]})
    with pytest.raises(StoreError, match="sample id 'd00' was committed by two shards"):
        group.seal()


def test_a_large_part_is_cut_into_runs(tiny, tmp_path, caplog):
    group = _group(tmp_path)
    _write(group, {"big": [f"r{(i * 37) % 50:02d}" for i in range(50)], "small": ["r99"]})
    with caplog.at_level(logging.INFO, logger="cusa.store.sealing"):
        _assert_same_seal(group, tmp_path)
    assert any("in 8 run(s)" in r.getMessage() for r in caplog.records)  # 51 ids / 7


_FLAT_SCRIPT = r"""
import os, sys
import numpy as np, pyarrow as pa
from cusa.store import FeatureStore, sealing
from cusa.store.spec import TeacherSpec

sealing.SEAL_RUN_ROWS = sealing.SEAL_PARTITION_ROWS = sealing.MANIFEST_BLOCK_ROWS = 5_000
sealing.SEAL_TEMP_BATCH_ROWS = 1024
sealing.SAMPLE_ID_FRAME_BYTES = 32 * 1024
spec = TeacherSpec(name="t", modality="text", model="m", weights_sha256="0" * 64,
                   preprocessing={}, output_kind="sentence", dim=4)
peaks = []
for n in (50_000, 150_000):
    group = FeatureStore.open(os.path.join(sys.argv[1], str(n)), create=True).group(
        "d", "train", spec, create=True)
    perm = np.random.default_rng(0).permutation(n).tolist()
    for s, lo in enumerate(range(0, n, 5_000)):
        ids = [f"{i * 999_999_937 % 10**12:012d}#{i % 5}" for i in perm[lo : lo + 5_000]]
        group.write_shard(f"s{s}", ids, np.full((len(ids), 4), 0.5, np.float32))
    group.seal()
    peaks.append(pa.default_memory_pool().max_memory())
print(peaks)
"""


def test_arrow_memory_of_a_seal_does_not_grow_with_n(tmp_path):
    """In a fresh process, the most Arrow memory ever allocated (a running maximum) stays the
    same when a seal 3x larger follows a first one: sorting holds partitions, not N ids (the
    in-memory sort held all ids, their order and a sorted copy: ~3x more for 3x the ids)."""
    import subprocess
    import sys

    env = {**os.environ, "CUSA_SEAL_BLOCK_BYTES": str(32 * 1024)}
    proc = subprocess.run([sys.executable, "-c", _FLAT_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    small, large = json.loads(proc.stdout.strip().splitlines()[-1])
    assert large <= 1.1 * small, (small, large)
