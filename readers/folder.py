"""A plain folder of images with a captions file.

The captions file sits in the folder and is, in order of preference,
``captions_{split}.jsonl``, ``captions_{split}.tsv``, ``captions.jsonl`` or ``captions.tsv``:

- ``.tsv``: one caption per line, ``<relative image path><TAB><caption>``.
- ``.jsonl``: one JSON object per line, ``{"image": "a.jpg", "caption": "..."}`` or
  ``{"image": "a.jpg", "captions": ["...", "..."]}``; an optional ``"ann_id"`` (int) or
  ``"ann_ids"`` (list) is carried as the caption annotation id.

Several lines may name the same image; its captions are kept in file order. The image id is the
image path relative to the folder (posix separators). Images in the folder that the captions
file does not name are included after the named ones, sorted, with no captions, so that their
image features are still extracted.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import ClassVar

from ..errors import DatasetError
from ._common import (
    IMAGE_EXTENSIONS,
    MAX_INDEX_BYTES,
    decode_caption,
    loads_json_member,
    raw_caption,
    read_regular_file,
)
from .indexed import DEFAULT_SHARD_SIZE, IndexedReader, IndexItem

log = logging.getLogger(__name__)


def find_captions_file(root: Path, split: str) -> Path | None:
    """The captions file of ``split`` in ``root``, or None."""
    for name in (
        f"captions_{split}.jsonl",
        f"captions_{split}.tsv",
        "captions.jsonl",
        "captions.tsv",
    ):
        if (root / name).is_file():
            return root / name
    return None


class FolderReader(IndexedReader):
    """Reads a folder of images plus ``captions.jsonl`` / ``captions.tsv``.

    Args:
        root: the folder.
        split: selects ``captions_{split}.*`` when present; otherwise ``captions.*`` is used.
        include_uncaptioned: also yield images that no caption line names. Default True.
        shard_size: images per shard.
        name: the dataset name reported by the reader.
        allow_outside_root: read images that are symlinks leading outside ``root``; by default
            such a sample is ledgered, not read.
        captions: the captions file, when it is not one of the names above (it must lie in
            ``root``, since image paths are relative to it).
    """

    kind: ClassVar[str] = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        include_uncaptioned: bool = True,
        shard_size: int = DEFAULT_SHARD_SIZE,
        name: str = "folder",
        allow_outside_root: bool = False,
        captions: str | Path | None = None,
    ) -> None:
        super().__init__(root, split, shard_size, name, allow_outside_root=allow_outside_root)
        self.include_uncaptioned = bool(include_uncaptioned)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {str(self.root)!r} is not a directory")
        if captions is not None:
            captions = Path(captions).expanduser()
            if not captions.is_file():
                raise DatasetError(f"captions file {str(captions)!r} is not a file")
        else:
            captions = find_captions_file(self.root, self.split)
        if captions is None:
            raise DatasetError(
                f"no captions file in {str(self.root)!r}: expected captions.tsv "
                "(lines of '<image file><TAB><caption>') or captions.jsonl "
                f"(or captions_{self.split}.tsv / .jsonl)"
            )
        self.captions_file = captions

    def _index_file(self) -> Path:
        return self.captions_file

    def _options(self) -> dict[str, object]:
        return {"include_uncaptioned": self.include_uncaptioned}

    def _build_index(self) -> list[IndexItem]:
        rows = self._read_jsonl() if self.captions_file.suffix == ".jsonl" else self._read_tsv()
        order: list[str] = []
        caps: dict[str, list[str | bytes]] = {}
        anns: dict[str, list[int | None]] = {}
        for image, captions, ann_ids in rows:
            if image not in caps:
                order.append(image)
                caps[image] = []
                anns[image] = []
            caps[image].extend(captions)
            anns[image].extend(ann_ids)
        if self.include_uncaptioned:
            named = set(order)
            for path in sorted(self.root.rglob("*")):
                rel = path.relative_to(self.root).as_posix()
                if (
                    path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                    and rel not in named
                    and not any(part.startswith(".") for part in Path(rel).parts)
                    and path.is_file()
                ):
                    order.append(rel)
                    caps[rel] = []
                    anns[rel] = []
        return [IndexItem(i, i, tuple(caps[i]), tuple(anns[i])) for i in order]

    def _image_key(self, name: str, line_no: int) -> str:
        rel = PurePosixPath(name.strip().replace("\\", "/"))
        if not name.strip() or rel.is_absolute() or ".." in rel.parts:
            raise DatasetError(
                f"{str(self.captions_file)!r} line {line_no}: image {name!r} must be a path "
                "relative to the folder, without '..'"
            )
        return str(rel)

    def _read_captions_file(self) -> bytes:
        data, reason = read_regular_file(self.captions_file, MAX_INDEX_BYTES, what="captions file")
        if data is None:
            raise DatasetError(f"{reason}; the captions file must be a regular file")
        return data

    def _read_tsv(self):
        for line_no, line in enumerate(self._read_captions_file().split(b"\n"), start=1):
            line = line.removesuffix(b"\r")
            if not line.strip():
                continue
            name, tab, caption = line.partition(b"\t")
            if not tab:
                raise DatasetError(
                    f"{str(self.captions_file)!r} line {line_no} has no TAB: expected "
                    "'<image file><TAB><caption>'"
                )
            try:
                image = name.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{str(self.captions_file)!r} line {line_no}: image name {name!r} is not UTF-8"
                ) from exc
            yield self._image_key(image, line_no), [decode_caption(caption)], [None]

    def _read_jsonl(self):
        raw = self._read_captions_file().decode("utf-8", "surrogateescape")
        for line_no, line in enumerate(raw.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = loads_json_member(line)
                if not isinstance(rec, dict):
                    raise TypeError(f"expected an object, got {type(rec).__name__}")
                image = rec["image"]
                if "captions" in rec:
                    captions = list(rec["captions"])
                    ann_ids = list(rec.get("ann_ids") or [None] * len(captions))
                else:
                    captions = [rec["caption"]]
                    ann_ids = [rec.get("ann_id")]
                if not isinstance(image, str) or not all(isinstance(c, str) for c in captions):
                    raise TypeError("'image' and captions must be strings")
                if len(ann_ids) != len(captions):
                    raise ValueError("'ann_ids' must have one entry per caption")
                ann_ids = [None if a is None else int(a) for a in ann_ids]
            except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
                raise DatasetError(
                    f"{str(self.captions_file)!r} line {line_no} is not a caption record ({exc}); "
                    'expected {"image": "a.jpg", "caption": "..."} or '
                    '{"image": "a.jpg", "captions": [...]}'
                ) from exc
            yield (
                self._image_key(image, line_no),
                [raw_caption(c) for c in captions],
                ann_ids,
            )
