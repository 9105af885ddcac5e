from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from cusa.errors import DatasetError, SampleNotFoundError, StoreError, StoreSpecMismatchError
from cusa.readers.registry import open_dataset
from cusa.store import FeatureStore
from cusa.store.spec import TeacherSpec
from cusa_train.data import (
    PairDataset,
    SoftLabelCollate,
    SoftLabelStage,
    TeacherFeatures,
    pair_collate,
)

IMAGE_SPEC = TeacherSpec(
    name="img-teacher", modality="image", model="test/img", weights_sha256="a" * 64,
    preprocessing={"resize": 224}, output_kind="embedding", dim=12, dtype="float32",
)  # fmt: skip
TEXT_SPEC = TeacherSpec(
    name="txt-teacher", modality="text", model="test/txt", weights_sha256="b" * 64,
    preprocessing={"lower": False}, output_kind="sentence", dim=8, dtype="float16",
)  # fmt: skip


def feature_of(sample_id: str, dim: int) -> np.ndarray:
    """A distinct, reproducible feature per id, so a test can tell which row came back."""
    seed = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@pytest.fixture
def reader():
    return open_dataset("coco-sample", split="train", shard_size=10)


@pytest.fixture
def store(tmp_path, reader):
    """A real zarr store of the coco-sample split; shards written in shuffled order, caption
    ``<image 3>#2`` recorded as a failure."""
    fs = FeatureStore.open(tmp_path / "store", create=True)
    img = fs.group(reader.name, "train", IMAGE_SPEC, reader.manifest_hash(), create=True)
    txt = fs.group(reader.name, "train", TEXT_SPEC, reader.manifest_hash(), create=True)
    shards = reader.shards()
    random.Random(0).shuffle(shards)
    missing = f"{reader.items()[3].image_id}#2"
    for shard in shards:
        samples = list(reader.read(shard))
        random.Random(1).shuffle(samples)
        ids = [s.image_id for s in samples]
        img.write_shard(shard.key, ids, np.stack([feature_of(i, 12) for i in ids]))
        cids = [c for s in samples for c in s.caption_ids if c != missing]
        fails = (
            [(missing, "test")] if missing in {c for s in samples for c in s.caption_ids} else []
        )
        txt.write_shard(shard.key, cids, np.stack([feature_of(c, 8) for c in cids]), failures=fails)
    img.seal()
    return tmp_path / "store"


def open_teachers(store, **kw) -> TeacherFeatures:
    return TeacherFeatures.open(
        store,
        dataset="coco-sample",
        split="train",
        image_teacher="img-teacher",
        text_teacher="txt-teacher",
        **kw,
    )


def test_gather_joins_by_id_not_by_row(store, reader):
    teachers = open_teachers(store, image_spec={"dim": 12}, text_spec=TEXT_SPEC)
    assert teachers.dims == (12, 8)
    image_ids = [it.image_id for it in reader.items()][::-1][:5]
    caption_ids = [f"{i}#0" for i in image_ids]
    t_img, t_txt = teachers.gather(image_ids, caption_ids)
    assert t_img.dtype == t_txt.dtype == torch.float32
    assert t_img.shape == (5, 12) and t_txt.shape == (5, 8)
    np.testing.assert_array_equal(t_img.numpy(), np.stack([feature_of(i, 12) for i in image_ids]))
    expected_txt = (
        np.stack([feature_of(c, 8) for c in caption_ids]).astype(np.float16).astype(np.float32)
    )
    np.testing.assert_array_equal(t_txt.numpy(), expected_txt)


def test_missing_id_is_an_error_naming_it(store, reader):
    teachers = open_teachers(store)
    missing = f"{reader.items()[3].image_id}#2"
    with pytest.raises(SampleNotFoundError, match=f"sample id '{missing}' is not in"):
        teachers.gather([reader.items()[3].image_id], [missing])
    with pytest.raises(SampleNotFoundError, match="'no-such-image.jpg'"):
        teachers.gather(["no-such-image.jpg"], [f"{reader.items()[0].image_id}#0"])


def test_a_store_made_by_another_teacher_spec_is_refused(store):
    with pytest.raises(
        StoreSpecMismatchError, match=r"dim: store 12 != configured 16.*weights_sha256"
    ):
        open_teachers(store, image_spec={"dim": 16, "weights_sha256": "c" * 64})
    with pytest.raises(StoreSpecMismatchError, match="text teacher features.*preprocessing"):
        open_teachers(store, text_spec=TEXT_SPEC.replace(preprocessing={"lower": True}))
    # A text teacher configured as the image teacher is refused by modality.
    with pytest.raises(
        StoreSpecMismatchError, match="modality: store 'text' != configured 'image'"
    ):
        TeacherFeatures.open(
            store,
            dataset="coco-sample",
            split="train",
            image_teacher="txt-teacher",
            text_teacher="txt-teacher",
        )
    with pytest.raises(StoreError, match="no features of teacher 'unicom-vit-b32'.*img-teacher@"):
        TeacherFeatures.open(
            store,
            dataset="coco-sample",
            split="train",
            image_teacher="unicom-vit-b32",
            text_teacher="txt-teacher",
        )


def _preprocess(data: bytes) -> torch.Tensor:
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((16, 16))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_pair_dataset_and_collate_in_dataloader_workers(store, reader):
    teachers = open_teachers(store)
    data = PairDataset(
        reader, _preprocess, max_images=6, require_ids=(teachers.image.ids, teachers.text.ids)
    )
    missing = f"{reader.items()[3].image_id}#2"
    assert data.skipped == {missing: "caption not in the text teacher's features"}
    assert (
        len(data.images) == 6
        and len(data) == sum(len(it.captions) for it in reader.items()[:6]) - 1
    )
    loader = DataLoader(
        data,
        batch_size=7,
        shuffle=True,
        num_workers=1,
        collate_fn=SoftLabelCollate(teachers),
        drop_last=True,
    )
    batches = list(loader)
    assert len(batches) == len(data) // 7
    batch = batches[0]
    assert batch["image"].shape == (7, 3, 16, 16)
    assert len(batch["text"]) == 7 and all(isinstance(t, str) for t in batch["text"])
    assert [c.split("#")[0] for c in batch["caption_id"]] == batch["image_id"]
    expected = np.stack([feature_of(i, 12) for i in batch["image_id"]])
    np.testing.assert_array_equal(batch["teacher_image"].numpy(), expected)
    assert batch["teacher_text"].shape == (7, 8)


def test_collate_without_require_ids_fails_loudly_on_a_missing_caption(store, reader):
    teachers = open_teachers(store)
    data = PairDataset(reader, _preprocess, max_images=4)
    collate = SoftLabelCollate(teachers, text_transform=lambda texts: [t.upper() for t in texts])
    missing = f"{reader.items()[3].image_id}#2"
    index = next(i for i, p in enumerate(data.pairs) if p[1] == missing)
    with pytest.raises(SampleNotFoundError, match=missing):
        collate([data[index - 1], data[index]])
    ok = collate([data[0], data[1]])
    assert ok["text"][0] == data[0]["text"].upper()
    with pytest.raises(DatasetError, match="empty batch"):
        pair_collate([])


def test_webdataset_stage_attaches_features_to_a_shard_stream(store, reader, tmp_path):
    tar = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(tar)) as sink:
        for sample in reader.read(reader.shards()[0]):
            for cid, caption in zip(sample.caption_ids[:2], sample.captions[:2], strict=True):
                sink.write({
                    "__key__": cid.replace(".", "_").replace("#", "_"),
                    "jpg": sample.image,
                    "json": json.dumps({"image_id": sample.image_id, "caption_id": cid, "caption": caption}).encode(),
                })  # fmt: skip
    teachers = open_teachers(store)
    stage = SoftLabelStage(teachers)

    def to_pair(s):
        meta = s["json"]
        return {
            "image": s["jpg"],
            "text": meta["caption"],
            "image_id": meta["image_id"],
            "caption_id": meta["caption_id"],
        }

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(str(tar)),
        wds.tarfile_to_samples(),
        wds.decode("pil"),
        wds.map(to_pair),
        stage,
        wds.batched(4, collation_fn=pair_collate),
    )
    batches = list(pipeline)
    assert sum(len(b["image_id"]) for b in batches) == 20
    first = batches[0]
    assert first["teacher_image"].shape == (4, 12) and first["teacher_text"].shape == (4, 8)
    np.testing.assert_array_equal(
        first["teacher_image"][0].numpy(), feature_of(first["image_id"][0], 12)
    )
    # Per-sample use with .map() and on already batched samples.
    one = stage.attach(
        {"image_id": first["image_id"][0].encode(), "caption_id": first["caption_id"][0]}
    )
    assert one["teacher_image"].shape == (12,)
    many = stage.attach({"image_id": first["image_id"], "caption_id": first["caption_id"]})
    assert torch.equal(many["teacher_text"], first["teacher_text"])
    with pytest.raises(
        DatasetError, match=r"has no 'caption_id'; its keys are \['__key__', 'image_id'\]"
    ):
        stage.attach({"__key__": "k", "image_id": first["image_id"][0]})
