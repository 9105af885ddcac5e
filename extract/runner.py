"""``extract(config)``: run teachers over a dataset and fill the store, resumably.

The runner wires reader -> prepare -> teachers -> writer and times each stage. Shards whose
groups are all committed are skipped before their input is read, so a re-run after a crash
(or ``kill -9``) only does the missing work; sealing at the end makes the final store the same
whatever happened before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StoreError
from ..readers import DATASETS, open_dataset
from ..readers.base import DatasetReader, ShardRef
from ..store import FeatureGroup, FeatureStore
from ..store.layout import parse_group_leaf
from ..store.spec import FINGERPRINT_FIELDS, TeacherSpec, spec_diff, spec_fingerprint
from .batches import Runner, RunnerJob, load_teachers
from .job import (
    MODALITIES,
    RUNNERS,
    TEXT,
    ExtractConfig,
    ExtractSummary,
    RowKind,
    RunnerChoice,
    ShardStats,
)
from .local_runner import run_local
from .progress import NullProgress, ProgressSink
from .teachers.registry import get_teacher_entry
from .writer import ShardWriter

log = logging.getLogger(__name__)

#: ``--runner auto`` picks Ray on a GPU machine only from this many images on: below it, starting
#: Ray, its actors and a second copy of each teacher costs more than parallel decoding saves
#: (measured in ``benchmarks/runner_auto.py`` -> ``benchmarks/results/runner_auto.json``).
RAY_MIN_IMAGES = 20_000


def get_runner(name: str) -> Runner:
    """The runner called ``name`` (``local`` or ``ray``); Ray's module is imported only here."""
    if name == "ray":
        from .ray_runner import run_ray

        return run_ray
    if name == "local":
        return run_local
    raise ConfigError(f"runner {name!r} is unknown; use one of {', '.join(RUNNERS[1:])}")


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
    ray_ok = _ray_installed() if ray_installed is None else ray_installed
    if config.runner == "ray" and not ray_ok:  # refused before any model or store is touched
        raise ConfigError(
            "--runner ray needs Ray Data, which is not installed: pip install 'cusa[ray]', or "
            "use --runner local"
        )
    if config.runner != "auto":
        return RunnerChoice(config.runner, f"--runner {config.runner} was given")
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


def dataset_source(config: ExtractConfig, reader: DatasetReader) -> dict[str, Any]:
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


def open_groups(
    config: ExtractConfig, reader: DatasetReader, specs: Mapping[RowKind, TeacherSpec]
) -> tuple[FeatureStore, dict[RowKind, FeatureGroup]]:
    """Open (or create) one store group per modality; refuses a differing spec or manifest."""
    try:
        store = FeatureStore.open(config.store, create=True, storage_options=config.storage_options)
        groups = {}
        source = dataset_source(config, reader)
        for kind, spec in specs.items():
            # Per modality: a caption edit concerns the text group only, not the image group.
            info = reader.manifest_info(modality=kind)
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


def pending_shards(
    shards: list[ShardRef], groups: Mapping[RowKind, FeatureGroup]
) -> list[ShardRef]:
    """Shards that some group has not committed yet; checked per shard, no id sets held."""
    return [s for s in shards if not all(g.is_committed(s.key) for g in groups.values())]


def finished_groups(
    config: ExtractConfig, reader: DatasetReader, shards: list[ShardRef]
) -> dict[RowKind, FeatureGroup] | None:
    """The sealed groups of an extraction that is already finished, found without loading a
    teacher; None when that cannot be told cheaply (then the job runs as usual and skips
    committed shards).

    Finished means: for each modality, exactly one group of this dataset and split in the store
    has the configured teacher name, dtype and caption mode, records this dataset's manifest
    hash, is sealed and has committed every shard. Its recorded spec must also agree with what
    the registry declares of the teacher without loading it (modality, output kind,
    ``normalized``) and still hash to the fingerprint in its folder name (attributes edited to
    another model, weights or preprocessing do not); otherwise the teachers are loaded and
    :func:`open_groups` refuses the mismatch with the differing fields. A teacher that declares
    no ``normalized``, and ``--image-teacher-weights`` (the weights' hash is part of the
    fingerprint), are loaded to check as well.
    """
    if config.image_teacher_weights:
        return None
    try:
        store = FeatureStore.open(config.store, storage_options=config.storage_options)
    except StoreError:  # no store yet (or not one): nothing is finished
        return None
    groups = [g for g in store.groups() if g.dataset == reader.name and g.split == reader.split]
    found: dict[RowKind, FeatureGroup] = {}
    for kind, name in config.teacher_names().items():
        known = {**get_teacher_entry(name).info.known_spec(), "dtype": config.dtype}
        if "normalized" not in known:  # only the built teacher can tell: load it to check
            return None
        info = reader.manifest_info(modality=kind)
        manifest_hash = info["hash"] if info else reader.manifest_hash()
        caption_mode = "raw" if config.raw_captions else "pre_caption"
        matches = [
            g
            for g in groups
            if g.spec.get("name") == name
            and g.spec.get("dtype") == config.dtype
            and g.spec.get("modality") == kind
            and (kind != TEXT or g.spec.get("preprocessing", {}).get("caption") == caption_mode)
        ]
        if len(matches) != 1:
            return None
        group = matches[0]
        if (
            spec_diff(group.spec, known, subset=True)  # the open_groups path names the fields
            or not _spec_matches_folder(group)
            or group.attrs.get("manifest_hash") != manifest_hash
            or not group.sealed
            or not all(group.is_committed(s.key) for s in shards)
        ):
            return None
        found[kind] = group
    return found


def _spec_matches_folder(group: FeatureGroup) -> bool:
    """Does the group's recorded spec still hash to the fingerprint its folder name carries?"""
    spec = group.spec
    if not all(k in spec for k in FINGERPRINT_FIELDS):
        return False
    path_fp = parse_group_leaf(group.leaf)[1]
    return spec_fingerprint(spec) == path_fp == group.attrs.get("fingerprint")


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
    done = finished_groups(config, reader, shards)
    if done is not None:  # re-running a finished job: no teacher is loaded to do nothing
        log.info(
            "%s/%s: every shard is committed and sealed; nothing to do", reader.name, reader.split
        )
        for group in done.values():
            group.seal()  # already sealed: only removes what a killed writer left (*.partial, parts/)
        summary = ExtractSummary(
            dataset=reader.name, split=reader.split, runner=runner, runner_reason=choice.reason,
            store=next(iter(done.values())).store.url, groups={k: g.url for k, g in done.items()},
            shards_total=len(shards), shards_skipped=len(shards), sealed=True,
            max_failures=config.max_failures,
        )  # fmt: skip
        _add_totals_from_ledger(summary, done)
        summary.elapsed_s = time.perf_counter() - t_start
        return summary
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
        # The bars show the summary's rates (items per busy second of each stage), so the two
        # agree; a per-wall-second rate of read/decode, advanced only at commits, did not.
        rates = summary.throughput()
        read = stats.meta.get("counts", {}).get("read", 0)
        progress.advance("read", read, rate=rates.get("read"))
        progress.advance("decode", read, rate=rates.get("decode"))
        progress.advance("write", rate=rates.get("write"))
        for kind in teachers:
            progress.advance(f"{kind} teacher", 0, rate=rates.get(f"{kind} teacher"))
        progress.failures(sum(stats.failed.values()))

    writer = ShardWriter(groups, on_commit=on_commit)
    try:
        if todo:
            get_runner(runner)(RunnerJob(config, reader, todo, teachers, writer, summary, progress))
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


def _add_totals_from_ledger(
    summary: ExtractSummary, groups: Mapping[RowKind, FeatureGroup]
) -> None:
    """Failures include those recorded by earlier (resumed) runs, so the exit code is honest."""
    for kind, group in groups.items():
        summary.failed[kind] = len(group.failures())
        summary.rows.setdefault(kind, 0)


__all__ = [
    "MODALITIES",
    "RAY_MIN_IMAGES",
    "RUNNERS",
    "ExtractConfig",
    "ExtractSummary",
    "Runner",
    "RunnerChoice",
    "ShardStats",
    "choose_runner",
    "dataset_source",
    "extract",
    "get_runner",
    "job_images",
    "load_teachers",
    "open_groups",
    "pending_shards",
    "run_local",
    "visible_gpus",
]
