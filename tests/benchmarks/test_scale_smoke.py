"""Smoke test of ``benchmarks/scale.py``: the whole benchmark at toy sizes, for real.

Real COCO JPEGs from ``../shared/data/coco-example`` go into webdataset tars, ``extract()`` runs
in child processes under the ``/proc`` memory monitor, the store case writes, seals, opens and
gathers, and the plot is drawn. The Ray variant is marked ``ray``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import proc_monitor, scale_inputs
from cusa.readers.wds import WebDatasetReader

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "scale.json"
    cmd = [
        sys.executable, "-m", "benchmarks.scale", "--fresh", "--out", str(out),
        "--plot", str(tmp_path / "scale.png"), "--workdir", str(tmp_path / "wd"), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_shards_cycle_real_images_with_distinct_ids(coco_example, tmp_path):
    pattern = scale_inputs.make_shards(coco_example / "pics", tmp_path / "tars", 30, shard_size=12)
    again = scale_inputs.make_shards(coco_example / "pics", tmp_path / "tars", 30, shard_size=12)
    assert pattern == again and pattern.endswith("train-{000000..000002}.tar")
    reader = WebDatasetReader(pattern)
    samples = [s for ref in reader.shards() for s in reader.read(ref)]
    assert [s.image_id for s in samples] == [f"{i:08d}" for i in range(30)]
    assert all(s.image and s.image[:2] == b"\xff\xd8" and s.captions for s in samples)
    # Past the 801 originals come seeded crops: smaller JPEGs, the same every time.
    pics = sorted((coco_example / "pics").glob("*.jpg"))
    crop = scale_inputs._variant(pics, len(pics) + 3, tmp_path / "pool")
    assert crop != pics[3].read_bytes() and crop == scale_inputs._variant(
        pics, len(pics) + 3, tmp_path / "p2"
    )


def test_memory_helpers_read_this_process():
    status = proc_monitor.proc_status()
    assert status["VmRSS"] > 0 and status["VmHWM"] >= status["VmRSS"]
    assert proc_monitor.proc_status(2**22 + 12345) == {}  # no such pid
    if proc_monitor.reset_peak_rss():
        assert proc_monitor.proc_status()["VmHWM"] <= status["VmHWM"]


@pytest.mark.benchmark
def test_scale_benchmark_local_smoke(coco_example, tmp_path):
    res = _run(
        tmp_path, "--sizes", "40,80", "--shard-size", "20", "--runners", "local",
        "--store-cases", "3000x64", "--store-shards", "6", "--gather-reps", "50",
        "--pics", str(coco_example / "pics"),
    )  # fmt: skip
    runs = {r["n"]: r for r in res["extraction"]}
    assert set(runs) == {40, 80}
    for n, r in runs.items():
        assert r["ok"] and r["rows"] == n and r["failed"] == 0 and r["runner"] == "local"
        assert r["shards"] == n // 20 and r["dim"] == 3136  # tiny Unicom tokens: 49 x 64
        for key in ("samples_per_s", "driver_extract_peak_rss_mb", "seal_s", "seal_peak_rss_mb",
                    "verify_s", "store_bytes"):  # fmt: skip
            assert r[key] and r[key] > 0, key
        assert [p["role"] for p in r["processes"]] == ["driver"]
    assert (
        res["teacher"]["name"] == scale_inputs.BENCH_TEACHER
        and "random weights" in res["teacher"]["label"]
    )
    assert res["goals"]["local"]["compared"] == "N=40 -> N=80"
    (case,) = res["store"]
    assert (case["rows"], case["dim"], case["verify_ok"]) == (3000, 64, True)
    assert case["gather_vs_baseline"] > 0 and case["open_s"] >= 0
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    # Results merge by (runner, N): a second, partial run keeps the first one's points.
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--out", str(out), "--plot",
         str(tmp_path / "scale.png"), "--workdir", str(tmp_path / "wd"), "--sizes", "20",
         "--shard-size", "20", "--runners", "local", "--store-cases", "",
         "--pics", str(coco_example / "pics")],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=os.environ.copy(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert sorted(r["n"] for r in merged["extraction"]) == [20, 40, 80]
    assert len(merged["store"]) == 1


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_scale_benchmark_ray_smoke(coco_example, tmp_path):
    """The Ray runner in a child process: the tiny teacher reaches the actors through the
    worker setup hook, and every Ray worker's peak memory is recorded."""
    res = _run(
        tmp_path, "--sizes", "40", "--shard-size", "20", "--runners", "ray",
        "--store-cases", "", "--pics", str(coco_example / "pics"),
    )  # fmt: skip
    (r,) = res["extraction"]
    assert r["ok"] and r["rows"] == 40 and r["runner"] == "ray"
    workers = [p for p in r["processes"] if p["role"] == "ray worker"]
    assert workers and all(p["peak_rss_mb"] > 0 for p in workers)
    assert any("_TeacherActor" in p["name"] for p in workers), [p["name"] for p in workers]
    assert r["max_worker_peak_rss_mb"] == max(p["peak_rss_mb"] for p in workers)
