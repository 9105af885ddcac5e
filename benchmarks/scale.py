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
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
PLOT = REPO / "docs" / "img" / "scale.png"
DEFAULT_PICS = REPO.parent / "shared" / "data" / "coco-example" / "pics"
TINY_CONFIG = REPO / "tests" / "fixtures" / "unicom_tiny_config.json"
BENCH_TEACHER = "unicom-tiny-random-tokens"
WEIGHTS_ENV = "CUSA_SCALE_TINY_WEIGHTS"
CROPS_PER_IMAGE = 3  # variants after the original: sample i cycles through 801 x 4 images
COCO_TOKENS = (113_287, 37_632)
TEACHER_LABEL = (
    "tiny Unicom config (tests/fixtures/unicom_tiny_config.json: dim 64, depth 2, 4 heads, "
    "patch 32, 224 px) with random weights, output tokens (49 x 64 = 3,136-d): measures the "
    "pipeline, not a real teacher"
)

# -- memory, from /proc ----------------------------------------------------------------------

_STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` of ``pid`` in bytes ({} if gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _mb(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (all its threads), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class TreeMonitor:
    """Polls the process tree under ``root`` and keeps each process's peak memory.

    Ray renames its workers (``ray::IDLE``, then ``ray::MapWorker(...)``...), so a process is
    labelled by the most specific name it had.
    """

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.procs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in _descendants(self.root):
                status = proc_status(pid)
                if not status:
                    continue
                rec = self.procs.setdefault(pid, {"pid": pid, "names": [], "peak": {}})
                name = _cmdline(pid)
                if name and name not in rec["names"]:
                    rec["names"].append(name)
                for key, value in status.items():
                    rec["peak"][key] = max(rec["peak"].get(key, 0), value)
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    rec["cpu_s"] = max(rec.get("cpu_s", 0.0), cpu)
            self._stop.wait(self.interval)

    def report(self) -> list[dict[str, Any]]:
        rows = []
        for rec in self.procs.values():
            peak, names = rec["peak"], rec["names"]
            ray_names = [n for n in names if n.startswith("ray::")]
            busy = [n for n in ray_names if "IDLE" not in n]
            name = (busy or ray_names or names or [""])[-1]
            rows.append(
                {
                    "pid": rec["pid"],
                    "role": _role(rec["pid"], names, self.root),
                    "name": name[:120],
                    "peak_rss_mb": _mb(max(peak.get("VmHWM", 0), peak.get("VmRSS", 0))),
                    "peak_anon_mb": _mb(peak.get("RssAnon")),
                    "peak_shmem_mb": _mb(peak.get("RssShmem")),
                    "cpu_s": round(rec.get("cpu_s", 0.0), 2),
                }
            )
        return sorted(rows, key=lambda r: (r["role"], -(r["peak_rss_mb"] or 0)))


def _role(pid: int, names: list[str], root: int) -> str:
    text = " ".join(names)
    if pid == root:
        return "driver"
    if "ray::" in text or "default_worker.py" in text or "setup_worker.py" in text:
        return "ray worker"
    if "ray" in text:
        return "ray system"
    return "other"


# -- the dataset ---------------------------------------------------------------------------------


def _captions() -> dict[str, str]:
    out: dict[str, str] = {}
    for split in ("new_train.json", "new_val.json"):
        path = DEFAULT_PICS.parent / split
        if path.exists():
            for rec in json.loads(path.read_text()):
                out.setdefault(Path(rec["image_path"]).name, rec["caption"])
    return out


def _variant(pics: list[Path], p: int, pool: Path) -> bytes:
    """Pool image ``p``: image ``p % len(pics)`` as it is (variant 0) or a seeded crop."""
    base, variant = pics[p % len(pics)], p // len(pics)
    if variant == 0:
        return base.read_bytes()
    target = pool / f"{p:06d}.jpg"
    if target.exists():
        return target.read_bytes()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(p)
    with Image.open(base) as img:
        img = img.convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.55, 0.95)), int(h * rng.uniform(0.55, 0.95))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        img.crop((x0, y0, x0 + cw, y0 + ch)).save(buf, format="JPEG", quality=90)
    pool.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.partial")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    return buf.getvalue()


def make_shards(
    pics_dir: Path, out: Path, n: int, shard_size: int, crops: int = CROPS_PER_IMAGE
) -> str:
    """Write (or reuse) the tars holding samples ``0..n-1``; returns their brace pattern.

    Shard ``k`` always holds samples ``k*shard_size ...``, so a smaller N reads a prefix of the
    same tars. ``crops=0`` cycles the original JPEGs only (no re-encoding, fast to write).
    """
    pics = sorted(pics_dir.glob("*.jpg"))
    if not pics:
        raise SystemExit(f"no JPEG images in {pics_dir}; pass --pics")
    captions = _captions()
    pool_size = len(pics) * (1 + crops)
    shards = -(-n // shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        path = out / f"train-{k:06d}.tar"
        done = out / f"train-{k:06d}.count"
        if path.exists() and done.exists() and int(done.read_text()) == hi - lo:
            continue
        tmp = path.with_suffix(".tar.partial")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(lo, hi):
                p = i % pool_size
                caption = captions.get(pics[p % len(pics)].name, "a photo").encode()
                for ext, data in (("jpg", _variant(pics, p, out / "pool")), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        done.write_text(str(hi - lo))
    return str(out / f"train-{{000000..{shards - 1:06d}}}.tar")


# -- the benchmark teacher ---------------------------------------------------------------------


def write_tiny_weights(path: Path) -> Path:
    """Random weights (seed 0) of the tiny Unicom config, in the official fp16 format."""
    import torch

    from cusa.extract.teachers.unicom import UnicomConfig, build_unicom

    torch.manual_seed(0)
    model = build_unicom(UnicomConfig(**json.loads(TINY_CONFIG.read_text())))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def register_bench_teacher() -> None:
    """Register ``unicom-tiny-random-tokens`` (weights from ``$CUSA_SCALE_TINY_WEIGHTS``).

    Also the Ray ``worker_process_setup_hook`` of the benchmark, so teacher actors find it.
    """
    from cusa.extract.teachers.registry import (
        TEACHERS,
        TeacherInfo,
        _ensure_loaded,
        register_teacher,
    )
    from cusa.extract.teachers.unicom import UnicomConfig, UnicomImageTeacher

    _ensure_loaded()
    if BENCH_TEACHER in TEACHERS.list():
        return

    def factory(*, device: str | None = None, dtype: str = "float16") -> UnicomImageTeacher:
        weights = os.environ.get(WEIGHTS_ENV)
        if not weights:
            raise RuntimeError(f"{WEIGHTS_ENV} is not set: run through benchmarks/scale.py")
        return UnicomImageTeacher(
            "ViT-B/32",
            "tokens",
            weights=weights,
            allow_unofficial=True,
            config=UnicomConfig(**json.loads(TINY_CONFIG.read_text())),
            name=BENCH_TEACHER,
            device=device,
            dtype=dtype,
        )

    register_teacher(
        BENCH_TEACHER,
        factory,
        TeacherInfo(
            name=BENCH_TEACHER,
            modality="image",
            dim=3136,
            default_dtype="float16",
            weights_source=f"${WEIGHTS_ENV} (random, seed 0)",
            output_kind="tokens",
            stand_in=True,
            description=TEACHER_LABEL,
        ),
    )


# -- child: one extraction ---------------------------------------------------------------------


class _CommitClock:
    """A ProgressSink that records when the first teacher batch reached the driver, and when
    each shard was committed with how many samples it had."""

    def __init__(self) -> None:
        self.first_batch: tuple[float, int] | None = None
        self.commits: list[tuple[float, int]] = []

    def start(self, totals: dict[str, int | None]) -> None:
        return None

    def advance(self, stage: str, n: int = 1) -> None:
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


def _child_extract(job: dict[str, Any]) -> dict[str, Any]:
    import logging

    from cusa.extract.runner import ExtractConfig, extract
    from cusa.store import FeatureStore
    from cusa.store.feature_store import FeatureGroup
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
                "worker_process_setup_hook": "benchmarks.scale.register_bench_teacher",
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
        "driver_extract_peak_rss_mb": _mb(seal_info.get("extract_peak_rss")),
        "seal_s": round(seal_info.get("seal_s", float("nan")), 3),
        "seal_cpu_s": round(seal_info.get("seal_cpu_s", float("nan")), 3),
        "seal_rss_before_mb": _mb(seal_info.get("rss_before")),
        "seal_peak_rss_mb": _mb(seal_info.get("peak_rss")) if seal_info.get("hwm_reset") else None,
        "seal_rss_over_before_mb": _mb(seal_info["peak_rss"] - seal_info["rss_before"])
        if seal_info.get("hwm_reset")
        else None,
        "verify_s": round(verify_s, 3),
        "verify_cpu_s": round(statistics.median(verify_cpu), 3),
        "verify_rss_before_mb": _mb(verify_rss_before),
        "verify_peak_rss_mb": _mb(verify_peak),
        "store_bytes": group.nbytes_on_disk(),
        "dim": group.dim,
    }


# -- child: one store at width and size --------------------------------------------------------


def _child_store(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from benchmarks.store_gather import _median_us_interleaved, write_store
    from cusa.store import FeatureLookup, FeatureStore
    from cusa.store.feature_store import seal_block_bytes
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
        "seal_rss_before_mb": _mb(before),
        "seal_peak_rss_mb": _mb(seal_peak),
        "seal_rss_over_before_mb": _mb(seal_peak - before),
        "open_s": round(open_s, 3),
        "open_rss_mb": _mb(open_rss),
        "open_peak_rss_mb": _mb(open_peak),
    }
    if job["baseline"]:
        # The same array in RAM and the same dict id -> row mapping a user would build.
        ram = np.array(lookup.gather_rows(np.arange(len(lookup))))
        row_of = {sid: i for i, sid in enumerate(lookup.ids)}
        assert np.array_equal(lookup.gather(batches[0]), ram[[row_of[s] for s in batches[0]]])
        t = _median_us_interleaved(
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
    out["verify_rss_over_before_mb"] = _mb(proc_status().get("VmHWM", 0) - before_verify)
    out["verify_ok"] = all(r.ok for r in reports)
    return out


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


def _summarise_processes(result: dict[str, Any]) -> None:
    procs = result["processes"]
    workers = [p for p in procs if p["role"] == "ray worker"]
    result["driver_peak_rss_mb_polled"] = max(
        (p["peak_rss_mb"] for p in procs if p["role"] == "driver"), default=None
    )
    result["driver_peak_anon_mb_polled"] = max(
        (p["peak_anon_mb"] or 0 for p in procs if p["role"] == "driver"), default=None
    )
    result["max_worker_peak_rss_mb"] = max((p["peak_rss_mb"] for p in workers), default=None)
    result["max_worker_peak_anon_mb"] = max((p["peak_anon_mb"] or 0 for p in workers), default=None)
    # CPU seconds of the whole run (driver during extract() + every Ray process): samples per
    # CPU second is what a shared, oversubscribed machine cannot distort the way it does wall time.
    if result.get("driver_cpu_s_extract") is not None:
        others = sum(p.get("cpu_s") or 0.0 for p in procs if p["role"] != "driver")
        total = result["driver_cpu_s_extract"] + others
        result["cpu_s_total"] = round(total, 1)
        result["samples_per_cpu_s"] = round(result["rows"] / total, 2) if total > 0 else None
    result["ray_system_peak_rss_mb"] = {
        _short(p["name"]): p["peak_rss_mb"] for p in procs if p["role"] == "ray system"
    }


def _short(cmdline: str) -> str:
    """``.../ray/dashboard/agent.py --x`` -> ``agent.py``; ``.../raylet --x`` -> ``raylet``."""
    tokens = cmdline.split() or [""]
    script = next((t for t in tokens if t.endswith(".py")), tokens[0])
    return script.rsplit("/", 1)[-1]


def _goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each goal per runner: the largest N against N = 10k (the issue's comparison) when both
    were measured, else against the next largest N."""
    out: dict[str, Any] = {}
    for runner in sorted({r["runner"] for r in runs}):
        pts = sorted((r for r in runs if r["runner"] == runner), key=lambda r: r["n"])
        if len(pts) < 2:
            continue
        b = pts[-1]
        a = next((r for r in pts[:-1] if r["n"] == 10_000), pts[-2])
        g: dict[str, Any] = {"compared": f"N={a['n']} -> N={b['n']}"}

        def ratio(key: str, a: dict = a, b: dict = b) -> float | None:
            x, y = a.get(key), b.get(key)
            return round(y / x, 3) if x and y else None

        g["driver_peak_rss_ratio"] = ratio("driver_extract_peak_rss_mb")
        g["driver_peak_anon_ratio"] = ratio("driver_peak_anon_mb_polled")
        g["max_worker_peak_rss_ratio"] = ratio("max_worker_peak_rss_mb")
        g["max_worker_peak_anon_ratio"] = ratio("max_worker_peak_anon_mb")
        g["seal_peak_rss_ratio"] = ratio("seal_peak_rss_mb")
        g["throughput_ratio_end_to_end"] = ratio("samples_per_s")
        g["throughput_ratio_steady"] = ratio("samples_per_s_steady")
        g["throughput_ratio_per_cpu_s"] = ratio("samples_per_cpu_s")
        scale = b["n"] / a["n"]
        g["seal_time_ratio_over_n_ratio"] = round((b["seal_s"] / a["seal_s"]) / scale, 3)
        g["verify_time_ratio_over_n_ratio"] = round((b["verify_s"] / a["verify_s"]) / scale, 3)
        for key in ("seal_cpu_s", "verify_cpu_s"):  # 1.0 = exactly linear in N
            if a.get(key) and b.get(key):
                g[f"{key.removesuffix('_s')}_ratio_over_n_ratio"] = round(
                    (b[key] / a[key]) / scale, 3
                )
        rss = [x for x in (g["driver_peak_rss_ratio"], g["max_worker_peak_rss_ratio"]) if x]
        g["rss_flat_met"] = bool(rss) and all(x <= 1.2 for x in rss)
        # Judged per CPU second when measured (wall time on a shared machine follows the load of
        # the other jobs), else on the steady wall-clock rate.
        thr = g["throughput_ratio_per_cpu_s"] or g["throughput_ratio_steady"]
        g["throughput_flat_met"] = thr is not None and abs(thr - 1) <= 0.10
        out[runner] = g
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: samples/s, peak RSS, seal/verify time and seal RSS, each against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("extraction", [])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_thr, ax_rss), (ax_time, ax_seal) = axes
    for runner, marker in (("local", "o"), ("ray", "s")):
        pts = sorted((r for r in runs if r["runner"] == runner), key=lambda r: r["n"])
        if not pts:
            continue
        n = [p["n"] for p in pts]
        ax_thr.plot(
            n,
            [p["samples_per_s"] for p in pts],
            marker=marker,
            label=f"{runner}: samples/s, end to end",
        )
        steady = [p.get("samples_per_s_steady") for p in pts]
        if any(steady):
            ax_thr.plot(n, steady, marker=marker, ls=":", label=f"{runner}: samples/s, steady")
        per_cpu = [p.get("samples_per_cpu_s") for p in pts]
        if any(per_cpu):
            ax_thr.plot(n, per_cpu, marker=marker, ls="--", label=f"{runner}: samples per CPU-s")
        ax_rss.plot(
            n,
            [p["driver_extract_peak_rss_mb"] for p in pts],
            marker=marker,
            label=f"{runner} driver",
        )
        workers = [p.get("max_worker_peak_rss_mb") for p in pts]
        if any(workers):
            ax_rss.plot(n, workers, marker=marker, ls="--", label=f"{runner} largest Ray worker")
        for key, ls, what in (("seal", "-", "seal"), ("verify", ":", "verify")):
            cpu = [p.get(f"{key}_cpu_s") for p in pts]
            ys = cpu if all(cpu) else [p[f"{key}_s"] for p in pts]  # CPU s when measured
            ax_time.plot(n, ys, marker=marker, ls=ls, label=f"{runner} {what}")
        ax_seal.plot(
            n,
            [p["seal_peak_rss_mb"] for p in pts],
            marker=marker,
            label=f"{runner} driver during seal",
        )
    if runs:
        lo, hi = min(r["n"] for r in runs), max(r["n"] for r in runs)
        ref = max((r.get("seal_cpu_s") or r["seal_s"] for r in runs if r["n"] == hi), default=None)
        if ref and hi > lo:
            ax_time.plot([lo, hi], [ref * lo / hi, ref], color="grey", lw=0.8, label="linear")
    for ax, title, ylabel in (
        (ax_thr, "Extraction throughput (2 shared cores)", "samples per second"),
        (ax_rss, "Peak RSS during extraction", "MiB"),
        (ax_time, "Seal and verify time (CPU seconds)", "s"),
        (ax_seal, "Peak RSS while sealing", "MiB"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("N samples")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    ax_thr.set_ylim(bottom=0)
    ax_rss.set_ylim(bottom=0)
    ax_seal.set_ylim(bottom=0)
    fig.suptitle(
        "cusa extraction at scale: webdataset tars of real COCO JPEGs -> sealed store\n"
        "image teacher: tiny Unicom config, random weights (the pipeline, not a model)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_tables(results: dict[str, Any]) -> str:
    """The extraction and store tables of ``docs/scale.md``, from a results file."""

    def f(x: Any, nd: int = 1) -> str:
        return "–" if x is None else f"{x:,.{nd}f}"

    lines = [
        "| runner | N | samples/s end to end | steady | per CPU-s | driver peak RSS (anon) MiB "
        "| largest Ray worker RSS (anon) MiB | store MB | seal s (CPU s) | seal peak RSS MiB "
        "| verify s (CPU s) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results.get("extraction", []), key=lambda r: (r["runner"], r["n"])):
        worker = (
            f"{f(r['max_worker_peak_rss_mb'], 0)} ({f(r['max_worker_peak_anon_mb'], 0)})"
            if r.get("max_worker_peak_rss_mb")
            else "–"
        )
        lines.append(
            f"| {r['runner']} | {r['n']:,} | {f(r['samples_per_s'])} | "
            f"{f(r.get('samples_per_s_steady'))} | {f(r.get('samples_per_cpu_s'))} | "
            f"{f(r['driver_extract_peak_rss_mb'], 0)} ({f(r.get('driver_peak_anon_mb_polled'), 0)}) | "
            f"{worker} | {f(r['store_bytes'] / 1e6)} | {f(r['seal_s'], 2)} "
            f"({f(r.get('seal_cpu_s'), 2)}) | {f(r['seal_peak_rss_mb'], 0)} | "
            f"{f(r['verify_s'], 2)} ({f(r.get('verify_cpu_s'), 2)}) | "
            f"{f(r.get('machine', {}).get('load_average_1min_at_end'))} |"
        )
    lines += [
        "",
        "| store | on disk | write s | seal s | seal RSS over before MiB | open s | open RSS MiB "
        "| gather µs | in-RAM baseline µs | gather / baseline | verify s | verify RSS over before MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(results.get("store", []), key=lambda c: (c["dim"], c["rows"])):
        lines.append(
            f"| {c['rows']:,} x {c['dim']:,} fp16 | {c['bytes_on_disk'] / 1e9:.2f} GB | "
            f"{f(c['write_s'])} | {f(c['seal_s'])} | {f(c['seal_rss_over_before_mb'], 0)} | "
            f"{f(c['open_s'], 3)} | {f(c['open_rss_mb'], 1)} | {f(c['gather_us'])} | "
            f"{f(c.get('baseline_ram_dict_ids_us'))} | {f(c.get('gather_vs_baseline'), 2)} | "
            f"{f(c['verify_s'])} | {f(c.get('verify_rss_over_before_mb'), 0)} |"
        )
    return "\n".join(lines)


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        with contextlib.suppress(ValueError):
            return json.loads(path.read_text())
    return {}


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


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
        results["goals"] = _goals(results.get("extraction", []))
        _save(args.out, results)
        plot(results, args.plot)
        print(json.dumps(results["goals"], indent=2))
        return

    if args.child:
        kind, job_path, out_path = args.child
        job = json.loads(Path(job_path).read_text())
        result = _child_extract(job) if kind == "extract" else _child_store(job)
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
                    _summarise_processes(res)
                    results["extraction"] = [
                        r for r in results["extraction"] if (r["runner"], r["n"]) != (runner, n)
                    ] + [res]
                    results["extraction"].sort(key=lambda r: (r["runner"], r["n"]))
                    results["goals"] = _goals(results["extraction"])
                    _save(args.out, results)
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
            _save(args.out, results)
            print(json.dumps(res), flush=True)
    finally:
        if not args.keep_data:
            shutil.rmtree(workdir / "tars", ignore_errors=True)
        if args.workdir is None and not args.keep_data:
            shutil.rmtree(workdir, ignore_errors=True)
    if results["extraction"]:
        plot(results, args.plot)
    _save(args.out, results)


if __name__ == "__main__":
    main()
