"""``extract(config)``: run teachers over a dataset and fill the store, resumably.

The runner wires reader -> prepare -> teachers -> writer and times each stage. Shards whose
groups are all committed are skipped before their input is read, so a re-run after a crash
(or ``kill -9``) only does the missing work; sealing at the end makes the final store the same
whatever happened before.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StoreError
from ..readers import DATASETS, open_dataset
from ..readers.base import ShardRef
from ..readers.registry import check_dataset_name
from ..store import FeatureGroup, FeatureStore
from ..store.layout import DTYPES
from ..teacher_defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from .progress import NullProgress, ProgressSink
from .ray_runner import run_ray
from .teachers.base import Teacher
from .work import (
    END,
    IMAGE,
    TEXT,
    encode_row,
    load_teachers,
    prepare_shard,
)
from .writer import ShardStats, ShardWriter

log = logging.getLogger(__name__)

MODALITIES = (IMAGE, TEXT)
RUNNERS = ("auto", "local", "ray")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
#: ``--runner auto`` picks Ray on a GPU machine only from this many images on: below it, starting
#: Ray, its actors and a second copy of each teacher costs more than parallel decoding saves
#: (measured in ``benchmarks/runner_auto.py`` -> ``benchmarks/results/runner_auto.json``).
RAY_MIN_IMAGES = 20_000


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction job; validated on construction.

    Args:
        dataset: a registered dataset name (``coco``, ``coco-sample``...) or a path/URL (a
            folder, its index file such as ``new_test.json``, tars, ``s3://``, ``pipe:``).
        root: dataset root directory (or its index file) for registered names that need one.
        split: dataset split; ``None``: the split an index file names (``new_test.json`` ->
            ``test``), else ``train``.
        name: the dataset's name in the store (``<store>/<name>/<split>/...``); default: the
            reader's own (``albef``, ``coco``, the source named by a ``manifest.json``). Two
            folders of one layout need different names to share a split in one store.
        store: store directory or URL (default ``$CUSA_HOME/store``).
        image_teacher / text_teacher: registered teacher names; the defaults are the paper's
            teachers, named in :mod:`cusa.teacher_defaults`.
        modalities: which of ``image``/``text`` to extract.
        image_teacher_weights: explicit weights file for the image teacher.
        allow_unofficial_weights: accept an explicit weights file whose SHA-256 is not the
            official one (a checkpoint of your own); the spec records its real hash.
        dtype: stored feature dtype (``float16`` or ``float32``).
        batch_size: teacher batch size.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        runner: ``auto`` (see :func:`choose_runner`), ``local`` or ``ray``.
        ray_address: join this Ray cluster instead of starting a local one.
        actors_per_teacher: Ray actor pool size per teacher (default: from cluster resources).
        max_failures: failed samples tolerated before the job reports failure.
        shard_size: images per shard for JSON datasets.
        raw_captions: encode captions as given, without the official normalisation.
        storage_options: fsspec options for a remote store.
        allow_outside_root: read dataset files outside the dataset root (absolute or ``../``
            image paths, symlinks leading out, tars a ``manifest.json`` names elsewhere); off
            by default, so such samples are ledgered and such manifests refused.
    """

    dataset: str
    root: str | None = None
    split: str | None = "train"
    store: str | None = None
    image_teacher: str = DEFAULT_IMAGE_TEACHER
    text_teacher: str = DEFAULT_TEXT_TEACHER
    modalities: tuple[str, ...] = MODALITIES
    image_teacher_weights: str | None = None
    allow_unofficial_weights: bool = False
    dtype: str = "float16"
    batch_size: int = 64
    device: str = "auto"
    runner: str = "auto"
    ray_address: str | None = None
    actors_per_teacher: int | None = None
    max_failures: int = 0
    shard_size: int | None = None
    raw_captions: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    allow_outside_root: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ConfigError(
                f"--modalities {','.join(self.modalities)!r} is invalid; use a comma-separated "
                f"subset of {','.join(MODALITIES)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is invalid; use float16 or float32")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} is invalid; it must be at least 1")
        if self.runner not in RUNNERS:
            raise ConfigError(
                f"--runner {self.runner!r} is invalid; use one of {', '.join(RUNNERS)}"
            )
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures {self.max_failures} is invalid; it must be >= 0")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"--shard-size {self.shard_size} is invalid; it must be at least 1")
        if self.actors_per_teacher is not None and self.actors_per_teacher < 1:
            raise ConfigError(
                f"--actors {self.actors_per_teacher} is invalid; it must be at least 1"
            )
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(
                f"--device {self.device!r} is invalid; use auto, cpu, cuda, cuda:N or mps"
            )
        if self.name is not None:
            check_dataset_name(self.name)

    def teacher_names(self) -> dict[str, str]:
        names = {IMAGE: self.image_teacher, TEXT: self.text_teacher}
        return {m: names[m] for m in MODALITIES if m in self.modalities}


@dataclass(frozen=True)
class RunnerChoice:
    """Which runner a job uses and why (printed by the CLI, kept in the summary)."""

    runner: str
    reason: str


def _ray_installed() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def visible_gpus(device: str = "auto") -> int:
    """CUDA devices this job may use: none for ``--device cpu``/``mps``, else what torch sees."""
    if device in ("cpu", "mps"):
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_runner(
    config: ExtractConfig,
    num_images: int | None,
    *,
    gpus: int | None = None,
    ray_installed: bool | None = None,
) -> RunnerChoice:
    """Decide ``--runner auto``: local unless a cluster is given or Ray pays off.

    - ``--runner local|ray``: as given.
    - ``--ray-address``: Ray (the job is meant for that cluster).
    - Ray not installed, no GPU visible (or ``--device cpu``), or fewer than
      :data:`RAY_MIN_IMAGES` images: local. On one machine's CPUs the teachers are the
      bottleneck, torch already uses every core in-process, and Ray only adds its start-up, a
      second copy of each teacher and fractional-CPU actors (``benchmarks/results/runner_auto.json``).
    - Otherwise (GPUs and a large or unknown-size job): Ray, whose parallel CPU read tasks keep
      the GPUs fed where the local runner's single reader thread would not.

    Args:
        num_images: images in the job (``None`` when unknown, e.g. bare tars).
        gpus / ray_installed: override the probes (for tests).
    """
    if config.runner != "auto":
        return RunnerChoice(config.runner, f"--runner {config.runner} was given")
    ray_ok = _ray_installed() if ray_installed is None else ray_installed
    if config.ray_address:
        if not ray_ok:
            raise ConfigError(
                f"--ray-address {config.ray_address!r} needs Ray Data: pip install 'cusa[ray]', "
                "or drop --ray-address to run locally"
            )
        return RunnerChoice("ray", f"--ray-address {config.ray_address} was given")
    if not ray_ok:
        return RunnerChoice("local", "Ray is not installed (pip install 'cusa[ray]' for clusters)")
    if config.device in ("cpu", "mps"):
        n_gpus = 0
    else:
        n_gpus = visible_gpus(config.device) if gpus is None else gpus
    if n_gpus == 0:
        why = "--device cpu was given" if config.device == "cpu" else "no GPU is visible"
        return RunnerChoice(
            "local",
            f"{why} and no cluster (--ray-address) was given: on one machine's CPUs the local "
            "runner is faster than Ray; pass --runner ray to force it",
        )
    if num_images is not None and num_images < RAY_MIN_IMAGES:
        return RunnerChoice(
            "local",
            f"a small job ({num_images:,} images, under {RAY_MIN_IMAGES:,}): starting Ray costs "
            "more than it saves; pass --runner ray to force it",
        )
    size = "an unknown number of" if num_images is None else f"{num_images:,}"
    return RunnerChoice(
        "ray",
        f"{n_gpus} GPU(s) and {size} images: Ray decodes in parallel CPU tasks while the "
        "teachers run on the GPUs; pass --runner local to avoid Ray",
    )


def job_images(shards: list[ShardRef]) -> int | None:
    """Images in ``shards`` when every shard knows its size, else ``None``."""
    if all(s.num_samples is not None for s in shards):
        return sum(int(s.num_samples or 0) for s in shards)
    return None


def dataset_source(config: ExtractConfig, reader: Any) -> dict[str, Any]:
    """How to open this dataset again (recorded in each group for ``cusa report``).

    Local paths are made absolute; names, URLs and ``pipe:`` commands are kept as given.
    """

    def absolute(value: str | None) -> str | None:
        if value is None or "://" in value or value.startswith("pipe:") or "{" in value:
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    spec = config.dataset if config.dataset in DATASETS else absolute(config.dataset)
    return {
        "dataset": spec,
        "root": absolute(config.root),
        "split": reader.split,
        "shard_size": config.shard_size,
        "reader": type(reader).__name__,
    }


@dataclass
class ExtractSummary:
    """What a run did; ``ok`` is False when more samples failed than ``max_failures`` allows."""

    dataset: str
    split: str
    runner: str
    store: str
    groups: dict[str, str]
    runner_reason: str = ""
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_items: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    sealed: bool = False
    max_failures: int = 0

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def ok(self) -> bool:
        return self.total_failed <= self.max_failures

    def throughput(self) -> dict[str, float]:
        """Items per busy second for each stage."""
        return {
            stage: self.stage_items.get(stage, 0) / secs
            for stage, secs in self.stage_seconds.items()
            if secs > 0
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["throughput"] = self.throughput()
        return d

    def record(self, stats: ShardStats) -> None:
        self.shards_done += 1
        for kind, n in stats.rows.items():
            self.rows[kind] = self.rows.get(kind, 0) + n
            self.failed[kind] = self.failed.get(kind, 0) + stats.failed[kind]
        timing = stats.meta.get("timing", {})
        counts = stats.meta.get("counts", {})
        self.add_stage("read", timing.get("read_s", 0.0), counts.get("read", 0))
        self.add_stage("decode", timing.get("prepare_s", 0.0), counts.get("read", 0))
        self.add_stage("write", timing.get("write_s", 0.0), sum(stats.rows.values()))

    def add_stage(self, stage: str, seconds: float, items: int) -> None:
        """Add busy time and items to a stage (read, decode, image/text teacher, write)."""
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.stage_items[stage] = self.stage_items.get(stage, 0) + items


def open_groups(
    config: ExtractConfig, reader: Any, specs: dict[str, Any]
) -> tuple[FeatureStore, dict[str, FeatureGroup]]:
    """Open (or create) one store group per modality; refuses a differing spec or manifest."""
    try:
        store = FeatureStore.open(config.store, create=True, storage_options=config.storage_options)
        groups = {}
        source = dataset_source(config, reader)
        for kind, spec in specs.items():
            # Per modality: a caption edit concerns the text group only, not the image group.
            info = reader.manifest_info(modality=kind) if hasattr(reader, "manifest_info") else None
            manifest_hash = info["hash"] if info else reader.manifest_hash()
            groups[kind] = store.group(
                reader.name,
                reader.split,
                spec,
                manifest_hash,
                create=True,
                manifest_info=info,
                source=source,
            )
    except StoreError:
        raise
    except OSError as exc:
        if isinstance(exc, ConnectionError | TimeoutError):
            raise
        where = config.store or "the default store ($CUSA_HOME/store)"
        raise StoreError(
            f"cannot create or open the feature group in {where!r}: {exc}; check that the store "
            "is writable (not read-only, enough space, permissions), or pass another --store"
        ) from exc
    return store, groups


def pending_shards(shards: list[ShardRef], groups: dict[str, FeatureGroup]) -> list[ShardRef]:
    """Shards that some group has not committed yet; checked per shard, no id sets held."""
    return [s for s in shards if not all(g.is_committed(s.key) for g in groups.values())]


def extract(
    config: ExtractConfig,
    progress: ProgressSink | None = None,
    on_runner: Callable[[RunnerChoice], None] | None = None,
) -> ExtractSummary:
    """Run the extraction job described by ``config``.

    Args:
        progress: receives progress events (the CLI draws them).
        on_runner: called once with the runner chosen and why, before any model is loaded.

    Returns:
        The run summary. Per-sample failures are in each group's ledger, never dropped.
    """
    t_start = time.perf_counter()
    progress = progress or NullProgress()
    options: dict[str, Any] = {"allow_outside_root": True} if config.allow_outside_root else {}
    reader = open_dataset(
        config.dataset,
        root=config.root,
        split=config.split,
        shard_size=config.shard_size,
        name=config.name,
        **options,
    )
    shards = reader.shards()
    choice = choose_runner(config, job_images(shards))
    runner = choice.runner
    if on_runner is not None:  # the caller reports the choice (the CLI prints it once)
        on_runner(choice)
    else:
        log.info("runner: %s (%s)", runner, choice.reason)
    teachers = load_teachers(config, device="cpu" if runner == "ray" else None)
    store, groups = open_groups(config, reader, {k: t.spec for k, t in teachers.items()})
    todo = pending_shards(shards, groups)
    summary = ExtractSummary(
        dataset=reader.name,
        split=reader.split,
        runner=runner,
        runner_reason=choice.reason,
        store=store.url,
        groups={k: g.url for k, g in groups.items()},
        shards_total=len(shards),
        shards_skipped=len(shards) - len(todo),
        max_failures=config.max_failures,
    )
    log.info(
        "%s/%s: %d shard(s), %d already committed, %d to do (runner=%s)",
        reader.name,
        reader.split,
        len(shards),
        summary.shards_skipped,
        len(todo),
        runner,
    )
    known = sum(s.num_samples or 0 for s in todo) if all(s.num_samples for s in todo) else None
    progress.start(
        {
            "read": known,
            "decode": known,
            **({f"{k} teacher": None for k in teachers}),
            "write": len(todo),
        }
    )

    def on_commit(stats: ShardStats) -> None:
        summary.record(stats)
        progress.advance("read", stats.meta.get("counts", {}).get("read", 0))
        progress.advance("decode", stats.meta.get("counts", {}).get("read", 0))
        progress.advance("write")
        progress.failures(sum(stats.failed.values()))

    writer = ShardWriter(groups, on_commit=on_commit)
    try:
        if todo:
            if runner == "ray":
                run_ray(config, reader, todo, teachers, writer, summary, progress)
            else:
                run_local(config, reader, todo, teachers, writer, summary, progress)
    finally:
        progress.close()
    if not pending_shards(shards, groups):
        for g in groups.values():
            try:
                g.seal([s.key for s in shards])
            except StoreError:
                raise
            except OSError as exc:  # disk full or I/O error while consolidating
                raise StoreError(
                    f"sealing {g.url!r} failed: {exc}; every shard is committed and readers "
                    "still see them. Free space or fix the store, then re-run to seal"
                ) from exc
        summary.sealed = True
    _add_totals_from_ledger(summary, groups)
    summary.elapsed_s = time.perf_counter() - t_start
    return summary


def _add_totals_from_ledger(summary: ExtractSummary, groups: dict[str, FeatureGroup]) -> None:
    """Failures include those recorded by earlier (resumed) runs, so the exit code is honest."""
    for kind, group in groups.items():
        summary.failed[kind] = len(group.failures())
        summary.rows.setdefault(kind, 0)


def run_local(
    config: ExtractConfig,
    reader: Any,
    shards: list[ShardRef],
    teachers: dict[str, Teacher],
    writer: ShardWriter,
    summary: ExtractSummary,
    progress: ProgressSink,
) -> None:
    """In-process runner: same batches as the Ray runner, so the same bits.

    A reader thread reads and prepares the next batches while the teachers encode the
    current one (JPEG decoding and PIL resizing release the GIL); the queue is bounded, so
    host memory stays at ``batch_size x PREFETCH_ROWS`` prepared items whatever the dataset size.
    """
    image_t, text_t = teachers.get(IMAGE), teachers.get(TEXT)
    rows: queue.Queue = queue.Queue(maxsize=PREFETCH_ROWS)
    stop = threading.Event()

    def produce() -> None:
        try:
            for shard in shards:
                for row in prepare_shard(reader, shard, image_t, text_t, config.batch_size):
                    while not stop.is_set():
                        try:
                            rows.put(row, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            rows.put(_DONE)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            rows.put(exc)

    thread = threading.Thread(target=produce, name="cusa-read", daemon=True)
    thread.start()
    try:
        while True:
            row = rows.get()
            if row is _DONE:
                break
            if isinstance(row, BaseException):
                raise row
            if row.kind == END:
                writer.add_end(row.shard, row.meta)
                continue
            feats, secs = encode_row(row, teachers[row.kind])
            summary.add_stage(f"{row.kind} teacher", secs, len(row.ids))
            progress.advance(f"{row.kind} teacher", len(row.ids))
            writer.add_features(row.shard, row.kind, row.seq, row.ids, feats)
    finally:
        stop.set()
        thread.join(timeout=10)


PREFETCH_ROWS = 4
_DONE = object()
