"""How long the README's sample training run takes here, and how much it writes.

Runs the README's two commands as a user would (``cusa extract --dataset coco-sample
--image-teacher efficientnet-lite0``, then ``cusa train --config configs/coco-sample.yaml``) in a
fresh ``CUSA_HOME`` (the assembled teacher weights are shared through ``CUSA_MODELS_DIR``) and
records, for the training command: wall time, the load average sampled every 5 s (the machine
is shared, so the figure is only meaningful with it), the bytes the process wrote
(``/proc/<pid>/io`` ``write_bytes``, children included), what stays on disk, the steps and the
evaluations. Writes ``benchmarks/results/sample_training_time.json``.

    python -m benchmarks.sample_training_time
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS_DIR, versions


def _cusa() -> list[str]:
    return [sys.executable, "-m", "cusa.cli"]


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds until stopped."""

    def __init__(self, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._stop_event = every, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop_event.wait(self.every)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join()
        return self.samples


def run_timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` under ``bash``, returning wall time, load samples and the bytes it wrote."""
    # bash reads its own /proc/<pid>/io after the command: reaped children's I/O is included.
    script = " ".join(f"'{c}'" for c in cmd) + ' > "$LOG" 2>&1; rc=$?; cat /proc/$$/io; exit $rc'
    sampler = LoadSampler()
    sampler.start()
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load = sampler.stop()
    io = dict(line.split(": ") for line in done.stdout.strip().splitlines() if ": " in line)
    return {
        "exit_code": done.returncode,
        "wall_s": round(wall, 1),
        "load_1min": {
            "min": min(load),
            "mean": round(statistics.fmean(load), 2),
            "max": max(load),
            "samples": len(load),
        },
        "write_bytes": int(io.get("write_bytes", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "sample_training_time.json"))
    parser.add_argument("--models-dir", default=os.environ.get("CUSA_MODELS_DIR"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cusa-sample-train-"))
    env = {**os.environ, "CUSA_HOME": str(home / "home")}
    if args.models_dir:
        env["CUSA_MODELS_DIR"] = args.models_dir
    try:
        env["LOG"] = str(home / "extract.log")
        extract = run_timed(
            [
                *_cusa(),
                "extract",
                "--dataset",
                "coco-sample",
                "--image-teacher",
                "efficientnet-lite0",
            ],
            env,
        )
        out_dir = home / "run"
        env["LOG"] = str(home / "train.log")
        train = run_timed(
            [
                *_cusa(),
                "train",
                "--config",
                str(REPO / "configs" / "coco-sample.yaml"),
                "--output-dir",
                str(out_dir),
                "--no-progress",
            ],
            env,
        )
        records = [
            json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        ]
        files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
        inodes = {p.stat().st_ino for p in out_dir.glob("*.pt")}
        result = {
            "what": "README sample run: cusa train --config configs/coco-sample.yaml (CPU)",
            "extract": extract,
            "train": {
                **train,
                "steps": max((r["step"] for r in records if "loss" in r), default=0),
                "evaluations": [r for r in records if r.get("event") == "eval"],
                "files": files,
                "distinct_checkpoint_files": len(inodes),
                "bytes_on_disk": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
                - (files.get("checkpoint-best.pt", 0) if len(inodes) == 1 else 0),
            },
            "versions": versions(),
            "note": "shared 2-core machine: read wall_s with load_1min",
        }
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(json.dumps({k: result["train"][k] for k in ("wall_s", "load_1min", "steps")}))
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
