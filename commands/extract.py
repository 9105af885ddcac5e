"""``cusa extract``: run the teachers over a dataset into the store."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from ..teacher_defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from .exit_codes import EXIT_FAILED, friendly_errors
from .options import (
    DatasetOption,
    DeviceOption,
    DType,
    JsonSummaryOption,
    NameOption,
    RootOption,
    SplitOption,
    StoreOption,
    echo_json,
)


class RunnerName(str, Enum):
    """Extraction runners."""

    auto = "auto"
    local = "local"
    ray = "ray"


@friendly_errors
def extract_cmd(
    dataset: DatasetOption,
    root: RootOption = None,
    split: SplitOption = None,
    name: NameOption = None,
    store: StoreOption = None,
    image_teacher: Annotated[
        str,
        typer.Option(
            "--image-teacher",
            help="Image teacher (see `cusa teachers list`); the default is the paper's, Unicom ViT-B/32 forward_features.",
        ),
    ] = DEFAULT_IMAGE_TEACHER,
    text_teacher: Annotated[
        str,
        typer.Option(
            "--text-teacher",
            help="Text teacher (see `cusa teachers list`); the default is the paper's.",
        ),
    ] = DEFAULT_TEXT_TEACHER,
    modalities: Annotated[
        str,
        typer.Option("--modalities", help="Which teachers to run: image,text, image or text."),
    ] = "image,text",
    image_teacher_weights: Annotated[
        str | None,
        typer.Option(
            "--image-teacher-weights", help="Explicit weights file for the image teacher."
        ),
    ] = None,
    allow_unofficial_weights: Annotated[
        bool,
        typer.Option(
            "--allow-unofficial-weights",
            help="Accept an --image-teacher-weights file whose SHA-256 is not the official one.",
        ),
    ] = False,
    dtype: Annotated[
        DType,
        typer.Option("--dtype", help="Stored dtype; both can live side by side in one store."),
    ] = DType.float16,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Teacher batch size.")] = 64,
    device: DeviceOption = "auto",
    runner: Annotated[
        RunnerName,
        typer.Option(
            "--runner",
            help="auto: local unless --ray-address is given or GPUs and a large job make Ray pay off (the choice and why are printed); local: in-process; ray: Ray Data.",
        ),
    ] = RunnerName.auto,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Join this Ray cluster (e.g. ray://head:10001 or auto); implies the Ray runner.",
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            "--actors", help="Ray actors per teacher [default: from the cluster's resources]."
        ),
    ] = None,
    max_failures: Annotated[
        int,
        typer.Option("--max-failures", help="Failed samples tolerated before exiting with code 1."),
    ] = 0,
    shard_size: Annotated[
        int | None,
        typer.Option("--shard-size", help="Images per shard for JSON datasets [default: 1000]."),
    ] = None,
    raw_captions: Annotated[
        bool, typer.Option("--raw-captions", help="Skip the official caption normalisation.")
    ] = False,
    allow_outside_root: Annotated[
        bool,
        typer.Option(
            "--allow-outside-root",
            help="Read dataset files outside the dataset root (absolute or ../ image paths, symlinks leading out, tars a manifest.json names elsewhere); refused by default.",
        ),
    ] = False,
    as_json: JsonSummaryOption = False,
    show_progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Live progress bars.")
    ] = True,
) -> None:
    """Run the teachers over a dataset and commit their features to the store (resumable)."""
    from ..extract.progress import NullProgress, RichProgress
    from ..extract.runner import ExtractConfig
    from ..extract.runner import extract as run_extract

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
            "`cusa store verify` lists the failed ids with their reasons",
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
