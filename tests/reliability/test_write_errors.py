"""Disk full / write errors in the middle of a shard: not committed, reported, completed later."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid

import pytest
from helpers import leftovers, lost_samples, store_snapshot
from reliability_common import SAMPLE_SHARDS, sample_cli_options
from typer.testing import CliRunner

from cusa.cli import app
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.fs import StoreFS
from cusa.store.verify import verify_store


def _cli(store) -> list[str]:
    from helpers import extract_args

    return extract_args("coco-sample", str(store), runner="local", **sample_cli_options())


def test_injected_write_error_mid_shard(tmp_path, monkeypatch, sample_reference, reliability_log):
    """The 3rd atomic write (shard 000001's image part manifest) fails with ENOSPC."""
    _, reference = sample_reference
    store = tmp_path / "store"
    real = StoreFS.write_bytes_atomic
    calls = {"n": 0}

    def flaky(self, rel, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", self.path(rel))
        return real(self, rel, data)

    monkeypatch.setattr(StoreFS, "write_bytes_atomic", flaky)
    result = CliRunner().invoke(app, _cli(store))
    monkeypatch.setattr(StoreFS, "write_bytes_atomic", real)

    assert result.exit_code == 2, result.output
    assert "could not write shard '000001'" in result.output
    assert "No space left on device" in result.output and "re-run" in result.output
    groups = {g.spec["modality"]: g for g in FeatureStore.open(store).groups()}
    assert groups["image"].committed_shards() == ["000000"]
    assert groups["text"].committed_shards() == ["000000"]
    # Nothing of the failed shard is left: no part, no temporary file; readers see shard 0 only.
    assert [p.name for p in (store / groups["image"].rel / "parts").iterdir()][0].startswith(
        "000000"
    )
    assert len(list((store / groups["image"].rel / "parts").iterdir())) == 1
    assert not list(store.rglob("*.partial"))
    lk = FeatureLookup(groups["image"])
    assert len(lk) == 2 and all(i in reference[groups["image"].rel][0] for i in lk.ids)

    snap, lost, reports = _rerun_and_compare(store, reference)
    reliability_log.fault(
        "write error mid-shard (injected ENOSPC)",
        "3rd atomic write",
        survived=snap == reference and all(r.ok for r in reports),
        samples_lost=sum(len(v) for v in lost.values()),
    )
    assert snap == reference and not lost
    assert all(r.ok and not r.warnings for r in reports)
    assert not leftovers(store)


def _mount_tmpfs(where, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def test_real_disk_full_on_a_small_tmpfs(tmp_path, sample_reference, reliability_log):
    """A real ENOSPC from a 96 KiB tmpfs; after growing it, the same command completes."""
    _, reference = sample_reference
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(mnt, "96k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-error test covers this")
    try:
        store = mnt / "store"
        result = CliRunner().invoke(app, _cli(store))
        assert result.exit_code == 2, result.output
        assert "No space left on device" in result.output, result.output
        assert "re-run" in result.output
        committed = {
            g.spec["modality"]: g.committed_shards() for g in FeatureStore.open(store).groups()
        }
        assert sum(map(len, committed.values())) < 2 * SAMPLE_SHARDS or not any(
            g.sealed for g in FeatureStore.open(store).groups()
        )
        assert not list(store.rglob("*.partial"))
        # Readers see exactly the committed shards, each row equal to the reference.
        for g in FeatureStore.open(store).groups():
            lk = FeatureLookup(g)
            ref_ids, ref_bytes = reference[g.rel]
            width = len(ref_bytes) // len(ref_ids)
            for sid, row in zip(lk.ids, lk.gather(lk.ids), strict=True):
                i = ref_ids.index(sid)
                assert row.tobytes() == ref_bytes[i * width : (i + 1) * width]
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        snap, lost, reports = _rerun_and_compare(store, reference)
        reliability_log.fault(
            "disk full (96 KiB tmpfs)",
            "real ENOSPC",
            survived=snap == reference and all(r.ok for r in reports),
            samples_lost=sum(len(v) for v in lost.values()),
            committed_before_full=committed,
        )
        assert snap == reference and not lost
        assert all(r.ok and not r.warnings for r in reports)
        assert not leftovers(store)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _rerun_and_compare(store, reference):
    """Re-run the same extraction; return its snapshot, the samples lost and verify reports."""
    again = CliRunner().invoke(app, _cli(store))
    assert again.exit_code == 0, again.output
    snap = store_snapshot(store)
    return snap, lost_samples(snap, reference), verify_store(FeatureStore.open(store))
