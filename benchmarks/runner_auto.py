"""``--runner auto``: what it picks here, and what the local and Ray runners cost end to end.

Each run is one fresh ``cusa extract`` process into a fresh store, timed from start to exit as a
user would see it: imports, model loading, Ray's start-up and the run itself. The datasets are
the embedded sample (``coco-sample`` train: 24 images, 120 captions) and
``../shared/data/coco-example`` train (600 images, 3,000 captions), with the offline teachers
EfficientNet-Lite0 and all-MiniLM-L6-v2 on the CPU. For each run the script also counts the
lines on stderr that are not cusa's own (Ray's warnings, progress notices, C++ log lines):
``--runner auto`` is meant to keep that at 0.

Run:  python -m benchmarks.runner_auto [--data ../shared/data/coco-example] [--quick]
Writes benchmarks/results/runner_auto.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "runner_auto.json"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-example"
TEACHERS = ("efficientnet-lite0", "all-MiniLM-L6-v2")
# What cusa itself writes to stderr: its notes, log lines and errors.
OURS = re.compile(r"^(runner: |note: |error: |\d+ sample\(s\) |(INFO|WARNING|ERROR) cusa[.:])")


def _cusa() -> list[str]:
    return [sys.executable, "-m", "cusa.cli"]


def run_once(dataset: list[str], runner: str, workdir: Path) -> dict:
    store = Path(tempfile.mkdtemp(prefix=f"store-{runner}-", dir=workdir))
    cmd = [
        *_cusa(), "extract", *dataset, "--store", str(store), "--image-teacher", TEACHERS[0],
        "--text-teacher", TEACHERS[1], "--device", "cpu", "--runner", runner, "--json",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "CUSA_HOME": str(workdir / "home")}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    stderr = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    foreign = [ln for ln in stderr if not OURS.match(ln)]
    choice = next((ln for ln in stderr if ln.startswith("runner: ")), "")
    return {
        "runner_requested": runner,
        "runner_used": summary["runner"],
        "reason": summary.get("runner_reason", ""),
        "wall_s": round(wall, 2),
        "run_s": round(summary["elapsed_s"], 2),
        "images": summary["rows"].get("image", 0),
        "captions": summary["rows"].get("text", 0),
        "throughput": {k: round(v, 1) for k, v in summary["throughput"].items()},
        "stderr_lines_not_ours": len(foreign),
        "stderr_not_ours_sample": foreign[:5],
        "choice_line": choice,
        "load_avg_1m_before": round(load_before, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="coco-example folder")
    ap.add_argument("--quick", action="store_true", help="the embedded sample only")
    args = ap.parse_args()

    from cusa.extract.runner import RAY_MIN_IMAGES, ExtractConfig, choose_runner, visible_gpus

    jobs = {"coco-sample train (24 images, 120 captions)": ["--dataset", "coco-sample"]}
    data = Path(args.data)
    if not args.quick and (data / "new_train.json").is_file():
        jobs["coco-example train (600 images, 3,000 captions)"] = [
            "--dataset", str(data / "new_train.json"),
        ]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="runner-auto-") as tmp:
        for label, dataset in jobs.items():
            for runner in ("auto", "local", "ray"):
                print(f"{label}: --runner {runner} ...", file=sys.stderr, flush=True)
                row = run_once(dataset, runner, Path(tmp))
                results.append({"job": label, **row})
                print(f"  {row['runner_used']}: {row['wall_s']} s", file=sys.stderr, flush=True)
    by_job: dict[str, dict[str, float]] = {}
    for r in results:
        by_job.setdefault(r["job"], {})[r["runner_requested"]] = r["wall_s"]
    out = {
        "what": "wall time of one fresh `cusa extract` process per runner (imports, model "
        "loading, Ray start-up and the run), fresh store each time; offline teachers on CPU",
        "teachers": list(TEACHERS),
        "machine": {
            "cpus": os.cpu_count(),
            "gpus_visible": visible_gpus(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "2 cores shared with other jobs; the load average is recorded per run",
        },
        "auto_rule": {
            "ray_min_images": RAY_MIN_IMAGES,
            "here": choose_runner(ExtractConfig(dataset="coco-sample"), 600).reason,
        },
        "runs": results,
        "ray_over_local": {
            job: round(t["ray"] / t["local"], 2) for job, t in by_job.items() if "ray" in t
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ray_over_local"], indent=2))


if __name__ == "__main__":
    main()
