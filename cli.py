"""The ``cusa`` command line. It parses options, calls one library function and turns
library errors into a clear message and a non-zero exit code."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from cusa.errors import CusaError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
store_app = typer.Typer(no_args_is_help=True, help="Inspect, verify, search and export a feature store.")
teachers_app = typer.Typer(no_args_is_help=True, help="List and fetch teachers.")
app.add_typer(store_app, name="store")
app.add_typer(teachers_app, name="teachers")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """Turn a CusaError into a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CusaError as exc:
            _fail(str(exc))

    return wrapper


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug output.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---- store ----------------------------------------------------------------------------------

# ---- teachers -------------------------------------------------------------------------------

# ---- extract / shard ------------------------------------------------------------------------


@app.command()
@friendly_errors
def extract(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Registered dataset name (coco, flickr30k, coco-sample...) or a path/URL."),
    root: str = typer.Option(None, "--root", help="Dataset root for registered names that need one."),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    store: str = typer.Option(None, "--store", help="Store directory or URL [default: $CUSA_HOME/store]."),
    image_teacher: str = typer.Option("unicom-vit-b32", "--image-teacher", help="Image teacher (see `cusa teachers list`)."),
    text_teacher: str = typer.Option("all-mpnet-base-v2", "--text-teacher", help="Text teacher (see `cusa teachers list`)."),
    modalities: str = typer.Option("image,text", "--modalities", help="Comma-separated: image, text."),
    image_teacher_weights: str = typer.Option(None, "--image-teacher-weights", help="Explicit weights file for the image teacher."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored dtype: float16 or float32."),
    batch_size: int = typer.Option(64, "--batch-size", help="Teacher batch size."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    runner: str = typer.Option("auto", "--runner", help="auto (ray when installed), local or ray."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join this Ray cluster (e.g. ray://head:10001 or auto)."),
    actors: int = typer.Option(None, "--actors", help="Ray actors per teacher [default: from cluster resources]."),
    max_failures: int = typer.Option(0, "--max-failures", help="Failed samples tolerated before exiting non-zero."),
    shard_size: int = typer.Option(None, "--shard-size", help="Images per shard for JSON datasets."),
    raw_captions: bool = typer.Option(False, "--raw-captions", help="Skip the official caption normalisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bars."),
) -> None:
    """Run the teachers over a dataset and commit their features to the store (resumable)."""
    from cusa.extract.progress import NullProgress, RichProgress
    from cusa.extract.runner import ExtractConfig
    from cusa.extract.runner import extract as run_extract

    config = ExtractConfig(
        dataset=dataset, root=root, split=split, store=store, image_teacher=image_teacher,
        text_teacher=text_teacher, modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()),
        image_teacher_weights=image_teacher_weights, dtype=dtype, batch_size=batch_size, device=device,
        runner=runner, ray_address=ray_address, actors_per_teacher=actors, max_failures=max_failures,
        shard_size=shard_size, raw_captions=raw_captions,
    )
    summary = run_extract(config, progress=RichProgress() if show_progress else NullProgress())
    if as_json:
        echo_json(summary.to_dict())
    else:
        _print_summary(summary)
    if not summary.ok:
        typer.secho(
            f"{summary.total_failed} sample(s) failed (allowed: {summary.max_failures}); "
            "see `cusa store info` for the failure ledger", fg=typer.colors.RED, err=True,
        )
        raise typer.Exit(1)


def _print_summary(summary: Any) -> None:
    typer.echo(
        f"{summary.dataset}/{summary.split} via {summary.runner}: {summary.shards_done} shard(s) done, "
        f"{summary.shards_skipped} skipped as committed, of {summary.shards_total}; "
        f"{'sealed' if summary.sealed else 'not sealed yet'} in {summary.elapsed_s:.1f}s"
    )
    for kind, url in summary.groups.items():
        typer.echo(f"  {kind:5s} rows written {summary.rows.get(kind, 0):>7}  failed "
                   f"{summary.failed.get(kind, 0):>5}  -> {url}")
    for stage, rate in summary.throughput().items():
        typer.echo(f"  {stage:>14}: {rate:,.1f} items/s")

# ---- train / eval ---------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
