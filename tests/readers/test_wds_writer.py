"""``write_shards`` / ``cusa shard``: shards read back exactly as the source."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile

import pytest
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, DatasetError
from cusa.readers import FolderReader, WebDatasetReader, coco_sample_root, open_dataset
from cusa.readers.wds_writer import write_shards
from cusa.sizes import parse_size


def read_all(reader) -> list:
    return [s for ref in reader.shards() for s in reader.read(ref)]


def fields(samples) -> list[tuple]:
    return [
        (s.image_id, s.image, s.captions, s.caption_ids, s.caption_ann_ids, s.image_error)
        for s in samples
    ]


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_read_back_as_the_root(tmp_path, split):
    source = open_dataset("coco-sample", split=split)
    summary = write_shards(source, tmp_path, max_count=5)
    shards = open_dataset(str(tmp_path), split=split)
    assert isinstance(shards, WebDatasetReader)
    assert shards.name == "coco-sample"  # the source's name, so the store groups match
    assert fields(read_all(shards)) == fields(read_all(source))
    n = len(read_all(source))
    assert summary.samples == n
    assert [s.samples for s in summary.shards] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert [r.key for r in shards.shards()] == [
        f"{split}-{i:06d}" for i in range(len(summary.shards))
    ]


def test_manifest_records_counts_bytes_hashes_and_source(tmp_path):
    source = open_dataset("coco-sample", split="train")
    write_shards(source, tmp_path, max_size="1MB")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["splits"]["train"]
    assert manifest["format"] == "cusa-webdataset"
    assert entry["source"]["dataset"] == "coco-sample"
    assert entry["source"]["manifest_hash"] == source.manifest_hash()
    assert entry["samples"] == 24 and entry["captions"] == 120
    for shard in entry["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) <= 1_000_000
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(tmp_path / shard["file"]) as tar:
            assert len(tar.getnames()) == 2 * shard["samples"]
    assert sum(len(s["image_ids"]) for s in entry["shards"]) == 24
    assert not list(tmp_path.glob("*.partial"))


def test_tar_keys_are_escaped_and_ids_restored(tmp_path):
    write_shards(open_dataset("coco-sample", split="val"), tmp_path)
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        names = tar.getnames()
    assert names[0] == "COCO_val2014_000000557150%2Ejpg.jpg"
    assert names[1] == "COCO_val2014_000000557150%2Ejpg.json"
    (first, *_) = read_all(open_dataset(str(tmp_path / "val-000000.tar"), split="val"))
    assert first.image_id == "COCO_val2014_000000557150.jpg"


def test_rewriting_is_deterministic_and_removes_stale_shards(tmp_path):
    source = open_dataset("coco-sample", split="train")
    a = write_shards(source, tmp_path, max_count=4)
    assert len(a.shards) == 6
    b = write_shards(source, tmp_path, max_count=4)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    write_shards(source, tmp_path, max_count=10)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    write_shards(open_dataset("coco-sample", split="val"), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["train", "val"]  # other splits are kept


def test_errors_non_utf8_and_ann_ids_survive_sharding(tmp_path):
    src = coco_sample_root()
    root = tmp_path / "folder"
    root.mkdir()
    name = sorted((src / "pics").glob("*.jpg"))[0]
    shutil.copy(name, root / "a b.jpg")
    (root / "captions.jsonl").write_text(
        json.dumps({"image": "a b.jpg", "captions": ["x", "y"], "ann_ids": [5, 6]})
        + "\n"
        + json.dumps({"image": "missing.jpg", "caption": "gone"})
        + "\n"
    )
    with (root / "captions.jsonl").open("ab") as f:
        f.write(b'{"image": "a b.jpg", "caption": "bad \xff\xfe bytes", "ann_id": 7}\n')
    source = FolderReader(root)
    write_shards(source, tmp_path / "out")
    back = read_all(open_dataset(str(tmp_path / "out")))
    assert fields(back) == fields(read_all(source))
    a, missing = back
    assert a.captions == ["x", "y", b"bad \xff\xfe bytes"]
    assert a.caption_ann_ids == [5, 6, 7]
    assert missing.image is None and "image file not found" in missing.image_error


def test_refuses_to_overwrite_its_own_input(tmp_path):
    write_shards(open_dataset("coco-sample", split="val"), tmp_path)
    with pytest.raises(DatasetError, match="would overwrite its own input"):
        write_shards(open_dataset(str(tmp_path), split="val"), tmp_path)


def test_parse_size():
    assert parse_size("256MB") == 256_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match=r"invalid size '12XB'"):
        parse_size("12XB")
    with pytest.raises(ConfigError, match="must be positive"):
        parse_size("0")


def test_cli_shard_and_datasets_list(tmp_path):
    runner = CliRunner()
    out = tmp_path / "shards"
    result = runner.invoke(
        app,
        [
            "shard",
            "--dataset",
            "coco-sample",
            "--split",
            "val",
            "--out",
            str(out),
            "--max-count",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 8 and len(summary["shards"]) == 2
    assert (out / "val-000001.tar").is_file()

    listing = runner.invoke(app, ["datasets", "list"])
    assert listing.exit_code == 0
    assert "coco-sample" in listing.stdout and "flickr30k" in listing.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "nope"], "unknown dataset 'nope'; known datasets:"),
        (["--dataset", "coco"], "needs --root DIR"),
        (["--dataset", "coco-sample", "--max-size", "lots"], "invalid size 'lots'"),
        (["--dataset", "coco-sample", "--split", "test"], "new_test.json"),
    ],
)
def test_cli_shard_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(app, ["shard", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output


def test_shard_the_real_coco_example_val_split(tmp_path, coco_example):
    """The 8 real val images of the embedded sample: the shards give the same samples as the root."""
    source = open_dataset(str(coco_example), split="val", shard_size=3)
    summary = write_shards(source, tmp_path, max_size="400KB")
    assert summary.samples == 8 and summary.captions == 37
    assert len(summary.shards) >= 2 and all(s.bytes <= 400_000 for s in summary.shards)
    shards = open_dataset(str(tmp_path), split="val")
    assert fields(read_all(shards)) == fields(read_all(source))
