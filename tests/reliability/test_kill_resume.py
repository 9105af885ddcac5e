"""kill -9 at random points of a real extraction, then resume: nothing lost, nothing extra.

Each trial is seeded and must kill *mid-run*: before the last shard was committed, which the
trial checks after the kill (a kill that came too late is retried with a fresh store, at most
twice, and the trial fails if it never lands mid-run). A ``local`` trial SIGKILLs the
``cusa extract`` process after a random number of whole shards were committed (0 = while
importing or loading models) plus a random delay. A ``ray`` trial SIGKILLs a Ray teacher actor
process (``ray::MapWorker(MapBatches(_TeacherActor))``) while the driver is still committing;
the driver's outcome is asserted: it recovers by itself (Ray restarts the actor and retries the
task; exit 0 and a complete store without any re-run), or it fails cleanly (exit 2, one line)
and a re-run *with the Ray runner* completes the store. The final store must equal an
uninterrupted run: same ids, same bytes, no duplicates, no missing rows, ``verify`` clean, no
temporary files or leftover parts.
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


ATTEMPTS = 3


def _kill_local_once(rng: random.Random, store, log_path, first: bool) -> dict:
    """One kill of the local runner; returns what happened (``mid_run``: before the last commit)."""
    # After `shards` whole shards (image + text commit each; 0 = while importing / loading
    # models), plus a random delay that is short next to encoding one more shard.
    shards = rng.randint(0, SAMPLE_SHARDS - 1)
    target = 2 * shards
    delay = (rng.uniform(0.0, 4.0) if shards == 0 else rng.uniform(0.0, 0.3)) if first else 0.0
    cmd = cusa_command(
        *extract_args("coco-sample", str(store), runner="local", **sample_cli_options())
    )
    proc = start(cmd, log_path)
    try:
        wait_until(lambda: len(commit_files(store)) >= target, timeout=300, proc=proc)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
    after = len(commit_files(store))  # nothing can commit after SIGKILL: this is the truth
    return {
        "killed": killed,
        "mid_run": killed and after < TOTAL_COMMITS,
        "commits_at_kill": after,
        "target_commits": target,
        "delay_s": round(delay, 3),
    }


def _kill_local_trial(seed, tmp_path, sample_reference, log) -> None:
    rng = random.Random(seed)
    _, reference = sample_reference
    for attempt in range(1, ATTEMPTS + 1):
        store = tmp_path / f"store{attempt}"
        kill = _kill_local_once(rng, store, tmp_path / f"killed{attempt}.log", attempt == 1)
        if kill["mid_run"]:
            break
    assert kill["mid_run"], f"seed {seed}: no kill landed before the last commit: {kill}"
    summary = extract(sample_config(store))
    assert summary.ok and summary.sealed
    assert summary.shards_done == SAMPLE_SHARDS - summary.shards_skipped
    assert summary.shards_done >= 1  # the kill left work to do
    _check_store(
        store,
        reference,
        log,
        "kill -9 local runner",
        f"seed {seed}",
        attempts=attempt,
        resumed_shards=summary.shards_done,
        **kill,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", FAST_LOCAL)
def test_kill_local_runner_then_resume(seed, tmp_path, sample_reference, reliability_log):
    _kill_local_trial(seed, tmp_path, sample_reference, reliability_log)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_LOCAL)
def test_kill_local_runner_then_resume_slow(seed, tmp_path, sample_reference, reliability_log):
    _kill_local_trial(seed, tmp_path, sample_reference, reliability_log)


def _ray_cmd(store) -> list[str]:
    return cusa_command(
        *extract_args("coco-sample", str(store), runner="ray", actors=1, **sample_cli_options())
    )


def _kill_actor_once(rng: random.Random, store, log_path) -> dict:
    """Kill a teacher actor while the driver still has shards to commit; wait for the driver."""
    # Ray streams every shard through the actors before most commits land, so the kill point is
    # a random time after the actor process appears (model loading, then encoding), cut short
    # when the driver is about to commit its last shard.
    delay = rng.uniform(0.0, 2.5)
    # Actor processes of an earlier driver (a previous attempt or trial) may linger for a few
    # seconds after it was stopped: wait for them, and never count or kill one.
    wait_until(lambda: not pids_matching(ACTOR), timeout=60)
    stale = set(pids_matching(ACTOR))
    proc = start(_ray_cmd(store), log_path)
    victim, commits_at_kill = None, None

    def ours() -> list[int]:
        return [pid for pid in pids_matching(ACTOR) if pid not in stale]

    try:
        assert wait_until(lambda: bool(ours()), timeout=300, proc=proc), (
            "no Ray teacher actor process appeared; driver log:\n" + log_path.read_text()[-3000:]
        )
        wait_until(lambda: len(commit_files(store)) >= TOTAL_COMMITS - 2, timeout=delay, proc=proc)
        actors = ours()
        if actors and proc.poll() is None:
            victim = rng.choice(actors)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                victim = None
        commits_at_kill = len(commit_files(store))
        rc = proc.wait(timeout=400)
    finally:
        stop_group(proc)
    return {
        "killed": victim is not None,
        "mid_run": victim is not None and commits_at_kill < TOTAL_COMMITS,
        "commits_at_kill": commits_at_kill,
        "delay_s": round(delay, 2),
        "driver_exit": rc,
    }


def _kill_actor_trial(seed, tmp_path, sample_reference, log) -> None:
    rng = random.Random(seed)
    _, reference = sample_reference
    for attempt in range(1, ATTEMPTS + 1):
        store = tmp_path / f"store{attempt}"
        driver_log = tmp_path / f"driver{attempt}.log"
        kill = _kill_actor_once(rng, store, driver_log)
        if kill["mid_run"]:
            break
    assert kill["mid_run"], f"seed {seed}: no actor kill landed before the last commit: {kill}"
    rc = kill["driver_exit"]
    text = driver_log.read_text()
    if rc == 0:
        # Recovered by itself: the store is already complete and sealed, with no re-run.
        outcome, rerun_exit = "recovered", None
        assert all(g.sealed for g in FeatureStore.open(store).groups()), text[-3000:]
    else:
        # Failed cleanly: exit 2 with one line, committed shards kept; the Ray runner resumes.
        outcome = "failed cleanly, Ray re-run recovered"
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
        rerun = start(_ray_cmd(store), tmp_path / "rerun.log")
        try:
            rerun_exit = rerun.wait(timeout=400)
        finally:
            stop_group(rerun)
        assert rerun_exit == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    _check_store(
        store,
        reference,
        log,
        "kill -9 Ray teacher actor",
        f"seed {seed}",
        attempts=attempt,
        outcome=outcome,
        rerun_exit=rerun_exit,
        **kill,
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


@pytest.mark.slow
def test_resume_after_a_kill_inside_seal_leaves_no_temp_files(
    tmp_path, sample_reference, monkeypatch
):
    """The state a SIGKILL between writing and renaming ``sealed.json`` leaves (seen in a seeded
    trial): every shard committed, parts present, temporary files beside the records. The re-run
    seals and removes every ``*.partial`` file; a later re-run cleans a sealed group as well."""
    from cusa.store.group import FeatureGroup

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
