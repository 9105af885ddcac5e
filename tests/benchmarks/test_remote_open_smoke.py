"""Smoke test of ``benchmarks/remote_open.py``: the whole script at 3 shards, for real (a local
HTTP server serving a published store)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.benchmark


def test_remote_open_runs_and_reads_the_same_bytes_both_ways(tmp_path):
    out = tmp_path / "remote_open.json"
    cmd = [sys.executable, "-m", "benchmarks.remote_open", "--shards", "3", "--rtt-ms", "1"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["shards"] == 3 and set(result["median_s"]) == {"one_by_one", "batched", "open"}
