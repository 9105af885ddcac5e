"""Evaluate a dual encoder: the entry points, and the public names of every evaluation module.

Entry points, from cheapest to most complete:

- :func:`evaluate_features` scores features already in memory (:mod:`cusa_train.evaluation.scores`);
- :func:`evaluate_store` / :func:`load_features` score stored student features (``.npz``,
  ``.npy`` + ids, ``.parquet`` or a cusa store group; :mod:`cusa_train.evaluation.stored_features`);
- :func:`evaluate_model` / :func:`evaluate_checkpoint` encode an eval set with a model first,
  through the cross-modal head and, when the model has them, the USA (uni-modal) heads. The eval
  set is read by the dataset readers: anything ``cusa extract --dataset`` accepts, or a caption
  file (:mod:`cusa_train.evaluation.data`, :mod:`cusa_train.evaluation.encoding`);
- :func:`evaluate_image_benchmarks` and :func:`evaluate_sts_benchmarks` run the paper's
  uni-modal benchmarks (:mod:`cusa_train.evaluation.image_benchmarks`, :mod:`cusa_train.evaluation.sts_benchmarks`);
- :func:`run_evaluation` runs what an :class:`EvalConfig` (``cusa eval``) describes.

The modules, each importing only those before it: :mod:`~cusa_train.evaluation.metrics` (definitions) ->
:mod:`~cusa_train.evaluation.report` (:class:`EvalReport`) -> :mod:`~cusa_train.evaluation.eccv` ->
:mod:`~cusa_train.evaluation.scores` -> :mod:`~cusa_train.evaluation.stored_features`; :mod:`~cusa_train.evaluation.data`
-> :mod:`~cusa_train.evaluation.encoding` -> the benchmarks, :mod:`~cusa_train.evaluation.validation` (the
trainer's per-epoch evaluation) -> this module.

Retrieval numbers are percentages; the ``sts_spearman`` of a pairs file stays in [-1, 1]; the
SentEval STS numbers are Spearman x 100, as the official script prints them and the paper
reports them. Metric keys without a suffix come from the features given, i.e. the cross-modal
head of a model; the suffix ``_usa`` marks the same metric through the USA head (the official
choice for uni-modal retrieval and STS).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cusa.errors import ConfigError, DatasetError
from cusa.readers import DatasetReader
from cusa_train.checkpoints import load_checkpoint
from cusa_train.config import TrainConfig
from cusa_train.evaluation.data import (
    CAPTION_MODES,
    DEFAULT_SPLIT,
    CaptionDataset,
    CaptionDatasetReader,
    benchmark_name,
    caption_transform,
    is_caption_file,
    load_caption_json,
    open_eval_data,
)
from cusa_train.evaluation.eccv import (
    CaptionGroundTruth,
    coco_5k_test_ids,
    coco_image_id,
    detect_eccv,
    eccv_ground_truth,
    ground_truth_metrics,
)
from cusa_train.evaluation.encoding import EncodedSplit, EvalEncoder, HeadEncoder, encode_dataset
from cusa_train.evaluation.image_benchmarks import evaluate_image_benchmarks, parse_benchmark_names
from cusa_train.evaluation.metrics import DEFAULT_KS, RANK1_PROTOCOLS, StsPairs, load_sts_pairs
from cusa_train.evaluation.report import USA, EvalReport
from cusa_train.evaluation.scores import (
    evaluate_features,
    evaluate_sts,
    sts_result,
    text_to_image_rows,
)
from cusa_train.evaluation.stored_features import (
    FeatureTable,
    evaluate_store,
    evaluate_tables,
    image_id_of_caption,
    load_features,
    load_store_features,
)
from cusa_train.evaluation.sts_benchmarks import evaluate_sts_benchmarks, parse_sts_tasks
from cusa_train.students.registry import build_student_skeleton
from cusa_train.wrapper import CusaModel

__all__ = [
    "CAPTION_MODES",
    "TASKS",
    "USA",
    "CaptionDataset",
    "CaptionGroundTruth",
    "EncodedSplit",
    "EvalConfig",
    "EvalEncoder",
    "EvalReport",
    "FeatureTable",
    "HeadEncoder",
    "coco_5k_test_ids",
    "coco_image_id",
    "detect_eccv",
    "eccv_ground_truth",
    "encode_dataset",
    "evaluate_checkpoint",
    "evaluate_features",
    "evaluate_image_benchmarks",
    "evaluate_model",
    "evaluate_store",
    "evaluate_sts",
    "evaluate_sts_benchmarks",
    "evaluate_tables",
    "ground_truth_metrics",
    "image_id_of_caption",
    "load_caption_json",
    "load_checkpoint_model",
    "load_features",
    "load_store_features",
    "open_eval_data",
    "resolve_device",
    "run_evaluation",
    "text_to_image_rows",
]

TASKS = ("retrieval", "image-retrieval", "sts")


# ---- model -> features -> report ------------------------------------------------------------


def evaluate_model(
    model: EvalEncoder,
    data: DatasetReader | CaptionDataset | str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    split: str = DEFAULT_SPLIT,
    batch_size: int = 32,
    sts_pairs: StsPairs | str | os.PathLike | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    eccv: bool | None = None,
    captions: str = "raw",
    image_labels: Sequence[Any] | None = None,
    workers: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Encode an eval set with ``model`` and evaluate it (plus STS when pairs are given).

    Cross-modal retrieval uses the cross-modal head. Uni-modal retrieval and STS are reported
    through the cross-modal head and, when the model has them, through the USA heads
    (``_usa`` keys, the official protocol). ECCV Caption is added when the images are the COCO
    5K test split and the captions carry COCO annotation ids (a Karpathy ``dataset_coco.json``).

    Args:
        model: anything with ``preprocess_image``, ``encode_image`` and ``encode_text``, e.g.
            a :class:`cusa_train.wrapper.CusaModel`.
        data: a dataset reader, a :class:`CaptionDataset`, or what
            :func:`cusa_train.evaluation.data.open_eval_data` opens: a registered dataset name (with
            ``root``), a folder, webdataset tars, or a ``.json`` caption file.
        root: the folder of a registered dataset name.
        image_root: folder of the images of a caption file (default: the JSON's folder).
        max_images: evaluate only the first N images and their captions.
        split: the split to read (of a Karpathy file, a registered dataset, a folder...).
        batch_size: items encoded at once.
        sts_pairs: an STS pairs file scored with the text tower.
        ks: recall cut-offs.
        eccv: ``None`` adds ECCV Caption when the split allows it (and says why not otherwise);
            ``True`` requires it; ``False`` skips it.
        captions: ``"raw"`` or ``"pre_caption"`` (the official caption normalisation, which the
            official evaluation applies to test captions; use what the model was trained with).
        image_labels: class label of each image, for image->image retrieval.
        workers: threads decoding images.
        info: extra metadata recorded in the report.
    """
    transform = caption_transform(captions)
    pairs = None
    if sts_pairs is not None:
        pairs = sts_pairs if isinstance(sts_pairs, StsPairs) else load_sts_pairs(sts_pairs)
    bench = ""
    if isinstance(data, CaptionDataset):
        reader, source, bench = CaptionDatasetReader(data), data.source, data.benchmark
    elif isinstance(data, (str, os.PathLike)):
        reader = open_eval_data(data, root=root, split=split, image_root=image_root)
        source = str(data)
    else:
        reader, source = data, repr(data)
    enc = HeadEncoder(model, workers=workers)
    encoded = enc.encode_reader(
        reader, batch_size=batch_size, max_images=max_images, caption_transform=transform
    )
    gt, why_not = (None, "skipped (eccv=False)")
    if eccv is not False:
        gt, why_not = detect_eccv(encoded.image_ids, None, encoded.caption_ann_ids)
        if eccv and gt is None:
            raise DatasetError(f"ECCV Caption requested but {why_not}")
    sts = None
    if pairs is not None:
        e1 = enc.encode_texts(pairs.sentence1, batch_size)
        e2 = enc.encode_texts(pairs.sentence2, batch_size)
        sts = sts_result(pairs, e1, e2)
    bench = "" if max_images else (bench or benchmark_name(reader, len(encoded.image_ids)))
    meta = {
        "task": "retrieval",
        "dataset": source,
        "captions": captions,
        "heads": enc.note,
        **({"benchmark": bench} if bench else {}),
        **({} if gt is not None else {"eccv": why_not}),
        **dict(info or {}),
    }
    return evaluate_features(
        encoded.images["cross"],
        encoded.texts["cross"],
        encoded.image_ids_of_texts,
        image_ids=encoded.image_ids,
        image_labels=image_labels,
        eccv_gt=gt,
        sts=sts,
        usa_image_features=encoded.images.get("usa"),
        usa_text_features=encoded.texts.get("usa"),
        ks=ks,
        info=meta,
    )


# ---- checkpoints ----------------------------------------------------------------------------


def load_checkpoint_model(
    path: str | os.PathLike,
    *,
    student: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Rebuild the trained :class:`cusa_train.wrapper.CusaModel` from a ``cusa train`` checkpoint.

    The checkpoint (read by :func:`cusa_train.checkpoints.load_checkpoint`, ``weights_only=True``)
    holds ``"config"`` (``TrainConfig.to_dict()``) and ``"model"`` (the CusaModel ``state_dict``).

    Args:
        path: the checkpoint file.
        student: the student module when it is not a registered one (the trainer was given it
            directly); by default it is built from ``config.model``.
        device: where to put the model (default: CPU).

    Raises:
        ConfigError: the file is missing, unreadable, not a checkpoint, or does not fit its model.
        WeightsError: the student's pretrained towers cannot be built.
    """
    return _load_checkpoint(path, student, device)[0]


def _load_checkpoint(
    path: str | os.PathLike, student: torch.nn.Module | None, device: str | torch.device | None
) -> tuple[torch.nn.Module, Any]:
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict(ckpt["config"])
    if student is None:
        # The checkpoint holds the student's weights: no pretrained release is fetched first.
        student = build_student_skeleton(config.model.student, **config.model.student_options)
    model = CusaModel(
        student,
        config.loss,
        embed_dim=config.model.embed_dim,
        head_init_std=config.model.head_init_std,
        gather=False,
    )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ConfigError(
            f"checkpoint {str(path)!r} does not fit the model its config describes: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if device is not None:
        model = model.to(device)
    return model.eval(), config


def _trained_captions(config: Any) -> str:
    """How the checkpoint's student read captions in training (``data.captions``)."""
    mode = getattr(getattr(config, "data", None), "captions", "raw")
    return mode if mode in CAPTION_MODES else "raw"


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: DatasetReader | CaptionDataset | str | os.PathLike,
    *,
    student: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    captions: str | None = None,
    info: Mapping[str, Any] | None = None,
    **options: Any,
) -> EvalReport:
    """Load a trainer checkpoint (:func:`load_checkpoint_model`) and run :func:`evaluate_model`.

    Args:
        checkpoint: the checkpoint file.
        data: the eval set, as for :func:`evaluate_model`.
        student: the student module when it is not a registered one.
        device: where to put the model (default: CPU).
        captions: ``"raw"`` or ``"pre_caption"``; ``None`` reads the captions as the
            checkpoint's student read them in training (its config's ``data.captions``).
        info: extra metadata recorded in the report (beside ``checkpoint``).
        **options: the other keyword arguments of :func:`evaluate_model` (``split``,
            ``max_images``, ``sts_pairs``, ``ks``, ``eccv``, ``root``, ``image_root``...).
    """
    model, config = _load_checkpoint(checkpoint, student, device)
    return evaluate_model(
        model,
        data,
        captions=captions or _trained_captions(config),
        info={"checkpoint": str(checkpoint), **dict(info or {})},
        **options,
    )


# ---- one entry point for the CLI ------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device: {exc}") from exc


@dataclass(frozen=True)
class EvalConfig:
    """What ``cusa eval`` was asked to do.

    Args:
        task: ``retrieval`` (image-text; a checkpoint with a caption file, or stored features),
            ``image-retrieval`` (the paper's image benchmarks) or ``sts`` (SentEval STS).
        checkpoint: a trainer checkpoint.
        data: the eval set to encode (with ``checkpoint``, task ``retrieval``): anything
            ``cusa extract --dataset`` accepts, or a ``.json`` caption file
            (:func:`cusa_train.evaluation.data.open_eval_data`).
        image_features: stored image features (a file, or a group name with ``store``).
        text_features: stored caption features (likewise).
        store: cusa store URL holding the feature groups (with ``dataset`` and ``split``).
        dataset: store dataset name (stored features), or the benchmark names for
            ``image-retrieval`` (``cub,sop,inshop,inat,cars`` or ``all``).
        split: store split name, or the split of ``data`` (default ``test``).
        root: benchmark root (``image-retrieval``), SentEval data folder (``sts``), or the
            folder of a registered dataset name in ``data``.
        image_root: folder of the images of a caption file in ``data``.
        max_images: evaluate only the first N images of ``data``.
        batch_size: items encoded at once.
        sts: STS pairs file (needs ``checkpoint``: features alone cannot encode new sentences).
        sts_tasks: SentEval tasks for ``sts`` (default all seven).
        ks: recall cut-offs.
        eccv: ``None`` auto, ``True`` required, ``False`` off.
        captions: ``raw`` or ``pre_caption``, applied to the captions of ``data``; default:
            as the checkpoint's student read them in training.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        workers: threads decoding images.
        protocol: rank-1 protocol of ``image-retrieval``: ``official`` (the default when None:
            reproduces the paper's Table 3) or ``strict`` (ties are misses).
    """

    task: str = "retrieval"
    checkpoint: str | None = None
    data: str | None = None
    image_features: str | None = None
    text_features: str | None = None
    store: str | None = None
    dataset: str | None = None
    split: str | None = None
    root: str | None = None
    image_root: str | None = None
    max_images: int | None = None
    batch_size: int = 32
    sts: str | None = None
    sts_tasks: str | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    eccv: bool | None = None
    captions: str | None = None
    device: str | None = None
    workers: int | None = None
    protocol: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.protocol is not None:
            if self.task != "image-retrieval":
                raise ConfigError(
                    f"--protocol {self.protocol!r} is the rank-1 protocol of --task "
                    f"image-retrieval; --task {self.task} has no such choice"
                )
            if self.protocol not in RANK1_PROTOCOLS:
                raise ConfigError(
                    f"--protocol must be one of {', '.join(RANK1_PROTOCOLS)}, got {self.protocol!r}"
                )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1, got {self.max_images!r}")
        if self.captions is not None and self.captions not in CAPTION_MODES:
            raise ConfigError(f"--captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if self.task == "retrieval":
            self._check_retrieval()
            return
        what = "--task image-retrieval" if self.task == "image-retrieval" else "--task sts"
        if self.checkpoint is None:
            raise ConfigError(f"{what} needs --checkpoint: the images or sentences are encoded")
        extra = [
            flag
            for flag, v in (
                ("--data", self.data), ("--image-features", self.image_features),
                ("--text-features", self.text_features), ("--store", self.store),
                ("--sts", self.sts),
            )
            if v is not None
        ]  # fmt: skip
        if extra:
            raise ConfigError(f"{what} takes no {', '.join(extra)}")
        if self.root is None:
            raise ConfigError(
                f"{what} needs --root: "
                + (
                    "the folder holding cub/, sop/, inshop/, inaturalist/ (official layout)"
                    if self.task == "image-retrieval"
                    else "SentEval's data folder (holding downstream/STS and downstream/SICK)"
                )
            )
        if self.task == "image-retrieval":
            if not self.dataset:
                raise ConfigError(
                    "--task image-retrieval needs --dataset: cub, sop, inshop, inat, cars, a "
                    "comma-separated list, or all"
                )
            parse_benchmark_names(self.dataset)
        else:
            parse_sts_tasks(self.sts_tasks)

    def _check_retrieval(self) -> None:
        has_feats = self.image_features is not None or self.text_features is not None
        if (self.checkpoint is None) == (not has_feats):
            raise ConfigError(
                "give either --checkpoint (with --data) or --image-features and --text-features"
            )
        if self.checkpoint is not None and self.data is None:
            raise ConfigError(
                "--checkpoint needs --data, the eval set to encode and score: a registered "
                "dataset (with --root), a folder, webdataset tars, or a caption file (ALBEF/CUSA "
                "JSON, Karpathy dataset_coco.json / dataset_flickr30k.json)"
            )
        if has_feats and (self.image_features is None or self.text_features is None):
            raise ConfigError("stored features need both --image-features and --text-features")
        if has_feats and self.sts is not None:
            raise ConfigError(
                "--sts needs --checkpoint: stored features cannot encode new sentences"
            )
        if self.store is not None and not (self.dataset and self.split):
            raise ConfigError("--store needs --dataset and --split to find the feature groups")
        if self.root is not None and (self.data is None or is_caption_file(self.data)):
            raise ConfigError(
                "--root is for --task image-retrieval and --task sts, and for a registered "
                "--data name (coco, flickr30k...); give the images of a caption file with "
                "--image-root"
            )
        if self.image_root is not None and (self.data is None or not is_caption_file(self.data)):
            raise ConfigError(
                "--image-root is for a .json caption file in --data; a registered dataset name "
                "takes --root, and a folder or webdataset tars hold their images"
            )


def run_evaluation(config: EvalConfig) -> EvalReport:
    """Run what ``config`` describes and return the report."""
    if config.checkpoint is None:
        return evaluate_store(
            config.image_features,  # type: ignore[arg-type]  # checked in EvalConfig
            config.text_features,  # type: ignore[arg-type]
            store=config.store,
            dataset=config.dataset,
            split=config.split,
            ks=config.ks,
        )
    device = resolve_device(config.device)
    model, train_config = _load_checkpoint(config.checkpoint, None, device)
    meta = {"checkpoint": config.checkpoint, "device": str(device)}
    if config.task == "image-retrieval":
        return evaluate_image_benchmarks(
            model, config.dataset, config.root,  # type: ignore[arg-type]
            batch_size=config.batch_size, workers=config.workers, info=meta,
            protocol=config.protocol or "official",
        )  # fmt: skip
    if config.task == "sts":
        return evaluate_sts_benchmarks(
            model, config.root, tasks=config.sts_tasks,  # type: ignore[arg-type]
            batch_size=config.batch_size, info=meta,
        )  # fmt: skip
    return evaluate_model(
        model,
        config.data,  # type: ignore[arg-type]
        root=config.root,
        image_root=config.image_root,
        max_images=config.max_images,
        split=config.split or DEFAULT_SPLIT,
        batch_size=config.batch_size,
        sts_pairs=config.sts,
        ks=config.ks,
        eccv=config.eccv,
        captions=config.captions or _trained_captions(train_config),
        workers=config.workers,
        info=meta,
    )
