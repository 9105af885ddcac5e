"""JSON/TSV readers and open_dataset on real COCO images and captions."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from cusa.errors import ConfigError, DatasetError, UnknownNameError
from cusa.readers import (
    DATASETS,
    AlbefReader,
    FolderReader,
    KarpathyReader,
    WebDatasetReader,
    coco_sample_root,
    list_datasets,
    open_dataset,
)


def read_all(reader) -> list:
    return [s for ref in reader.shards() for s in reader.read(ref)]


def albef_records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def first_appearance(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["image_id"], None)
    return list(seen)


# -- coco-sample / ALBEF ----------------------------------------------------------------------
@pytest.mark.parametrize(("split", "n_images", "n_captions"), [("train", 24, 120), ("val", 8, 37)])
def test_coco_sample_matches_its_json(split, n_images, n_captions):
    root = coco_sample_root()
    records = albef_records(root / f"new_{split}.json")
    reader = open_dataset("coco-sample", split=split, shard_size=5)
    assert isinstance(reader, AlbefReader)
    assert (reader.name, reader.split) == ("coco-sample", split)
    samples = read_all(reader)
    assert [s.image_id for s in samples] == first_appearance(records)
    assert len(samples) == n_images
    assert sum(len(s.captions) for s in samples) == n_captions
    for s in samples:
        mine = [r["caption"] for r in records if r["image_id"] == s.image_id]
        assert s.captions == mine
        assert s.caption_ids == [f"{s.image_id}#{k}" for k in range(len(mine))]
        assert s.caption_ann_ids == [None] * len(mine)
        assert s.image == (root / "pics" / s.image_id).read_bytes()
        assert s.image[:3] == b"\xff\xd8\xff"  # real JPEGs


def test_coco_sample_shards_are_stable_and_sized():
    a = open_dataset("coco-sample", shard_size=10)
    b = open_dataset("coco-sample", shard_size=10)
    assert a.shards() == b.shards()
    assert [(r.key, r.num_samples) for r in a.shards()] == [
        ("000000", 10),
        ("000001", 10),
        ("000002", 4),
    ]
    # reading shards in reverse order gives the same samples per shard
    forward = {r.key: [s.image_id for s in a.read(r)] for r in a.shards()}
    backward = {r.key: [s.image_id for s in b.read(r)] for r in reversed(b.shards())}
    assert forward == backward
    assert a.manifest_hash() == b.manifest_hash()
    assert a.manifest_hash() != open_dataset("coco-sample", shard_size=5).manifest_hash()


def test_albef_groups_interleaved_records_in_first_appearance_order(tmp_path):
    src = coco_sample_root()
    ids = first_appearance(albef_records(src / "new_val.json"))[:3]
    (tmp_path / "pics").mkdir()
    for i in ids:
        shutil.copy(src / "pics" / i, tmp_path / "pics" / i)
    # captions of three images interleaved: a b c a b c
    recs = [
        {"image_path": f"./pics/{i}", "caption": f"{i} caption {k}", "image_id": i}
        for k in range(2)
        for i in ids
    ]
    (tmp_path / "new_test.json").write_text(json.dumps(recs))
    samples = read_all(AlbefReader(tmp_path, "test"))
    assert [s.image_id for s in samples] == ids
    assert samples[1].captions == [f"{ids[1]} caption 0", f"{ids[1]} caption 1"]
    assert samples[1].caption_ids == [f"{ids[1]}#0", f"{ids[1]}#1"]


def test_albef_original_layout_with_caption_lists_and_no_image_id(tmp_path):
    src = coco_sample_root()
    name = first_appearance(albef_records(src / "new_val.json"))[0]
    (tmp_path / "val2014").mkdir()
    shutil.copy(src / "pics" / name, tmp_path / "val2014" / name)
    (tmp_path / "new_val.json").write_text(
        json.dumps([{"image": f"val2014/{name}", "caption": ["one", "two"]}])
    )
    (sample,) = read_all(open_dataset(str(tmp_path), split="val"))
    assert sample.image_id == name
    assert sample.captions == ["one", "two"]
    assert sample.image == (src / "pics" / name).read_bytes()


def test_albef_duplicate_image_id_names_both_records(tmp_path):
    (tmp_path / "new_train.json").write_text(
        json.dumps(
            [
                {"image_path": "pics/a.jpg", "caption": "x", "image_id": "42"},
                {"image_path": "pics/b.jpg", "caption": "y", "image_id": "42"},
            ]
        )
    )
    with pytest.raises(
        DatasetError, match=r"duplicate image id '42'.*record 0 has image 'pics/a.jpg'.*record 1"
    ):
        AlbefReader(tmp_path).shards()


def test_missing_image_file_becomes_an_error_sample(tmp_path):
    src = coco_sample_root()
    ids = first_appearance(albef_records(src / "new_val.json"))[:2]
    (tmp_path / "pics").mkdir()
    shutil.copy(src / "pics" / ids[0], tmp_path / "pics" / ids[0])
    recs = [{"image_path": f"./pics/{i}", "caption": "c", "image_id": i} for i in ids]
    (tmp_path / "new_val.json").write_text(json.dumps(recs))
    ok, missing = read_all(AlbefReader(tmp_path, "val"))
    assert ok.image is not None and ok.image_error is None
    assert missing.image is None
    assert missing.image_id == ids[1]
    assert "image file not found" in missing.image_error and ids[1] in missing.image_error
    assert missing.captions == ["c"]  # captions still go to the text teacher


def test_non_utf8_bytes_in_json_caption_are_kept(tmp_path):
    raw = b"caf\xe9 \xff"
    body = (
        b'[{"image_path": "pics/a.jpg", "caption": "' + raw + b'", "image_id": "a"},'
        b' {"image_path": "pics/a.jpg", "caption": "plain", "image_id": "a"}]'
    )
    (tmp_path / "new_train.json").write_bytes(body)
    (sample,) = read_all(AlbefReader(tmp_path))
    assert sample.captions == [raw, "plain"]


def test_albef_missing_split_lists_the_splits_found():
    with pytest.raises(DatasetError, match=r"new_test\.json.*splits found there: train, val"):
        open_dataset("coco-sample", split="test")


# -- Karpathy ---------------------------------------------------------------------------------
def _cocoid(name: str) -> int:
    return int(name.rsplit("_", 1)[1].split(".")[0])


@pytest.fixture
def karpathy_coco(tmp_path) -> Path:
    """A real-image dataset_coco.json: 8 train, 3 restval, 2 val, 2 test from coco-sample."""
    src = coco_sample_root()
    recs = albef_records(src / "new_train.json") + albef_records(src / "new_val.json")
    names = first_appearance(recs)[:15]
    splits = ["train"] * 8 + ["restval"] * 3 + ["val"] * 2 + ["test"] * 2
    images, sentid = [], 1000
    for imgid, (name, split) in enumerate(zip(names, splits, strict=True)):
        folder = "train2014" if "train2014" in name else "val2014"
        (tmp_path / folder).mkdir(exist_ok=True)
        shutil.copy(src / "pics" / name, tmp_path / folder / name)
        sentences = []
        for r in recs:
            if r["image_id"] == name:
                sentences.append(
                    {"raw": r["caption"], "tokens": [], "imgid": imgid, "sentid": sentid}
                )
                sentid += 1
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": _cocoid(name),
            }
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return tmp_path


def test_karpathy_coco_ids_captions_and_ann_ids(karpathy_coco):
    data = json.loads((karpathy_coco / "dataset_coco.json").read_text())["images"]
    reader = open_dataset("coco", root=str(karpathy_coco), split="train", shard_size=4)
    assert isinstance(reader, KarpathyReader)
    samples = read_all(reader)
    expected = [img for img in data if img["split"] in ("train", "restval")]
    assert [s.image_id for s in samples] == [str(img["cocoid"]) for img in expected]
    for s, img in zip(samples, expected, strict=True):
        assert s.captions == [x["raw"] for x in img["sentences"]]
        assert s.caption_ann_ids == [x["sentid"] for x in img["sentences"]]
        assert s.caption_ids[0] == f"{img['cocoid']}#0"
        assert s.image == (karpathy_coco / img["filepath"] / img["filename"]).read_bytes()
    assert [r.num_samples for r in reader.shards()] == [4, 4, 3]


@pytest.mark.parametrize(
    ("split", "restval", "n"),
    [("train", False, 8), ("restval", True, 3), ("val", True, 2), ("test", True, 2)],
)
def test_karpathy_splits(karpathy_coco, split, restval, n):
    reader = KarpathyReader(karpathy_coco, split, include_restval=restval)
    assert len(read_all(reader)) == n


def test_karpathy_flickr_uses_file_names_and_finds_the_image_folder(karpathy_coco, tmp_path):
    root = tmp_path / "flickr"
    (root / "flickr30k-images").mkdir(parents=True)
    data = json.loads((karpathy_coco / "dataset_coco.json").read_text())["images"][:3]
    for img in data:
        shutil.copy(karpathy_coco / img["filepath"] / img["filename"], root / "flickr30k-images")
        del img["filepath"], img["cocoid"]
        img["split"] = "test"
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": data}))
    reader = open_dataset(str(root), split="test")  # sniffed
    assert reader.name == "flickr30k"
    samples = read_all(reader)
    assert [s.image_id for s in samples] == [img["filename"] for img in data]
    assert all(s.image is not None for s in samples)


def test_karpathy_duplicate_cocoid_is_refused(karpathy_coco):
    path = karpathy_coco / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"][1]["cocoid"] = data["images"][0]["cocoid"]
    path.write_text(json.dumps(data))
    with pytest.raises(
        DatasetError,
        match=rf"duplicate image id '{data['images'][0]['cocoid']}'.*images\[0\].*images\[1\]",
    ):
        KarpathyReader(karpathy_coco, "train").shards()


def test_karpathy_bad_root_and_missing_images(tmp_path, karpathy_coco):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        DatasetError, match=r"split file not found: expected '.*empty/dataset_coco\.json'"
    ):
        open_dataset("coco", root=str(empty))
    shutil.rmtree(karpathy_coco / "train2014")
    with pytest.raises(
        DatasetError,
        match=r"images of 'coco' split 'train' not found: expected e\.g\. '.*train2014/",
    ):
        KarpathyReader(karpathy_coco, "train").shards()
    with pytest.raises(DatasetError, match="no split 'dev'"):
        KarpathyReader(karpathy_coco, "dev")


# -- plain folder -----------------------------------------------------------------------------
@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    src = coco_sample_root()
    names = first_appearance(albef_records(src / "new_val.json"))[:4]
    (tmp_path / "sub").mkdir()
    shutil.copy(src / "pics" / names[0], tmp_path / "a.jpg")
    shutil.copy(src / "pics" / names[1], tmp_path / "sub" / "b.jpg")
    shutil.copy(src / "pics" / names[2], tmp_path / "uncaptioned.jpg")
    lines = [
        b"a.jpg\tA first caption",
        b"sub/b.jpg\tcaption of b",
        b"a.jpg\tsecond caption of a \xe9\xff",
        b"gone.jpg\tthis image is missing",
        b"",
    ]
    (tmp_path / "captions.tsv").write_bytes(b"\r\n".join(lines))
    return tmp_path


def test_folder_tsv_groups_lines_and_keeps_raw_bytes(folder_dataset):
    reader = open_dataset(str(folder_dataset))
    assert isinstance(reader, FolderReader)
    samples = read_all(reader)
    assert [s.image_id for s in samples] == ["a.jpg", "sub/b.jpg", "gone.jpg", "uncaptioned.jpg"]
    a, b, gone, unc = samples
    assert a.captions == ["A first caption", b"second caption of a \xe9\xff"]
    assert a.caption_ids == ["a.jpg#0", "a.jpg#1"]
    assert b.image == (folder_dataset / "sub" / "b.jpg").read_bytes()
    assert gone.image is None and "gone.jpg" in gone.image_error
    assert unc.captions == [] and unc.image is not None


def test_folder_jsonl_with_caption_lists_and_ann_ids(folder_dataset):
    (folder_dataset / "captions_val.jsonl").write_text(
        json.dumps({"image": "a.jpg", "captions": ["x", "y"], "ann_ids": [11, 12]})
        + "\n"
        + json.dumps({"image": "sub/b.jpg", "caption": "z", "ann_id": 13})
        + "\n"
    )
    reader = FolderReader(folder_dataset, "val", include_uncaptioned=False)
    a, b = read_all(reader)
    assert (a.captions, a.caption_ann_ids) == (["x", "y"], [11, 12])
    assert (b.captions, b.caption_ann_ids) == (["z"], [13])


def test_folder_bad_lines_are_named(tmp_path):
    (tmp_path / "captions.tsv").write_text("a.jpg no tab here\n")
    with pytest.raises(DatasetError, match=r"line 1 has no TAB"):
        FolderReader(tmp_path).shards()
    (tmp_path / "captions.tsv").write_text("../etc/passwd\tx\n")
    with pytest.raises(
        DatasetError, match=r"line 1: image '\.\./etc/passwd' must be a path relative"
    ):
        FolderReader(tmp_path).shards()
    (tmp_path / "captions.tsv").unlink()
    with pytest.raises(DatasetError, match="no captions file"):
        FolderReader(tmp_path)


# -- open_dataset / registry ------------------------------------------------------------------
def test_registry_lists_the_built_in_datasets():
    assert {"coco", "flickr30k", "albef", "coco-sample", "folder", "webdataset"} <= set(
        list_datasets()
    )
    assert DATASETS.get("coco-sample").needs_root is False


def test_unknown_name_lists_known_ones():
    with pytest.raises(
        UnknownNameError, match=r"unknown dataset 'cocoo'; known datasets: .*coco-sample"
    ):
        open_dataset("cocoo")


def test_open_dataset_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="needs --root DIR"):
        open_dataset("albef")
    with pytest.raises(DatasetError, match="is not a directory"):
        open_dataset("albef", root=str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="takes no --root"):
        open_dataset("coco-sample", root=str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(str(tmp_path / "absent" / "dir"))
    with pytest.raises(DatasetError, match="cannot tell what dataset"):
        open_dataset(str(tmp_path))
    with pytest.raises(ConfigError, match="shard_size must be >= 1"):
        open_dataset("coco-sample", shard_size=0)
    with pytest.raises(DatasetError, match="invalid split"):
        open_dataset("coco-sample", split="../x")


def test_sniffing_folders(tmp_path, karpathy_coco):
    assert isinstance(open_dataset(str(coco_sample_root())), AlbefReader)
    assert open_dataset(str(karpathy_coco)).name == "coco"
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "train-000000.tar").write_bytes(b"\0" * 1024)
    assert isinstance(open_dataset(str(tars)), WebDatasetReader)


def test_readers_pickle_small_and_read_the_same():
    reader = open_dataset("coco-sample", shard_size=8)
    before = read_all(reader)
    blob = pickle.dumps(reader)
    assert len(blob) < 2000  # the parsed index is not shipped to workers
    clone = pickle.loads(blob)
    after = read_all(clone)
    assert [(s.image_id, s.captions, s.image) for s in after] == [
        (s.image_id, s.captions, s.image) for s in before
    ]


# -- index files wherever their folder is accepted, and --name ---------------------------------


def test_an_albef_index_file_opens_its_folder():
    root = coco_sample_root()
    folder = open_dataset(str(root), split="val")
    by_file = open_dataset(str(root / "new_val.json"), split=None)
    as_root = open_dataset("albef", root=str(root / "new_val.json"), split=None)
    for reader in (by_file, as_root):
        assert isinstance(reader, AlbefReader) and reader.split == "val"
        assert reader.items() == folder.items()
        assert reader.manifest_hash() == folder.manifest_hash()  # the same group resumes
    assert open_dataset(str(root / "new_val.json"), split="holdout").split == "holdout"


def test_split_from_index_file_names(tmp_path):
    from cusa.readers.registry import split_from_file_name

    assert split_from_file_name(Path("new_test.json")) == "test"
    assert split_from_file_name(Path("coco_karpathy_val.json")) == "val"
    assert split_from_file_name(Path("captions_train.jsonl")) == "train"
    assert split_from_file_name(Path("my_caps.tsv")) is None
    assert split_from_file_name(Path("dataset_coco.json")) is None


def test_a_karpathy_file_opens_by_name_or_as_root(karpathy_coco):
    index = karpathy_coco / "dataset_coco.json"
    folder = open_dataset(str(karpathy_coco), split="val")
    for reader in (
        open_dataset(str(index), split="val"),
        open_dataset("coco", root=str(index), split="val"),
    ):
        assert reader.name == "coco" and reader.items() == folder.items()
    assert open_dataset(str(index), split=None).split == "train"


def test_a_captions_file_opens_the_folder_reader(folder_dataset):
    (folder_dataset / "captions.tsv").rename(folder_dataset / "my_caps.tsv")
    reader = open_dataset(str(folder_dataset / "my_caps.tsv"), split=None)
    assert reader.split == "train" and [i.image_id for i in reader.items()][:2] == [
        "a.jpg",
        "sub/b.jpg",
    ]
    assert (
        open_dataset("folder", root=str(folder_dataset / "my_caps.tsv")).items() == reader.items()
    )


def test_files_that_are_no_index_say_what_to_pass(tmp_path, karpathy_coco):
    obj = tmp_path / "other.json"
    obj.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"pass --dataset coco \(or flickr30k\) --root"):
        open_dataset(str(obj))
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(DatasetError, match="pass a \\*.tar shard, an index file"):
        open_dataset(str(txt))
    with pytest.raises(DatasetError, match="is a file, so --root .* is not used; drop --root"):
        open_dataset(str(karpathy_coco / "dataset_coco.json"), root=str(tmp_path))


def test_name_sets_the_dataset_name_and_is_checked(karpathy_coco):
    assert open_dataset("coco-sample", name="lab-a").name == "lab-a"
    assert open_dataset(str(karpathy_coco), name="coco.v2").name == "coco.v2"
    for bad in ("", "../x", "a/b", ".hidden", "sp ace"):
        with pytest.raises(
            DatasetError, match="is invalid: a dataset name is stored as one folder"
        ):
            open_dataset("coco-sample", name=bad)
