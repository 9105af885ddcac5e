"""Bad inputs, each rejected or recorded with a clear message; good samples are untouched.

A small ALBEF-layout dataset is built in a temporary folder from the real COCO images of the
embedded ``coco-sample`` (so a fresh clone runs these tests, without ``../shared``). Its ``clean``
split holds only good samples; its ``train`` split holds the same good samples plus every bad
image and caption. Both are extracted with ``cusa extract`` (typer's CliRunner) at batch size 1,
so each good sample is computed alone and its features must be byte-identical in both runs.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import IMAGE_T, TEXT_T, extract_args, rows_by_id, store_snapshot
from PIL import Image
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import StoreError, StoreSpecMismatchError, WeightsError
from cusa.readers import coco_sample_root
from cusa.store import FeatureLookup, FeatureStore

GOOD = 4
LONG_WORDS = 3000
NON_UTF8 = b"caf\xe9 au lait on a wooden table"  # Latin-1, not UTF-8


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _extract(dataset: Path, store: Path, split: str, **options: Any) -> Any:
    opts = dict(
        split=split,
        image_teacher=IMAGE_T,
        text_teacher=TEXT_T,
        runner="local",
        batch_size=1,
        shard_size=4,
        device="cpu",
    )
    opts.update(options)
    return _cli(*extract_args(str(dataset), str(store), **opts))


class MarkerPayload:
    """Unpickling this would create ``path`` (it must never happen)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- the dataset -------------------------------------------------------------------------------------


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height pixels whose file is a few KB (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco_example() -> Path:
    """Real COCO images and captions inside the package (shadows the ../shared fixture)."""
    return coco_sample_root()


@pytest.fixture(scope="module")
def bad_dataset(coco_example, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad_dataset")
    pics = root / "pics"
    pics.mkdir()
    records = json.loads((coco_example / "new_train.json").read_text())
    by_image: dict[str, list[dict]] = {}
    for rec in records:
        by_image.setdefault(rec["image_id"], []).append(rec)
    names = list(by_image)[:GOOD]
    for name in names:
        shutil.copy(coco_example / "pics" / name, pics / name)
    first = Image.open(pics / names[0]).convert("RGB")
    second = Image.open(pics / names[1]).convert("L")
    jpeg = (pics / names[2]).read_bytes()
    rng = np.random.default_rng(0)

    files = {
        "gray8.png": _png(second),  # the clean twin of gray16.png
        "alpha.png": _png(Image.merge("RGBA", (*first.split(), Image.new("L", first.size, 77)))),
        "gray16.png": _png(Image.fromarray(np.asarray(second, np.uint16) * 257)),
        "cmyk.jpg": _jpeg_cmyk(first),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "random.jpg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "bomb.png": _bomb_png(12_000, 12_000),
    }
    for name, data in files.items():
        (pics / name).write_bytes(data)
    assert Image.open(pics / "gray16.png").mode.startswith("I")
    assert Image.open(pics / "cmyk.jpg").mode == "CMYK"

    long_caption = " ".join(["a dog runs"] * (LONG_WORDS // 3))
    first64 = " ".join(long_caption.split()[:64])
    # (image file, caption); caption k of an image is its k-th record, so the good captions keep
    # their ids (<image>#0, #1) in both splits and names[1]#2 is the long one / its truncation.
    base = [(n, r["caption"]) for n in names for r in by_image[n][:2]]
    gray = ("gray8.png", "a black and white picture")
    clean = [*base, (names[1], first64), gray]
    bad = [*base, (names[1], long_caption), gray]
    bad += [(names[0], c) for c in ("", "?!... ,;:", "@@NONUTF8@@")]  # names[0]#2, #3, #4
    for name in (
        "alpha.png",
        "gray16.png",
        "cmyk.jpg",
        "truncated.jpg",
        "empty.jpg",
        "random.jpg",
        "bomb.png",
        "missing.jpg",
    ):
        bad.append((name, f"a picture stored as {name}"))

    def write(split: str, rows: list[tuple[str, str]]) -> None:
        recs = [{"image_path": f"./pics/{n}", "caption": c, "image_id": n} for n, c in rows]
        raw = json.dumps(recs).encode().replace(b"@@NONUTF8@@", NON_UTF8)
        (root / f"new_{split}.json").write_bytes(raw)

    write("clean", clean)
    write("train", bad)
    return {"root": root, "good": names, "long": long_caption}


def _jpeg_cmyk(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_run(bad_dataset, tmp_path_factory) -> dict[str, Any]:
    """The clean split, then the bad split, extracted into one store."""
    store = tmp_path_factory.mktemp("bad_store") / "store"
    clean = _extract(bad_dataset["root"], store, "clean")
    assert clean.exit_code == 0, clean.output
    clean_snapshot = store_snapshot(store)
    bad = _extract(bad_dataset["root"], store, "train")
    groups = {(g.split, g.spec["modality"]): g for g in FeatureStore.open(store).groups()}
    return {"store": store, "clean": clean_snapshot, "result": bad, "groups": groups}


IMAGE_FAULTS = {  # image id -> what the ledger reason must say
    "truncated.jpg": "truncated",
    "empty.jpg": "0 bytes",
    "random.jpg": "not a recognised image",
    "bomb.png": "decompression-bomb",
    "missing.jpg": "not found",
}
CONVERTED = ("alpha.png", "gray16.png", "cmyk.jpg")


def test_bad_images_are_ledgered_and_the_run_goes_on(bad_run, bad_dataset, reliability_log):
    result, groups = bad_run["result"], bad_run["groups"]
    ledger = {f["sample_id"]: f["error"] for f in groups[("train", "image")].failures()}
    for name, reason in IMAGE_FAULTS.items():
        caught = name in ledger and reason in ledger[name] and result.exit_code == 1
        reliability_log.bad_input(
            f"image: {name}",
            "image",
            caught=caught,
            outcome="recorded in ledger",
            message=ledger.get(name, ""),
        )
    assert result.exit_code == 1, result.output
    assert "sample(s) failed" in result.output
    assert set(ledger) == set(IMAGE_FAULTS), ledger
    for name, reason in IMAGE_FAULTS.items():
        assert reason in ledger[name], (name, ledger[name])
    shards = {f["shard"] for f in groups[("train", "image")].failures()}
    assert shards and all(s for s in shards)  # the ledger names the shard too


def test_unusual_images_are_converted_not_failed(bad_run, bad_dataset, reliability_log):
    groups = bad_run["groups"]
    lk = FeatureLookup(groups[("train", "image")])
    for name in CONVERTED:
        ok = name in lk
        reliability_log.bad_input(
            f"image: {name}", "image", caught=ok, outcome="converted to RGB and extracted"
        )
        assert ok, name
    feats = lk.gather(list(CONVERTED)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=2e-3)
    good0, good1 = bad_dataset["good"][:2]
    # Alpha dropped: the same pixels as the JPEG it was made from, so the same features.
    assert lk.gather(["alpha.png"]).tobytes() == lk.gather([good0]).tobytes()
    # 16-bit greyscale scaled to 8 bits: identical to its 8-bit twin.
    assert lk.gather(["gray16.png"]).tobytes() == lk.gather(["gray8.png"]).tobytes()


def test_bad_captions_are_ledgered_long_ones_truncated(bad_run, bad_dataset, reliability_log):
    groups = bad_run["groups"]
    good0, good1 = bad_dataset["good"][:2]
    ledger = {f["sample_id"]: f["error"] for f in groups[("train", "text")].failures()}
    expected = {
        f"{good0}#2": "empty after normalisation",
        f"{good0}#3": "empty after normalisation",
        f"{good0}#4": "not valid UTF-8",
    }
    labels = {
        f"{good0}#2": "empty caption",
        f"{good0}#3": "punctuation-only caption",
        f"{good0}#4": "non-UTF-8 caption",
    }
    for cid, reason in expected.items():
        reliability_log.bad_input(
            f"caption: {labels[cid]}",
            "caption",
            caught=reason in ledger.get(cid, ""),
            outcome="recorded in ledger",
            message=ledger.get(cid, ""),
        )
    lk = FeatureLookup(groups[("train", "text")])
    clean = FeatureLookup(groups[("clean", "text")])
    long_id = f"{good1}#2"
    truncated_ok = (
        long_id in lk and lk.gather([long_id]).tobytes() == clean.gather([long_id]).tobytes()
    )
    reliability_log.bad_input(
        "caption: very long (3000 words)",
        "caption",
        caught=truncated_ok,
        outcome="truncated to 64 words, extracted",
    )
    assert set(ledger) == set(expected), ledger
    for cid, reason in expected.items():
        assert reason in ledger[cid]
    assert truncated_ok


def test_good_samples_equal_a_clean_run_and_nothing_else_changed(bad_run):
    store, clean = bad_run["store"], bad_run["clean"]
    now = store_snapshot(store)
    # The clean split's groups are byte-identical after the bad run wrote next to them.
    for rel, snap in clean.items():
        assert now[rel] == snap
    clean_rows, now_rows = rows_by_id(clean), rows_by_id(now)
    for (rel, sid), row in clean_rows.items():
        bad_rel = rel.replace("/clean/", "/train/")
        assert now_rows[(bad_rel, sid)] == row, (bad_rel, sid)
    # No row exists for a failed sample, and the failures are all the store lacks.
    for (split, _), g in bad_run["groups"].items():
        if split == "train":
            failed = {f["sample_id"] for f in g.failures()}
            assert not failed & set(FeatureLookup(g).ids)
    verify = _cli("store", "verify", str(store))
    assert verify.exit_code == 0, verify.output


# -- datasets ------------------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def jpegs(coco_example) -> list[bytes]:
    names = sorted((coco_example / "pics").iterdir())[:3]
    return [p.read_bytes() for p in names]


def test_duplicate_sample_ids_are_refused(bad_dataset, jpegs, tmp_path, reliability_log):
    root = tmp_path / "dup"
    (root / "pics").mkdir(parents=True)
    for i, data in enumerate(jpegs[:2]):
        (root / "pics" / f"{i}.jpg").write_bytes(data)
    recs = [
        {"image_path": f"./pics/{i}.jpg", "caption": "a photo", "image_id": "same"}
        for i in range(2)
    ]
    (root / "new_train.json").write_text(json.dumps(recs))
    store = tmp_path / "store"
    res = _extract(root, store, "train", modalities="text")
    ok = res.exit_code == 2 and "duplicate image id 'same'" in res.output
    reliability_log.bad_input(
        "dataset: duplicate sample ids (JSON)",
        "dataset",
        caught=ok,
        outcome="refused",
        message=res.output,
    )
    assert ok, res.output
    assert not store.exists() or not FeatureStore.open(store).groups()

    tar = _tar(
        tmp_path / "dups.tar",
        [
            ("a.jpg", jpegs[0]),
            ("a.json", b'{"image_id": "x", "captions": ["one"]}'),
            ("b.jpg", jpegs[1]),
            ("b.json", b'{"image_id": "x", "captions": ["two"]}'),
        ],
    )
    res = _extract(tar, tmp_path / "store2", "train", modalities="image")
    ok = res.exit_code == 2 and "duplicate image id 'x'" in res.output
    reliability_log.bad_input(
        "dataset: duplicate sample ids (webdataset)",
        "dataset",
        caught=ok,
        outcome="refused",
        message=res.output,
    )
    assert ok, res.output


def test_webdataset_non_contiguous_keys_are_refused(jpegs, tmp_path, reliability_log):
    tar = _tar(
        tmp_path / "split.tar", [("a.jpg", jpegs[0]), ("b.jpg", jpegs[1]), ("a.txt", b"late")]
    )
    store = tmp_path / "store"
    res = _extract(tar, store, "train", modalities="image")
    ok = res.exit_code == 2 and "non-contiguous key 'a'" in res.output
    reliability_log.bad_input(
        "dataset: webdataset non-contiguous keys",
        "dataset",
        caught=ok,
        outcome="refused",
        message=res.output,
    )
    assert ok, res.output
    assert all(not g.committed_shards() for g in FeatureStore.open(store).groups())


def test_webdataset_member_escaping_the_archive_is_never_used(
    jpegs, tmp_path, caplog, reliability_log
):
    inner = tmp_path / "data"
    inner.mkdir()
    tar = _tar(
        inner / "evil.tar",
        [
            ("../escape.jpg", jpegs[0]),
            ("../escape.txt", b"outside"),
            ("ok.jpg", jpegs[1]),
            ("ok.txt", b"a fine photo"),
        ],
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    store = tmp_path / "store"
    res = _extract(tar, store, "train")
    lk_ids = {g.spec["modality"]: FeatureLookup(g).ids for g in FeatureStore.open(store).groups()}
    warned = "escapes the archive" in caplog.text and "'../escape.jpg'" in caplog.text
    ledger = {
        f["sample_id"]: f["error"]
        for g in FeatureStore.open(store).groups()
        if g.spec["modality"] == "image"
        for f in g.failures()
    }
    ledgered = sorted(ledger) == ["evil:../escape.jpg", "evil:../escape.txt"]
    ok = warned and ledgered and lk_ids == {"image": ["ok"], "text": ["ok#0"]}
    reliability_log.bad_input(
        "dataset: tar member path escapes",
        "dataset",
        caught=ok,
        outcome="member never read; ledgered with its reason; exit code 1; nothing written outside",
        message="tar member '../escape.jpg' escapes the archive; not read",
    )
    assert ok, (caplog.text, lk_ids, ledger)
    assert res.exit_code == 1, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "store"])


def test_truncated_tar_keeps_earlier_samples_and_ledgers_the_rest(jpegs, tmp_path, reliability_log):
    full = _tar(
        tmp_path / "full.tar",
        [
            ("s0.jpg", jpegs[0]),
            ("s0.txt", b"first photo"),
            ("s1.jpg", jpegs[1]),
            ("s1.txt", b"second photo"),
        ],
    ).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: 512 + len(jpegs[0]) + 1024 + 512 + len(jpegs[1]) // 2])
    store = tmp_path / "store"
    res = _extract(cut, store, "train")
    groups = {g.spec["modality"]: g for g in FeatureStore.open(store).groups()}
    img_ledger = {f["sample_id"]: f["error"] for f in groups["image"].failures()}
    txt_ledger = {f["sample_id"]: f["error"] for f in groups["text"].failures()}
    ok = (
        res.exit_code == 1
        and "truncated tar" in img_ledger.get("s1", "")
        and FeatureLookup(groups["image"]).ids == ["s0"]
    )
    reliability_log.bad_input(
        "dataset: truncated tar",
        "dataset",
        caught=ok,
        outcome="earlier samples kept, the cut sample ledgered",
        message=img_ledger.get("s1", ""),
    )
    assert ok, (res.output, img_ledger)
    assert FeatureLookup(groups["text"]).ids == ["s0#0"]
    assert "truncated tar" in txt_ledger.get("s1#*", ""), txt_ledger


# -- files handed to cusa --------------------------------------------------------------------------


def test_weights_with_the_wrong_sha256_are_refused(tmp_path, reliability_log):
    weights = tmp_path / "FP16-ViT-B-32.pt"
    weights.write_bytes(b"not the official checkpoint" * 100)
    store = tmp_path / "store"
    res = _cli(
        *extract_args(
            "coco-sample",
            str(store),
            split="val",
            modalities="image",
            image_teacher="unicom-vit-b32",
            image_teacher_weights=str(weights),
            runner="local",
            device="cpu",
        )
    )
    ok = (
        res.exit_code == 2
        and "checksum mismatch" in res.output
        and "expected the official SHA-256" in res.output
    )
    reliability_log.bad_input(
        "file: weights with the wrong SHA-256",
        "file",
        caught=ok,
        outcome="refused before loading",
        message=res.output,
    )
    assert ok, res.output
    assert not store.exists()


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_pickle_instead_of_a_state_dict_is_never_executed(fmt, tmp_path, reliability_log):
    import torch

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    payload = {"weight": MarkerPayload(str(marker))}
    if fmt == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    res = _cli(
        *extract_args(
            "coco-sample",
            str(tmp_path / "store"),
            split="val",
            modalities="image",
            image_teacher=IMAGE_T,
            image_teacher_weights=str(evil),
            runner="local",
            device="cpu",
        )
    )
    ok = res.exit_code == 2 and "refusing to load" in res.output and not marker.exists()
    reliability_log.bad_input(
        f"file: pickle instead of a state dict ({fmt})",
        "file",
        caught=ok,
        outcome="refused (weights_only=True), payload not executed",
        message=res.output,
    )
    assert res.exit_code == 2, res.output
    assert "refusing to load" in res.output and "weights_only=True" in res.output
    assert not marker.exists(), "the pickle's payload ran"
    from cusa.weights import load_state_dict

    with pytest.raises(WeightsError, match="refusing to load"):
        load_state_dict(evil)
    assert not marker.exists()


def test_npy_needing_pickle_is_refused(tmp_path, reliability_log):
    from cusa.extract.batches import bytes_to_array
    from cusa_train.evaluation.evaluate import load_features

    marker = tmp_path / "PWNED"
    evil = tmp_path / "features.npy"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = MarkerPayload(str(marker)), "x"
    np.save(evil, arr, allow_pickle=True)
    (tmp_path / "features.ids.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="never unpickles"):
        load_features(evil)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        bytes_to_array(evil.read_bytes())  # the Ray runner's own batch payloads
    ok = not marker.exists()
    reliability_log.bad_input(
        "file: .npy needing pickle",
        "file",
        caught=ok,
        outcome="refused (allow_pickle=False) with a message naming the file, payload not executed",
        message="feature file ... holds Python objects that need pickle to load; cusa never unpickles feature files",
    )
    assert ok


@pytest.fixture
def store_copy(sample_reference, tmp_path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(sample_reference[0], store)
    return store


def test_store_attributes_edited_to_another_spec_are_caught(store_copy, reliability_log):
    from reliability_common import sample_cli_options

    from cusa.extract.teachers import get_teacher

    group = next(g for g in FeatureStore.open(store_copy).groups() if g.spec["modality"] == "text")
    meta_path = store_copy / group.rel / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["cusa"]["spec"]["model"] = "sentence-transformers/all-mpnet-base-v2"
    meta_path.write_text(json.dumps(meta))

    verify = _cli("store", "verify", str(store_copy))
    rerun = _cli(
        *extract_args("coco-sample", str(store_copy), runner="local", **sample_cli_options())
    )
    spec = get_teacher(TEXT_T, device="cpu").spec
    with pytest.raises(StoreSpecMismatchError, match="model"):
        FeatureLookup.open(
            store_copy, dataset="coco-sample", split="val", teacher=TEXT_T, expected_spec=spec
        )
    ok = (
        verify.exit_code == 1
        and "spec/attrs mismatch" in verify.output
        and rerun.exit_code == 2
        and "differs" in rerun.output
    )
    reliability_log.bad_input(
        "file: store attributes edited to another teacher spec",
        "file",
        caught=ok,
        outcome="verify exits 1; extract and readers refuse",
        message=verify.output,
    )
    assert verify.exit_code == 1 and "spec/attrs mismatch" in verify.output, verify.output
    assert rerun.exit_code == 2 and "model" in rerun.output, rerun.output


def test_truncated_chunk_file_is_caught(store_copy, reliability_log):
    group = next(g for g in FeatureStore.open(store_copy).groups() if g.spec["modality"] == "image")
    chunk = store_copy / group.rel / "features" / "c" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) - 1000])
    verify = _cli("store", "verify", str(store_copy))
    with pytest.raises(StoreError, match="truncated"):
        FeatureLookup.open(store_copy, dataset="coco-sample", split="val", teacher=IMAGE_T)
    ok = verify.exit_code == 1 and "truncated" in verify.output
    reliability_log.bad_input(
        "file: chunk file truncated on disk",
        "file",
        caught=ok,
        outcome="verify exits 1 naming the file; readers refuse",
        message=verify.output,
    )
    assert ok, verify.output
    assert str(chunk) in verify.output
