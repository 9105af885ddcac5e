"""``cusa eval``: score a checkpoint or stored features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from ..paths import default_store
from .exit_codes import friendly_errors
from .options import DeviceOption, echo_json

#: What ``--image-features`` / ``--text-features`` take as files; anything else names a group.
FEATURE_FILE_SUFFIXES = (".npz", ".npy", ".parquet")


def _is_feature_file(value: str) -> bool:
    return value.lower().endswith(FEATURE_FILE_SUFFIXES) or Path(value).exists()


def _store_of_groups(
    image_features: str | None,
    text_features: str | None,
    store: str | None,
    dataset: str | None,
    split: str | None,
) -> str | None:
    """The store to read ``--image-features``/``--text-features`` groups from.

    Values that are not feature files name groups in ``--store``, which defaults to
    ``$CUSA_HOME/store`` as ``--help`` says; ``None`` when they are files.
    """
    named = [
        (flag, v)
        for flag, v in (("--image-features", image_features), ("--text-features", text_features))
        if v is not None and not _is_feature_file(v)
    ]
    if store is not None or not named:
        return store
    if not (dataset and split):
        flag, value = named[0]
        raise ConfigError(
            f"{flag} {value!r} is not a feature file ({', '.join(FEATURE_FILE_SUFFIXES)}), so it "
            f"names a group in the store ({default_store()!r}, or --store); pass --dataset and "
            "--split to find the groups"
        )
    return default_store()


@friendly_errors
def eval_cmd(
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="Checkpoint written by `cusa train`.")
    ] = None,
    # --task and --captions are checked by EvalConfig (its one-line messages are part of the
    # tested contract of `cusa eval`); the metavar lists the choices.
    task: Annotated[
        str,
        typer.Option(
            "--task",
            metavar="[retrieval|image-retrieval|sts]",
            help="retrieval (image-text), image-retrieval (CUB/SOP/In-Shop/iNat/Cars) or sts (SentEval).",
        ),
    ] = "retrieval",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Eval set to encode (with --checkpoint): anything `cusa extract --dataset` takes (registered name with --root, folder, webdataset tars or URL) or a caption file (ALBEF/CUSA JSON, Karpathy dataset_coco.json / dataset_flickr30k.json).",
        ),
    ] = None,
    image_root: Annotated[
        str | None,
        typer.Option(
            "--image-root",
            help="Folder of the images of a .json caption file in --data (default: the JSON's folder).",
        ),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option("--max-images", help="Evaluate only the first N images.")
    ] = None,
    image_features: Annotated[
        str | None,
        typer.Option(
            "--image-features",
            help="Stored image features: .npz/.npy/.parquet, or a group name in the store "
            "(--store, default $CUSA_HOME/store) with --dataset and --split.",
        ),
    ] = None,
    text_features: Annotated[
        str | None,
        typer.Option("--text-features", help="Stored caption features (ids <image_id>#<k>)."),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Feature store holding the --image-features/--text-features groups [default: $CUSA_HOME/store].",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="Store dataset name (with --store), or the image benchmarks (--task image-retrieval): cub, sop, inshop, inat, cars, a list, or all.",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Store split name (with --store), or the split of --data [default: test].",
        ),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option(
            "--root",
            help="Folder of a registered --data name (coco, flickr30k...), benchmark root (--task image-retrieval) or SentEval data folder (--task sts).",
        ),
    ] = None,
    sts: Annotated[
        str | None,
        typer.Option(
            "--sts", help="STS pairs file (.tsv/.csv/.jsonl: sentence1, sentence2, score)."
        ),
    ] = None,
    sts_tasks: Annotated[
        str | None,
        typer.Option(
            "--sts-tasks",
            help="SentEval tasks for --task sts, e.g. STS12,STSBenchmark [default: all seven].",
        ),
    ] = None,
    eccv: Annotated[
        bool | None,
        typer.Option(
            "--eccv/--no-eccv",
            help="ECCV Caption metrics: required / off [default: when the eval set is the COCO 5K test split].",
        ),
    ] = None,
    captions: Annotated[
        str | None,
        typer.Option(
            "--captions",
            metavar="[raw|pre_caption]",
            help="raw or pre_caption (the official caption normalisation) [default: as the checkpoint was trained].",
        ),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            "--protocol",
            metavar="[official|strict]",
            help="Rank-1 protocol of --task image-retrieval: official (as evaluation_img.py; a query's exact duplicate, or the query itself, can be its hit; reproduces the paper) or strict (the query excluded, ties are misses) [default: official].",
            show_default=False,
        ),
    ] = None,
    ks: Annotated[str, typer.Option("--ks", help="Recall cut-offs, comma-separated.")] = "1,5,10",
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images or captions encoded per forward pass.")
    ] = 32,
    device: DeviceOption = "auto",
    workers: Annotated[
        int | None, typer.Option("--workers", help="Threads decoding images [default: up to 8].")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", help="Write the JSON report here.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON report instead of the table.")
    ] = False,
) -> None:
    """Score a checkpoint or stored features: image-text retrieval (R@K, RSUM, r_mean, ECCV
    Caption on COCO 5K, uni-modal), the paper's image retrieval benchmarks, or SentEval STS."""
    from cusa_train.evaluation.evaluate import EvalConfig, run_evaluation

    store = _store_of_groups(image_features, text_features, store, dataset, split)
    try:
        cutoffs = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise typer.BadParameter(f"--ks must be comma-separated integers, got {ks!r}") from None
    config = EvalConfig(
        task=task, checkpoint=checkpoint, data=data, image_features=image_features,
        text_features=text_features, store=store, dataset=dataset, split=split, root=root,
        image_root=image_root, max_images=max_images, batch_size=batch_size, sts=sts,
        sts_tasks=sts_tasks, ks=cutoffs, eccv=eccv, captions=captions, device=device,
        workers=workers, protocol=protocol,
    )  # fmt: skip
    if config.checkpoint and config.data and config.task == "retrieval":
        from cusa_train.evaluation.data import is_caption_file, open_eval_data

        if not is_caption_file(config.data):  # cheap: a wrong --split is refused before the
            # model loads (a caption file is parsed once, by the evaluation itself)
            open_eval_data(config.data, root=config.root, split=config.split)
    report = run_evaluation(config)
    if out:
        report.to_json(out)
    if as_json:
        echo_json(report.to_dict())
    else:
        typer.echo(report.to_table())
        if out:
            typer.echo(f"\nreport written to {out}")
