"""COCO and Flickr30K Karpathy splits: ``dataset_coco.json`` / ``dataset_flickr30k.json``.

Each entry of ``images`` has ``filename``, ``split`` (``train``, ``val``, ``test``,
``restval``), ``sentences`` (``raw``, ``sentid``) and, for COCO, ``filepath`` and ``cocoid``.
The image id is ``str(cocoid)`` for COCO and the file name for Flickr30K; the caption
annotation id is ``sentid``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from ..errors import DatasetError
from ._common import load_json_file, raw_caption
from .indexed import (
    DEFAULT_SHARD_SIZE,
    IndexedReader,
    IndexItem,
    check_duplicate,
)

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")

# Folders (relative to the root) where the images are commonly unpacked; the first that holds
# the first images of the split is used.
_IMAGE_DIR_CANDIDATES = (".", "images", "flickr30k-images", "flickr30k_images", "Flickr30k")


class KarpathyReader(IndexedReader):
    """Reads a Karpathy split file plus its image folder.

    Args:
        root: folder holding the JSON file and the images (``<root>/<filepath>/<filename>``).
        split: ``train``, ``val``, ``test`` or ``restval``.
        variant: ``coco`` (id = cocoid) or ``flickr30k`` (id = file name).
        include_restval: for ``split="train"``, also include the ``restval`` images (the usual
            113,287-image COCO training set). Default True.
        annotations: path of the JSON file when it is not ``<root>/dataset_<variant>.json``.
        image_dir: folder of the images, relative to root or absolute; found automatically
            among ``.``, ``images`` and ``flickr30k-images`` when not given.
        shard_size: images per shard.
        allow_outside_root: read image paths that climb out of ``root`` (and ``image_dir``)
            with ``../`` or through symlinks; by default such a sample is ledgered, not read.
    """

    kind: ClassVar[str] = "karpathy"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        variant: str = "coco",
        include_restval: bool = True,
        annotations: str | Path | None = None,
        image_dir: str | Path | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        name: str | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        if variant not in ("coco", "flickr30k"):
            raise DatasetError(f"unknown Karpathy variant {variant!r}; use 'coco' or 'flickr30k'")
        super().__init__(
            root, split, shard_size, name or variant, allow_outside_root=allow_outside_root
        )
        if self.split not in KARPATHY_SPLITS:
            raise DatasetError(
                f"{self.name!r} has no split {split!r}; Karpathy splits are "
                f"{', '.join(KARPATHY_SPLITS)}"
            )
        self.variant = variant
        self.include_restval = bool(include_restval)
        self.annotations = (
            Path(annotations).expanduser() if annotations else self.root / f"dataset_{variant}.json"
        )
        self.image_dir = str(image_dir) if image_dir is not None else None
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root {str(self.root)!r} is not a directory; pass --root pointing to the "
                f"folder holding dataset_{variant}.json and the images"
            )
        if not self.annotations.is_file():
            raise DatasetError(
                f"Karpathy split file not found: expected {str(self.annotations)!r} "
                f"(dataset_{variant}.json from https://cs.stanford.edu/people/karpathy/deepimagesent/)"
            )

    def _index_file(self) -> Path:
        return self.annotations

    def _options(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "include_restval": self.include_restval and self.split == "train",
            "image_dir": self.image_dir,
        }

    def _allowed_roots(self) -> list[str]:
        roots = super()._allowed_roots()
        if self.image_dir is not None:  # given explicitly by the user, so trusted
            roots.append(os.path.realpath(self.root / self.image_dir))
        return roots

    def _wanted(self) -> set[str]:
        if self.split == "train" and self.include_restval:
            return {"train", "restval"}
        return {self.split}

    def _build_index(self) -> list[IndexItem]:
        data = load_json_file(self.annotations)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DatasetError(
                f"{str(self.annotations)!r} is not a Karpathy split file: expected a JSON object "
                "with an 'images' list"
            )
        wanted = self._wanted()
        selected = [img for img in images if isinstance(img, dict) and img.get("split") in wanted]
        image_base = self._find_image_dir(selected)
        items: list[IndexItem] = []
        seen: dict[str, str] = {}
        for pos, img in enumerate(selected):
            try:
                filename = str(img["filename"])
                if self.variant == "coco":
                    image_id = str(img["cocoid"]) if "cocoid" in img else filename
                else:
                    image_id = filename
                rel = Path(str(img.get("filepath", ""))) / filename
                sentences = img.get("sentences", [])
                captions = tuple(raw_caption(str(s["raw"])) for s in sentences)
                ann_ids = tuple(
                    int(s["sentid"]) if s.get("sentid") is not None else None for s in sentences
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(
                    f"malformed entry {pos} of split {self.split!r} in {str(self.annotations)!r}: "
                    f"{exc!r}; each image needs 'filename' and 'sentences' with 'raw'"
                ) from exc
            check_duplicate(
                seen, image_id, f"images[{img.get('imgid', pos)}] ({rel.as_posix()})", self.name
            )
            items.append(IndexItem(image_id, (image_base / rel).as_posix(), captions, ann_ids))
        return items

    def _find_image_dir(self, selected: list[dict]) -> Path:
        if self.image_dir is not None:
            return Path(self.image_dir)
        probe = [
            Path(str(img.get("filepath", ""))) / str(img.get("filename", ""))
            for img in selected[:5]
        ]
        if not probe:
            return Path(".")
        for cand in _IMAGE_DIR_CANDIDATES:
            if any((self.root / cand / rel).is_file() for rel in probe):
                return Path(cand)
        raise DatasetError(
            f"images of {self.name!r} split {self.split!r} not found: expected e.g. "
            f"{str(self.root / probe[0])!r} (also looked in "
            f"{', '.join(repr(c) for c in _IMAGE_DIR_CANDIDATES[1:])} under the root); "
            "pass image_dir= the folder that holds them"
        )
