"""Dataset readers: they yield samples that carry stable sample ids.

Open one with :func:`open_dataset` (a registered name such as ``coco`` or ``coco-sample``, a
folder, or webdataset tars) and read it shard by shard::

    reader = open_dataset("coco-sample", split="val")
    for shard in reader.shards():
        for sample in reader.read(shard):
            ...
"""

from __future__ import annotations

from cusa.extract.readers.albef import AlbefReader
from cusa.extract.readers.base import (
    CAPTION_ID_SEP,
    DatasetReader,
    Sample,
    ShardRef,
    caption_id,
    split_caption_id,
)
from cusa.extract.readers.folder import FolderReader
from cusa.extract.readers.indexed import DEFAULT_SHARD_SIZE
from cusa.extract.readers.karpathy import KARPATHY_SPLITS, KarpathyReader
from cusa.extract.readers.registry import (
    DATASETS,
    DatasetEntry,
    coco_sample_root,
    list_datasets,
    open_dataset,
    sniff_dataset,
)
from cusa.extract.readers.wds import WebDatasetReader
from cusa.extract.readers.wds_format import decode_key, encode_key

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
