"""Hostile datasets at the reader level: nothing outside the dataset is read, nothing hangs,
nothing vanishes. Every bad sample comes out as an error sample with a bounded reason; every bad
dataset file is refused with one line naming the value and the fix. Data comes from the embedded
``coco-sample`` (real COCO images) and small files made in ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from cusa.errors import DatasetError
from cusa.readers import AlbefReader, FolderReader, WebDatasetReader, coco_sample_root
from cusa.readers import _common as common
from cusa.readers._common import read_regular_file


def _jpeg(i: int = 0) -> bytes:
    return sorted((coco_sample_root() / "pics").iterdir())[i].read_bytes()


def _read_all(reader) -> list:
    return [s for ref in reader.shards() for s in reader.read(ref)]


def _albef(root: Path, records: list[dict], split: str = "train") -> AlbefReader:
    (root / f"new_{split}.json").write_text(json.dumps(records))
    return AlbefReader(root, split, shard_size=100)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A real image that lies outside the dataset root."""
    path = tmp_path / "secret" / "outside.jpg"
    path.parent.mkdir()
    path.write_bytes(_jpeg(1))
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "ds"
    (root / "pics").mkdir(parents=True)
    (root / "pics" / "good.jpg").write_bytes(_jpeg(0))
    return root


def _rec(path: str, image_id: str, caption: str = "a photo") -> dict:
    return {"image_path": path, "caption": caption, "image_id": image_id}


# -- files that are not regular files -------------------------------------------------------------


def test_fifo_image_is_ledgered_without_blocking(root):
    os.mkfifo(root / "pics" / "pipe.jpg")  # opening it for reading would block forever
    reader = _albef(root, [_rec("pics/good.jpg", "good"), _rec("pics/pipe.jpg", "pipe")])
    by_id = {s.image_id: s for s in _read_all(reader)}
    assert by_id["good"].image == _jpeg(0)
    assert by_id["pipe"].image is None
    assert "is a FIFO (named pipe), not a regular file; not read" in by_id["pipe"].image_error


def test_dev_zero_is_never_read(root):
    reader = _albef(root, [_rec("/dev/zero", "zero")])
    (sample,) = _read_all(reader)
    assert "outside the dataset root" in sample.image_error
    assert "--allow-outside-root" in sample.image_error
    allowed = AlbefReader(root, "train", shard_size=100, allow_outside_root=True)
    (sample,) = _read_all(allowed)
    assert sample.image is None
    assert "'/dev/zero' is a character device, not a regular file; not read" in sample.image_error


def test_file_over_the_size_cap_is_not_read(root, monkeypatch):
    big = root / "pics" / "big.jpg"
    with open(big, "wb") as fh:  # sparse: 300 MB on paper, nothing on disk
        fh.truncate(300 * 2**20)
    reader = _albef(root, [_rec("pics/big.jpg", "big")])
    (sample,) = _read_all(reader)
    assert sample.image is None
    assert "is 314,572,800 bytes, over the limit of 268,435,456; not read" in sample.image_error
    monkeypatch.setattr(common, "MAX_IMAGE_BYTES", 1000)
    data, reason = read_regular_file(root / "pics" / "good.jpg", 1000)
    assert data is None and "over the limit of 1,000" in reason


# -- paths leaving the dataset root --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_image_paths_outside_the_root_are_ledgered_unless_allowed(root, outside, kind):
    path = str(outside) if kind == "absolute" else "../secret/outside.jpg"
    reader = _albef(root, [_rec("pics/good.jpg", "good"), _rec(path, "out")])
    by_id = {s.image_id: s for s in _read_all(reader)}
    assert by_id["good"].image == _jpeg(0)
    assert by_id["out"].image is None
    assert f"image path {path!r} lies outside the dataset root" in by_id["out"].image_error
    assert "pass --allow-outside-root" in by_id["out"].image_error
    allowed = AlbefReader(root, "train", shard_size=100, allow_outside_root=True)
    assert {s.image_id: s.image for s in _read_all(allowed)}["out"] == _jpeg(1)


def test_symlinks_are_resolved_and_checked(root, outside, tmp_path):
    (root / "pics" / "inside.jpg").symlink_to(root / "pics" / "good.jpg")
    (root / "pics" / "passwd.jpg").symlink_to("/etc/passwd")
    (root / "pics" / "escape.jpg").symlink_to(outside)
    lines = "".join(f"{n}.jpg\tcaption of {n}\n" for n in ("inside", "passwd", "escape"))
    (root / "pics" / "captions.tsv").write_text(lines)
    reader = FolderReader(root / "pics", "train")
    by_id = {s.image_id: s for s in _read_all(reader)}
    assert by_id["inside.jpg"].image == _jpeg(0)  # a symlink inside the root is fine
    for name in ("passwd.jpg", "escape.jpg"):
        assert by_id[name].image is None
        assert f"image path {name!r} resolves outside the dataset root" in by_id[name].image_error
    assert "root:" not in json.dumps([s.image_error for s in by_id.values()])  # no contents
    allowed = FolderReader(root / "pics", "train", allow_outside_root=True)
    assert {s.image_id: s.image for s in _read_all(allowed)}["escape.jpg"] == _jpeg(1)


# -- index files ----------------------------------------------------------------------------------


def test_non_utf8_image_id_in_json_is_kept_for_the_runner_to_ledger(root):
    raw = json.dumps([_rec("pics/good.jpg", "@@ID@@")]).encode().replace(b"@@ID@@", b"caf\xe9")
    (root / "new_train.json").write_bytes(raw)
    (sample,) = _read_all(AlbefReader(root, "train"))
    assert sample.image_id == "caf\udce9"  # the raw byte survives (surrogateescape)


def test_huge_values_are_cut_in_messages(root):
    (root / "new_train.json").write_text(json.dumps([{"caption": "x" * 100_000}]))
    with pytest.raises(DatasetError, match="has no 'image_path'") as info:
        AlbefReader(root, "train").shards()
    assert len(str(info.value)) < 500


# -- the dataset manifest hash -------------------------------------------------------------------


def _captions_dataset(root: Path, captions: list[str]) -> AlbefReader:
    return _albef(root, [_rec("pics/good.jpg", "good", c) for c in captions])


def test_manifest_hash_covers_captions_and_the_id_set(root):
    base = _captions_dataset(root, ["a dog", "a cat"]).manifest_info()
    os.utime(root / "new_train.json", ns=(1, 1))  # defeat the index cache's mtime key
    edited = _captions_dataset(root, ["a dog", "a cow"]).manifest_info()
    added = _captions_dataset(root, ["a dog", "a cat", "a cow"]).manifest_info()
    (root / "pics" / "two.jpg").write_bytes(_jpeg(1))
    more = _albef(root, [_rec("pics/good.jpg", "good", "a dog"), _rec("pics/two.jpg", "two")])
    hashes = {base["hash"], edited["hash"], added["hash"], more.manifest_hash()}
    assert len(hashes) == 4
    assert (base["images"], base["captions"], added["captions"]) == (1, 2, 3)


def test_content_hash_tells_a_new_shard_size_from_a_changed_dataset():
    a = AlbefReader(coco_sample_root(), "val", shard_size=2).manifest_info()
    b = AlbefReader(coco_sample_root(), "val", shard_size=3).manifest_info()
    assert a["hash"] != b["hash"] and a["content_hash"] == b["content_hash"]
    assert (a["shard_size"], a["shards"], b["shards"]) == (2, 4, 3)


# -- webdataset tars ------------------------------------------------------------------------------


def _member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _tar(path: Path, members, **open_args) -> Path:
    with tarfile.open(path, "w", **open_args) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def test_link_and_device_members_are_ledgered_on_their_sample(tmp_path):
    members = [
        _member("ok.jpg", _jpeg(0)),
        _member("ok.txt", b"a fine photo"),
        _member("sym.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        _member("sym.txt", b"caption of a symlinked image"),
        _member("hard.jpg", type=tarfile.LNKTYPE, linkname="ok.jpg"),
        _member("chr.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=5),
        _member("fifo.jpg", type=tarfile.FIFOTYPE),
        _member("capsym.jpg", _jpeg(1)),
        _member("capsym.txt", type=tarfile.SYMTYPE, linkname="/etc/shadow"),
        _member("noext", type=tarfile.SYMTYPE, linkname="/etc/hosts"),
    ]
    reader = WebDatasetReader(str(_tar(tmp_path / "links.tar", members)), "train")
    by_id = {s.image_id: s for s in _read_all(reader)}
    assert by_id["ok"].image == _jpeg(0) and by_id["ok"].captions == ["a fine photo"]
    expect = {
        "sym": "is a symbolic link to '/etc/passwd', not a regular file",
        "hard": "is a hard link to 'ok.jpg', not a regular file",
        "chr": "is a character device, not a regular file",
        "fifo": "is a FIFO, not a regular file",
    }
    for key, reason in expect.items():
        assert by_id[key].image is None, key
        assert reason in by_id[key].image_error and "not read" in by_id[key].image_error, key
    assert by_id["sym"].captions == ["caption of a symlinked image"]  # the text is still fine
    assert by_id["capsym"].image == _jpeg(1) and by_id["capsym"].captions == []
    assert "'capsym.txt'" in by_id["capsym"].caption_error
    assert "symbolic link" in by_id["capsym"].caption_error
    assert "is a symbolic link" in by_id["links:noext"].image_error


def test_duplicate_member_name_makes_the_sample_ambiguous_not_last_wins(tmp_path):
    members = [
        _member("a.jpg", _jpeg(0)),
        _member("a.jpg", _jpeg(1)),
        _member("a.txt", b"first"),
        _member("b.jpg", _jpeg(2)),
        _member("b.txt", b"one"),
        _member("b.txt", b"two"),
    ]
    reader = WebDatasetReader(str(_tar(tmp_path / "dups.tar", members)), "train")
    by_id = {s.image_id: s for s in _read_all(reader)}
    assert by_id["a"].image is None and "appears more than once" in by_id["a"].image_error
    assert by_id["a"].captions == ["first"]
    assert by_id["b"].image == _jpeg(2) and by_id["b"].captions == []
    assert "'b.txt'" in by_id["b"].caption_error and "more than once" in by_id["b"].caption_error


def test_latin1_member_name_survives_as_raw_bytes(tmp_path):
    members = [_member("caf\xe9.jpg", _jpeg(0)), _member("ok.jpg", _jpeg(1))]
    tar = _tar(tmp_path / "latin1.tar", members, format=tarfile.USTAR_FORMAT, encoding="latin-1")
    ids = [s.image_id for s in _read_all(WebDatasetReader(str(tar), "train"))]
    assert ids == ["caf\udce9", "ok"]  # the runner ledgers the first under an escaped id


def test_member_over_the_size_cap_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "MAX_IMAGE_BYTES", 1000)
    tar = _tar(tmp_path / "big.tar", [_member("big.jpg", _jpeg(0)), _member("big.txt", b"x")])
    (sample,) = _read_all(WebDatasetReader(str(tar), "train"))
    assert sample.image is None and "over the limit of 1,000" in sample.image_error
    assert sample.captions == ["x"]


def test_deep_json_member_is_a_caption_error(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    tar = _tar(tmp_path / "deep.tar", [_member("d.jpg", _jpeg(0)), _member("d.json", deep)])
    (sample,) = _read_all(WebDatasetReader(str(tar), "train"))
    assert sample.image == _jpeg(0) and sample.captions == []
    assert "nested too deeply" in sample.caption_error


def _manifest(folder: Path, files: list[str]) -> None:
    shards = [{"file": f, "samples": 1} for f in files]
    data = {"format": "cusa-webdataset", "version": 1, "splits": {"train": {"shards": shards}}}
    (folder / "manifest.json").write_text(json.dumps(data))


def test_malformed_or_fifo_manifest_is_refused(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _tar(folder / "train-000000.tar", [_member("x.jpg", _jpeg(0))])
    (folder / "manifest.json").write_text(
        json.dumps({"format": "cusa-webdataset", "splits": {"train": {"shards": [{"file": 3}]}}})
    )
    with pytest.raises(DatasetError, match="has no 'file' name"):
        WebDatasetReader(str(folder), "train")
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")
    with pytest.raises(DatasetError, match="FIFO"):
        WebDatasetReader(str(folder), "train")


def test_a_tar_path_that_is_a_fifo_is_refused_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.tar")
    with pytest.raises(DatasetError, match="is a FIFO .named pipe., not a regular file"):
        WebDatasetReader(str(tmp_path / "pipe.tar"), "train")


def test_image_paths_that_are_no_file_names_are_ledgered(root):
    reader = _albef(root, [_rec("pics/a\u0000b.jpg", "nul"), _rec("pics/good.jpg", "good")])
    by_id = {s.image_id: s for s in _read_all(reader)}
    assert "is not a valid file name (embedded null byte)" in by_id["nul"].image_error
    assert by_id["good"].image == _jpeg(0)
