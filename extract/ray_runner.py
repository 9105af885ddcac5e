"""The Ray runner: Ray Data streams shards through CPU read tasks and teacher actor pools.

1. ``flat_map`` reads and prepares each shard in CPU tasks, emitting fixed batches (see batches.py).
2. Each teacher runs in an actor pool (``map_batches`` with a callable class). On GPU nodes an
   actor takes a GPU share; on CPU-only nodes actors take *fractional* CPUs sized from the
   cluster, leaving room for the read tasks (whole-CPU actors on a 2-core machine starve the
   readers and the job deadlocks; ``plan_resources`` sizes them, tests/extract/test_plan_resources.py).
3. The driver consumes the stream with backpressure and commits each complete shard.

``--ray-address`` joins an existing cluster; the store must then be a path or URL every node
and the driver can reach (shared filesystem or object storage).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigError, CusaError
from ..readers.base import DatasetReader, ShardRef
from .batches import (
    RunnerJob,
    WorkRow,
    array_to_bytes,
    bytes_to_array,
    encode_row,
    load_teachers,
    prepare_shard,
)
from .job import END, IMAGE, TEXT, ExtractConfig, RowKind
from .teachers.base import Preparer

log = logging.getLogger(__name__)


class RayRunError(CusaError, RuntimeError):
    """The Ray job failed; committed shards are kept and a re-run resumes after them."""


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error (e.g. a DatasetError raised by a reader)."""
    seen = 0
    while seen < 8:
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc:
            return exc
        if isinstance(inner, CusaError) and not hasattr(inner, "cause"):
            return inner
        exc, seen = inner, seen + 1
    return exc


@dataclass(frozen=True)
class ActorPlan:
    """Resources of one teacher's actor pool and of the read tasks."""

    actors: int
    num_cpus: float
    num_gpus: float
    read_cpus: float
    torch_threads: int


def plan_resources(resources: dict[str, float], n_teachers: int, actors: int | None) -> ActorPlan:
    """Size actor pools from the cluster's resources.

    On GPUs: one actor per GPU per teacher (sharing a GPU between the two teachers).
    On CPUs: half the CPUs go to teacher actors, the rest to read/prepare tasks, and every
    request is fractional so that no pool can hold all cores.
    """
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    if gpus >= 1:
        per_gpu = 1.0 / n_teachers
        n = actors or max(1, int(gpus))
        return ActorPlan(
            n,
            num_cpus=min(1.0, cpus / (2 * n * n_teachers)),
            num_gpus=per_gpu,
            read_cpus=0.5,
            torch_threads=max(1, int(cpus // (n * n_teachers + 1))),
        )
    budget = cpus / 2
    n = actors or max(1, int(budget // n_teachers))
    share = budget / (n * n_teachers)
    return ActorPlan(
        n,
        num_cpus=round(min(share, 1.0), 3),
        num_gpus=0.0,
        read_cpus=round(max(min(cpus / 4, 1.0), 0.25), 3),
        torch_threads=max(1, math.floor(cpus / (n * n_teachers))),
    )


class _ReadPrepare:
    """Picklable read+prepare step; teachers are rebuilt without weights-heavy state per task."""

    def __init__(
        self, reader: DatasetReader, preparers: Mapping[RowKind, Preparer], batch_size: int
    ) -> None:
        self.reader = reader
        self.preparers = preparers
        self.batch_size = batch_size

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        shard = ShardRef(item["key"], item["source"], item.get("num_samples"))
        rows = prepare_shard(
            self.reader, shard, self.preparers.get(IMAGE), self.preparers.get(TEXT), self.batch_size
        )
        return [r.to_dict() for r in rows]


class _TeacherActor:
    """Holds one teacher on its worker and encodes rows of its modality; others pass through."""

    def __init__(self, config: ExtractConfig, modality: RowKind, torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.modality = modality
        sub = replace(config, modalities=(modality,))
        self.teacher = load_teachers(sub)[modality]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {k: [] for k in (*batch.keys(), "features", "seconds")}
        n = len(batch["shard"])
        for i in range(n):
            row = {k: batch[k][i] for k in batch if k not in ("features", "seconds")}
            feats, secs = b"", 0.0
            if row["kind"] == self.modality:
                arr, secs = encode_row(WorkRow.from_dict(row), self.teacher)
                feats = array_to_bytes(arr)
            for k, v in row.items():
                out[k].append(v)
            prev_feats = batch["features"][i] if "features" in batch else b""
            prev_secs = float(batch["seconds"][i]) if "seconds" in batch else 0.0
            out["features"].append(feats or prev_feats)
            out["seconds"].append(secs or prev_secs)
        return {k: [_plain(x) for x in v] for k, v in out.items()}


def _plain(x: Any) -> Any:
    # Ray hands list columns back as numpy arrays; turn them into lists for Arrow.
    import numpy as np

    if isinstance(x, np.ndarray) and x.dtype == object:
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


@contextlib.contextmanager
def _stderr_to_log(quiet: bool) -> Iterator[None]:
    """Keep what Ray's C++ core prints straight to file descriptor 2 while it starts (e.g.
    ``Set ray log level ...``) out of cusa's output; it is logged at DEBUG instead."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("Ray start-up output:\n%s", text)


def init_ray(address: str | None) -> Any:
    """Start (or join) Ray with its own messages kept out of cusa's output.

    Ray's Python loggers are set to ERROR (its token-authentication notice and Ray Data's
    "Progress bars disabled" are warnings) and its C++ core to FATAL (it prints notices about
    actor restarts straight to stderr); failures still reach the user as one-line errors. With
    ``-v`` (DEBUG logging) Ray keeps its usual verbosity. ``RAY_BACKEND_LOG_LEVEL`` set by the
    user is respected.
    """
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is an extra of ray: ray[data])
    except ImportError as exc:
        raise ConfigError(
            "--runner ray needs Ray Data: pip install 'cusa[ray]' (or use --runner local)"
        ) from exc
    quiet = not log.isEnabledFor(logging.DEBUG)
    level = logging.ERROR if quiet else logging.WARNING
    if quiet:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    logging.getLogger("ray").setLevel(level)
    if not ray.is_initialized():
        with _stderr_to_log(quiet):
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=level)
            else:
                ray.init(
                    include_dashboard=False,
                    log_to_driver=False,
                    num_cpus=os.cpu_count(),
                    logging_level=level,
                )
    # Ray Data logs every execution plan at INFO; our own summary and progress say enough.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    return ray


def run_ray(job: RunnerJob) -> None:
    """Stream the job's shards through Ray Data and commit each one as it completes."""
    config, shards, teachers, writer, summary = (
        job.config, job.shards, job.teachers, job.writer, job.summary
    )  # fmt: skip
    ray = init_ray(config.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False

    modalities = list(config.teacher_names())
    plan = plan_resources(ray.cluster_resources(), len(modalities), config.actors_per_teacher)
    log.info("ray plan: %s", plan)
    # Read tasks need only each teacher's cheap, picklable preprocessing, not its weights.
    preparers = {k: t.preparer() if hasattr(t, "preparer") else t for k, t in teachers.items()}

    items = [{"key": s.key, "source": s.source, "num_samples": s.num_samples} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(
        _ReadPrepare(job.reader, preparers, config.batch_size), num_cpus=plan.read_cpus
    )
    for modality in modalities:
        ds = ds.map_batches(
            _TeacherActor,
            fn_constructor_args=(config, modality, plan.torch_threads),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
        )
    try:
        for row in ds.iter_rows():
            kind, shard = RowKind(row["kind"]), str(row["shard"])
            if kind == END:
                writer.add_end(shard, str(row["meta"]))
                continue
            feats = bytes_to_array(bytes(row["features"]))
            ids = [str(i) for i in row["ids"]]
            summary.add_stage(f"{kind} teacher", float(row["seconds"]), len(ids))
            job.progress.advance(f"{kind} teacher", len(ids))
            writer.add_features(shard, kind, int(row["seq"]), ids, feats)
    except Exception as exc:
        inner = _unwrap(exc)
        if isinstance(inner, CusaError) and inner is not exc:
            raise inner from None  # a reader's or the store's own one-line error
        if isinstance(exc, CusaError) and not hasattr(exc, "cause"):
            raise
        first = " ".join(str(inner).split())[:300] or type(inner).__name__
        raise RayRunError(
            f"the Ray job failed after committing {summary.shards_done} shard(s) "
            f"({type(inner).__name__}: {first}); committed shards are kept — re-run the same "
            "command to resume (or use --runner local)"
        ) from exc
    if writer.in_flight:
        log.warning(
            "%d shard(s) did not complete in this run; re-run to finish them", writer.in_flight
        )


__all__ = ["ActorPlan", "init_ray", "plan_resources", "run_ray"]
