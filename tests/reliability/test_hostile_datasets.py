"""Hostile datasets through ``cusa extract`` (typer's CliRunner, real teachers, real COCO images
of the embedded sample): every bad sample is ledgered with a bounded, escaped reason and the
rest of the job completes; every bad dataset is refused with one line naming the value and the
fix. Nothing outside the dataset is read, nothing hangs, nothing vanishes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import IMAGE_T, TEXT_T, extract_args
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import DatasetError
from cusa.readers import AlbefReader, FolderReader, WebDatasetReader, coco_sample_root
from cusa.readers import _common as common
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.ledger import MAX_REASON_CHARS

RUN = dict(image_teacher=IMAGE_T, text_teacher=TEXT_T, runner="local", device="cpu", batch_size=4)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _extract(dataset: Path | str, store: Path, **options: Any) -> Any:
    return _cli(*extract_args(str(dataset), str(store), **{**RUN, **options}))


def _ledgers(store: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for g in FeatureStore.open(store).groups():
        out[g.spec["modality"]] = {f["sample_id"]: f["error"] for f in g.failures()}
    return out


def _ids(store: Path) -> dict[str, list[str]]:
    return {g.spec["modality"]: FeatureLookup(g).ids for g in FeatureStore.open(store).groups()}


def _pics() -> list[Path]:
    return sorted((coco_sample_root() / "pics").iterdir())


def _one_line(result: Any) -> str:
    """The error line of a refused command (stderr is mixed into ``output``)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def _tall_png(width: int = 1, height: int = 100_000) -> bytes:
    """A valid greyscale PNG of a few hundred bytes whose resize would need gigapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    rows = (b"\x00" + b"\x80" * width) * height
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


# -- an ALBEF dataset full of hostile image paths ------------------------------------------------

GOOD = ("good0", "good1", "good2")
HUGE_CAPTION_CHARS = 20_000_000


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hostile")
    root, secret = base / "ds", base / "secret"
    (root / "pics").mkdir(parents=True)
    secret.mkdir()
    pics = _pics()
    for i, name in enumerate(GOOD):
        shutil.copy(pics[i], root / "pics" / f"{name}.jpg")
    shutil.copy(pics[3], secret / "outside.jpg")
    (secret / "secret.txt").write_text("SECRET=hunter2\n")
    os.mkfifo(root / "pics" / "pipe.jpg")
    (root / "pics" / "passwd.jpg").symlink_to(secret / "secret.txt")
    (root / "pics" / "inside.jpg").symlink_to(root / "pics" / "good0.jpg")
    (root / "pics" / "tall.png").write_bytes(_tall_png())
    with open(root / "pics" / "big.jpg", "wb") as fh:  # sparse: 300 MB on paper only
        fh.truncate(300 * 2**20)
    records = [
        ("pics/good0.jpg", "good0", "a man riding a wave on a surfboard"),
        ("pics/good0.jpg", "good0", "?!" * (HUGE_CAPTION_CHARS // 2)),  # good0#1: 20 MB
        ("pics/good1.jpg", "good1", "a plate of food on a table"),
        ("pics/good2.jpg", "good2", "a cat sitting on a couch"),
        ("pics/inside.jpg", "inside", "a symlink that stays inside the root"),
        ("pics/pipe.jpg", "pipe", "a FIFO named like an image"),
        ("/dev/zero", "zero", "an endless device"),
        (str(secret / "outside.jpg"), "absolute", "an absolute path outside the root"),
        ("../secret/outside.jpg", "dotdot", "a ../ path outside the root"),
        ("pics/passwd.jpg", "passwd", "a symlink to a secret file"),
        ("pics/tall.png", "tall", "a 1x100000 PNG"),
        ("pics/big.jpg", "big", "a 300 MB file"),
        ("pics/good1.jpg", "@@LATIN1@@", "an image id that is not UTF-8"),
    ]
    recs = [{"image_path": p, "caption": c, "image_id": i} for p, i, c in records]
    raw = json.dumps(recs).encode().replace(b"@@LATIN1@@", b"caf\xe9")
    (root / "new_train.json").write_bytes(raw)
    store = base / "store"
    result = _extract(root, store)
    allowed_store = base / "store-allowed"
    allowed = _extract(root, allowed_store, allow_outside_root=True)
    return {
        "root": root,
        "store": store,
        "result": result,
        "allowed_store": allowed_store,
        "allowed": allowed,
    }


HOSTILE_IMAGES = {  # image id -> (bad-input name, what its ledger reason must say)
    "pipe": ("image: FIFO as the image file", "is a FIFO (named pipe), not a regular file"),
    "zero": ("image: /dev/zero as the image path", "'/dev/zero' lies outside the dataset root"),
    "absolute": ("image: absolute path outside the root", "lies outside the dataset root"),
    "dotdot": ("image: ../ path outside the root", "lies outside the dataset root"),
    "passwd": ("image: symlink to a file outside the root", "resolves outside the dataset root"),
    "tall": ("image: 1x100000 PNG (huge resize output)", "output-size guard"),
    "big": ("image: file over the size cap (300 MB)", "over the limit of 268,435,456"),
    "caf\\xe9": ("image: non-UTF-8 image id (JSON)", "is not valid UTF-8"),
}


def test_hostile_image_paths_are_ledgered_and_the_job_completes(hostile, reliability_log):
    result, store = hostile["result"], hostile["store"]
    ledgers, ids = _ledgers(store), _ids(store)
    image = ledgers["image"]
    for sid, (name, reason) in HOSTILE_IMAGES.items():
        msg = image.get(sid, "")
        caught = reason in msg and result.exit_code == 1 and len(msg) <= MAX_REASON_CHARS
        outcome = "ledgered with its reason, never read; the job completes"
        if sid == "tall":
            outcome = "ledgered from the header by the output-size guard; never decoded"
        if sid == "caf\\xe9":
            outcome = "ledgered under an escaped id (image and captions); the job completes"
        reliability_log.bad_input(name, "image", caught=caught, outcome=outcome, message=msg)
    assert result.exit_code == 1, result.output
    assert set(image) == set(HOSTILE_IMAGES), image
    for sid, (_, reason) in HOSTILE_IMAGES.items():
        assert reason in image[sid], (sid, image[sid])
    # Good samples, and a symlink that stays inside the root, are extracted.
    assert sorted(ids["image"]) == sorted([*GOOD, "inside"])
    assert FeatureLookup(FeatureStore.open(store).groups()[0]) is not None
    # Never file contents: not the secret behind the symlink, not /dev/zero's bytes.
    everything = json.dumps(ledgers)
    assert "hunter2" not in everything and "\\u0000" not in everything
    assert "--allow-outside-root" in image["absolute"]
    assert "caf\\xe9#*" in ledgers["text"]


def test_a_20mb_caption_is_ledgered_with_a_bounded_reason(hostile, reliability_log):
    text = _ledgers(hostile["store"])["text"]
    msg = text.get("good0#1", "")
    caught = "empty after normalisation" in msg and len(msg) <= MAX_REASON_CHARS
    reliability_log.bad_input(
        "caption: 20 MB caption",
        "caption",
        caught=caught,
        outcome=f"ledgered; reason cut to {MAX_REASON_CHARS} characters",
        message=msg,
    )
    assert caught, msg[:1000]
    assert "chars, cut]" in msg
    verify = _cli("store", "verify", str(hostile["store"]))
    assert verify.exit_code == 0 and len(verify.output) < 20_000, verify.output[:2000]


def test_allow_outside_root_reads_outside_but_never_devices(hostile, reliability_log):
    result, store = hostile["allowed"], hostile["allowed_store"]
    image = _ledgers(store)["image"]
    ids = _ids(store)["image"]
    zero = image.get("zero", "")
    caught = "'/dev/zero' is a character device, not a regular file; not read" in zero
    reliability_log.bad_input(
        "image: /dev/zero with --allow-outside-root",
        "image",
        caught=caught and result.exit_code == 1,
        outcome="ledgered: not a regular file, never read (no hang, no memory blow-up)",
        message=zero,
    )
    assert result.exit_code == 1, result.output
    assert caught, image
    assert {"absolute", "dotdot"} <= set(ids)  # the user said so explicitly
    # The secret file is read now but is not an image; its bytes never reach the ledger.
    assert "not a recognised image" in image["passwd"] and "hunter2" not in image["passwd"]
    assert "SECRET" not in image["passwd"]


# -- webdataset tars with hostile members --------------------------------------------------------


def _tar_member(name: str, data: bytes = b"", **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _write_tar(path: Path, members, **open_args: Any) -> Path:
    with tarfile.open(path, "w", **open_args) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


@pytest.fixture(scope="module")
def hostile_tar(tmp_path_factory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("hostile_tar")
    jpegs = [p.read_bytes() for p in _pics()[:4]]
    big = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    members = [
        _tar_member("ok.jpg", jpegs[0]),
        _tar_member("ok.txt", b"a fine photo"),
        _tar_member("sym.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        _tar_member("sym.txt", b"a symlinked image"),
        _tar_member("hard.jpg", type=tarfile.LNKTYPE, linkname="ok.jpg"),
        _tar_member("chr.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=5),
        _tar_member("fifo.jpg", type=tarfile.FIFOTYPE),
        _tar_member("dup.jpg", jpegs[1]),
        _tar_member("dup.jpg", jpegs[2]),
        _tar_member("deep.jpg", jpegs[3]),
        _tar_member("deep.json", b"[" * 100_000 + b"]" * 100_000),
        _tar_member("big.jpg", big),
        _tar_member("big.txt", b"a caption of a huge image"),
        _tar_member("caf\xe9.jpg", jpegs[2]),
        _tar_member("caf\xe9.txt", b"a Latin-1 member name"),
    ]
    tar = _write_tar(base / "hostile.tar", members, format=tarfile.USTAR_FORMAT, encoding="latin-1")
    store = base / "store"
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "MAX_IMAGE_BYTES", 250_000)  # so a 300 KB member is "over the cap"
    try:
        result = _extract(tar, store)
    finally:
        mp.undo()
    return {"store": store, "result": result}


HOSTILE_MEMBERS = {  # sample id -> (bad-input name, ledger reason)
    "sym": ("dataset: tar symlink member", "is a symbolic link to '/etc/passwd'"),
    "hard": ("dataset: tar hard-link member", "is a hard link to 'ok.jpg'"),
    "chr": ("dataset: tar character-device member", "is a character device"),
    "fifo": ("dataset: tar FIFO member", "is a FIFO, not a regular file"),
    "dup": ("dataset: tar member name appearing twice", "appears more than once in the tar"),
    "big": ("dataset: tar member over the size cap", "over the limit of 250,000"),
    "caf\\xe9": ("dataset: tar member name in Latin-1 (not UTF-8)", "is not valid UTF-8"),
}


def test_hostile_tar_members_are_ledgered_never_dropped(hostile_tar, reliability_log):
    result, store = hostile_tar["result"], hostile_tar["store"]
    ledgers, ids = _ledgers(store), _ids(store)
    image, text = ledgers["image"], ledgers["text"]
    for sid, (name, reason) in HOSTILE_MEMBERS.items():
        msg = image.get(sid, "")
        reliability_log.bad_input(
            name,
            "dataset",
            caught=reason in msg and result.exit_code == 1,
            outcome="never read; its sample ledgered with the reason (no copy silently wins)",
            message=msg,
        )
    deep = text.get("deep#*", "")
    reliability_log.bad_input(
        "dataset: JSON nested 100k deep (tar .json member)",
        "dataset",
        caught="nested too deeply" in deep and "deep" in ids["image"],
        outcome="captions ledgered; the image is extracted",
        message=deep,
    )
    assert result.exit_code == 1, result.output
    assert set(image) == set(HOSTILE_MEMBERS), image
    for sid, (_, reason) in HOSTILE_MEMBERS.items():
        assert reason in image[sid], (sid, image[sid])
    assert sorted(ids["image"]) == ["deep", "ok"]
    assert sorted(ids["text"]) == ["big#0", "ok#0", "sym#0"]  # their captions are fine
    assert set(text) == {"deep#*", "caf\\xe9#*"}, text
    verify = _cli("store", "verify", str(store))
    assert verify.exit_code == 0, verify.output


# -- bad datasets are refused in one line --------------------------------------------------------


def _tiny_albef(root: Path, captions: dict[str, list[str]]) -> Path:
    (root / "pics").mkdir(parents=True, exist_ok=True)
    pics = _pics()
    recs = []
    for i, (image_id, caps) in enumerate(captions.items()):
        target = root / "pics" / f"{image_id}.jpg"
        if not target.exists():
            shutil.copy(pics[i], target)
        recs += [
            {"image_path": f"pics/{image_id}.jpg", "caption": c, "image_id": image_id} for c in caps
        ]
    (root / "new_train.json").write_text(json.dumps(recs))
    return root


# Each dataset-level refusal below is one scenario checked at two levels: the reader raises the
# one-line DatasetError, and `cusa extract` turns it into exit 2 with that line.
LEVELS = ["reader", "cli"]


@pytest.mark.parametrize("level", LEVELS)
def test_json_nested_200k_deep_is_refused(tmp_path, level, reliability_log):
    root = tmp_path / "deep"
    root.mkdir()
    (root / "new_train.json").write_text("[" * 200_000 + "]" * 200_000)
    if level == "reader":
        with pytest.raises(DatasetError, match="nests JSON arrays/objects too deeply") as info:
            AlbefReader(root, "train").shards()
        assert "\n" not in str(info.value) and len(str(info.value)) < 400
        return
    res = _extract(root, tmp_path / "store", modalities="text")
    line = _one_line(res)
    ok = res.exit_code == 2 and "nests JSON arrays/objects too deeply" in line
    reliability_log.bad_input(
        "dataset: JSON nested 200k deep (ALBEF index)",
        "dataset",
        caught=ok,
        outcome="refused in one line (exit 2), no RecursionError traceback",
        message=line,
    )
    assert ok, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("how", "level"),
    [
        ("../", "reader"),
        ("absolute", "reader"),
        ("symlink", "reader"),
        ("../", "cli"),
        ("absolute", "cli"),
    ],
)
def test_manifest_naming_a_tar_outside_is_refused(tmp_path, how, level, reliability_log):
    folder = tmp_path / "shards"
    folder.mkdir()
    outside = _write_tar(tmp_path / "outside.tar", [_tar_member("x.jpg", _pics()[0].read_bytes())])
    name = {"../": "../outside.tar", "absolute": str(outside), "symlink": "link.tar"}[how]
    if how == "symlink":
        (folder / "link.tar").symlink_to(outside)
    manifest = {
        "format": "cusa-webdataset",
        "version": 1,
        "splits": {"train": {"shards": [{"file": name, "samples": 1}]}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if level == "reader":
        with pytest.raises(DatasetError, match="outside") as info:
            WebDatasetReader(str(folder), "train")
        assert repr(name) in str(info.value) and "--allow-outside-root" in str(info.value)
        reader = WebDatasetReader(str(folder), "train", allow_outside_root=True)
        assert [s.image_id for s in reader.read(reader.shards()[0])] == ["x"]
        return
    res = _extract(folder, tmp_path / "store", modalities="text")
    line = _one_line(res)
    ok = res.exit_code == 2 and repr(name) in line and "--allow-outside-root" in line
    reliability_log.bad_input(
        f"dataset: manifest.json naming a tar outside its folder ({how})",
        "dataset",
        caught=ok,
        outcome="refused in one line naming the file and --allow-outside-root",
        message=line,
    )
    assert ok, res.output


@pytest.mark.parametrize("level", LEVELS)
def test_dataset_index_that_is_a_fifo_is_refused(tmp_path, level, reliability_log):
    root = tmp_path / "fifo"
    (root / "pics").mkdir(parents=True)
    os.mkfifo(root / "new_train.json")
    if level == "reader":
        with pytest.raises(DatasetError, match="is a FIFO .named pipe., not a regular file"):
            AlbefReader(root, "train")  # never opened
        os.mkfifo(root / "pics" / "captions.tsv")
        with pytest.raises(DatasetError, match="no captions file"):
            FolderReader(root / "pics", "train")
        return
    res = _extract(root, tmp_path / "store", modalities="text")
    line = _one_line(res)
    ok = res.exit_code == 2 and "new_train.json' is a FIFO (named pipe), not a regular" in line
    reliability_log.bad_input(
        "dataset: the index file is a FIFO",
        "dataset",
        caught=ok,
        outcome="refused in one line; never opened (no hang)",
        message=line,
    )
    assert ok, res.output


# -- a changed dataset is never resumed silently -------------------------------------------------

BASE_CAPTIONS = {"a": ["a dog on a beach", "a brown dog"], "b": ["a red bus"]}


@pytest.fixture
def resumable(tmp_path) -> dict[str, Any]:
    root = _tiny_albef(tmp_path / "ds", BASE_CAPTIONS)
    store = tmp_path / "store"
    first = _extract(root, store, modalities="text", shard_size=1)
    assert first.exit_code == 0, first.output
    return {"root": root, "store": store}


CHANGES = {
    "caption edited": {"a": ["a dog on a beach", "a black dog"], "b": ["a red bus"]},
    "caption added": {"a": ["a dog on a beach", "a brown dog"], "b": ["a red bus", "a bus"]},
    "image removed": {"a": ["a dog on a beach", "a brown dog"]},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_dataset_is_refused_on_resume(resumable, change, reliability_log):
    root, store = resumable["root"], resumable["store"]
    before = _ids(store)
    _tiny_albef(root, CHANGES[change])
    res = _extract(root, store, modalities="text", shard_size=1)
    line = _one_line(res)
    ok = (
        res.exit_code == 2
        and "dataset manifest of albef/train" in line
        and "all-MiniLM-L6-v2" in line
        and "delete the group folder" in line
        and "changed since this group was extracted" in line
    )
    reliability_log.bad_input(
        f"dataset: {change}, then resumed",
        "dataset",
        caught=ok and _ids(store) == before,
        outcome="refused in one line saying what changed and how to re-extract; store unchanged",
        message=line,
    )
    assert ok, res.output
    assert _ids(store) == before


def test_a_changed_caption_refuses_only_the_text_group(tmp_path):
    root = _tiny_albef(tmp_path / "ds", BASE_CAPTIONS)
    store = tmp_path / "store"
    assert _extract(root, store, shard_size=1).exit_code == 0
    _tiny_albef(root, CHANGES["caption edited"])
    image_only = _extract(root, store, shard_size=1, modalities="image")
    assert image_only.exit_code == 0, image_only.output  # image features do not depend on it
    both = _extract(root, store, shard_size=1)
    assert both.exit_code == 2 and TEXT_T in _one_line(both) and IMAGE_T not in _one_line(both)


def test_a_new_shard_size_is_refused_with_the_original_one(resumable, reliability_log):
    res = _extract(resumable["root"], resumable["store"], modalities="text", shard_size=2)
    line = _one_line(res)
    ok = res.exit_code == 2 and "unchanged but cut into other shards" in line
    ok = ok and "re-run with --shard-size 1 to resume" in line
    reliability_log.bad_input(
        "dataset: --shard-size changed on resume",
        "dataset",
        caught=ok,
        outcome="refused: says the dataset is unchanged and names the original --shard-size",
        message=line,
    )
    assert ok, res.output
    assert "another --dataset name" not in line
