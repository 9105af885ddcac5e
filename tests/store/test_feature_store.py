"""FeatureStore / FeatureGroup: atomic per-shard commits, sealing and refusals, on real Zarr."""

from __future__ import annotations

import json
import multiprocessing as mp
import re

import numpy as np
import pytest
from store_helpers import DIM, fill_group, toy_spec, unit_rows

from cusa.errors import NotAStoreError, StoreError, StoreSpecMismatchError, StoreVersionError
from cusa.store import LAYOUT_VERSION, FeatureLookup, FeatureStore
from cusa.store.layout import MARKER


def _check_round_trip(filled) -> None:
    lookup = FeatureLookup(filled.group)
    ids = list(filled.expected)
    np.random.default_rng(7).shuffle(ids)
    got = lookup.gather(ids)
    assert got.shape == (len(ids), DIM) and got.dtype == np.float16
    np.testing.assert_array_equal(
        got.astype(np.float32), np.stack([filled.expected[i] for i in ids])
    )
    assert set(lookup.ids) == set(filled.expected)
    for sid in filled.failures:
        assert sid not in lookup


def test_round_trip_shuffled_shards_by_id_before_and_after_seal(filled):
    group = filled.group
    assert group.sealed is None
    _check_round_trip(filled)

    record = group.seal()
    assert record["rows"] == len(filled.expected)
    assert record["failed"] == len(filled.failures)
    assert sorted(record["shards"]) == sorted(filled.shards)
    assert group.sealed == record
    _check_round_trip(filled)
    lookup = FeatureLookup(group)
    assert lookup.ids == sorted(filled.expected)  # sealed rows are sorted by id
    assert not group.fs.exists(f"{group.rel}/parts")  # consolidated parts are removed
    assert group.seal() == record  # idempotent


def test_fp32_store_round_trips_exactly(store):
    group = store.group("coco", "val", toy_spec(dtype="float32"), create=True)
    feats = unit_rows(np.random.default_rng(3), 5)
    group.write_shard("only", [f"v{i}" for i in range(5)], feats)
    group.seal()
    got = FeatureLookup(group).gather(["v3", "v0"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, feats[[3, 0]])


def test_manifest_is_the_ledger_with_reasons(filled):
    for sealed in (False, True):
        if sealed:
            filled.group.seal()
        rows = filled.group.manifest().to_pylist()
        failed = {r["sample_id"]: r for r in rows if r["status"] != "ok"}
        assert set(failed) == set(filled.failures)
        for sid, r in failed.items():
            assert r["error"] == filled.failures[sid] and r["row"] == -1
            assert r["shard"].startswith("shard-")
        ok = [r for r in rows if r["status"] == "ok"]
        assert {r["sample_id"] for r in ok} == set(filled.expected)


def test_rerunning_a_committed_shard_is_a_noop(filled):
    group = filled.group
    shard, ids = next(iter(filled.shards.items()))
    parts_before = group.fs.ls(f"{group.rel}/parts")
    record_before = group.fs.read_bytes(f"{group.rel}/commits/{shard}.json")
    again = group.write_shard(shard, ids, -unit_rows(np.random.default_rng(99), len(ids)))
    assert again.status == "skipped"
    assert group.fs.ls(f"{group.rel}/parts") == parts_before
    assert group.fs.read_bytes(f"{group.rel}/commits/{shard}.json") == record_before
    np.testing.assert_array_equal(
        FeatureLookup(group).gather(ids).astype(np.float32),
        np.stack([filled.expected[i] for i in ids]),
    )


def _race_writer(root: str, value: float, barrier, results) -> None:
    store = FeatureStore.open(root)
    group = store.group("coco", "train", toy_spec())
    ids = [f"race{i:03d}" for i in range(64)]
    feats = np.full((64, DIM), value, dtype=np.float32)  # (64, D), one constant per writer
    barrier.wait()
    results.put((value, group.write_shard("contested", ids, feats).status))


def test_two_writers_racing_leave_exactly_one_unmixed_copy(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    ctx = mp.get_context("fork")
    for round_ in range(3):
        if round_:
            # fresh group for the next round: drop the previous one entirely
            group.fs.remove(group.rel)
            group = store.group("coco", "train", toy_spec(), create=True)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_race_writer, args=(store.url, v, barrier, results))
            for v in (0.25, -0.5)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        statuses = dict(results.get(timeout=5) for _ in procs)
        assert sorted(statuses.values()).count("committed") == 1, statuses
        assert set(statuses.values()) <= {"committed", "lost-race", "skipped"}
        winner = next(v for v, s in statuses.items() if s == "committed")
        assert group.committed_shards() == ["contested"]
        assert len(group.fs.ls(f"{group.rel}/parts")) == 1  # the loser removed its part
        got = FeatureLookup(group).gather([f"race{i:03d}" for i in range(64)])
        np.testing.assert_array_equal(got, np.full((64, DIM), winner, dtype=np.float16))


def test_reader_sees_only_committed_shards_and_a_reopen_sees_more(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    rng = np.random.default_rng(0)
    group.write_shard("a", ["a0", "a1"], unit_rows(rng, 2))
    # A shard whose part is fully written but whose commit record is not (a writer that died
    # just before committing, or one still writing): readers must not see it.
    group._write_part(
        f"{group.rel}/parts/b.deadbeef", "b", ["b0"], unit_rows(rng, 1).astype(np.float16), [], ""
    )
    lookup = FeatureLookup(group)
    assert lookup.ids == ["a0", "a1"] and "b0" not in lookup

    group.write_shard("c", ["c0"], unit_rows(rng, 1))
    assert "c0" not in lookup  # an open lookup is a consistent snapshot
    reopened = FeatureLookup(FeatureStore.open(store.url).find_group("coco", "train", "toy-text"))
    assert sorted(reopened.ids) == ["a0", "a1", "c0"]
    np.testing.assert_array_equal(reopened.gather(["a1"]), lookup.gather(["a1"]))


def test_spec_mismatch_names_the_differing_fields(store):
    store.group("coco", "train", toy_spec(), manifest_hash="h1", create=True)
    # dim and normalized are not part of the fingerprint, so this lands on the same group.
    with pytest.raises(StoreSpecMismatchError, match=r"dim: stored 16 != given 32.*normalized"):
        store.group("coco", "train", toy_spec(dim=32, normalized=False), create=True)
    with pytest.raises(StoreSpecMismatchError, match=r"manifest_hash: stored 'h1' != given 'h2'"):
        store.group("coco", "train", toy_spec(), manifest_hash="h2", create=True)
    with pytest.raises(
        StoreSpecMismatchError, match=r"dtype: store 'float16' != expected 'float32'"
    ):
        FeatureLookup.open(
            store,
            dataset="coco",
            split="train",
            teacher="toy-text",
            expected_spec=toy_spec(dtype="float32"),
        )
    # Library versions are informative only.
    store.group("coco", "train", toy_spec(library_versions={"torch": "9.9"}))


def test_a_changed_fingerprint_field_makes_a_separate_group(store):
    a = store.group("coco", "train", toy_spec(), create=True)
    b = store.group(
        "coco", "train", toy_spec(preprocessing={"caption": {"lowercase": False}}), create=True
    )
    assert a.rel != b.rel and a.fingerprint != b.fingerprint
    with pytest.raises(StoreError, match="matches several groups"):
        store.find_group("coco", "train", "toy-text")
    assert store.find_group("coco", "train", f"toy-text@{b.fingerprint}").rel == b.rel


def test_not_a_store_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(NotAStoreError, match=r"photos.*is not a cusa store"):
        FeatureStore.open(tmp_path / "photos")
    with pytest.raises(NotAStoreError, match=r"photos.*is not a cusa store"):
        FeatureStore.open(tmp_path / "photos", create=True)
    with pytest.raises(NotAStoreError, match=r"no cusa store at .*nowhere"):
        FeatureStore.open(tmp_path / "nowhere")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / MARKER).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NotAStoreError, match="not a cusa store marker"):
        FeatureStore.open(tmp_path / "fake")


def test_newer_layout_version_is_refused(store):
    marker = store.fs.read_json(MARKER)
    marker["layout_version"] = LAYOUT_VERSION + 1
    store.fs.write_bytes_atomic(MARKER, json.dumps(marker).encode())
    with pytest.raises(
        StoreVersionError, match=rf"layout version {LAYOUT_VERSION + 1}, newer .*upgrade"
    ):
        FeatureStore.open(store.url)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6])  # 1e6 overflows fp16 to inf
def test_non_finite_features_are_refused_at_write(store, bad):
    group = store.group("coco", "train", toy_spec(), create=True)
    feats = unit_rows(np.random.default_rng(0), 3)
    feats[1, 4] = bad
    with pytest.raises(StoreError, match=r"non-finite features .*\['x1'\]"):
        group.write_shard("s", ["x0", "x1", "x2"], feats)
    assert not group.is_committed("s")
    assert group.fs.ls(f"{group.rel}/parts") == []


def test_duplicate_ids_are_rejected(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    feats = unit_rows(np.random.default_rng(0), 3)
    with pytest.raises(StoreError, match=r"duplicate sample id 'x1'"):
        group.write_shard("s", ["x0", "x1", "x1"], feats)
    with pytest.raises(StoreError, match=r"duplicate sample id 'x2'"):
        group.write_shard("s", ["x0", "x1", "x2"], feats, failures=[("x2", "also failed?")])
    assert not group.is_committed("s")


def test_shape_mismatch_is_refused(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    with pytest.raises(
        StoreError, match=re.escape("features of shape (2, 8) do not match 2 ids x dim 16")
    ):
        group.write_shard("s", ["a", "b"], np.ones((2, 8), np.float32))


def test_seal_waits_for_expected_shards(filled):
    with pytest.raises(StoreError, match=r"1 shard\(s\) not committed yet, e.g. \['shard-999'\]"):
        filled.group.seal(expected_shards=[*filled.shards, "shard-999"])
    assert filled.group.sealed is None
    filled.group.seal(expected_shards=list(filled.shards))
    assert filled.group.sealed is not None


def test_groups_live_side_by_side(store):
    g1 = fill_group(store.group("coco", "train", toy_spec(), create=True), shards=2)
    g2 = fill_group(store.group("coco", "val", toy_spec(), create=True), shards=1, prefix="v")
    g3 = fill_group(
        store.group(
            "flickr",
            "train",
            toy_spec(name="toy-img", modality="image", model="tests/toy-img"),
            create=True,
        ),
        shards=1,
    )
    assert [g.rel for g in store.groups()] == sorted([g1.group.rel, g2.group.rel, g3.group.rel])
    assert store.find_group("coco", "val", "toy-text").rel == g2.group.rel
    with pytest.raises(
        StoreError, match=r"no features of teacher 'nope' .*teachers there: toy-text@"
    ):
        store.find_group("coco", "train", "nope")


def test_seal_refuses_an_id_committed_by_two_shards(tmp_path):
    import numpy as np
    import pytest

    from cusa.errors import StoreError
    from cusa.store import FeatureStore
    from cusa.store.spec import TeacherSpec

    spec = TeacherSpec(
        name="t",
        modality="text",
        model="m",
        weights_sha256="0" * 64,
        preprocessing={},
        output_kind="sentence",
        dim=4,
    )
    group = FeatureStore.open(tmp_path / "s", create=True).group("d", "train", spec, create=True)
    rows = np.eye(4, dtype=np.float32)[:2]
    group.write_shard("a", ["x", "y"], rows)
    group.write_shard("b", ["y", "z"], rows)
    with pytest.raises(StoreError, match="sample id 'y' was committed by two shards"):
        group.seal()
