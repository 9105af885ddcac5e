"""Two writers at once, and readers while a writer runs: real processes on one store."""

from __future__ import annotations

import json
import time

from helpers import (
    commit_files,
    cusa_command,
    extract_args,
    leftovers,
    lost_samples,
    rows_by_id,
    start,
    stop_group,
    store_snapshot,
)
from reliability_common import SAMPLE_SHARDS, sample_cli_options

from cusa.errors import StoreError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.verify import verify_store


def _extract_cmd(store) -> list[str]:
    return cusa_command(
        *extract_args("coco-sample", str(store), runner="local", **sample_cli_options())
    )


def test_two_writers_on_one_store(tmp_path, sample_reference, reliability_log):
    """Both finish; every shard is committed exactly once; the store equals a single run."""
    _, reference = sample_reference
    store = tmp_path / "store"
    procs = [start(_extract_cmd(store), tmp_path / f"writer{i}.log") for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_group(p)
    logs = [(tmp_path / f"writer{i}.log").read_text() for i in range(2)]
    snap = store_snapshot(store)
    lost = lost_samples(snap, reference)
    reports = verify_store(FeatureStore.open(store))
    records = [json.loads(p.read_text()) for p in commit_files(store)]
    writers = {r["writer"] for r in records}
    per_group: dict[str, list[str]] = {}
    for p, r in zip(commit_files(store), records, strict=True):
        per_group.setdefault(p.parent.parent.name, []).append(r["shard"])
    survived = codes == [0, 0] and snap == reference and all(r.ok for r in reports)
    reliability_log.fault(
        "concurrent writers",
        "2 processes",
        survived=survived,
        samples_lost=sum(len(v) for v in lost.values()),
        writers_with_commits=len(writers),
        exit_codes=codes,
    )
    assert codes == [0, 0], logs
    assert len(per_group) == 2
    for shards in per_group.values():
        assert sorted(shards) == sorted(set(shards)) and len(shards) == SAMPLE_SHARDS
    assert not lost and snap == reference
    assert all(r.ok and not r.warnings for r in reports), [r.summary() for r in reports]
    assert not leftovers(store)


def test_reader_sees_only_committed_shards_while_a_writer_runs(
    tmp_path, sample_reference, reliability_log
):
    """Every open sees whole committed shards only, later opens see more, no row is torn."""
    ref_store, reference = sample_reference
    ref_rows = rows_by_id(reference)
    shard_of = {
        g.rel: {m["sample_id"]: m["shard"] for m in g.manifest().to_pylist()}
        for g in FeatureStore.open(ref_store).groups()
    }
    store = tmp_path / "store"
    proc = start(_extract_cmd(store), tmp_path / "writer.log")
    opens, sizes, torn, uncommitted, incomplete = 0, {}, [], [], []
    try:
        while True:
            running = proc.poll() is None
            try:
                groups = FeatureStore.open(store).groups()
            except StoreError:  # no store yet
                groups = []
            for g in groups:
                before = set(g.committed_shards())
                try:
                    lk = FeatureLookup(g)
                except StoreError:
                    continue  # the group exists but has nothing committed yet
                after = set(g.committed_shards())
                opens += 1
                rows = lk.gather(lk.ids)
                width = rows.nbytes // max(len(lk.ids), 1)
                raw = rows.tobytes()
                for i, sid in enumerate(lk.ids):
                    if raw[i * width : (i + 1) * width] != ref_rows[(g.rel, sid)]:
                        torn.append(sid)
                seen_shards = {shard_of[g.rel][sid] for sid in lk.ids}
                uncommitted += sorted(seen_shards - after)
                ref_ids = set(reference[g.rel][0])
                expected = {s for s, sh in shard_of[g.rel].items() if sh in before and s in ref_ids}
                incomplete += sorted(expected - set(lk.ids))
                sizes.setdefault(g.rel, []).append(len(lk))
            if not running:
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=60)
    finally:
        stop_group(proc)
    grew = all(s == sorted(s) for s in sizes.values())
    distinct = {rel: len(set(s)) for rel, s in sizes.items()}
    survived = rc == 0 and not torn and not uncommitted and not incomplete and grew
    reliability_log.fault(
        "reader during writes",
        "1 writer + polling reader",
        survived=survived,
        samples_lost=len(torn),
        reader_opens=opens,
        distinct_sizes_seen=distinct,
    )
    assert rc == 0, (tmp_path / "writer.log").read_text()
    assert not torn, f"rows differing from the reference: {torn[:5]}"
    assert not uncommitted, f"reader saw rows of uncommitted shards {uncommitted[:5]}"
    assert not incomplete, f"reader missed rows of committed shards: {incomplete[:5]}"
    assert grew, f"a reopen saw fewer rows than before: {sizes}"
    assert len(sizes) == 2 and max(distinct.values()) >= 2, (
        f"reopening never saw more rows: {sizes}"
    )
    assert store_snapshot(store) == reference


def test_a_late_second_sealer_leaves_the_store_intact(sample_reference, tmp_path):
    """Two writers may both seal: the one arriving after the other finished must not delete
    the finished chunks (it used to, through zarr's ``overwrite=True``)."""
    import shutil

    ref_store, reference = sample_reference
    store = tmp_path / "store"
    shutil.copytree(ref_store, store)
    for g in FeatureStore.open(store).groups():
        g._seal(g.commit_records())  # the exact work of a racing sealer that lost the race
    assert store_snapshot(store) == reference
    assert all(r.ok and not r.warnings for r in verify_store(FeatureStore.open(store)))


def test_seal_removes_parts_left_by_a_seal_killed_while_cleaning_up(sample_reference, tmp_path):
    import shutil

    ref_store, reference = sample_reference
    store = tmp_path / "store"
    shutil.copytree(ref_store, store)
    g = FeatureStore.open(store).groups()[0]
    stale = store / g.rel / "parts" / "000001.0123456789ab" / "features"
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{}")
    assert leftovers(store)
    g.seal()
    assert not leftovers(store) and store_snapshot(store) == reference


def test_two_writers_creating_the_store_at_once(tmp_path):
    """The first writer's marker temp file is not 'foreign content' to the second (it was
    refused with "exists and is not a cusa store" before)."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "cusa_store.json.0a1b2c3d.partial").write_bytes(b"{")  # writer 1, mid-create
    FeatureStore.open(store, create=True)  # writer 2
    assert FeatureStore.open(store).url == str(store)
    (store / "unrelated.txt").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "unrelated.txt").write_text("x")
    import pytest

    from cusa.errors import NotAStoreError

    with pytest.raises(NotAStoreError, match="is not a cusa store"):
        FeatureStore.open(other, create=True)
