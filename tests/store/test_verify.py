"""verify: a clean store passes, and each kind of corruption is caught with a precise message."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from store_helpers import DIM, fill_group, toy_spec, unit_rows

from cusa.store import FeatureLookup
from cusa.store.verify import verify_group, verify_store


def _locate(group, sample_id: str) -> tuple[str, int]:
    """The chunk file holding ``sample_id`` and the byte offset of its row."""
    lookup = FeatureLookup(group)
    row = int(lookup.rows([sample_id])[0])
    seg = int(np.searchsorted(lookup._offsets, row, side="right") - 1)
    local = row - int(lookup._offsets[seg])
    return group.fs.local_path(group.segments()[seg].rel), local * DIM * 2


def _shard_of(filled, sample_id: str) -> str:
    return next(s for s, ids in filled.shards.items() if sample_id in ids)


@pytest.fixture(params=["unsealed", "sealed"])
def state(request, filled):
    if request.param == "sealed":
        filled.group.seal()
    return filled


def test_clean_store_verifies_and_lists_the_ledger(state):
    report = verify_group(state.group)
    assert report.ok, report.summary()
    assert report.errors == [] and report.warnings == []
    assert report.rows == len(state.expected)
    assert report.committed_shards == len(state.shards)
    assert {f["sample_id"]: f["error"] for f in report.failed} == state.failures
    assert report.to_dict()["ok"] is True
    assert "OK" in report.summary()


def test_nan_injected_into_a_chunk_file(state):
    victim = sorted(state.expected)[3]
    path, offset = _locate(state.group, victim)
    with open(path, "r+b") as fh:
        fh.seek(offset + 2 * 5)
        fh.write(np.array([np.nan], dtype=np.float16).tobytes())
    report = verify_group(state.group)
    assert not report.ok
    text = "\n".join(report.errors)
    assert re.search(rf"NaN/inf features for 1 sample\(s\): {re.escape(repr(victim))}", text)
    assert "does not match the SHA-256 recorded" in text
    assert state.group.rel in text
    if state.group.sealed is None:
        assert f"shard {_shard_of(state, victim)!r}" in text


def test_truncated_chunk_file(state):
    path, _ = _locate(state.group, sorted(state.expected)[0])
    with open(path, "r+b") as fh:
        fh.truncate(DIM * 2 * 2 + 7)
    report = verify_group(state.group)
    assert not report.ok
    msg = next(e for e in report.errors if "truncated" in e)
    assert f"{DIM * 2 * 2 + 7} bytes, expected" in msg and path in msg


def test_norm_off_when_spec_says_normalized(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    rng = np.random.default_rng(0)
    feats = unit_rows(rng, 4)
    feats[2] *= 1.5
    group.write_shard("s0", ["n0", "n1", "n2", "n3"], feats)
    group.write_shard("s1", ["m0"], unit_rows(rng, 1) * 0.98)  # 2% off: beyond fp16 rounding
    report = verify_group(group)
    text = "\n".join(report.errors)
    assert re.search(
        r"shard 's0'.*L2-normalised but 1 sample\(s\) have norms off 1 .*'n2' \(norm 1\.[45]\d+\)",
        text,
    )
    assert "'m0' (norm 0.98" in text
    # The same rows in a store whose spec says "not normalised" are fine.
    loose = store.group("coco", "train", toy_spec(name="raw", normalized=False), create=True)
    loose.write_shard("s0", ["n0", "n1", "n2", "n3"], feats)
    assert verify_group(loose).ok


def test_fp16_rounding_stays_within_the_norm_tolerance(store):
    group = store.group("coco", "train", toy_spec(dim=768), create=True)
    group.write_shard(
        "s", [f"r{i}" for i in range(512)], unit_rows(np.random.default_rng(1), 512, 768)
    )
    assert verify_group(group).ok


def test_commit_record_pointing_at_a_missing_part(filled):
    group = filled.group
    shard = sorted(filled.shards)[1]
    record = group.fs.read_json(f"{group.rel}/commits/{shard}.json")
    group.fs.remove(f"{group.rel}/parts/{record['part']}")
    report = verify_group(group)
    assert not report.ok
    assert any(
        f"shard {shard!r}: commit record commits/{shard}.json points at missing part parts/{record['part']}"
        in e
        for e in report.errors
    ), report.errors
    # Its ids are listed by nobody else, so nothing else is reported about them.
    assert len(report.errors) == 1


def test_deleted_manifest_row(state):
    group = state.group
    victim = sorted(state.expected)[2]
    shard = _shard_of(state, victim)
    if group.sealed:
        rel = f"{group.rel}/manifest.parquet"
    else:
        part = group.fs.read_json(f"{group.rel}/commits/{shard}.json")["part"]
        rel = f"{group.rel}/parts/{part}/manifest.parquet"
    table = pq.read_table(io.BytesIO(group.fs.read_bytes(rel)))
    table = table.filter(pa.compute.not_equal(table["sample_id"], victim))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    group.fs.write_bytes_atomic(rel, buf.getvalue())
    report = verify_group(group)
    assert any(
        "have feature rows but are not in the manifest" in e and repr(victim) in e
        for e in report.errors
    ), report.errors


def test_deleted_feature_row_in_sealed_arrays(filled):
    group = filled.group
    group.seal()
    ids = sorted(filled.expected)
    victim = ids[4]
    kept = [i for i in ids if i != victim]
    arr = zarr.open_array(store=group.fs.zarr_store(f"{group.rel}/sample_id"), mode="r+")
    arr[: len(kept)] = np.array(kept, dtype=object)  # the id column lost a row
    arr.resize((len(kept),))
    report = verify_group(group)
    text = "\n".join(report.errors)
    assert (
        f"sealed sample_id array has {len(kept)} ids but sealed.json records {len(ids)} rows"
        in text
    )
    assert re.search(
        rf"listed in the manifest as committed have no feature row: {re.escape(repr(victim))}", text
    )


def test_duplicate_id_across_shards(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    rng = np.random.default_rng(0)
    group.write_shard("shard-a", ["x", "y"], unit_rows(rng, 2))
    group.write_shard("shard-b", ["z", "x"], unit_rows(rng, 2))
    report = verify_group(group)
    assert any(
        "duplicate sample id(s) 'x' in shard 'shard-a' and shard 'shard-b'" in e
        for e in report.errors
    ), report.errors


def test_attrs_edited_to_another_teacher_spec(filled):
    group = filled.group
    meta = group.fs.read_json(f"{group.rel}/zarr.json")
    meta["attributes"]["cusa"]["spec"]["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    meta["attributes"]["cusa"]["spec"]["weights_sha256"] = "cd" * 32
    group.fs.write_bytes_atomic(f"{group.rel}/zarr.json", json.dumps(meta).encode())
    edited = filled.store.groups()[0]
    report = verify_group(edited)
    assert not report.ok
    msg = report.errors[0]
    assert "spec/attrs mismatch" in msg and f"path fingerprint is {group.fingerprint!r}" in msg
    assert "all-MiniLM-L6-v2" in msg and group.rel in msg


def test_attrs_edited_dim_is_caught_against_commit_records(filled):
    group = filled.group
    meta = group.fs.read_json(f"{group.rel}/zarr.json")
    meta["attributes"]["cusa"]["spec"]["dim"] = 8  # not a fingerprint field
    group.fs.write_bytes_atomic(f"{group.rel}/zarr.json", json.dumps(meta).encode())
    report = verify_group(filled.store.groups()[0])
    assert any("committed with dim=16 but the attributes say dim=8" in e for e in report.errors), (
        report.errors
    )


def test_orphaned_part_is_a_warning_not_an_error(filled):
    group = filled.group
    group._write_part(
        f"{group.rel}/parts/shard-x.0123456789ab",
        "shard-x",
        ["o1"],
        np.eye(DIM, dtype=np.float16)[:1],
        [],
        "",
    )
    report = verify_group(group)
    assert report.ok, report.errors
    assert any("orphaned uncommitted part parts/shard-x.0123456789ab" in w for w in report.warnings)


def test_shard_committed_after_seal(filled, monkeypatch):
    from cusa.errors import StoreError
    from cusa.store import FeatureGroup

    group = filled.group
    group.seal()
    with pytest.raises(StoreError, match="the group is sealed"):
        group.write_shard("late", ["late0"], unit_rows(np.random.default_rng(5), 1))
    # A writer that checked the seal just before another process sealed still commits:
    # simulate that race by hiding the seal record from the writer only.
    with monkeypatch.context() as m:
        m.setattr(FeatureGroup, "sealed", property(lambda self: None))
        group.write_shard("late", ["late0"], unit_rows(np.random.default_rng(5), 1))
    report = verify_group(group)
    assert any("'late'" in e and "committed after sealing" in e for e in report.errors), (
        report.errors
    )


def test_verify_store_checks_every_group(store):
    fill_group(store.group("coco", "train", toy_spec(), create=True), shards=2)
    bad = fill_group(store.group("coco", "val", toy_spec(), create=True), shards=2, prefix="v")
    path, _ = _locate(bad.group, sorted(bad.expected)[0])
    with open(path, "r+b") as fh:
        fh.truncate(3)
    reports = verify_store(store)
    assert [r.ok for r in reports] == [True, False]
    assert reports[1].group == bad.group.rel
