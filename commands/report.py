"""``cusa report``: one self-contained HTML page about a store and training runs."""

from __future__ import annotations

from typing import Annotated

import typer

from .exit_codes import friendly_errors
from .options import StoreOption, StorePositional, store_arg


@friendly_errors
def report_cmd(
    store_pos: StorePositional = None,
    store: StoreOption = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="The HTML page to write.")
    ] = "report.html",
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset name or path for thumbnails and caption text [default: the one the store recorded at extraction, when it can be opened here].",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Split to show [default: the store's only split for the dataset, else train].",
        ),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option(
            "--root",
            help="Dataset root (or its index file) for registered names that need one.",
        ),
    ] = None,
    run: Annotated[
        list[str],
        typer.Option(
            "--run",
            help="Run dir or metrics JSONL; repeat to overlay runs (LABEL=PATH names one).",
        ),
    ] = [],  # noqa: B006 - typer hands the command a new list
    eval_json: Annotated[
        list[str],
        typer.Option(
            "--eval", help="Eval JSON from `cusa eval --out`; repeat to compare (LABEL=PATH)."
        ),
    ] = [],  # noqa: B006 - typer hands the command a new list
    embeddings: Annotated[
        list[str],
        typer.Option(
            "--embeddings",
            help="Student features (.npz/.npy/.parquet) for the t-SNE; repeat, e.g. usa=a.npz base=b.npz.",
        ),
    ] = [],  # noqa: B006 - typer hands the command a new list
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images in the soft-label batch.")
    ] = 16,
    tau: Annotated[
        float, typer.Option("--tau", help="Soft-label temperature: softmax(cos / tau).")
    ] = 1.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the random batch, queries and t-SNE.")
    ] = 0,
) -> None:
    """Write one self-contained HTML page about a store (and training runs) that opens offline."""
    from ..viz import build_report

    path = build_report(
        store_arg(store, store_pos),
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
