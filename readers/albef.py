"""The ALBEF/CUSA JSON layout: ``<root>/new_{split}.json``, one record per caption.

A record is ``{"image_path": "./pics/x.jpg", "caption": "...", "image_id": "x.jpg"}``
(the CUSA release). ALBEF's own files use ``image`` instead of ``image_path`` and may give
``caption`` as a list and omit ``image_id``; both are accepted. Captions are grouped by image id
in order of first appearance; a caption's k is its index within its image.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from ..errors import DatasetError
from ._common import file_kind, load_json_file, raw_caption, short_repr
from .indexed import DEFAULT_SHARD_SIZE, IndexedReader, IndexItem

log = logging.getLogger(__name__)


def albef_splits(root: Path) -> list[str]:
    """The splits present under ``root`` (from ``new_{split}.json`` file names)."""
    return sorted(p.name[len("new_") : -len(".json")] for p in root.glob("new_*.json"))


class AlbefReader(IndexedReader):
    """Reads ``<root>/new_{split}.json`` with image paths relative to ``root``.

    Args:
        root: folder holding ``new_{split}.json`` and the images it references.
        split: the split, i.e. the ``{split}`` in the file name.
        annotations: path of the JSON file when it is not ``<root>/new_{split}.json``.
        shard_size: images per shard.
        name: the dataset name reported by the reader.
        allow_outside_root: read image paths that are absolute, climb out with ``../`` or are
            symlinks leading outside ``root``; by default such a sample is ledgered, not read.
    """

    kind: ClassVar[str] = "albef"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        annotations: str | Path | None = None,
        shard_size: int = DEFAULT_SHARD_SIZE,
        name: str = "albef",
        allow_outside_root: bool = False,
    ) -> None:
        super().__init__(root, split, shard_size, name, allow_outside_root=allow_outside_root)
        self.annotations = (
            Path(annotations).expanduser() if annotations else self.root / f"new_{self.split}.json"
        )
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root {str(self.root)!r} is not a directory; pass --root pointing to the "
                "folder holding new_{split}.json and the images"
            )
        if self.annotations.exists() and not self.annotations.is_file():
            raise DatasetError(
                f"ALBEF split file {str(self.annotations)!r} is "
                f"{file_kind(self.annotations.stat().st_mode)}, not a regular file; point the "
                "dataset at a regular JSON file"
            )
        if not self.annotations.is_file():
            have = albef_splits(self.root)
            hint = f"splits found there: {', '.join(have)}" if have else "no new_*.json found there"
            raise DatasetError(
                f"ALBEF split file not found: expected {str(self.annotations)!r} ({hint})"
            )

    def _index_file(self) -> Path:
        return self.annotations

    def _build_index(self) -> list[IndexItem]:
        records = load_json_file(self.annotations)
        if not isinstance(records, list):
            raise DatasetError(
                f"{str(self.annotations)!r} is not in the ALBEF layout: expected a JSON list of "
                "records with 'image_path' (or 'image') and 'caption'"
            )
        order: list[str] = []
        paths: dict[str, tuple[str, int]] = {}
        captions: dict[str, list[str | bytes]] = {}
        for pos, rec in enumerate(records):
            image_id, rel, caps = self._parse(rec, pos)
            known = paths.get(image_id)
            if known is None:
                paths[image_id] = (rel, pos)
                captions[image_id] = []
                order.append(image_id)
            elif known[0] != rel:
                raise DatasetError(
                    f"duplicate image id {image_id!r} in {str(self.annotations)!r}: record "
                    f"{known[1]} has image {known[0]!r} but record {pos} has {rel!r}; "
                    "image ids must name exactly one image"
                )
            captions[image_id].extend(caps)
        return [
            IndexItem(
                image_id,
                paths[image_id][0],
                tuple(captions[image_id]),
                (None,) * len(captions[image_id]),
            )
            for image_id in order
        ]

    def _parse(self, rec: Any, pos: int) -> tuple[str, str, list[str | bytes]]:
        if not isinstance(rec, dict):
            raise DatasetError(
                f"record {pos} of {str(self.annotations)!r} is not an object: {short_repr(rec)}"
            )
        path = rec.get("image_path", rec.get("image"))
        if not isinstance(path, str) or not path:
            raise DatasetError(
                f"record {pos} of {str(self.annotations)!r} has no 'image_path' (or 'image'): "
                f"{short_repr(rec)}"
            )
        cap = rec.get("caption", [])
        caps = [cap] if isinstance(cap, str) else cap
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DatasetError(
                f"record {pos} of {str(self.annotations)!r}: 'caption' must be a string or a "
                f"list of strings, got {short_repr(cap)}"
            )
        rel = PurePosixPath(path.replace("\\", "/"))
        rel_str = str(rel)  # normalises './pics/x.jpg' -> 'pics/x.jpg'
        image_id = rec.get("image_id")
        image_id = rel.name if image_id is None else str(image_id)
        return image_id, rel_str, [raw_caption(c) for c in caps]
