"""Scale benchmark (issue 15): extraction at N = 1k, 10k, 100k and the store at width and size.

**Extraction.** N samples built from the real COCO images in ``../shared/data/coco-example/pics``
as webdataset tars: sample ``i`` (id ``f"{i:08d}"``) cycles through the 801 images, first the
original JPEG bytes and then three deterministic random crops of each (55-95 % of each side,
re-encoded at quality 90), so every id is distinct and every sample is a real JPEG decode. Each
N is extracted by the public ``extract()`` (the same path as ``cusa extract --dataset
"DIR/train-{000000..K}.tar" --modalities image``) with the local runner and with the Ray runner,
in a fresh child process per run. The image teacher is **the tiny Unicom config with random
weights** (``tests/fixtures/unicom_tiny_config.json``: dim 64, depth 2, 4 heads, patch 32 at
224 px; output ``tokens`` = 49 x 64 = 3,136 values per image), registered as
``unicom-tiny-random-tokens``: the pipeline is measured, not a model. Reported per N and runner:

* samples/s end to end (``extract()`` wall time, seal included) and steady (rows committed
  between the first and the last shard commit, per second: no start-up, no seal);
* peak RSS of the driver during extraction (``VmHWM`` before sealing), and of every other
  process of the run (Ray's workers, raylet, GCS...), polled from ``/proc`` by this process;
* store size on disk, seal time and seal peak RSS (the driver's ``VmHWM`` reset right before
  ``seal``), ``verify_store`` time and its peak RSS.

Goals: peak RSS flat in N (100k within 1.2x of 10k), throughput flat in N (within 10 %), seal and
verify linear in N.

**Store at width and size.** Stores of ``ROWSxDIM`` fp16 filled through the public writer
(``write_store`` of ``benchmarks/store_gather.py``: ``write_shard`` in shuffled order, then
``seal``), each in a child process: write and seal time, seal peak RSS over the RSS before it,
``FeatureLookup.open`` time and RSS, and ``gather`` of 128 random ids against in-RAM numpy with the
same dict id lookup (the paths taking turns batch by batch, ``_median_us_interleaved`` of
``store_gather.py``). Goal: gather within 2x of the baseline at every size. ``--coco-tokens``
adds the COCO token store itself (113,287 x 37,632 fp16, 8.5 GB; no in-RAM baseline) to measure
what seal needs there.

Run (everything, ~1.5 h on 2 busy cores, ~15 GB of temporary tars)::

    python -m benchmarks.scale
    python -m benchmarks.scale --sizes 1000,10000 --runners local,ray --store-cases ''
    python -m benchmarks.scale --sizes 100000 --runners ray --store-cases ''   # add one point

Results are merged into ``benchmarks/results/scale.json`` by (runner, N) and by store case, so a
long run can be done in parts; the plot ``docs/img/scale.png`` is redrawn from the whole file.

This file runs the children and merges their results; beside it are :mod:`benchmarks.scale_inputs`
(the tars and the tiny teacher), :mod:`benchmarks.scale_children` (what each child measures),
:mod:`benchmarks.proc_monitor` (memory and CPU from ``/proc``) and :mod:`benchmarks.scale_report`
(goals, plot, tables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import IMG_DIR, REPO, RESULTS_DIR, write_json
from benchmarks.proc_monitor import TreeMonitor
from benchmarks.scale_children import measure_extraction, measure_store
from benchmarks.scale_inputs import (
    BENCH_TEACHER,
    CROPS_PER_IMAGE,
    DEFAULT_PICS,
    TEACHER_LABEL,
    WEIGHTS_ENV,
    make_shards,
    write_tiny_weights,
)
from benchmarks.scale_report import goals, markdown_tables, plot, summarise_processes

RESULTS = RESULTS_DIR / "scale.json"
PLOT = IMG_DIR / "scale.png"
COCO_TOKENS = (113_287, 37_632)


# -- the parent ----------------------------------------------------------------------------------


def _run_child(kind: str, job: dict[str, Any], env: dict[str, str], timeout: float) -> dict:
    """Run ``kind`` in a fresh interpreter under a memory monitor; returns its result."""
    with tempfile.TemporaryDirectory(prefix="cusa-scale-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        log_path = Path(tmp) / "child.log"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--child",
            kind,
            str(job_path),
            str(out_path),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            with TreeMonitor(proc.pid) as monitor:
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc = "timeout"
        if rc != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{kind} child failed ({rc}): {job}\n{tail}")
        result = json.loads(out_path.read_text())
        result["processes"] = monitor.report()
        return result


def _environment(weights: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[WEIGHTS_ENV] = str(weights)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("CUSA_HOME", tempfile.mkdtemp(prefix="cusa-scale-home-"))
    return env


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "note": "shared machine: 2 cores used by several jobs at once, so absolute rates are noisy",
    }


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        with contextlib.suppress(ValueError):
            return json.loads(path.read_text())
    return {}


def _parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        rows, _, dim = item.lower().partition("x")
        cases.append((int(rows), int(dim)))
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N ('' skips)")
    ap.add_argument("--runners", default="local,ray")
    ap.add_argument("--shard-size", type=int, default=250, help="samples per tar")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--store-cases", default="1000000x768,20000x37632", help="ROWSxDIM,... ('' skips)"
    )
    ap.add_argument("--store-shards", type=int, default=50)
    ap.add_argument("--gather-reps", type=int, default=1000)
    ap.add_argument("--coco-tokens", action="store_true", help="also the 113,287 x 37,632 store")
    ap.add_argument("--pics", type=Path, default=DEFAULT_PICS)
    ap.add_argument("--workdir", type=Path, default=None, help="tars and stores (default: temp)")
    ap.add_argument("--keep-data", action="store_true", help="keep the tars for the next run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--fresh", action="store_true", help="start a new results file (no merge)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per child run")
    ap.add_argument(
        "--tables", action="store_true", help="print the results as markdown; run nothing"
    )
    ap.add_argument("--replot", action="store_true", help="recompute the goals, redraw the plot")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tables:
        print(markdown_tables(_load(args.out)))
        return
    if args.replot:
        results = _load(args.out)
        results["goals"] = goals(results.get("extraction", []))
        write_json(args.out, results)
        plot(results, args.plot)
        print(json.dumps(results["goals"], indent=2))
        return

    if args.child:
        kind, job_path, out_path = args.child
        job = json.loads(Path(job_path).read_text())
        result = measure_extraction(job) if kind == "extract" else measure_store(job)
        Path(out_path).write_text(json.dumps(result))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    cases = _parse_cases(args.store_cases)
    if args.coco_tokens:
        cases.append(COCO_TOKENS)
    results = {} if args.fresh else _load(args.out)
    results.setdefault("extraction", [])
    results.setdefault("store", [])
    results["teacher"] = {"name": BENCH_TEACHER, "label": TEACHER_LABEL}
    results["dataset"] = (
        f"webdataset tars, {args.shard_size} samples each, of the {len(list(args.pics.glob('*.jpg')))}"
        f" real COCO JPEGs in {args.pics.name}/ cycled: original bytes, then {CROPS_PER_IMAGE} seeded"
        " crops (55-95 % of each side, JPEG quality 90) per image; ids 00000000, 00000001..."
    )

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cusa-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    weights = write_tiny_weights(workdir / "unicom-tiny-random.pt")
    env = _environment(weights)
    try:
        if sizes:
            data = workdir / "tars"
            for n in sorted(sizes):
                t0 = time.perf_counter()
                pattern = make_shards(args.pics, data, n, args.shard_size)
                print(f"data for N={n}: {time.perf_counter() - t0:.0f} s", flush=True)
                for runner in runners:
                    store = workdir / f"store-{runner}-{n}"
                    shutil.rmtree(store, ignore_errors=True)
                    job = {
                        "dataset": pattern,
                        "store": str(store),
                        "runner": runner,
                        "batch_size": args.batch_size,
                    }
                    res = _run_child("extract", job, env, args.timeout)
                    shutil.rmtree(store, ignore_errors=True)
                    res.update(
                        n=n,
                        runner=runner,
                        shard_size=args.shard_size,
                        batch_size=args.batch_size,
                        machine=_machine(),
                    )
                    summarise_processes(res)
                    results["extraction"] = [
                        r for r in results["extraction"] if (r["runner"], r["n"]) != (runner, n)
                    ] + [res]
                    results["extraction"].sort(key=lambda r: (r["runner"], r["n"]))
                    results["goals"] = goals(results["extraction"])
                    write_json(args.out, results)
                    print(
                        f"{runner:5s} N={n:>7,}: {res['samples_per_s']:.1f}/s end to end, "
                        f"{res['samples_per_s_steady'] or float('nan'):.1f}/s steady, driver "
                        f"{res['driver_extract_peak_rss_mb']} MiB, worker "
                        f"{res['max_worker_peak_rss_mb']} MiB, seal {res['seal_s']} s "
                        f"({res['seal_peak_rss_mb']} MiB), verify {res['verify_s']} s",
                        flush=True,
                    )
        for rows, dim in cases:
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                job = {
                    "rows": rows,
                    "dim": dim,
                    "shards": args.store_shards,
                    "workdir": tmp,
                    "batch": 128,
                    "reps": args.gather_reps,
                    "baseline": (rows, dim) != COCO_TOKENS,
                }
                res = _run_child("store", job, env, args.timeout)
            res.pop("processes", None)
            res["machine"] = _machine()
            results["store"] = [
                r for r in results["store"] if (r["rows"], r["dim"]) != (rows, dim)
            ] + [res]
            results["store"].sort(key=lambda r: (r["dim"], r["rows"]))
            write_json(args.out, results)
            print(json.dumps(res), flush=True)
    finally:
        if not args.keep_data:
            shutil.rmtree(workdir / "tars", ignore_errors=True)
        if args.workdir is None and not args.keep_data:
            shutil.rmtree(workdir, ignore_errors=True)
    if results["extraction"]:
        plot(results, args.plot)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
