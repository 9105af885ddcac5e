"""Dataset readers: they yield samples that carry stable sample ids.

Open one with :func:`open_dataset` (a registered name such as ``coco`` or ``coco-sample``, a
folder, or webdataset tars) and read it shard by shard::

    reader = open_dataset("coco-sample", split="val")
    for shard in reader.shards():
        for sample in reader.read(shard):
            ...
"""

from __future__ import annotations

from .albef import AlbefReader
from .base import (
    CAPTION_ID_SEP,
    DatasetReader,
    Sample,
    ShardRef,
    caption_id,
    split_caption_id,
)
from .folder import FolderReader
from .indexed import DEFAULT_SHARD_SIZE
from .karpathy import KARPATHY_SPLITS, KarpathyReader
from .registry import (
    DATASETS,
    DatasetEntry,
    coco_sample_root,
    list_datasets,
    open_dataset,
    sniff_dataset,
)
from .wds import WebDatasetReader
from .wds_format import decode_key, encode_key

__all__ = [
    "CAPTION_ID_SEP",
    "DATASETS",
    "DEFAULT_SHARD_SIZE",
    "KARPATHY_SPLITS",
    "AlbefReader",
    "DatasetEntry",
    "DatasetReader",
    "FolderReader",
    "KarpathyReader",
    "Sample",
    "ShardRef",
    "WebDatasetReader",
    "caption_id",
    "coco_sample_root",
    "decode_key",
    "encode_key",
    "list_datasets",
    "open_dataset",
    "sniff_dataset",
    "split_caption_id",
]
