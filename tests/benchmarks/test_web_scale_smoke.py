"""Smoke test of ``benchmarks/web_scale.py``: every phase at a toy N, for real, in child processes.

A 20,000-row store is written once into ``--keep`` and reused by a second run (which seals a
hard-linked copy, leaving the kept store unsealed), as the 100M run of docs/scale.md does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
N = 20_000

pytestmark = pytest.mark.benchmark


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "web_scale.json"
    cmd = [
        sys.executable, "-m", "benchmarks.web_scale", "--sizes", str(N), "--out", str(out),
        "--worker-batches", "50", "--reps", "60", "--keep", str(tmp_path / "keep"),
        "--shard-sweep", "1,10", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_all_phases_run_and_a_kept_store_is_reused(tmp_path):
    data = _run(tmp_path)
    first = data["results"][str(N)]
    assert first["verify_ok"] and first["verify_errors"] == []
    assert first["open_uss_mib"] < 8  # the index is mapped, not read into the process
    assert len(first["workers"]) == 4 and first["worker_batches"] == 50
    assert first["baselines_run"] and first["gather_vs_dict_plus_numpy"] > 0
    assert 30 < first["index_bytes_per_sample"] < 45  # hashes, rows, offsets, ids, buckets
    assert (tmp_path / "web_scale.png").stat().st_size > 0
    kept = tmp_path / "keep" / f"n{N}"
    assert json.loads((kept / "write.json").read_text())["shards"] == 100 == first["shards"]
    # the smallest N is its own reference: the same-process ratios are those of like with like
    assert (
        first["ref_n"] == N and 0.5 < first["open_vs_ref"] < 2 and 0.5 < first["gather_vs_ref"] < 2
    )
    sweep = data["open_by_shards"]
    assert sweep["n"] == N and sweep["shards"] == [1, 10]
    assert len(sweep["open_median_ms"]) == len(sweep["open_median_ms_without_stamp"]) == 2
    assert set(sweep["fit"]) == set(sweep["fit_without_stamp"]) == {"us_per_shard", "ms_at_0"}
    # the second run reuses the written store; without baselines above --baseline-max
    second = _run(tmp_path, "--baseline-max", "10")["results"][str(N)]
    assert second["write_reused"] and second["write_s"] == first["write_s"]
    assert not second["baselines_run"] and "gather_vs_dict_plus_numpy" not in second
    assert "dict_plus_numpy" not in second["median_us"] and second["verify_ok"]
    assert not list((kept / "store").rglob("sealed.json"))  # the kept store stays unsealed
