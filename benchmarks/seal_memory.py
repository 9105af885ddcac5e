"""Sealing at scale (issue 22): peak memory and temporary disk of ``FeatureGroup.seal()``.

Sealing sorts the ids out of core (:mod:`cusa.store.sealing`): sorted runs and the sorted ids
go to temporary files, and so does the id index's builder. For each N a store of N caption ids
(``000123456789#3``) and dim-8 fp16 rows is written by :mod:`benchmarks.web_scale`'s ``write``
phase (1M-row shards in shuffled order); then, each in a fresh child process:

* ``idle``: the interpreter with cusa imported and the group opened (the floor of the peak);
* ``seal``: ``FeatureGroup.seal()``: wall and CPU time, peak RSS (``VmHWM``), while this process
  polls the size of the child's ``TMPDIR`` every 0.1 s for the most temporary disk it used.

Run: ``python -m benchmarks.seal_memory --sizes 1000000,10000000`` (``--workdir`` on a disk with
room: 10M rows need ~0.3 GB of store and ~0.7 GB of temporary files). Writes
``benchmarks/results/seal_memory.json`` (merged by N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR

RESULT = RESULTS_DIR / "seal_memory.json"


def _dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.path.getsize(os.path.join(d, f))
    return total


def _child(phase: str, root: str, n: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    if phase == "write":
        cmd = [sys.executable, "-m", "benchmarks.web_scale", "--child", "write", "--root", root]
        cmd += ["--sizes", str(n)]
    else:
        cmd = [sys.executable, "-m", "benchmarks.seal_memory", "--child", phase, "--root", root]
        cmd += ["--sizes", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} at N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(phase: str, root: str, n: int) -> dict[str, Any]:
    from benchmarks import web_scale

    if phase == "idle":
        web_scale._group(root)
        return {"idle_peak_rss_mib": round(web_scale._peak_rss_mib(), 1)}
    return web_scale.phase_seal(root, n)


def run_size(n: int, workdir: str | None) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix=f"seal-memory-{n}-", dir=workdir)
    root = os.path.join(tmp, "store")
    seal_tmp = os.path.join(tmp, "tmpdir")
    os.makedirs(seal_tmp)
    try:
        result: dict[str, Any] = {"n": n, "dim": 8, "dtype": "float16"}
        result.update(_child("write", root, n))
        result.update(_child("idle", root, n))
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _dir_bytes(seal_tmp))
                time.sleep(0.1)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            result.update(_child("seal", root, n, env={**os.environ, "TMPDIR": seal_tmp}))
        finally:
            done.set()
            watcher.join()
        result["temp_peak_bytes"] = peak[0]
        result["temp_bytes_per_id"] = round(peak[0] / n, 1)
        result["temp_left_behind_bytes"] = _dir_bytes(seal_tmp)
        above = result["seal_peak_rss_mib"] - result["idle_peak_rss_mib"]
        result["seal_peak_above_idle_mib"] = round(above, 1)
        result["load_average_1min"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", choices=["idle", "seal"], default=None)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        print(json.dumps(run_child(args.child, args.root, sizes[0])))
        return
    results = json.loads(RESULT.read_text()) if RESULT.exists() else {"sizes": {}}
    for n in sizes:
        results["sizes"][str(n)] = run_size(n, args.workdir)
        print(json.dumps(results["sizes"][str(n)]), file=sys.stderr, flush=True)
    results["machine"] = f"{os.cpu_count()} CPU cores (shared)"
    results["command"] = f"python -m benchmarks.seal_memory --sizes {args.sizes}"
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {Path(RESULT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
