"""The dataset registry and :func:`open_dataset`, which turns a name or a path/URL into a reader.

Other packages add datasets through the ``cusa.datasets`` entry-point group; an entry point may
name a :class:`DatasetEntry` or a factory ``(root, split, shard_size, **options) -> reader``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DatasetError, UnknownNameError
from ..registry import Registry, load_entry_points
from .albef import AlbefReader, albef_splits
from .base import DatasetReader
from .folder import FolderReader, find_captions_file
from .indexed import DEFAULT_SHARD_SIZE
from .karpathy import KarpathyReader
from .wds import WebDatasetReader, looks_like_webdataset
from .wds_format import MANIFEST_NAME

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cusa.datasets"

Factory = Callable[..., DatasetReader]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: how to open it and a one-line description.

    Args:
        name: registry name (``coco``).
        factory: ``(root, split, shard_size, **options) -> DatasetReader``.
        description: shown by ``cusa datasets list``.
        needs_root: whether ``--root`` is required.
    """

    name: str
    factory: Factory
    description: str
    needs_root: bool = True


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def coco_sample_root() -> Path:
    """The folder of the embedded ``coco-sample`` dataset inside the installed package."""
    root = resources.files("cusa.readers") / "coco_sample"
    path = Path(str(root))
    if not (path / "new_train.json").is_file():
        raise DatasetError(
            f"the embedded coco-sample data is missing at {str(path)!r}; reinstall cusa "
            "(it ships coco_sample/*.json and coco_sample/pics/*.jpg as package data)"
        )
    return path


def _need_root(name: str, root: str | None, expected: str) -> Path:
    if root is None:
        raise DatasetError(
            f"dataset {name!r} needs --root DIR (data.root in a training config): the folder "
            f"holding {expected}, or that index file"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"--root {root!r} for dataset {name!r} is not a directory; it must hold {expected}"
        )
    return path


def _root_and_file(name: str, root: str | None, expected: str) -> tuple[Path, Path | None]:
    """``--root`` as a folder, or as the dataset's index file (its folder is then the root)."""
    if root is not None and Path(root).expanduser().is_file():
        path = Path(root).expanduser()
        return path.parent, path
    return _need_root(name, root, expected), None


#: Index file names that say their split: ``new_test.json`` (ALBEF/CUSA), ``captions_val.tsv``
#: (plain folder), and ALBEF's own ``coco_karpathy_test.json`` / ``flickr30k_train.json``.
_SPLIT_IN_NAME = re.compile(
    r"^(?:new|captions)_(?P<split>[A-Za-z0-9+-]+)$|_(?P<known>train|val|test|restval|dev)$"
)


def split_from_file_name(path: Path) -> str | None:
    """The split an index file names (``new_test.json`` -> ``test``), or None."""
    m = _SPLIT_IN_NAME.search(path.stem)
    return (m.group("split") or m.group("known")) if m else None


def _split_for(index: Path | None, split: str | None) -> str:
    if split is not None:
        return split
    return (split_from_file_name(index) if index is not None else None) or "train"


def _karpathy(variant: str) -> Factory:
    def factory(
        root: str | None, split: str | None, shard_size: int, **options: Any
    ) -> DatasetReader:
        folder, index = _root_and_file(variant, root, f"dataset_{variant}.json and the images")
        return KarpathyReader(
            folder,
            split or "train",
            variant=variant,
            shard_size=shard_size,
            name=variant,
            annotations=index,
            **options,
        )

    return factory


def _albef(root: str | None, split: str | None, shard_size: int, **options: Any) -> DatasetReader:
    folder, index = _root_and_file("albef", root, "new_{split}.json and the images it references")
    return AlbefReader(
        folder, _split_for(index, split), annotations=index, shard_size=shard_size, **options
    )


def _coco_sample(
    root: str | None, split: str | None, shard_size: int, **options: Any
) -> DatasetReader:
    if root is not None:
        raise DatasetError(
            f"dataset 'coco-sample' is embedded in the package and takes no --root (got {root!r})"
        )
    return AlbefReader(
        coco_sample_root(), split or "train", shard_size=shard_size, name="coco-sample", **options
    )


def _folder(root: str | None, split: str | None, shard_size: int, **options: Any) -> DatasetReader:
    folder, index = _root_and_file("folder", root, "the images and captions.tsv or captions.jsonl")
    return FolderReader(
        folder, _split_for(index, split), shard_size=shard_size, captions=index, **options
    )


def _webdataset(
    root: str | None, split: str | None, shard_size: int, **options: Any
) -> DatasetReader:
    if root is None:
        raise DatasetError(
            "dataset 'webdataset' needs --root: a folder of tars, a tar path, a brace pattern "
            "or an s3:// / pipe: URL (or pass that directly as --dataset)"
        )
    if Path(root).expanduser().name == MANIFEST_NAME:
        root = str(Path(root).expanduser().parent)
    return WebDatasetReader(root, split or "train", **options)


DATASETS.register(
    "coco",
    DatasetEntry("coco", _karpathy("coco"), "COCO Karpathy splits: dataset_coco.json + images"),
)
DATASETS.register(
    "flickr30k",
    DatasetEntry(
        "flickr30k",
        _karpathy("flickr30k"),
        "Flickr30K Karpathy splits: dataset_flickr30k.json + images",
    ),
)
DATASETS.register(
    "albef",
    DatasetEntry("albef", _albef, "ALBEF/CUSA layout: new_{split}.json + images"),
)
DATASETS.register(
    "coco-sample",
    DatasetEntry(
        "coco-sample",
        _coco_sample,
        "32 real COCO images embedded in the package (splits train, val)",
        needs_root=False,
    ),
)
DATASETS.register(
    "folder",
    DatasetEntry("folder", _folder, "a folder of images + captions.tsv or captions.jsonl"),
)
DATASETS.register(
    "webdataset",
    DatasetEntry("webdataset", _webdataset, "webdataset tars (folder, pattern, s3://, pipe:)"),
)

_BUILTIN = frozenset(DATASETS.list())
_entry_points_loaded = False


def _as_entry(obj: Any) -> DatasetEntry:
    if isinstance(obj, DatasetEntry):
        return obj
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return DatasetEntry(getattr(obj, "__name__", "plugin"), obj, doc[0] if doc else "(plugin)")


def _load_plugins() -> None:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        load_entry_points(ENTRY_POINT_GROUP, DATASETS, loader=_as_entry)


def list_datasets() -> list[str]:
    """Names of the registered datasets (built in and from plugins)."""
    _load_plugins()
    return DATASETS.list()


def sniff_dataset(path: Path, split: str) -> str:
    """Which registered reader a local folder is for, judged by the files in it.

    Raises:
        DatasetError: the folder matches no known layout.
    """
    if (path / MANIFEST_NAME).is_file() or any(path.glob("*.tar")):
        return "webdataset"
    if (path / f"new_{split}.json").is_file() or albef_splits(path):
        return "albef"
    if (path / "dataset_coco.json").is_file():
        return "coco"
    if (path / "dataset_flickr30k.json").is_file():
        return "flickr30k"
    if find_captions_file(path, split) is not None:
        return "folder"
    raise DatasetError(
        f"cannot tell what dataset {str(path)!r} is: expected new_{{split}}.json (ALBEF), "
        "dataset_coco.json / dataset_flickr30k.json (Karpathy), captions.tsv / captions.jsonl "
        "(plain folder), or manifest.json / *.tar (webdataset)"
    )


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def check_dataset_name(name: str) -> str:
    """Refuse a dataset name that is not one plain path component of the store.

    Raises:
        DatasetError: the name is empty, starts with a dot or holds other characters than
            letters, digits, ``.``, ``_``, ``+``, ``=`` and ``-``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200:
        raise DatasetError(
            f"--name {name!r} is invalid: a dataset name is stored as one folder of the store, "
            "so use letters, digits, '.', '_', '+', '=' or '-', starting with a letter or digit "
            "(e.g. --name coco-lab-b)"
        )
    stored = name.strip("._")
    if stored != name:
        # The store keeps a dataset in the folder of its name with trailing '.'/'_' stripped
        # (cusa.store.layout.safe_name), so 'lab.' and 'lab_' would share 'lab''s folder.
        raise DatasetError(
            f"--name {name!r} ends in '.' or '_', so it would be stored in the folder {stored!r} "
            f"and collide with --name {stored!r}; use --name {stored!r} for that same dataset, "
            f"or a distinct name such as --name {stored + '-2'!r}"
        )
    return name


def _open_index_file(
    path: Path, root: str | None, split: str | None, shard_size: int, **options: Any
) -> DatasetReader:
    """A dataset given by its index file: the file's folder is the dataset root."""
    if root is not None:
        raise DatasetError(
            f"--dataset {str(path)!r} is a file, so --root {root!r} is not used; drop --root"
        )
    name = path.name
    if name == MANIFEST_NAME:
        return WebDatasetReader(str(path.parent), split or "train", **options)
    for variant in ("coco", "flickr30k"):
        if name == f"dataset_{variant}.json":
            return DATASETS.get(variant).factory(str(path), split, shard_size, **options)
    if path.suffix in (".tsv", ".jsonl"):
        return _folder(str(path), split, shard_size, **options)
    if path.suffix == ".json":
        with open(path, "rb") as fh:  # a regular file (checked above), so this cannot block
            head = fh.read(4096).lstrip()
        if head.startswith(b"["):  # a list of caption records: the ALBEF/CUSA layout
            return _albef(str(path), split, shard_size, **options)
        raise DatasetError(
            f"--dataset {str(path)!r} is a JSON object, not the ALBEF list of caption records; "
            "if it is a Karpathy split file, pass --dataset coco (or flickr30k) "
            f"--root {str(path)!r}"
        )
    raise DatasetError(
        f"--dataset {str(path)!r} is a file cusa cannot read as a dataset; pass a *.tar shard, "
        "an index file (new_{split}.json, dataset_coco.json, dataset_flickr30k.json, "
        "captions.tsv/.jsonl, manifest.json) or the folder holding one"
    )


def open_dataset(
    spec: str,
    root: str | None = None,
    split: str | None = "train",
    shard_size: int | None = None,
    name: str | None = None,
    **options: Any,
) -> DatasetReader:
    """Open a dataset by registered name, folder, index file, tar path, brace pattern or URL.

    Args:
        spec: a registered name (see :func:`list_datasets`), a local folder (its layout is
            sniffed), an index file inside one (``new_test.json``, ``dataset_coco.json``,
            ``captions.tsv``, a webdataset ``manifest.json``), or webdataset tars: ``*.tar``,
            ``shard-{000000..000009}.tar``, ``s3://bucket/shard-{0..9}.tar`` or ``pipe:<command>``.
        root: the dataset folder (or its index file), for registered names that need one.
        split: the split to read; ``None`` means the split an index file names
            (``new_test.json`` -> ``test``), else ``train``.
        shard_size: images per shard for JSON-indexed datasets (tars are their own shards);
            None means ``DEFAULT_SHARD_SIZE`` (1000).
        name: the dataset's name in the store instead of the reader's own (``albef``,
            ``coco``...), so two folders of one layout can share a split in one store.
        **options: passed to the reader (e.g. ``include_restval=False`` for Karpathy COCO,
            ``storage_options={...}`` for webdataset).

    Returns:
        A :class:`DatasetReader`.

    Raises:
        UnknownNameError: ``spec`` is neither a registered name nor an existing path/URL.
        DatasetError: the dataset's files are missing or malformed, or ``name`` is invalid.
    """
    _load_plugins()
    if name is not None:
        check_dataset_name(name)
    reader = _open(spec, root, split, DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
                   **options)  # fmt: skip
    if name is not None:
        reader.name = name
    return reader


def _open(
    spec: str, root: str | None, split: str | None, shard_size: int, **options: Any
) -> DatasetReader:
    if spec in DATASETS:
        # The built-in factories infer a split from an index file given as --root; a plugin's
        # factory gets the documented default.
        split = split if spec in _BUILTIN else (split or "train")
        return DATASETS.get(spec).factory(root, split, shard_size, **options)
    if looks_like_webdataset(spec):
        if root is not None:
            raise DatasetError(f"--root is not used with the webdataset URL {spec!r}; drop it")
        return WebDatasetReader(spec, split or "train", **options)
    path = Path(spec).expanduser()
    if path.is_dir():
        if root is not None:
            raise DatasetError(
                f"--dataset {spec!r} is a folder, so --root {root!r} is not used; drop --root"
            )
        split = split or "train"
        kind = sniff_dataset(path, split)
        if kind == "webdataset":
            return WebDatasetReader(str(path), split, **options)
        log.info("dataset %s looks like %r", path, kind)
        return DATASETS.get(kind).factory(str(path), split, shard_size, **options)
    if path.is_file():
        return _open_index_file(path, root, split, shard_size, **options)
    if path.exists():
        raise DatasetError(
            f"--dataset {spec!r} is not a regular file or folder; pass the dataset's folder, its "
            "index file or its tars"
        )
    if "/" in spec or spec.startswith((".", "~")):
        raise DatasetError(f"dataset path {spec!r} does not exist")
    known = ", ".join(DATASETS.list())
    raise UnknownNameError(
        f"unknown dataset {spec!r}; known datasets: {known}; or pass a folder, an index file "
        "(new_{split}.json...), a *.tar path, a brace pattern, an s3:// URL or a pipe: command"
    )
