"""The store on object storage (moto's S3 server on 127.0.0.1): kill -9 mid-run, resume, compare."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import (
    cusa_command,
    extract_args,
    lost_samples,
    start,
    stop_group,
    store_snapshot,
    wait_until,
)
from reliability_common import SAMPLE_SHARDS, sample_cli_options, sample_config

from cusa.extract.runner import extract
from cusa.store import FeatureStore
from cusa.store.verify import verify_store


@pytest.mark.slow
def test_s3_store_kill_then_resume(tmp_path, s3_endpoint, sample_reference, reliability_log):
    import s3fs

    _, reference = sample_reference
    opts = s3_endpoint.storage_options()
    bucket = s3_endpoint.new_bucket()
    url = f"s3://{bucket}/store"
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)

    def commits() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{bucket}/store/*/*/*/commits/*.json"))

    env = {**os.environ, **s3_endpoint.env()}
    cmd = cusa_command(*extract_args("coco-sample", url, runner="local", **sample_cli_options()))
    proc = start(cmd, tmp_path / "killed.log", env=env)
    try:
        reached = wait_until(lambda: commits() >= 3, timeout=300, proc=proc, interval=0.1)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
    assert reached, (tmp_path / "killed.log").read_text()[-3000:]
    at_kill = commits()  # nothing commits after SIGKILL: this is the count the kill left
    # The kill must have landed mid-run: the process was still running, with shards to commit.
    assert killed and at_kill < 2 * SAMPLE_SHARDS, (killed, at_kill)

    summary = extract(sample_config(url, storage_options=opts))
    assert summary.ok and summary.sealed
    assert summary.shards_skipped >= 1 and summary.shards_done >= 1
    snap = store_snapshot(url, storage_options=opts)
    lost = lost_samples(snap, reference)
    reports = verify_store(FeatureStore.open(url, storage_options=opts))
    keys = fs.find(f"{bucket}/store")
    stray = [k for k in keys if k.endswith(".partial") or "/parts/" in k]
    reliability_log.fault(
        "kill -9 with the store on S3 (moto)",
        "after >=3 commits",
        survived=snap == reference and all(r.ok for r in reports) and not stray,
        samples_lost=sum(len(v) for v in lost.values()),
        killed=killed,
        mid_run=killed and at_kill < 2 * SAMPLE_SHARDS,
        commits_at_kill=at_kill,
    )
    assert not lost and snap == reference
    assert all(r.ok and not r.warnings for r in reports), [r.summary() for r in reports]
    assert not stray, stray
    assert all(
        len(g.committed_shards()) == SAMPLE_SHARDS
        for g in FeatureStore.open(url, storage_options=opts).groups()
    )
