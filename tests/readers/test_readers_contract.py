"""The DatasetReader contract, run against every reader implementation (like zarr's StoreTests)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cusa.readers import (
    AlbefReader,
    DatasetReader,
    FolderReader,
    KarpathyReader,
    Sample,
    ShardRef,
    WebDatasetReader,
    coco_sample_root,
    open_dataset,
)
from cusa.readers.wds_writer import write_shards

SAFE_KEY = re.compile(r"^[A-Za-z0-9._-]+$")


def _records(split: str) -> list[dict]:
    return json.loads((coco_sample_root() / f"new_{split}.json").read_text())


def _albef(tmp: Path) -> DatasetReader:
    return AlbefReader(coco_sample_root(), "val", shard_size=3, name="coco-sample")


def _karpathy(tmp: Path) -> DatasetReader:
    src = coco_sample_root()
    images, seen = [], {}
    for r in _records("train")[:40]:
        seen.setdefault(r["image_id"], []).append(r["caption"])
    (tmp / "train2014").mkdir()
    for i, (name, caps) in enumerate(seen.items()):
        shutil.copy(src / "pics" / name, tmp / "train2014" / name)
        images.append(
            {
                "filepath": "train2014",
                "filename": name,
                "imgid": i,
                "split": "train",
                "cocoid": int(name.rsplit("_", 1)[1].split(".")[0]),
                "sentences": [{"raw": c, "sentid": 100 * i + k} for k, c in enumerate(caps)],
            }
        )
    (tmp / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return KarpathyReader(tmp, "train", shard_size=3)


def _folder(tmp: Path) -> DatasetReader:
    src = coco_sample_root()
    lines = []
    for r in _records("val")[:20]:
        if not (tmp / r["image_id"]).exists():
            shutil.copy(src / "pics" / r["image_id"], tmp / r["image_id"])
        lines.append(f"{r['image_id']}\t{r['caption']}")
    (tmp / "captions.tsv").write_text("\n".join(lines) + "\n")
    return FolderReader(tmp, "train", shard_size=2)


def _webdataset(tmp: Path) -> DatasetReader:
    write_shards(open_dataset("coco-sample", split="val"), tmp / "shards", max_count=3)
    return open_dataset(str(tmp / "shards"), split="val")


def _webdataset_pipe(tmp: Path) -> DatasetReader:
    write_shards(open_dataset("coco-sample", split="val"), tmp / "shards", max_count=5)
    return WebDatasetReader(f"pipe:cat {tmp}/shards/val-{{000000..000001}}.tar", "val")


READERS: dict[str, Callable[[Path], DatasetReader]] = {
    "albef": _albef,
    "karpathy": _karpathy,
    "folder": _folder,
    "webdataset": _webdataset,
    "webdataset-pipe": _webdataset_pipe,
}


@pytest.fixture(params=sorted(READERS))
def make_reader(request, tmp_path) -> Callable[[], DatasetReader]:
    """A factory: each call opens a fresh reader over the same files."""
    build = READERS[request.param]
    first = build(tmp_path)
    calls = iter([first])

    def make() -> DatasetReader:
        reader = next(calls, None)
        if reader is not None:
            return reader
        return pickle.loads(pickle.dumps(first))

    return make


def _all(reader: DatasetReader) -> list[Sample]:
    return [s for ref in reader.shards() for s in reader.read(ref)]


def test_is_a_dataset_reader(make_reader):
    reader = make_reader()
    assert isinstance(reader, DatasetReader)
    assert isinstance(reader.name, str) and reader.name
    assert isinstance(reader.split, str) and reader.split


def test_shards_are_stable_unique_and_filesystem_safe(make_reader):
    a, b = make_reader(), make_reader()
    shards = a.shards()
    assert shards, "a reader over a non-empty dataset has shards"
    assert all(isinstance(s, ShardRef) for s in shards)
    assert shards == b.shards() == a.shards()
    keys = [s.key for s in shards]
    assert len(set(keys)) == len(keys)
    assert all(SAFE_KEY.match(k) and k not in (".", "..") for k in keys)


def test_samples_are_well_formed(make_reader):
    reader = make_reader()
    for ref in reader.shards():
        samples = list(reader.read(ref))
        if ref.num_samples is not None:
            assert len(samples) == ref.num_samples
        for s in samples:
            assert isinstance(s, Sample)
            assert s.shard == ref.key
            assert isinstance(s.image_id, str) and s.image_id
            assert (s.image is None) == (s.image_error is not None)
            assert s.image is None or s.image[:3] == b"\xff\xd8\xff"
            assert s.caption_ids == [f"{s.image_id}#{k}" for k in range(len(s.captions))]
            assert len(s.caption_ann_ids) == len(s.captions)
            assert all(isinstance(c, (str, bytes)) for c in s.captions)


def test_image_ids_are_unique_and_independent_of_read_order(make_reader):
    a, b = make_reader(), make_reader()
    forward = [s.image_id for s in _all(a)]
    assert len(set(forward)) == len(forward)
    backward = {ref.key: [s.image_id for s in b.read(ref)] for ref in reversed(b.shards())}
    assert [i for ref in a.shards() for i in backward[ref.key]] == forward


def test_reading_twice_gives_identical_samples(make_reader):
    a, b = make_reader(), make_reader()
    assert _all(a) == _all(b)


def test_manifest_hash_is_stable_hex_sha256(make_reader):
    a, b = make_reader(), make_reader()
    h = a.manifest_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h == b.manifest_hash() == a.manifest_hash()


def test_same_samples_as_the_source(make_reader, request):
    """Every reader sees real COCO images and the exact captions of the embedded sample."""
    captions: dict[str, list[str]] = {}
    for split in ("train", "val"):
        for r in _records(split):
            captions.setdefault(r["image_id"], []).append(r["caption"])
    by_cocoid = {str(int(k.rsplit("_", 1)[1].split(".")[0])): k for k in captions}
    for s in _all(make_reader()):
        name = by_cocoid.get(s.image_id, s.image_id)
        assert s.image == (coco_sample_root() / "pics" / name).read_bytes()
        assert s.captions == captions[name][: len(s.captions)]
