"""The extraction job's types: its config, the kinds of rows that flow through it, and its summary.

Every other extraction module (the runners, the batches they share, the store writer) takes
these types; this module imports none of them, and no model library, so the CLI can build and
validate an :class:`ExtractConfig` without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from ..errors import ConfigError
from ..readers.registry import check_dataset_name
from ..store.layout import DTYPES
from ..teacher_defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER


class RowKind(str, Enum):
    """What a work row carries: a batch of images, a batch of captions, or a shard's end record.

    A ``str`` enum: ``RowKind.IMAGE == "image"``, it keys the same dict entries and formats as
    its value, so rows that travel through Ray as plain dicts compare equal to it.
    """

    IMAGE = "image"
    TEXT = "text"
    END = "end"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


IMAGE, TEXT, END = RowKind.IMAGE, RowKind.TEXT, RowKind.END
#: The kinds that are features (one store group each), in store order.
MODALITIES: tuple[RowKind, ...] = (IMAGE, TEXT)
RUNNERS = ("auto", "local", "ray")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
        runner: ``auto`` (see :func:`cusa.extract.runner.choose_runner`), ``local`` or ``ray``.
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
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"--device {self.device!r} is invalid; use auto, cpu, cuda, cuda:N or mps"
            )
        if self.name is not None:
            check_dataset_name(self.name)

    def teacher_names(self) -> dict[RowKind, str]:
        """The teacher of each modality this job extracts, in store order."""
        names = {IMAGE: self.image_teacher, TEXT: self.text_teacher}
        return {m: names[m] for m in MODALITIES if m in self.modalities}


@dataclass(frozen=True)
class RunnerChoice:
    """Which runner a job uses and why (printed by the CLI, kept in the summary)."""

    runner: str
    reason: str


@dataclass
class ShardStats:
    """What happened to one shard, for the run summary."""

    shard: str
    rows: dict[str, int]
    failed: dict[str, int]
    status: dict[str, str]
    meta: dict


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


__all__ = [
    "END",
    "IMAGE",
    "MODALITIES",
    "RUNNERS",
    "TEXT",
    "ExtractConfig",
    "ExtractSummary",
    "RowKind",
    "RunnerChoice",
    "ShardStats",
]
