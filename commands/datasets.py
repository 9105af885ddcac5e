"""``cusa datasets list`` and ``cusa shard``: the dataset readers, and a dataset written as
webdataset tars."""

from __future__ import annotations

from typing import Annotated

import typer

from .exit_codes import friendly_errors
from .options import (
    DatasetOption,
    JsonSummaryOption,
    NameOption,
    RootOption,
    SplitOption,
    echo_json,
    typer_app,
)

app = typer_app("List the dataset readers.")


@app.command("list")
@friendly_errors
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List registered datasets (--dataset also takes a folder, an index file, *.tar, s3:// or pipe:)."""
    from ..readers import DATASETS, list_datasets

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


@friendly_errors
def shard_cmd(
    dataset: DatasetOption,
    root: RootOption = None,
    split: SplitOption = None,
    name: NameOption = None,
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="Output folder for {split}-NNNNNN.tar and manifest.json."),
    ] = ...,
    max_size: Annotated[
        str, typer.Option("--max-size", help="Size cap per tar (e.g. 256MB, 1GiB).")
    ] = "256MB",
    max_count: Annotated[
        int | None, typer.Option("--max-count", help="Samples cap per tar [default: none].")
    ] = None,
    as_json: JsonSummaryOption = False,
) -> None:
    """Write a dataset as webdataset tars with a size cap and a manifest."""
    from ..readers import open_dataset
    from ..readers.wds_writer import write_shards
    from ..sizes import parse_size

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
