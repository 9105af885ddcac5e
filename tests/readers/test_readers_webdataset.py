"""WebDatasetReader on real tars built from real COCO images: layouts, URLs and faults."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from cusa.errors import DatasetError
from cusa.readers import WebDatasetReader, coco_sample_root, open_dataset
from cusa.readers.wds_format import decode_key, encode_key, split_member_name


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    """Six real COCO JPEGs from the embedded sample: (file name, bytes)."""
    pics = sorted((coco_sample_root() / "pics").glob("*.jpg"))[:6]
    return [(p.name, p.read_bytes()) for p in pics]


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(images, start: int, stop: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(start, stop):
        key = f"s{i:04d}"
        members.append((f"{key}.jpg", images[i][1]))
        members.append((f"{key}.txt", f"caption of {images[i][0]}".encode()))
    return members


def read_all(reader) -> list:
    return [s for ref in reader.shards() for s in reader.read(ref)]


def test_txt_and_json_captions_keep_keys_bytes_and_ann_ids(tmp_path, images):
    tar = make_tar(
        tmp_path / "shard-000000.tar",
        [
            ("a.jpg", images[0][1]),
            ("a.txt", b"a dog on a couch"),
            ("b.png", images[1][1]),
            ("b.json", json.dumps(["first", "second"]).encode()),
            ("c.jpeg", images[2][1]),
            (
                "c.json",
                json.dumps({"captions": ["x", "y"], "caption_ann_ids": [7, None]}).encode(),
            ),
            ("d.webp", images[3][1]),
            ("d.json", json.dumps({"caption": "img2dataset style"}).encode()),
        ],
    )
    reader = open_dataset(str(tar))
    assert isinstance(reader, WebDatasetReader)
    (ref,) = reader.shards()
    assert ref.key == "shard-000000"
    samples = list(reader.read(ref))
    assert [s.image_id for s in samples] == ["a", "b", "c", "d"]
    assert [s.image for s in samples] == [img for _, img in images[:4]]
    assert [s.captions for s in samples] == [
        ["a dog on a couch"],
        ["first", "second"],
        ["x", "y"],
        ["img2dataset style"],
    ]
    assert samples[1].caption_ids == ["b#0", "b#1"]
    assert samples[2].caption_ann_ids == [7, None]
    assert all(s.shard == "shard-000000" and s.image_error is None for s in samples)


def test_non_utf8_txt_caption_is_kept_as_bytes(tmp_path, images):
    raw = b"caf\xe9 au lait \xff"
    tar = make_tar(tmp_path / "t.tar", [("k.jpg", images[0][1]), ("k.txt", raw)])
    (sample,) = read_all(open_dataset(str(tar)))
    assert sample.captions == [raw]
    assert isinstance(sample.captions[0], bytes)


def test_non_contiguous_keys_raise_naming_tar_and_key(tmp_path, images):
    tar = make_tar(
        tmp_path / "split.tar",
        [
            ("a.jpg", images[0][1]),
            ("b.jpg", images[1][1]),
            ("b.txt", b"b"),
            ("a.txt", b"a again"),
        ],
    )
    reader = open_dataset(str(tar))
    with pytest.raises(
        DatasetError, match=r"non-contiguous key 'a' in webdataset shard .*split\.tar"
    ):
        read_all(reader)


@pytest.mark.parametrize("where", ["mid_member", "member_boundary", "mid_header"])
def test_truncated_tar_yields_good_samples_then_an_error_sample(tmp_path, images, where):
    full = make_tar(tmp_path / "full.tar", sample_members(images, 0, 4))
    data = full.read_bytes()
    with tarfile.open(full) as tf:
        members = tf.getmembers()
    third_image = members[4]  # s0002.jpg
    if where == "mid_member":
        cut = third_image.offset_data + 1000
    elif where == "member_boundary":
        cut = third_image.offset_data + -(-third_image.size // 512) * 512
    else:
        cut = third_image.offset + 100
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    samples = read_all(open_dataset(str(tmp_path / "cut.tar")))
    good = [s for s in samples if s.image_error is None]
    bad = [s for s in samples if s.image_error is not None]
    # A header cut short reads like a clean end of archive to tarfile, so the last sample
    # before it cannot be known complete: it is reported (conservatively) instead of yielded.
    n_good = 1 if where == "mid_header" else 2
    assert [s.image_id for s in good] == ["s0000", "s0001"][:n_good]
    assert [s.image for s in good] == [images[0][1], images[1][1]][:n_good]
    assert len(bad) == 1
    assert bad[0].image is None
    assert bad[0].image_error.startswith("truncated tar")
    assert bad[0].image_id == ("s0001" if where == "mid_header" else "s0002")
    assert "cut.tar" in bad[0].image_error


def test_member_paths_that_escape_are_skipped_and_ledgered(tmp_path, images, caplog):
    tar = make_tar(
        tmp_path / "evil.tar",
        [
            ("../escape.jpg", images[0][1]),
            ("/abs/path.jpg", images[1][1]),
            ("ok.jpg", images[2][1]),
            ("ok.txt", b"fine"),
        ],
    )
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with caplog.at_level(logging.WARNING):
        samples = read_all(open_dataset(str(tar)))
    good = [s for s in samples if s.image is not None]
    assert [s.image_id for s in good] == ["ok"]
    assert good[0].image == images[2][1]
    bad = sorted(s.image_id for s in samples if s.image is None)
    assert bad == ["evil:../escape.jpg", "evil:/abs/path.jpg"]
    assert all("escapes the archive" in s.image_error for s in samples if s.image is None)
    assert "'../escape.jpg'" in caplog.text and "'/abs/path.jpg'" in caplog.text
    assert "escapes the archive" in caplog.text
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before


def test_sample_without_image_and_malformed_json_are_reported(tmp_path, images):
    tar = make_tar(
        tmp_path / "faults.tar",
        [
            ("noimg.txt", b"caption without image"),
            ("badjson.jpg", images[0][1]),
            ("badjson.json", b"{not json"),
        ],
    )
    noimg, badjson = read_all(open_dataset(str(tar)))
    assert noimg.image is None
    assert "no image member" in noimg.image_error and "'noimg'" in noimg.image_error
    assert noimg.captions == ["caption without image"]
    assert badjson.image == images[0][1]
    assert badjson.captions == []
    assert badjson.caption_error and "malformed badjson.json" in badjson.caption_error


def test_brace_pattern_lists_shards_in_order_with_stem_keys(tmp_path, images):
    for i in range(3):
        make_tar(tmp_path / f"shard-{i:06d}.tar", sample_members(images, 2 * i, 2 * i + 2))
    reader = open_dataset(str(tmp_path / "shard-{000000..000002}.tar"))
    assert [r.key for r in reader.shards()] == ["shard-000000", "shard-000001", "shard-000002"]
    samples = read_all(reader)
    assert [s.image_id for s in samples] == [f"s{i:04d}" for i in range(6)]
    assert [s.image for s in samples] == [img for _, img in images]


def test_missing_shard_in_pattern_is_named(tmp_path, images):
    make_tar(tmp_path / "shard-000000.tar", sample_members(images, 0, 1))
    with pytest.raises(DatasetError, match=r"shard-000001\.tar' does not exist"):
        open_dataset(str(tmp_path / "shard-{000000..000001}.tar"))


def test_pipe_url_reads_through_a_command(tmp_path, images):
    tar = make_tar(tmp_path / "piped-000003.tar", sample_members(images, 0, 3))
    reader = open_dataset(f"pipe:cat {tar}")
    (ref,) = reader.shards()
    assert ref.key == "piped-000003"
    samples = read_all(reader)
    assert [s.image for s in samples] == [img for _, img in images[:3]]


def test_pipe_command_failure_is_reported(tmp_path, images):
    tar = make_tar(tmp_path / "p.tar", sample_members(images, 0, 2))
    # the command sends the whole tar and then fails: the samples stay, the failure is recorded
    samples = read_all(open_dataset(f"pipe:cat {tar}; exit 3"))
    assert [s.image_id for s in samples[:2]] == ["s0000", "s0001"]
    assert samples[-1].image_error and "exited with status 3" in samples[-1].image_error


def test_not_a_tar_raises_dataset_error(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    reader = open_dataset(str(junk))
    with pytest.raises(DatasetError, match=r"'junk' at .*junk\.tar.* not a readable tar"):
        read_all(reader)


def test_same_stem_in_two_folders_is_refused(tmp_path, images):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_tar(tmp_path / "a" / "x.tar", sample_members(images, 0, 1))
    make_tar(tmp_path / "b" / "x.tar", sample_members(images, 1, 2))
    reader = WebDatasetReader([str(tmp_path / "a" / "x.tar"), str(tmp_path / "b" / "x.tar")])
    with pytest.raises(DatasetError, match="two shards have the same key 'x'"):
        reader.shards()


def test_key_escaping_round_trips():
    for image_id in ["COCO_train2014_000000172406.jpg", "a/b.c", "__meta__", "50%.png", "é 漢", ""]:
        key = encode_key(image_id)
        assert "." not in key and "/" not in key and not key.startswith("__")
        assert decode_key(key) == image_id
        assert split_member_name(f"{key}.jpg") == (key, "jpg")
    assert encode_key("COCO_x.jpg") == "COCO_x%2Ejpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3(monkeypatch):
    """An S3-compatible moto server on 127.0.0.1 with AWS_ENDPOINT_URL pointing to it."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    s3fs = pytest.importorskip("s3fs")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start within 30 s")
                time.sleep(0.1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        yield s3fs.S3FileSystem()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_urls_via_fsspec(tmp_path, images, moto_s3):
    moto_s3.mkdir("cusa-test")
    for i in range(2):
        tar = make_tar(tmp_path / f"shard-{i:03d}.tar", sample_members(images, 3 * i, 3 * i + 3))
        moto_s3.put(str(tar), f"cusa-test/data/shard-{i:03d}.tar")
    reader = open_dataset("s3://cusa-test/data/shard-{000..001}.tar")
    assert [r.key for r in reader.shards()] == ["shard-000", "shard-001"]
    samples = read_all(reader)
    assert [s.image_id for s in samples] == [f"s{i:04d}" for i in range(6)]
    assert [s.image for s in samples] == [img for _, img in images]
