"""Write any readable dataset as webdataset tars with a size cap and a ``manifest.json``.

Layout of the output folder::

    {split}-000000.tar, {split}-000001.tar, ...   one sample = <key>.<jpg|png|webp> + <key>.json
    manifest.json                                 shards, counts, bytes, sha256, source dataset

The tar key is :func:`cusa.readers.wds_format.encode_key` of the image id
(percent-encoding, so ``COCO_x.jpg`` becomes ``COCO_x%2Ejpg``), and ``<key>.json`` holds the true
``image_id``, the ``captions`` (a caption that is not valid UTF-8 as ``{"b64": ...}``),
``caption_ann_ids`` and, for a sample without image, ``image_error``. :class:`WebDatasetReader`
restores all of them, so reading the shards gives the same samples as reading the source.

Tars are written deterministically (mtime 0, uid 0, mode 0644) to ``<name>.partial`` and renamed
when complete; ``manifest.json`` is replaced last, so readers never see a half-written shard.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from ..sizes import parse_size
from .base import DatasetReader, Sample
from .wds import WebDatasetReader
from .wds_format import MANIFEST_FORMAT, MANIFEST_NAME, encode_key

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 256 * 10**6
MANIFEST_VERSION = 1


def image_extension(data: bytes) -> str:
    """The tar extension for encoded image bytes, judged by their magic number.

    Unknown bytes (e.g. a corrupt file) are kept as ``jpg`` so that the teacher's decoder, not
    the shard writer, reports them, exactly as it would when reading the source.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


@dataclass(frozen=True)
class ShardInfo:
    """One written tar."""

    file: str
    key: str
    samples: int
    captions: int
    bytes: int
    sha256: str
    image_ids: list[str] = field(repr=False)


@dataclass(frozen=True)
class ShardSetSummary:
    """What :func:`write_shards` wrote for one split."""

    out_dir: str
    split: str
    samples: int
    captions: int
    bytes: int
    image_errors: int
    shards: list[ShardInfo]

    def to_dict(self, with_ids: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_ids:
            for s in d["shards"]:
                s.pop("image_ids")
        return d


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _member_bytes(name: str, size: int) -> int:
    # header block (+ a PAX header pair for long names) + data padded to 512-byte blocks
    header = 512 if len(name) <= 100 else 512 * 3
    return header + -(-size // 512) * 512


def _padded(size: int) -> int:
    # tarfile pads the archive to whole 10240-byte records
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _encode_caption(caption: str | bytes) -> str | dict[str, str]:
    if isinstance(caption, bytes):
        return {"b64": base64.b64encode(caption).decode("ascii")}
    return caption


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members ``(name, data)`` that store one sample."""
    key = encode_key(sample.image_id)
    meta: dict[str, Any] = {
        "image_id": sample.image_id,
        "captions": [_encode_caption(c) for c in sample.captions],
        "caption_ann_ids": list(sample.caption_ann_ids),
    }
    if sample.image is None:
        meta["image_error"] = sample.image_error or "no image"
    if getattr(sample, "caption_error", None):
        meta["caption_error"] = sample.caption_error
    members = []
    if sample.image is not None:
        members.append((f"{key}.{image_extension(sample.image)}", sample.image))
    members.append((f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return members


class _TarSink:
    """One ``.partial`` tar being written."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.final = out_dir / name
        self.partial = out_dir / (name + ".partial")
        self._raw = open(self.partial, "wb")  # noqa: SIM115 - closed in finish/abort
        self._file = _HashingFile(self._raw)
        self._tar = tarfile.open(  # noqa: SIM115 - closed in finish/abort
            fileobj=self._file,  # type: ignore[arg-type]
            mode="w|",
            format=tarfile.PAX_FORMAT,
        )
        self.estimate = 1024
        self.samples = 0
        self.captions = 0
        self.image_ids: list[str] = []

    def add(self, sample: Sample, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self.estimate += _member_bytes(name, len(data))
        self.samples += 1
        self.captions += len(sample.captions)
        self.image_ids.append(sample.image_id)

    def finish(self) -> ShardInfo:
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.partial, self.final)
        return ShardInfo(
            file=self.final.name,
            key=self.final.name[: -len(".tar")],
            samples=self.samples,
            captions=self.captions,
            bytes=self._file.size,
            sha256=self._file.sha256.hexdigest(),
            image_ids=self.image_ids,
        )

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            self.partial.unlink(missing_ok=True)


def _samples(reader: DatasetReader) -> Iterator[Sample]:
    for shard in reader.shards():
        log.info("reading shard %s of %s", shard.key, reader.name)
        yield from reader.read(shard)


def _check_not_reading_output(reader: DatasetReader, out_dir: Path) -> None:
    if isinstance(reader, WebDatasetReader):
        for url in reader.urls:
            try:
                inside = Path(url).expanduser().resolve().parent == out_dir.resolve()
            except (OSError, ValueError):
                inside = False
            if inside:
                raise DatasetError(
                    f"cannot shard {url!r} into {str(out_dir)!r}: it would overwrite its own "
                    "input; choose another --out folder"
                )


def _load_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "splits": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(
            f"existing {str(path)!r} is unreadable ({exc}); remove it or choose another --out"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DatasetError(
            f"{str(path)!r} is not a cusa shard manifest; choose an empty --out folder"
        )
    data.setdefault("splits", {})
    return data


def write_shards(
    reader: DatasetReader,
    out_dir: str | Path,
    *,
    max_size: int | str = DEFAULT_MAX_SIZE,
    max_count: int | None = None,
) -> ShardSetSummary:
    """Write every sample of ``reader`` (in shard order) as ``{split}-NNNNNN.tar`` files.

    Args:
        reader: any dataset reader.
        out_dir: local output folder (created if needed). Other splits already there are kept;
            this split's old tars are replaced.
        max_size: cap on each tar's size in bytes, or a string like ``"256MB"``. A single sample
            larger than the cap gets a tar of its own.
        max_count: cap on samples per tar.

    Returns:
        A :class:`ShardSetSummary`; the same figures are in ``<out_dir>/manifest.json``.
    """
    cap = parse_size(max_size)
    if max_count is not None and max_count < 1:
        raise ConfigError(f"max_count must be >= 1, got {max_count!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _check_not_reading_output(reader, out)
    manifest_path = out / MANIFEST_NAME
    manifest = _load_manifest(manifest_path)
    split = reader.split
    source = {
        "dataset": reader.name,
        "split": split,
        "reader": type(reader).__name__,
        "manifest_hash": reader.manifest_hash(),
    }
    infos: list[ShardInfo] = []
    image_errors = 0
    sink: _TarSink | None = None
    try:
        for sample in _samples(reader):
            members = sample_members(sample)
            size = sum(_member_bytes(n, len(d)) for n, d in members)
            if sink is not None and (
                _padded(sink.estimate + size) > cap
                or (max_count is not None and sink.samples >= max_count)
            ):
                infos.append(sink.finish())
                sink = None
            if sink is None:
                sink = _TarSink(out, f"{split}-{len(infos):06d}.tar")
            sink.add(sample, members)
            image_errors += sample.image is None
        if sink is not None:
            infos.append(sink.finish())
            sink = None
    finally:
        if sink is not None:
            sink.abort()
    _remove_stale(out, split, {i.file for i in infos})
    summary = ShardSetSummary(
        out_dir=str(out),
        split=split,
        samples=sum(i.samples for i in infos),
        captions=sum(i.captions for i in infos),
        bytes=sum(i.bytes for i in infos),
        image_errors=image_errors,
        shards=infos,
    )
    entry = summary.to_dict(with_ids=True)
    entry.pop("out_dir")
    entry.update(source=source, max_size=cap, max_count=max_count)
    manifest["splits"][split] = entry
    manifest.update(format=MANIFEST_FORMAT, version=MANIFEST_VERSION)
    tmp = manifest_path.with_name(MANIFEST_NAME + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, manifest_path)
    log.info(
        "wrote %d samples in %d shards (%d bytes) to %s",
        summary.samples,
        len(infos),
        summary.bytes,
        out,
    )
    return summary


def _remove_stale(out: Path, split: str, keep: set[str]) -> None:
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar(\.partial)?$")
    for path in sorted(out.iterdir()):
        if pattern.match(path.name) and path.name not in keep:
            log.info("removing stale shard %s", path)
            path.unlink()
