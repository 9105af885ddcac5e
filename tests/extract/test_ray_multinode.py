"""A real multi-node Ray cluster on one machine: ``cusa extract --ray-address <head>`` as a user
runs it, and a worker node killed mid-job.

``ray.cluster_utils.Cluster`` starts a head node and two worker nodes, each its own raylet with
its own object store and resources. The head has 0 CPUs (as on a real cluster, where the head
only coordinates), so every read task and teacher actor runs on a worker node. The CLI runs in
a subprocess and joins the cluster by its GCS address. Both tests compare the store with a local
runner's, byte for byte (``store_snapshot``: every group's ids and feature bytes).

Resources on a 2-core machine: each worker node declares 2 logical CPUs. ``plan_resources``
gives a teacher actor at most 1 CPU and the read tasks a fraction, so no node can be filled by
actors alone (the 2-core deadlock, tests/extract/test_plan_resources.py); the kill test uses one actor, so
the surviving node still has room for the restarted actor *and* the read tasks.

``RAY_TMPDIR`` points at a private folder, so the cluster's address file does not make other
``ray.init()`` calls on this machine join it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    commit_files,
    cusa_command,
    extract_args,
    leftovers,
    pids_matching,
    start,
    stop_group,
    store_snapshot,
    wait_until,
)

from cusa.extract.runner import ExtractConfig, extract
from cusa.store import FeatureStore
from cusa.store.verify import verify_store

pytest.importorskip(
    "ray.data", reason="the multi-node tests need Ray Data: pip install 'cusa[ray]'"
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# The embedded real sample (24 images), one cheap offline teacher, small shards so that a kill
# lands between commits.
OPTIONS = {
    "split": "train",
    "image_teacher": "efficientnet-lite0",
    "modalities": "image",
    "batch_size": 4,
    "shard_size": 2,
    "device": "cpu",
}
SHARDS = 12  # 24 images / shard_size 2: one commit record per shard (one group)
ACTOR = "_TeacherActor"  # in the actor's process title: ray::MapWorker(MapBatches(_TeacherActor))
RUN_TIMEOUT = 400


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> dict:
    """The same job with the local runner, in-process: what every cluster run must equal."""
    store = tmp_path_factory.mktemp("local") / "store"
    config = ExtractConfig(
        dataset="coco-sample",
        store=str(store),
        runner="local",
        **{**OPTIONS, "modalities": ("image",)},
    )
    summary = extract(config)
    assert summary.ok and summary.sealed and summary.rows["image"] == 24
    return store_snapshot(store)


@pytest.fixture
def cluster(monkeypatch):
    """Head (0 CPUs) + two worker nodes (2 logical CPUs each), in a private Ray temp dir."""
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Unix socket paths are bounded
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    common = {"object_store_memory": 150 * 2**20, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **common})
    try:
        for _ in range(2):
            c.add_node(num_cpus=2, object_store_memory=150 * 2**20)
        c.wait_for_nodes(timeout=120)
        yield c
    finally:
        c.shutdown()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cli(store: Path, address: str, **extra) -> list[str]:
    return cusa_command(
        *extract_args(
            "coco-sample", str(store), runner="ray", ray_address=address, **OPTIONS, **extra
        )
    )


def _raylet_pid(node) -> int:
    import ray._private.ray_constants as rc

    return node.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _node_of(pid: int, nodes: list) -> object | None:
    """The cluster node whose raylet is an ancestor of ``pid`` (Ray workers are its children)."""
    raylets = {_raylet_pid(n): n for n in nodes}
    seen = 0
    while pid and pid > 1 and seen < 16:
        if pid in raylets:
            return raylets[pid]
        pid, seen = _parent(pid), seen + 1
    return None


def _work_by_node(cluster, seen: dict[int, set[str]]) -> None:
    """Add to ``seen`` (raylet pid -> process titles) the Ray tasks and actors running now."""
    nodes = cluster.list_all_nodes()
    for pid in pids_matching("ray::"):
        try:
            title = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        node = _node_of(pid, nodes)
        if node is not None and "IDLE" not in title:
            seen.setdefault(_raylet_pid(node), set()).add(title.strip()[:80])


def _check_identical(store: Path, reference: dict) -> None:
    assert store_snapshot(store) == reference
    reports = verify_store(FeatureStore.open(store))
    assert all(r.ok for r in reports), [r.summary() for r in reports]
    assert not leftovers(store)


def test_cli_on_multinode_cluster_equals_local_runner(cluster, local_reference, tmp_path):
    """`cusa extract --ray-address <head>` on head + 2 worker nodes == the local runner."""
    store, log = tmp_path / "store", tmp_path / "driver.log"
    head_raylet = _raylet_pid(cluster.head_node)
    proc = start(_cli(store, cluster.address), log)
    seen: dict[int, set[str]] = {}
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            _work_by_node(cluster, seen)
            time.sleep(0.2)
        rc = proc.wait(timeout=5)
    finally:
        stop_group(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "via ray" in text, text[-3000:]
    # The head declares no CPUs: the teacher actors and read tasks (which ask for CPUs) ran on
    # the worker nodes; only Ray Data's 0-CPU bookkeeping actors may sit on the head.
    print({"head" if k == head_raylet else f"worker node {k}": sorted(v) for k, v in seen.items()})
    on_head = seen.get(head_raylet, set())
    assert not [t for t in on_head if ACTOR in t or "FlatMap" in t or "ReadPrepare" in t], seen
    assert any(ACTOR in t for titles in seen.values() for t in titles), seen
    _check_identical(store, local_reference)


def test_worker_node_killed_mid_job_gives_identical_store(cluster, local_reference, tmp_path):
    """Kill the worker node that hosts the teacher actor before the last commit: the job
    finishes by itself (Ray restarts the actor on the other node and rebuilds lost blocks), or
    it fails cleanly and a re-run on the surviving node resumes; the store is the local one."""
    for attempt in range(1, 4):
        store, log = tmp_path / f"store{attempt}", tmp_path / f"driver{attempt}.log"
        survivors_before = len(cluster.list_all_nodes())
        proc = start(_cli(store, cluster.address, actors=1), log)
        killed, commits_at_kill = None, None
        try:
            assert wait_until(lambda: bool(pids_matching(ACTOR)), timeout=RUN_TIMEOUT, proc=proc), (
                "no teacher actor appeared; driver log:\n" + log.read_text()[-3000:]
            )
            # Kill once the job is demonstrably running: the first shard is committed.
            wait_until(
                lambda s=store: len(commit_files(s)) >= 1, timeout=120, proc=proc, interval=0.01
            )
            if proc.poll() is None:
                actors = pids_matching(ACTOR)
                workers = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
                victim = next(
                    (n for n in (_node_of(a, workers) for a in actors) if n is not None), None
                )
                commits_at_kill = len(commit_files(store))
                if victim is not None and commits_at_kill < SHARDS:
                    cluster.remove_node(victim, allow_graceful=False)
                    killed = victim
            rc = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            stop_group(proc)
        if killed is not None:
            break
        # Too late (the job had finished) or the actor's node was not found: fresh store, again.
        assert len(cluster.list_all_nodes()) == survivors_before
    assert killed is not None, (
        f"no worker node kill landed before the last commit ({commits_at_kill})"
    )
    assert commits_at_kill < SHARDS  # the kill happened before the last commit
    assert len(cluster.list_all_nodes()) == 2  # head + the surviving worker node
    text = log.read_text()
    print(
        f"attempt {attempt}: node killed after {commits_at_kill}/{SHARDS} commits; driver exit {rc}"
    )
    if rc != 0:
        # Failed cleanly: one error line, committed shards kept; the same command resumes.
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
        rerun = subprocess.run(
            _cli(store, cluster.address, actors=1),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=os.environ.copy(),
        )
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    _check_identical(store, local_reference)
