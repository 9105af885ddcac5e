"""What :mod:`benchmarks.scale` measures, each in a fresh child process of its own
(``python -m benchmarks.scale --child KIND JOB OUT``): one extraction (:func:`measure_extraction`:
``extract()`` with the local or the Ray runner, seal, verify) and one store at width and size
(:func:`measure_store`: write, seal, open, gather against in-RAM numpy, verify).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any

from benchmarks.common import REPO
from benchmarks.proc_monitor import mib, proc_status, reset_peak_rss
from benchmarks.scale_inputs import BENCH_TEACHER, WEIGHTS_ENV, register_bench_teacher

# -- child: one extraction ---------------------------------------------------------------------


class _CommitClock:
    """A ProgressSink that records when the first teacher batch reached the driver, and when
    each shard was committed with how many samples it had."""

    def __init__(self) -> None:
        self.first_batch: tuple[float, int] | None = None
        self.commits: list[tuple[float, int]] = []

    def start(self, totals: dict[str, int | None]) -> None:
        return None

    def advance(self, stage: str, n: int = 1, rate: float | None = None) -> None:
        if stage == "read":
            self.commits.append((time.perf_counter(), n))
        elif stage.endswith("teacher") and self.first_batch is None:
            self.first_batch = (time.perf_counter(), n)

    def steady_rate(self) -> float | None:
        """Samples/s from the first encoded batch to the last commit: no start-up, no seal.

        (Between commits alone would flatter Ray, which streams most shards through the actors
        before the first commits land.)
        """
        if self.first_batch is None or not self.commits:
            return None
        span = self.commits[-1][0] - self.first_batch[0]
        rows = sum(n for _, n in self.commits) - self.first_batch[1]
        return rows / span if span > 0 else None

    def failures(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def measure_extraction(job: dict[str, Any]) -> dict[str, Any]:
    import logging

    from cusa.extract.runner import ExtractConfig, extract
    from cusa.store import FeatureGroup, FeatureStore
    from cusa.store.verify import verify_store

    register_bench_teacher()
    if job["runner"] == "ray":
        import ray

        ray.init(
            address="local",  # a fresh local cluster, never one this machine happens to run
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=os.cpu_count(),
            logging_level=logging.WARNING,
            runtime_env={
                "worker_process_setup_hook": "benchmarks.scale_inputs.register_bench_teacher",
                "env_vars": {"PYTHONPATH": str(REPO), WEIGHTS_ENV: os.environ[WEIGHTS_ENV]},
            },
        )
    seal_info: dict[str, Any] = {}
    real_seal = FeatureGroup.seal

    def measured_seal(self: FeatureGroup, *args: Any, **kwargs: Any) -> Any:
        seal_info["extract_peak_rss"] = proc_status().get("VmHWM")
        seal_info["rss_before"] = proc_status().get("VmRSS")
        seal_info["hwm_reset"] = reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return real_seal(self, *args, **kwargs)
        finally:
            seal_info["seal_s"] = time.perf_counter() - t0
            seal_info["seal_cpu_s"] = time.process_time() - c0
            seal_info["peak_rss"] = proc_status().get("VmHWM")

    FeatureGroup.seal = measured_seal  # type: ignore[method-assign]
    clock = _CommitClock()
    config = ExtractConfig(
        dataset=job["dataset"],
        split="train",
        store=job["store"],
        image_teacher=BENCH_TEACHER,
        modalities=("image",),
        batch_size=job["batch_size"],
        device="cpu",
        runner=job["runner"],
    )
    t_start, cpu_start = time.perf_counter(), time.process_time()
    summary = extract(config, progress=clock)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    FeatureGroup.seal = real_seal  # type: ignore[method-assign]
    if job["runner"] == "ray":
        import ray

        ray.shutdown()
    gc.collect()
    verify_rss_before = proc_status().get("VmRSS")
    reset_peak_rss()
    verify_times, verify_cpu = [], []
    for _ in range(3):  # the median of three: one pass is at the mercy of a busy machine
        t0, c0 = time.perf_counter(), time.process_time()
        reports = verify_store(FeatureStore.open(job["store"]))
        verify_times.append(time.perf_counter() - t0)
        verify_cpu.append(time.process_time() - c0)
    verify_s = statistics.median(verify_times)
    verify_peak = proc_status().get("VmHWM")
    rows = summary.rows.get("image", 0)
    steady = clock.steady_rate()
    group = FeatureStore.open(job["store"]).groups()[0]
    return {
        "ok": summary.ok and summary.sealed and all(r.ok for r in reports),
        "rows": rows,
        "failed": summary.total_failed,
        "shards": summary.shards_total,
        "extract_wall_s": round(wall, 2),
        "driver_cpu_s_extract": round(cpu, 2),
        "first_batch_at_s": round(clock.first_batch[0] - t_start, 2) if clock.first_batch else None,
        "samples_per_s": round(rows / wall, 2),
        "samples_per_s_steady": round(steady, 2) if steady else None,
        "stage_items_per_busy_s": {k: round(v, 1) for k, v in summary.throughput().items()},
        "driver_extract_peak_rss_mb": mib(seal_info.get("extract_peak_rss")),
        "seal_s": round(seal_info.get("seal_s", float("nan")), 3),
        "seal_cpu_s": round(seal_info.get("seal_cpu_s", float("nan")), 3),
        "seal_rss_before_mb": mib(seal_info.get("rss_before")),
        "seal_peak_rss_mb": mib(seal_info.get("peak_rss")) if seal_info.get("hwm_reset") else None,
        "seal_rss_over_before_mb": mib(seal_info["peak_rss"] - seal_info["rss_before"])
        if seal_info.get("hwm_reset")
        else None,
        "verify_s": round(verify_s, 3),
        "verify_cpu_s": round(statistics.median(verify_cpu), 3),
        "verify_rss_before_mb": mib(verify_rss_before),
        "verify_peak_rss_mb": mib(verify_peak),
        "store_bytes": group.nbytes_on_disk(),
        "dim": group.dim,
    }


# -- child: one store at width and size --------------------------------------------------------


def measure_store(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from benchmarks.store_gather import median_us_interleaved, write_store
    from cusa.store import FeatureLookup, FeatureStore
    from cusa.store.sealing import seal_block_bytes
    from cusa.store.verify import verify_store

    rows, dim, shards = job["rows"], job["dim"], job["shards"]
    root = os.path.join(job["workdir"], "store")
    store, write_s = write_store(root, rows, dim, shards)
    group = store.groups()[0]
    gc.collect()
    before = proc_status().get("VmRSS", 0)
    reset_peak_rss()
    t0 = time.perf_counter()
    group.seal()
    seal_s = time.perf_counter() - t0
    seal_peak = proc_status().get("VmHWM", 0)
    del store, group
    gc.collect()

    before_open = proc_status().get("VmRSS", 0)
    reset_peak_rss()
    t0 = time.perf_counter()
    lookup = FeatureLookup.open(root, dataset="bench", split="train", teacher="bench-teacher")
    open_s = time.perf_counter() - t0
    open_rss = proc_status().get("VmRSS", 0) - before_open
    open_peak = proc_status().get("VmHWM", 0) - before_open

    rng = np.random.default_rng(1)
    batches = [
        [lookup.ids[i] for i in rng.choice(rows, job["batch"], replace=False)]
        for _ in range(job["reps"])
    ]
    out: dict[str, Any] = {
        "rows": rows,
        "dim": dim,
        "dtype": "float16",
        "bytes_on_disk": lookup.group.nbytes_on_disk(),
        "shards_written": shards,
        "write_s": round(write_s, 2),
        "seal_s": round(seal_s, 2),
        "seal_block_bytes": seal_block_bytes(),
        "seal_rss_before_mb": mib(before),
        "seal_peak_rss_mb": mib(seal_peak),
        "seal_rss_over_before_mb": mib(seal_peak - before),
        "open_s": round(open_s, 3),
        "open_rss_mb": mib(open_rss),
        "open_peak_rss_mb": mib(open_peak),
    }
    if job["baseline"]:
        # The same array in RAM and the same dict id -> row mapping a user would build.
        ram = np.array(lookup.gather_rows(np.arange(len(lookup))))
        row_of = {sid: i for i, sid in enumerate(lookup.ids)}
        assert np.array_equal(lookup.gather(batches[0]), ram[[row_of[s] for s in batches[0]]])
        t = median_us_interleaved(
            {
                "gather": (lookup.gather, batches),
                "ram_ids": (
                    lambda b: ram[np.array([row_of[s] for s in b], dtype=np.int64)],
                    batches,
                ),
            }
        )
        del ram
        out["gather_us"] = round(t["gather"], 1)
        out["baseline_ram_dict_ids_us"] = round(t["ram_ids"], 1)
        out["gather_vs_baseline"] = round(t["gather"] / t["ram_ids"], 3)
        out["gather_within_2x"] = t["gather"] <= 2 * t["ram_ids"]
    else:
        times = []
        for b in batches:
            t0 = time.perf_counter_ns()
            lookup.gather(b)
            times.append(time.perf_counter_ns() - t0)
        out["gather_us"] = round(statistics.median(times) / 1e3, 1)
    del lookup, batches
    gc.collect()
    before_verify = proc_status().get("VmRSS", 0)
    reset_peak_rss()
    t0 = time.perf_counter()
    reports = verify_store(FeatureStore.open(root))
    out["verify_s"] = round(time.perf_counter() - t0, 2)
    out["verify_rss_over_before_mb"] = mib(proc_status().get("VmHWM", 0) - before_verify)
    out["verify_ok"] = all(r.ok for r in reports)
    return out
