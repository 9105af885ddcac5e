"""Web scale (issue 22): a sealed group of N = 1M, 10M (100M) ids and what reading it costs.

For each N a store of N caption ids shaped like a webdataset's (``000123456789#3``: a 12-digit
``__key__`` and the caption number) and dim-8 fp16 unit rows is written through the real API
(``write_shard`` in shuffled shard order, 100 shards at every N, so that N is the one thing that
changes), then, each phase in a fresh child process:

* ``seal``: ``FeatureGroup.seal()``: wall time, CPU time, peak RSS (``VmHWM``);
* ``verify``: ``verify_group`` (hashes included): wall, CPU, peak RSS;
* ``read``: ``FeatureLookup.open``: time and the USS it adds (``/proc/self/smaps_rollup``),
  of the process's first open (which also imports) and of a second one; 4 forked
  ``DataLoader`` workers, each doing 10,000 batches of ``gather`` of 128 random ids (made per
  batch from random integers, as a webdataset stream hands keys in), their USS after the first
  and after the last batch (all workers at the same moment); then the open with the index file
  hidden (a group sealed by an older cusa), after the workers so that they fork from the same
  parent at every N; the median latency of ``gather`` of 128 random ids against the features in
  RAM as numpy plus a dict id -> row, of ``gather_rows`` against bare numpy row indexing (of
  the array in RAM, and of the mapped file itself), of the id lookup alone with and without
  the index's bucket table (``rows_only``, ``rows_binary_search``), and of ``gather`` from the
  run's smallest store (the reference), taking turns batch by batch so the load of the shared
  machine falls on all alike, each path on its own batches; the open's median against the
  reference's, the two taking turns: "flat in N" is judged on these same-process ratios, as
  runs minutes apart differ by the machine's load;
* bytes on disk per sample beyond the features.

Then, at the smallest N, the shard sweep: the same ids sealed from 1, 10, 100 and 1000 shards,
opened in turns in one process, with the seal's stamp of the commit records and with it removed
(a group sealed by an older cusa): what one shard adds to the open (``open_by_shards``).

The dict baseline needs a Python string and a dict entry per id (~15 GB at 100M): it runs up to
``--baseline-max`` ids (default 20M), and above that the results say it was not run; the open
of a group without its index file (which indexes every id in memory) likewise.

Run: ``python -m benchmarks.web_scale --sizes 1000000,10000000`` (``--workdir`` on a disk with
room: 100M rows need ~15 GB); ``--sizes '' --sweep-n 1000000`` runs the shard sweep alone.
``--keep DIR`` writes the store in ``DIR`` and keeps it: a later run with the same ``DIR``
reuses what was written (a 100M-row write takes ~5 minutes) and seals a hard-linked copy, so
the original stays unsealed. Writes ``benchmarks/results/web_scale.json``
(merged by N) and ``docs/img/web_scale.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    IMG_DIR,
    RESULTS_DIR,
    pyplot,
    save_figure,
    take_turns,
    versions,
    write_json,
)

DIM = 8
BATCH = 128
WORKERS = 4
WORKER_BATCHES = 10_000
#: Every N is written as this many shards, so that N is the one thing that changes between sizes;
#: what a shard adds to the open is measured apart (``--shard-sweep``).
SHARDS = 100
#: Shard counts of the open-cost sweep, at the smallest N of the run.
SHARD_SWEEP = "1,10,100,1000"
#: Opens per store, taking turns, for the open's median in the same process.
OPEN_REPS = 25
#: Above this many ids the baselines that hold every id in memory are not run.
BASELINE_MAX = 20_000_000
#: 10**12 keys; a prime multiplier scatters the keys of consecutive samples over them.
_KEY_MULT = 999_999_937
RESULT = RESULTS_DIR / "web_scale.json"
PLOT = IMG_DIR / "web_scale.png"


def sample_id(i: int) -> str:
    """The i-th synthetic caption id: ``<12-digit webdataset key>#<caption 0-4>``."""
    return f"{(i // 5) * _KEY_MULT % 10**12:012d}#{i % 5}"


def spec():
    """The synthetic teacher of the web-scale stores (dim 8, fp16)."""
    from cusa.store.spec import TeacherSpec

    return TeacherSpec(
        name="web-teacher",
        modality="text",
        model="bench/random-unit-vectors",
        weights_sha256="0" * 64,
        preprocessing={"kind": "none"},
        output_kind="sentence",
        dim=DIM,
        dtype="float16",
        normalized=True,
    )


def _uss_kib(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty", "Anonymous", "Rss", "Pss"):
                out[key] = int(rest.split()[0])
    out["USS"] = out["Private_Clean"] + out["Private_Dirty"]
    return out


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _group(root: str):
    from cusa.store import FeatureStore

    return FeatureStore.open(root).find_group("web", "train", "web-teacher")


# -- phases, each run in a fresh child process ----------------------------------------------------


def phase_write(root: str, n: int, shards: int = SHARDS) -> dict[str, Any]:
    from cusa.store import FeatureStore

    store = FeatureStore.open(root, create=True)
    group = store.group("web", "train", spec(), create=True)
    rng = np.random.default_rng(0)
    bounds = sorted({int(b) for b in np.linspace(0, n, min(shards, n) + 1)})
    t0 = time.perf_counter()
    for s in rng.permutation(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        feats = rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        group.write_shard(f"shard-{s:05d}", [sample_id(i) for i in range(lo, hi)], feats)
    return {"write_s": round(time.perf_counter() - t0, 2), "shards": len(bounds) - 1}


def phase_seal(root: str, n: int) -> dict[str, Any]:
    group = _group(root)
    t0, c0 = time.perf_counter(), _cpu_s()
    group.seal()
    return {
        "seal_s": round(time.perf_counter() - t0, 2),
        "seal_cpu_s": round(_cpu_s() - c0, 2),
        "seal_peak_rss_mib": round(_peak_rss_mib(), 1),
    }


def phase_verify(root: str, n: int) -> dict[str, Any]:
    from cusa.store.verify import verify_group

    group = _group(root)
    t0, c0 = time.perf_counter(), _cpu_s()
    report = verify_group(group, check_hashes=True)
    return {
        "verify_s": round(time.perf_counter() - t0, 2),
        "verify_cpu_s": round(_cpu_s() - c0, 2),
        "verify_peak_rss_mib": round(_peak_rss_mib(), 1),
        "verify_ok": report.ok,
        "verify_errors": report.errors[:3],
    }


def _median_us_interleaved(paths: dict[str, Any], batches: list[Any]) -> dict[str, float]:
    """Median µs per call of each ``name: fn(batch_index)``, taking turns over ``batches``
    (the first 20 turns warm up)."""
    times = take_turns(paths, len(batches), seed=11)
    return {name: round(statistics.median(t[20:]) / 1e3, 2) for name, t in times.items()}


def _open_medians_s(roots: dict[str, str], reps: int = OPEN_REPS) -> dict[str, float]:
    """Median seconds of ``FeatureLookup.open`` of each store, the stores taking turns in this
    one process (the machine's load falls on all alike)."""
    from cusa.store import FeatureLookup

    def opener(root: str) -> Any:
        return lambda _: FeatureLookup.open(
            root, dataset="web", split="train", teacher="web-teacher"
        )

    times = take_turns({name: opener(root) for name, root in roots.items()}, reps, seed=5)
    return {name: statistics.median(t) / 1e9 for name, t in times.items()}


def phase_open_sweep(roots: list[str]) -> dict[str, Any]:
    """The open of the same N ids in stores of different shard counts, in this one process."""
    med = _open_medians_s({str(i): r for i, r in enumerate(roots)})
    return {"open_median_s": [round(med[str(i)], 6) for i in range(len(roots))]}


def phase_read(
    root: str,
    n: int,
    worker_batches: int,
    reps: int,
    baseline_max: int = BASELINE_MAX,
    ref_root: str | None = None,
    ref_n: int = 0,
) -> dict[str, Any]:
    import torch

    class RandomGathers(torch.utils.data.IterableDataset):
        """An IterableDataset: each DataLoader worker gathers WORKER_BATCHES batches of random ids
        and yields its USS after the first and after the last batch."""

        def __init__(self, lookup: Any, n: int, batches: int) -> None:
            super().__init__()
            self.lookup, self.n, self.batches = lookup, n, batches
            # Every worker reads its USS at the same moment: a page of the mapped files counts
            # as private to a worker once the others that shared it have exited.
            self.done = mp.get_context("fork").Barrier(WORKERS)

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng(1000 + (info.id if info else 0))
            for k in range(self.batches):
                ids = [sample_id(int(i)) for i in rng.integers(0, self.n, BATCH)]
                self.lookup.gather(ids)
                if k == 0:
                    first = _uss_kib()
            self.done.wait(timeout=3600)
            yield {"worker": info.id if info else -1, "first": first, "last": _uss_kib()}

    from cusa.store import FeatureLookup
    from cusa.store.layout import ID_INDEX

    out: dict[str, Any] = {}
    group = _group(root)
    index_file = group.fs.local_path(f"{group.rel}/{ID_INDEX}")

    baselines = n <= baseline_max
    out["baselines_run"] = baselines
    # The first open of the process also imports what opening needs (zarr, fsspec, the index
    # module): timed apart, so that the figure below is the same later open at every N.
    u0, t0 = _uss_kib(), time.perf_counter()
    first = FeatureLookup.open(root, dataset="web", split="train", teacher="web-teacher")
    out["first_open_s"] = round(time.perf_counter() - t0, 4)
    out["first_open_uss_mib"] = round((_uss_kib()["USS"] - u0["USS"]) / 1024, 2)
    del first
    u0, t0 = _uss_kib(), time.perf_counter()
    lookup = FeatureLookup.open(root, dataset="web", split="train", teacher="web-teacher")
    out["open_s"] = round(time.perf_counter() - t0, 4)
    out["open_uss_mib"] = round((_uss_kib()["USS"] - u0["USS"]) / 1024, 2)
    out["index_bytes"] = os.path.getsize(index_file)

    # 4 forked DataLoader workers, 10,000 batches of 128 random ids each
    loader = torch.utils.data.DataLoader(
        RandomGathers(lookup, n, worker_batches),
        batch_size=None,
        num_workers=WORKERS,
        multiprocessing_context="fork",
    )
    t0 = time.perf_counter()
    workers = sorted(list(loader), key=lambda r: r["worker"])
    out["workers_s"] = round(time.perf_counter() - t0, 1)
    out["worker_batches"] = worker_batches
    out["workers"] = [
        {
            "worker": w["worker"],
            "uss_first_mib": round(w["first"]["USS"] / 1024, 1),
            "uss_last_mib": round(w["last"]["USS"] / 1024, 1),
            "uss_growth_mib": round((w["last"]["USS"] - w["first"]["USS"]) / 1024, 2),
            "private_dirty_growth_mib": round(
                (w["last"]["Private_Dirty"] - w["first"]["Private_Dirty"]) / 1024, 2
            ),
            # USS = dirty (copies, the heap) + clean (file pages of the maps only this worker
            # has touched: page cache, not copies)
            "private_dirty_last_mib": round(w["last"]["Private_Dirty"] / 1024, 1),
            "private_clean_last_mib": round(w["last"]["Private_Clean"] / 1024, 1),
        }
        for w in workers
    ]

    # a group sealed by an older cusa (no index file): the ids are read and indexed in RAM;
    # after the workers, so that they fork from the same parent at every N
    hidden = index_file + ".hidden"
    if baselines:
        os.rename(index_file, hidden)
    try:
        if baselines:
            u0, t0 = _uss_kib(), time.perf_counter()
            old = FeatureLookup.open(root, dataset="web", split="train", teacher="web-teacher")
            out["open_without_index_file_s"] = round(time.perf_counter() - t0, 3)
            out["open_without_index_file_uss_mib"] = round(
                (_uss_kib()["USS"] - u0["USS"]) / 1024, 1
            )
            del old
    finally:
        if baselines:
            os.rename(hidden, index_file)

    # Flat in N, measured in this one process against the run's smallest store (the reference;
    # at the smallest N, the store itself, read with other batches): separate runs minutes
    # apart differ by the shared machine's load as much as by N.
    ref_root, ref_n = ref_root or root, ref_n or n
    opens = _open_medians_s({"n": root, "ref": ref_root})
    out["ref_n"] = ref_n
    out["open_median_s"] = round(opens["n"], 6)
    out["ref_open_median_s"] = round(opens["ref"], 6)
    out["open_vs_ref"] = round(opens["n"] / opens["ref"], 2)
    ref = FeatureLookup.open(ref_root, dataset="web", split="train", teacher="web-teacher")

    # gather latency against what a user would otherwise write, in this run
    rng = np.random.default_rng(7)
    idx = [rng.integers(0, n, BATCH) for _ in range(reps)]
    batches = [[sample_id(int(i)) for i in b] for b in idx]
    ref_batches = [[sample_id(int(i)) for i in rng.integers(0, ref_n, BATCH)] for _ in idx]
    rows = [lookup.rows(b) for b in batches]
    u0 = _uss_kib()["USS"]
    t0 = time.perf_counter()
    ram = np.array(lookup.gather_rows(np.arange(n)))  # (N, DIM) the features in RAM
    mapped = lookup._single  # the sealed group's one map, set by the gather_rows above
    assert mapped is not None and not isinstance(mapped, np.memmap)
    # the same mapped index without its bucket table: what a binary search of the hashes costs
    from cusa.store.id_index import IdIndex

    index = lookup._id_index()
    searched = IdIndex(index.hashes, index.rows_of_hash, index.offsets, index.blob, index.max_run)
    paths = {
        "gather": lambda k: lookup.gather(batches[k]),
        "rows_binary_search": lambda k: searched.lookup(batches[k]),
        "gather_rows": lambda k: lookup.gather_rows(rows[k]),
        "numpy_rows": lambda k: ram[rows[k]],
        # the same rows of the mapped file itself (4 KiB pages, where numpy gives the array in
        # RAM transparent huge pages): what gather_rows is, less its method call
        "numpy_rows_of_the_map": lambda k: mapped[rows[k]],
        "rows_only": lambda k: lookup.rows(batches[k]),
        "gather_ref": lambda k: ref.gather(ref_batches[k]),
    }
    if baselines:
        row_of: dict[str, int] = {}
        for block in lookup.iter_ids():
            row_of.update(zip(block, range(len(row_of), len(row_of) + len(block)), strict=True))
        assert np.array_equal(lookup.gather(batches[0]), ram[[row_of[s] for s in batches[0]]])
        paths["dict_plus_numpy"] = lambda k: ram[np.array([row_of[s] for s in batches[k]])]
    out["baseline_build_s"] = round(time.perf_counter() - t0, 1)
    out["baseline_uss_mib"] = round((_uss_kib()["USS"] - u0) / 1024, 1)
    med = _median_us_interleaved(paths, batches)
    out["median_us"] = med
    if baselines:
        out["gather_vs_dict_plus_numpy"] = round(med["gather"] / med["dict_plus_numpy"], 2)
    out["gather_rows_vs_numpy_rows"] = round(med["gather_rows"] / med["numpy_rows"], 2)
    out["gather_vs_ref"] = round(med["gather"] / med["gather_ref"], 2)
    out["gather_rows_vs_numpy_rows_of_the_map"] = round(
        med["gather_rows"] / med["numpy_rows_of_the_map"], 2
    )
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


PHASES = {"seal": phase_seal, "verify": phase_verify}


def _child(phase: str, root: str, n: int, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.web_scale", "--child", phase, "--root", root]
    cmd += ["--sizes", str(n), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} at N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _written(n: int, shards: int, store: str, keep: str | None, extra: list[str]) -> dict:
    """Write the store of N ids in ``shards`` shards at ``store``; with ``keep``, once: a kept
    store of the same shard count is reused (its ``write.json``)."""
    written = os.path.join(keep, "write.json") if keep else None
    if written and os.path.exists(written):
        done = json.loads(Path(written).read_text())
        if done.get("shards") == min(shards, n):
            return {**done, "write_reused": True}
        shutil.rmtree(os.path.join(keep, "store"), ignore_errors=True)  # another shard count
        os.remove(written)
    out = _child("write", store, n, [*extra, "--shards", str(shards)])
    if written:
        Path(written).write_text(json.dumps({k: out[k] for k in ("write_s", "shards")}))
    return out


def _sealed_copy(n: int, shards: int, run_dir: str, keep: str | None, extra: list[str]):
    """``(what writing it took, root)`` of a store of N ids, sealed, in a new folder of
    ``run_dir``; with ``keep`` the store is written there once and a hard-linked copy sealed."""
    tmp = tempfile.mkdtemp(prefix=f"web-scale-{n}-{shards}-", dir=run_dir)
    root = os.path.join(tmp, "store")
    if keep:
        os.makedirs(keep, exist_ok=True)
        result = _written(n, shards, os.path.join(keep, "store"), keep, extra)
        # the parts' files are immutable, so hard links are enough
        subprocess.run(["cp", "-al", os.path.join(keep, "store"), root], check=True)
    else:
        result = _written(n, shards, root, None, extra)
    return result, root


def run_size(
    n: int, run_dir: str, keep: str | None, extra: list[str], ref: tuple[str, int] | None
) -> tuple[dict[str, Any], str]:
    """All phases at N; ``ref``: the reference store (root, N) the read phase compares with,
    None at the smallest N (the store itself). Returns the results and the sealed store."""
    result: dict[str, Any] = {"n": n, "dim": DIM, "dtype": "float16"}
    written, root = _sealed_copy(n, SHARDS, run_dir, keep, extra)
    result.update(written)
    print(f"N={n:,} write: done", file=sys.stderr, flush=True)
    for phase in ("seal", "verify", "read"):
        more = ["--ref", ref[0], "--ref-n", str(ref[1])] if ref and phase == "read" else []
        result.update(_child(phase, root, n, [*extra, *more]))
        print(f"N={n:,} {phase}: done", file=sys.stderr, flush=True)
    group = _group(root)
    total = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(group.fs.local_path(group.rel))
        for f in fs
    )
    result["bytes_on_disk"] = total
    result["bytes_per_sample_beyond_features"] = round((total - n * DIM * 2) / n, 1)
    result["index_bytes_per_sample"] = round(result["index_bytes"] / n, 1)
    return result, root


def _without_stamp(root: str) -> str:
    """A copy of the sealed store at ``root`` whose seal record lacks the commit records' stamp,
    as a group sealed by an older cusa is read: each record read. A real copy: a hard link to a
    record would change its change time, and so the original's stamp."""
    copy = f"{root}-without-stamp"
    shutil.copytree(root, copy, symlinks=True)
    group = _group(copy)
    path = group.fs.local_path(f"{group.rel}/sealed.json")
    record = json.loads(Path(path).read_text())
    record.pop("commits_stamp")
    Path(f"{path}.new").write_text(json.dumps(record))
    os.replace(f"{path}.new", path)
    return copy


def _fit(counts: list[int], seconds: list[float]) -> dict[str, float]:
    slope, intercept = np.polyfit(counts, seconds, 1)
    return {
        "us_per_shard": round(float(slope) * 1e6, 2),
        "ms_at_0": round(float(intercept) * 1e3, 3),
    }


def run_shard_sweep(
    n: int, counts: list[int], run_dir: str, keep: str | None, extra: list[str]
) -> dict[str, Any]:
    """The open of N ids sealed from 1, 10, 100, 1000 shards, with the seal's stamp of the commit
    records (one ``stat`` each) and without it (each record read and checked, as for a group
    sealed by an older cusa): what one shard adds, fitted by least squares."""
    counts = sorted({min(c, n) for c in counts})
    roots, old = [], []
    for c in counts:
        sub = os.path.join(keep, f"sweep-n{n}-s{c}") if keep else None
        _, root = _sealed_copy(n, c, run_dir, sub, extra)
        _child("seal", root, n, extra)
        roots.append(root)
        old.append(_without_stamp(root))
        print(f"shard sweep: {c} shard(s) sealed", file=sys.stderr, flush=True)
    med = _child("open-sweep", ",".join(roots + old), n, extra)["open_median_s"]
    stamped, unstamped = med[: len(counts)], med[len(counts) :]
    out: dict[str, Any] = {
        "n": n,
        "shards": counts,
        "open_median_ms": [round(m * 1e3, 3) for m in stamped],
        "open_median_ms_without_stamp": [round(m * 1e3, 3) for m in unstamped],
    }
    if len(counts) > 1:
        out["fit"] = _fit(counts, stamped)
        out["fit_without_stamp"] = _fit(counts, unstamped)
    return out


# -- report -------------------------------------------------------------------------------------


def _targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted(results, key=int)
    r = [results[s] for s in sizes]
    worst_growth = max(w["uss_growth_mib"] for x in r for w in x["workers"])
    with_baseline = [x for x in r if x.get("gather_vs_dict_plus_numpy") is not None]
    out: dict[str, Any] = {
        "worker_uss_growth_le_8mib_every_n": worst_growth <= 8,
        "worst_worker_uss_growth_mib": worst_growth,
        "gather_le_1_5x_dict_plus_numpy_where_it_fits": all(
            x["gather_vs_dict_plus_numpy"] <= 1.5 for x in with_baseline
        ),
        "dict_baseline_sizes": [x["n"] for x in with_baseline],
        "gather_rows_le_1_2x_numpy_rows_every_n": all(
            x["gather_rows_vs_numpy_rows"] <= 1.2 for x in r
        ),
        "gather_rows_le_1_2x_numpy_rows_of_the_map_every_n": all(
            x.get("gather_rows_vs_numpy_rows_of_the_map", float("inf")) <= 1.2 for x in r
        ),
    }
    if len(r) > 1:
        lo, hi = r[0], r[-1]
        ratio = hi["n"] / lo["n"]
        out["sizes_compared"] = [lo["n"], hi["n"]]
        # across runs: each N's own child process, minutes apart (the machine's load differs)
        out["open_s_ratio"] = round(hi["open_s"] / lo["open_s"], 2)
        # below 1 MiB a USS reading is the allocator's noise, so the ratio floors both at 1 MiB
        out["open_uss_ratio"] = round(max(hi["open_uss_mib"], 1) / max(lo["open_uss_mib"], 1), 2)
        out["gather_us_ratio"] = round(hi["median_us"]["gather"] / lo["median_us"]["gather"], 2)
        out["gather_rows_us_ratio"] = round(
            hi["median_us"]["gather_rows"] / lo["median_us"]["gather_rows"], 2
        )
        out["worker_uss_last_ratio"] = round(
            max(w["uss_last_mib"] for w in hi["workers"])
            / max(w["uss_last_mib"] for w in lo["workers"]),
            2,
        )
        if all("private_dirty_last_mib" in w for x in (lo, hi) for w in x["workers"]):
            out["worker_private_dirty_last_ratio"] = round(
                max(w["private_dirty_last_mib"] for w in hi["workers"])
                / max(w["private_dirty_last_mib"] for w in lo["workers"]),
                2,
            )
            out["memory_flat_within_1_3x"] = (
                out["open_uss_ratio"] <= 1.3 and out["worker_private_dirty_last_ratio"] <= 1.3
            )
        out["seal_cpu_vs_linear"] = round(hi["seal_cpu_s"] / lo["seal_cpu_s"] / ratio, 2)
        out["verify_cpu_vs_linear"] = round(hi["verify_cpu_s"] / lo["verify_cpu_s"] / ratio, 2)
        # in the same process: the largest N against the smallest, taking turns
        if "open_vs_ref" in hi and hi.get("ref_n") == lo["n"]:
            out["open_vs_smallest_same_process"] = hi["open_vs_ref"]
            out["gather_vs_smallest_same_process"] = hi["gather_vs_ref"]
            out["open_gather_flat_within_1_3x"] = (
                hi["open_vs_ref"] <= 1.3 and hi["gather_vs_ref"] <= 1.3
            )
        out["seal_verify_within_1_3x_of_linear"] = (
            out["seal_cpu_vs_linear"] <= 1.3 and out["verify_cpu_vs_linear"] <= 1.3
        )
    at_100m = results.get(str(100_000_000))
    if at_100m:
        out["open_le_0_5s_at_100m"] = at_100m["open_s"] <= 0.5
        out["open_le_64mib_at_100m"] = at_100m["open_uss_mib"] <= 64
        out["seal_peak_rss_le_4gb_at_100m"] = at_100m["seal_peak_rss_mib"] <= 4096
        out["verify_peak_rss_le_4gb_at_100m"] = at_100m["verify_peak_rss_mib"] <= 4096
    else:
        out["at_100m"] = "not measured"
    return out


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The table docs/scale.md shows, rendered from the results (``--tables``)."""
    rows = [
        "| N | open s (USS MiB) | open without index file s (USS MiB) | worker USS growth MiB, "
        "max of 4 (private dirty) | gather µs vs dict + numpy | open, gather vs 1M in the same "
        "process | gather_rows µs vs numpy rows in RAM (of the map) | "
        "seal s (CPU s), peak RSS MiB | verify s (CPU s), peak RSS MiB | bytes/sample beyond "
        "features (index) | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(results, key=int):
        x = results[key]
        m = x["median_us"]
        growth = max(w["uss_growth_mib"] for w in x["workers"])
        dirty = max(w["private_dirty_growth_mib"] for w in x["workers"])
        if "open_without_index_file_s" in x:
            old = (
                f"{x['open_without_index_file_s']:.1f} ({x['open_without_index_file_uss_mib']:.0f})"
            )
        else:
            old = "not run"
        if "dict_plus_numpy" in m:
            gather = (
                f"{m['gather']:.0f} vs {m['dict_plus_numpy']:.0f} "
                f"({x['gather_vs_dict_plus_numpy']:.2f}×)"
            )
        else:
            gather = f"{m['gather']:.0f} (dict not run)"
        of_map = ""
        if "numpy_rows_of_the_map" in m:
            of_map = (
                f" ({m['numpy_rows_of_the_map']:.1f}, "
                f"{x['gather_rows_vs_numpy_rows_of_the_map']:.2f}×)"
            )
        rows.append(
            f"| {x['n']:,} | {x['open_s']:.3f} ({x['open_uss_mib']:.1f}) | {old} | "
            f"{growth:.2f} ({dirty:.2f}) | {gather} | "
            f"{x['open_vs_ref']:.2f}×, {x['gather_vs_ref']:.2f}× | {m['gather_rows']:.1f} vs "
            f"{m['numpy_rows']:.1f} ({x['gather_rows_vs_numpy_rows']:.2f}×)"
            f"{of_map} | "
            f"{x['seal_s']:.1f} ({x['seal_cpu_s']:.1f}), {x['seal_peak_rss_mib']:,.0f} | "
            f"{x['verify_s']:.1f} ({x['verify_cpu_s']:.1f}), {x['verify_peak_rss_mib']:,.0f} | "
            f"{x['bytes_per_sample_beyond_features']:.1f} ({x['index_bytes_per_sample']:.1f}) | "
            f"{x['load_average_1min']:.1f} |"
        )
    return "\n".join(rows)


def plot(
    results: dict[str, dict[str, Any]], path: Path, sweep: dict[str, Any] | None = None
) -> None:
    plt = pyplot()
    sizes = sorted(results, key=int)
    ns = [int(s) for s in sizes]
    r = [results[s] for s in sizes]
    fig, axes = plt.subplots(1, 4 if sweep else 3, figsize=(17 if sweep else 13, 3.8))
    ax = axes[0]
    ax.plot(ns, [x["open_s"] for x in r], "o-", label="open, id index mapped")
    old = [x for x in r if "open_without_index_file_s" in x]
    ax.plot(
        [x["n"] for x in old],
        [x["open_without_index_file_s"] for x in old],
        "s--",
        label="open, no index file",
    )
    ax.set(xscale="log", yscale="log", xlabel="N ids", ylabel="seconds", title="open time")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(ns, [x["open_uss_mib"] for x in r], "o-", label="opening process (index mapped)")
    ax.plot(
        [x["n"] for x in old],
        [x["open_without_index_file_uss_mib"] for x in old],
        "s--",
        label="no index file",
    )
    dict_runs = [x for x in r if "dict_plus_numpy" in x["median_us"]]
    ax.plot(
        [x["n"] for x in dict_runs],
        [x["baseline_uss_mib"] for x in dict_runs],
        "^:",
        label="numpy + dict baseline",
    )
    ax.plot(
        ns,
        [max(w["private_dirty_growth_mib"] for w in x["workers"]) for x in r],
        "d-",
        label=f"worst worker, private dirty growth over {r[0]['worker_batches']:,} batches",
    )
    ax.set(xscale="log", yscale="symlog", xlabel="N ids", ylabel="MiB private (USS)")
    ax.set_title("private memory")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(ns, [x["median_us"]["gather"] for x in r], "o-", label="gather(ids)")
    ax.plot(
        [x["n"] for x in dict_runs],
        [x["median_us"]["dict_plus_numpy"] for x in dict_runs],
        "^:",
        label="dict + numpy",
    )
    ax.plot(ns, [x["median_us"]["gather_rows"] for x in r], "o-", label="gather_rows(rows)")
    ax.plot(ns, [x["median_us"]["numpy_rows"] for x in r], "^:", label="numpy rows (in RAM)")
    of_map = [x for x in r if "numpy_rows_of_the_map" in x["median_us"]]
    ax.plot(
        [x["n"] for x in of_map],
        [x["median_us"]["numpy_rows_of_the_map"] for x in of_map],
        "v:",
        label="numpy rows (of the map)",
    )
    ax.set(xscale="log", yscale="log", xlabel="N ids", ylabel="median µs / 128 ids")
    ax.set_title("gather latency")
    ax.legend(fontsize=8)
    if sweep:
        ax = axes[3]
        ax.plot(sweep["shards"], sweep["open_median_ms"], "o-", label="stamp of the records")
        ax.plot(
            sweep["shards"],
            sweep["open_median_ms_without_stamp"],
            "s--",
            label="without it (each record read)",
        )
        ax.set(xscale="log", yscale="log", xlabel="shards (commit records)", ylabel="median ms")
        ax.set_title(f"open of {sweep['n']:,} ids by shard count")
        ax.legend(fontsize=8)
    fig.suptitle("A sealed group of N caption ids (dim 8, fp16) on 2 shared CPU cores")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker-batches", type=int, default=WORKER_BATCHES)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--baseline-max", type=int, default=BASELINE_MAX)
    ap.add_argument("--keep", default=None, help="write the store here once and reuse it")
    ap.add_argument("--out", type=Path, default=RESULT, help="results file (merged by N)")
    ap.add_argument("--tables", action="store_true", help="print the docs table and exit")
    ap.add_argument("--plot", action="store_true", help="redraw the plot from the results")
    ap.add_argument(
        "--shard-sweep",
        default=SHARD_SWEEP,
        help="shard counts of the open-cost sweep at the smallest N ('' skips it)",
    )
    ap.add_argument(
        "--sweep-n",
        type=int,
        default=0,
        help="N of the shard sweep (default: the smallest of --sizes); with --sizes '' only it runs",
    )
    ap.add_argument(
        "--child", choices=["write", *PHASES, "read", "open-sweep"], help=argparse.SUPPRESS
    )
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=SHARDS, help=argparse.SUPPRESS)
    ap.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref-n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    plot_path = PLOT if args.out == RESULT else args.out.with_suffix(".png")
    if args.tables:
        print(markdown_table(json.loads(args.out.read_text())["results"]))
        return
    if args.plot:
        data = json.loads(args.out.read_text())
        plot(data["results"], plot_path, data.get("open_by_shards"))
        return
    if args.child:
        n = int(args.sizes)
        if args.child == "read":
            out = phase_read(
                args.root, n, args.worker_batches, args.reps, args.baseline_max,
                args.ref, args.ref_n,
            )  # fmt: skip
        elif args.child == "open-sweep":
            out = phase_open_sweep(args.root.split(","))
        elif args.child == "write":
            out = phase_write(args.root, n, args.shards)
        else:
            out = PHASES[args.child](args.root, n)
        print(json.dumps(out))
        return
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = data.get("results", {})
    extra = ["--worker-batches", str(args.worker_batches), "--reps", str(args.reps)]
    extra += ["--baseline-max", str(args.baseline_max)]
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="web-scale-", dir=args.workdir or args.keep)
    try:
        ref: tuple[str, int] | None = None
        for n in sizes:
            keep = os.path.join(args.keep, f"n{n}") if args.keep else None
            results[str(n)], root = run_size(n, run_dir, keep, extra, ref)
            if ref is None:  # the smallest store stays, as the others' reference
                ref = (root, n)
            else:
                shutil.rmtree(os.path.dirname(root), ignore_errors=True)
            data = {
                **data,
                "benchmark": "web_scale",
                "config": {
                    "dim": DIM,
                    "batch": BATCH,
                    "workers": WORKERS,
                    "shards": SHARDS,
                    "ids": "caption ids <12-digit webdataset key>#<0-4>",
                    "cpus": os.cpu_count(),
                },
                "versions": versions(),
                "results": results,
                "targets": _targets(results),
            }
            write_json(args.out, data)
        counts = [int(c) for c in args.shard_sweep.split(",") if c.strip()]
        if counts:
            at = args.sweep_n or (sizes[0] if sizes else 1_000_000)
            data["open_by_shards"] = run_shard_sweep(at, counts, run_dir, args.keep, extra)
            write_json(args.out, data)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    plot(results, plot_path, data.get("open_by_shards"))
    print(json.dumps(data.get("targets"), indent=2))


if __name__ == "__main__":
    main()
