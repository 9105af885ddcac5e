"""What evaluation reads: any dataset ``cusa extract`` accepts, through the dataset readers.

- :func:`open_eval_data` turns ``--data`` into a reader: a registered name (with ``root``), a
  folder, webdataset tars or URLs (all through :func:`cusa.readers.open_dataset`), or one
  caption file (:func:`open_caption_file`: the ALBEF/CUSA JSON or a Karpathy split file).
- :class:`CaptionDataset` is the index of a caption file (ids, image paths, captions) without
  reading any image, and :func:`caption_dataset_reader` reads one back as a reader.
- :func:`caption_transform` maps the ``captions`` option (``raw`` / ``pre_caption``) to a function.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cusa.captions import pre_caption
from cusa.errors import ConfigError, DatasetError
from cusa.readers import (
    KARPATHY_SPLITS,
    AlbefReader,
    DatasetReader,
    KarpathyReader,
    Sample,
    ShardRef,
    caption_id,
    open_dataset,
)
from cusa.safe_files import read_lines_under, short_path

CAPTION_MODES = ("raw", "pre_caption")
DEFAULT_SPLIT = "test"

# The Karpathy test splits the papers report on, by reader variant and number of images.
_KARPATHY_BENCHMARKS = {
    ("coco", 5000): "COCO 5K test (Karpathy)",
    ("flickr30k", 1000): "Flickr30K 1K test (Karpathy)",
}


def caption_transform(mode: str) -> Callable[[str], str] | None:
    """``"raw"`` -> None (captions as written); ``"pre_caption"`` -> the official normalisation.

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in CAPTION_MODES:
        raise ConfigError(f"captions must be one of {CAPTION_MODES}, got {mode!r}")
    return pre_caption if mode == "pre_caption" else None


def read_lines(path: Path, what: str, *, root: str | os.PathLike | None = None) -> list[str]:
    """The lines of a UTF-8 index file, split as the official readers' ``for line in f`` does
    (at newlines only, never at U+2028 or U+0085 as ``str.splitlines`` would).

    The one rule of :mod:`cusa.safe_files` applies: a regular file of at most
    ``MAX_INDEX_BYTES`` (a FIFO or ``/dev/zero`` is never read), inside ``root`` when given.

    Raises:
        DatasetError: the file is missing, not a regular file, too big, outside ``root`` or not
            UTF-8; the message names it (``what`` says what it is, e.g. ``"STS file"``).
    """
    if not os.path.lexists(path):
        raise DatasetError(f"{what} {short_path(path)} does not exist")
    lines, reason = read_lines_under(path, root=root, what=what)
    if lines is None:
        raise DatasetError(f"{reason}; point --root at the benchmark's own files")
    return lines


def is_caption_file(spec: str | os.PathLike) -> bool:
    """Whether ``--data`` names one JSON caption file (rather than a dataset or tars)."""
    return str(spec).lower().endswith(".json")


def open_caption_file(
    path: str | os.PathLike,
    *,
    split: str = DEFAULT_SPLIT,
    image_root: str | os.PathLike | None = None,
) -> AlbefReader | KarpathyReader:
    """The reader of one caption file.

    - A JSON list is the ALBEF/CUSA layout (:class:`~cusa.readers.AlbefReader`): records
      ``{image_path | image, caption, image_id}``; ``caption`` may be a list and ``image_id`` may
      be absent (then the file name is the id). ``split`` only names it.
    - A JSON object is a Karpathy split file (:class:`~cusa.readers.KarpathyReader`):
      the ``split`` images only (``test``: COCO 5K, Flickr30K 1K), at
      ``<image_root>/<filepath>/<filename>``; caption annotation ids are the ``sentid``\\ s.
      ``dataset_flickr30k.json`` is read as Flickr30K (ids are file names), any other name as
      COCO (ids are ``cocoid``\\ s), as the registered ``flickr30k`` and ``coco`` datasets.

    Args:
        path: the JSON file.
        split: the Karpathy split to read.
        image_root: folder the image paths are relative to; default the JSON's folder.

    Raises:
        DatasetError: the file is missing or neither layout, or the split has no images.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"caption file {str(p)!r} does not exist")
    with p.open("rb") as fh:
        head = fh.read(4096).lstrip()[:1]  # the JSON value's first byte tells the layout
    if head == b"[":
        root = Path(image_root).expanduser() if image_root is not None else p.parent
        if not root.is_dir():
            raise DatasetError(
                f"image root {str(root)!r} of caption file {str(p)!r} is not a directory"
            )
        return AlbefReader(root, split, annotations=p, name=p.stem)
    if head != b"{":
        raise DatasetError(
            f"caption file {str(p)!r} must be a JSON list of records (ALBEF/CUSA) or a Karpathy "
            "split file (an object with 'images')"
        )
    variant = "flickr30k" if p.name == "dataset_flickr30k.json" else "coco"

    def reader(s: str) -> KarpathyReader:
        image_dir = str(Path(image_root).expanduser()) if image_root is not None else "."
        return KarpathyReader(
            p.parent, s, variant=variant, include_restval=False, annotations=p,
            image_dir=image_dir, name=variant,
        )  # fmt: skip

    out = reader(split)
    if len(out) == 0:
        have = sorted(s for s in KARPATHY_SPLITS if s != split and len(reader(s)))
        raise DatasetError(
            f"{str(p)!r} has no {split!r} images (splits there: {', '.join(have) or 'none'})"
        )
    return out


def open_eval_data(
    spec: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
) -> DatasetReader:
    """The reader of an eval set: everything ``cusa extract --dataset`` accepts, or a caption file.

    Args:
        spec: a registered dataset name (``coco``, ``flickr30k``, ``coco-sample``...), a folder
            (its layout is sniffed), webdataset tars (a path, a brace pattern, ``s3://``,
            ``pipe:``), or a ``.json`` caption file (:func:`open_caption_file`).
        root: the dataset folder, for registered names that need one.
        split: the split to read (default ``test``).
        image_root: the images of a caption file (default: its folder).

    Raises:
        ConfigError: ``root`` with a caption file, or ``image_root`` with anything else.
        DatasetError, UnknownNameError: as :func:`cusa.readers.open_dataset`.
    """
    split = split or DEFAULT_SPLIT
    if is_caption_file(spec):
        if root is not None:
            raise ConfigError(
                f"root {str(root)!r} is for registered dataset names; the images of the caption "
                f"file {str(spec)!r} are given with image_root"
            )
        return open_caption_file(spec, split=split, image_root=image_root)
    if image_root is not None:
        raise ConfigError(
            f"image_root is for a .json caption file; {str(spec)!r} is read as a dataset "
            "(registered name with root, folder or webdataset tars)"
        )
    return open_dataset(str(spec), root=None if root is None else str(root), split=split)


def benchmark_name(reader: DatasetReader, num_images: int) -> str:
    """The paper's name of a whole Karpathy test split (``"COCO 5K test (Karpathy)"``), or ``""``."""
    if not isinstance(reader, KarpathyReader) or reader.split != "test":
        return ""
    return _KARPATHY_BENCHMARKS.get((reader.variant, num_images), "")


@dataclass(frozen=True)
class CaptionDataset:
    """Images and their captions in evaluation order, as listed by a caption file's index.

    Args:
        image_ids: one id per image.
        image_paths: the image files.
        captions: every caption.
        image_ids_of_texts: the image id of each caption.
        source: the file it was read from.
        caption_ann_ids: the COCO caption annotation id of each caption when known (Karpathy's
            ``sentid``); needed for the ECCV Caption ground truth.
        benchmark: a name for the split when it is recognised, e.g. ``"Flickr30K 1K test"``.
    """

    image_ids: list[str]
    image_paths: list[Path]
    captions: list[str]
    image_ids_of_texts: list[str]
    source: str = ""
    caption_ann_ids: list[int | None] | None = None
    benchmark: str = ""


def load_caption_json(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    split: str = DEFAULT_SPLIT,
) -> CaptionDataset:
    """The index of a caption file (:func:`open_caption_file`), without reading any image.

    Captions are grouped by image, images in order of first appearance.

    Args:
        path: the JSON file.
        image_root: folder the image paths are relative to; default the JSON's folder.
        max_images: keep only the first N images and their captions.
        split: the split of a Karpathy file (ignored for ALBEF/CUSA files).
    """
    reader = open_caption_file(path, split=split, image_root=image_root)
    items = reader.items()
    kept = items[:max_images] if max_images else items
    captions = [c if isinstance(c, str) else c.decode("utf-8", "replace") for it in kept
                for c in it.captions]  # fmt: skip
    coco = isinstance(reader, KarpathyReader) and reader.variant == "coco"
    return CaptionDataset(
        image_ids=[it.image_id for it in kept],
        image_paths=[reader.root / it.image_path for it in kept],
        captions=captions,
        image_ids_of_texts=[it.image_id for it in kept for _ in it.captions],
        source=str(path),
        caption_ann_ids=[a for it in kept for a in it.ann_ids] if coco else None,
        benchmark="" if max_images else benchmark_name(reader, len(items)),
    )


class CaptionDatasetReader:
    """A :class:`CaptionDataset` as a dataset reader: one shard, images read from their paths.

    Each image's captions are yielded with it, in the order they have in ``data.captions``;
    :meth:`caption_order` says where each yielded caption sits in ``data.captions``.
    """

    def __init__(self, data: CaptionDataset, *, name: str = "captions", split: str = "eval"):
        if len(data.image_ids) != len(data.image_paths):
            raise DatasetError(
                f"{len(data.image_ids)} image ids but {len(data.image_paths)} image paths"
            )
        if len(data.image_ids_of_texts) != len(data.captions):
            raise DatasetError(
                f"{len(data.captions)} captions but {len(data.image_ids_of_texts)} image ids of them"
            )
        self.data = data
        self.name = name
        self.split = split
        self._rows: dict[str, list[int]] = {iid: [] for iid in data.image_ids}
        for t, iid in enumerate(data.image_ids_of_texts):
            if iid not in self._rows:
                raise DatasetError(f"caption {t} belongs to image id {iid!r}, which is not listed")
            self._rows[iid].append(t)

    def caption_order(self) -> list[int]:
        """The index in ``data.captions`` of each caption, in the order :meth:`read` yields them."""
        return [t for iid in self.data.image_ids for t in self._rows[iid]]

    def shards(self) -> list[ShardRef]:
        return [ShardRef("all", self.data.source or self.name, len(self.data.image_ids))]

    def read(self, shard: ShardRef) -> Iterator[Sample]:
        d = self.data
        for iid, path in zip(d.image_ids, d.image_paths, strict=True):
            rows = self._rows[iid]
            try:
                image, error = Path(path).read_bytes(), None
            except OSError as exc:
                image, error = None, f"cannot read {str(path)!r}: {exc}"
            yield Sample(
                image_id=iid,
                image=image,
                captions=[d.captions[t] for t in rows],
                caption_ids=[caption_id(iid, k) for k in range(len(rows))],
                caption_ann_ids=[d.caption_ann_ids[t] for t in rows] if d.caption_ann_ids else [],
                image_error=error,
                shard=shard.key,
            )

    def manifest_hash(self) -> str:
        d = self.data
        rows = [d.image_ids, [str(p) for p in d.image_paths], d.captions, d.image_ids_of_texts]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def manifest_info(self, modality: str | None = None) -> None:
        """No per-modality manifest: :meth:`manifest_hash` identifies the whole set."""
        return None

    def __repr__(self) -> str:
        return f"CaptionDatasetReader(source={self.data.source!r})"
