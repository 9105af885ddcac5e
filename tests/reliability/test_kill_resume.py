"""kill -9 at random points of a real extraction, then resume: nothing lost, nothing extra.

Each trial is seeded. A ``local`` trial SIGKILLs the ``cusa extract`` process after a random
number of commits plus a random delay (from model loading to sealing). A ``ray`` trial SIGKILLs
one of the Ray teacher actor processes (``ray::MapWorker(MapBatches(_TeacherActor))``) a random
time after it starts; the driver must then recover (actor restart + task retry) or fail cleanly. Either
way a re-run resumes, and the final store must equal an uninterrupted run: same ids, same bytes,
no duplicates, no missing rows, ``verify`` clean, no temporary files or leftover parts.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from helpers import (
    commit_files,
    cusa_command,
    extract_args,
    leftovers,
    lost_samples,
    pids_matching,
    start,
    stop_group,
    store_snapshot,
    wait_until,
)
from reliability_common import SAMPLE_SHARDS, sample_cli_options, sample_config

from cusa.extract.runner import extract
from cusa.store import FeatureStore
from cusa.store.verify import verify_store

TOTAL_COMMITS = 2 * SAMPLE_SHARDS  # image + text group per shard
FAST_LOCAL = [0, 1]
SLOW_LOCAL = list(range(100, 120))  # 20 more seeded trials
FAST_RAY = [0]
SLOW_RAY = list(range(200, 205))
ACTOR = "_TeacherActor"


def _check_store(store, reference, log, kind: str, trial: str, **detail) -> None:
    """Compare with the uninterrupted run, log the figures, then assert."""
    snap = store_snapshot(store)
    lost = lost_samples(snap, reference)
    n_lost = sum(len(v) for v in lost.values())
    reports = verify_store(FeatureStore.open(store))
    left = leftovers(store)
    survived = snap == reference and not n_lost and all(r.ok for r in reports) and not left
    log.fault(kind, trial, survived=survived, samples_lost=n_lost, **detail)
    assert not lost, f"rows lost or changed: {lost}"
    assert snap == reference
    assert all(r.ok and not r.warnings for r in reports), [r.summary() for r in reports]
    assert not left, f"temporary files or parts visible in the store: {left}"
    for g in FeatureStore.open(store).groups():
        assert sorted(g.sealed["shards"]) == g.committed_shards()
        assert len(set(g.committed_shards())) == SAMPLE_SHARDS


def _kill_local_trial(seed, tmp_path, sample_reference, log) -> None:
    rng = random.Random(seed)
    _, reference = sample_reference
    store = tmp_path / "store"
    # After `target` commits (0 = while importing / loading models, TOTAL = while sealing).
    target = rng.randint(0, TOTAL_COMMITS)
    delay = rng.uniform(0.0, 4.0) if target == 0 else rng.uniform(0.0, 0.3)
    cmd = cusa_command(
        *extract_args("coco-sample", str(store), runner="local", **sample_cli_options())
    )
    proc = start(cmd, tmp_path / "killed.log")
    try:
        wait_until(lambda: len(commit_files(store)) >= target, timeout=300, proc=proc)
        time.sleep(delay)
        killed = proc.poll() is None
        commits_at_kill = len(commit_files(store))
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
    summary = extract(sample_config(store))
    assert summary.ok and summary.sealed
    assert summary.shards_done == SAMPLE_SHARDS - summary.shards_skipped
    _check_store(
        store,
        reference,
        log,
        "kill -9 local runner",
        f"seed {seed}",
        killed=killed,
        commits_at_kill=commits_at_kill,
        target_commits=target,
        resumed_shards=summary.shards_done,
    )


@pytest.mark.parametrize("seed", FAST_LOCAL)
def test_kill_local_runner_then_resume(seed, tmp_path, sample_reference, reliability_log):
    _kill_local_trial(seed, tmp_path, sample_reference, reliability_log)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_LOCAL)
def test_kill_local_runner_then_resume_slow(seed, tmp_path, sample_reference, reliability_log):
    _kill_local_trial(seed, tmp_path, sample_reference, reliability_log)


def _kill_actor_trial(seed, tmp_path, sample_reference, log) -> None:
    rng = random.Random(seed)
    _, reference = sample_reference
    store = tmp_path / "store"
    # Ray streams every shard through the actors before most commits land, so the kill point is
    # a random time after the actor process appears (model loading, then encoding).
    delay = rng.uniform(0.0, 8.0)
    cmd = cusa_command(
        *extract_args("coco-sample", str(store), runner="ray", actors=1, **sample_cli_options())
    )
    proc = start(cmd, tmp_path / "driver.log")
    try:
        assert wait_until(lambda: bool(pids_matching(ACTOR)), timeout=300, proc=proc), (
            "no Ray teacher actor process appeared; driver log:\n"
            + (tmp_path / "driver.log").read_text()[-3000:]
        )
        time.sleep(delay)
        actors = pids_matching(ACTOR)
        commits_at_kill = len(commit_files(store))
        victim = rng.choice(actors) if actors and proc.poll() is None else None
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                victim = None
        rc = proc.wait(timeout=400)
    finally:
        stop_group(proc)
    outcome = "recovered" if rc == 0 else "failed cleanly"
    summary = extract(sample_config(store))  # the re-run (local runner: same bits as Ray)
    assert summary.ok and summary.sealed
    _check_store(
        store,
        reference,
        log,
        "kill -9 Ray teacher actor",
        f"seed {seed}",
        killed=victim is not None,
        commits_at_kill=commits_at_kill,
        delay_s=round(delay, 2),
        driver_exit=rc,
        outcome=outcome,
        resumed_shards=summary.shards_done,
    )


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", FAST_RAY)
def test_kill_ray_actor_then_resume(seed, tmp_path, sample_reference, reliability_log):
    _kill_actor_trial(seed, tmp_path, sample_reference, reliability_log)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", SLOW_RAY)
def test_kill_ray_actor_then_resume_slow(seed, tmp_path, sample_reference, reliability_log):
    _kill_actor_trial(seed, tmp_path, sample_reference, reliability_log)


def test_resume_after_a_kill_inside_seal_leaves_no_temp_files(
    tmp_path, sample_reference, monkeypatch
):
    """The state a SIGKILL between writing and renaming ``sealed.json`` leaves (seen in a seeded
    trial): every shard committed, parts present, temporary files beside the records. The re-run
    seals and removes every ``*.partial`` file; a later re-run cleans a sealed group as well."""
    from cusa.store.feature_store import FeatureGroup

    _, reference = sample_reference
    store = tmp_path / "store"
    monkeypatch.setattr(FeatureGroup, "seal", lambda self, expected_shards=None: None)
    assert extract(sample_config(store)).shards_done == SAMPLE_SHARDS  # killed just before sealing
    monkeypatch.undo()
    group = store / FeatureStore.open(store).groups()[0].rel
    (group / "sealed.json.64900959.partial").write_text('{"rows": ')
    (group / "commits" / "000000.json.0badc0de.partial").write_text("{")
    assert len(leftovers(store)) == 2
    summary = extract(sample_config(store))
    assert summary.sealed and summary.shards_done == 0
    assert not leftovers(store)
    assert store_snapshot(store) == reference
    (group / "manifest.parquet.0123abcd.partial").write_bytes(b"PAR1")
    extract(sample_config(store))
    assert not leftovers(store)
