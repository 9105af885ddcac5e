"""End-to-end extraction on the embedded real COCO sample with real offline teachers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import IMAGE_T, TEXT_T, store_snapshot

from cusa.errors import ConfigError, StoreSpecMismatchError
from cusa.extract.runner import ExtractConfig, extract
from cusa.store import FeatureLookup, FeatureStore


def _config(store: Path, **kw) -> ExtractConfig:
    base = dict(
        dataset="coco-sample",
        split="train",
        store=str(store),
        image_teacher=IMAGE_T,
        text_teacher=TEXT_T,
        runner="local",
        batch_size=8,
        shard_size=8,
        device="cpu",
    )
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory) -> Path:
    """One uninterrupted local run, shared by the tests of this module (copy before mutating)."""
    store = tmp_path_factory.mktemp("ref") / "store"
    summary = extract(_config(store))
    assert summary.ok and summary.sealed
    return store


def test_local_run_fills_and_seals_store(reference_store):
    groups = {g.spec["modality"]: g for g in FeatureStore.open(reference_store).groups()}
    assert set(groups) == {"image", "text"}
    image, text = FeatureLookup(groups["image"]), FeatureLookup(groups["text"])
    assert len(image) == 24 and image.dim == 1280
    assert len(text) >= 5 * 24 - 5 and all("#" in i for i in text.ids)
    norms = np.linalg.norm(image.gather(image.ids).astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert groups["image"].sealed["shards"] == ["000000", "000001", "000002"]


def test_rerun_is_a_noop(reference_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference_store, store)
    before = store_snapshot(store)
    summary = extract(_config(store))
    assert summary.shards_done == 0 and summary.shards_skipped == summary.shards_total
    assert store_snapshot(store) == before


@pytest.mark.slow
def test_shuffled_resume_gives_identical_store(reference_store, tmp_path):
    """Commit shards in another order across two runs: same ids, same bytes."""
    store = tmp_path / "store"
    cfg = _config(store)
    from cusa.extract import runner as runner_mod

    real_pending = runner_mod.pending_shards
    runner_mod.pending_shards = lambda shards, groups: list(reversed(real_pending(shards, groups)))[
        :1
    ]
    try:
        first = extract(cfg)
    finally:
        runner_mod.pending_shards = real_pending
    assert first.shards_done == 1 and not first.sealed
    second = extract(cfg)
    assert second.shards_done == second.shards_total - 1 and second.sealed
    assert store_snapshot(store) == store_snapshot(reference_store)


def test_spec_mismatch_on_resume_is_refused(reference_store, tmp_path):
    # A recorded spec field outside the fingerprint that differs (another dtype is not one any
    # more: it gets its own group, see test_float16_and_float32_of_one_teacher_live_side_by_side).
    store = tmp_path / "store"
    shutil.copytree(reference_store, store)
    (meta_path,) = (store / "coco-sample" / "train").glob(f"{IMAGE_T}@*/zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["cusa"]["spec"]["normalized"] = False
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreSpecMismatchError, match="normalized: stored False != given True"):
        extract(_config(store, modalities=("image",)))


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="--modalities"):
        ExtractConfig(dataset="coco-sample", modalities=("audio",))
    with pytest.raises(ConfigError, match="--batch-size 0"):
        ExtractConfig(dataset="coco-sample", batch_size=0)


def test_wrong_modality_teacher_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a text teacher"):
        extract(_config(tmp_path / "s", image_teacher=TEXT_T, modalities=("image",)))


def test_cli_extract_then_info(tmp_path):
    from typer.testing import CliRunner

    from cusa.cli import app

    store = tmp_path / "store"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "--dataset",
            "coco-sample",
            "--split",
            "val",
            "--store",
            str(store),
            "--image-teacher",
            IMAGE_T,
            "--text-teacher",
            TEXT_T,
            "--runner",
            "local",
            "--device",
            "cpu",
            "--no-progress",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sealed"] and summary["rows"]["image"] == 8


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_and_local_runners_give_identical_stores(reference_store, tmp_path):
    store = tmp_path / "store"
    summary = extract(_config(store, runner="ray"))
    assert summary.runner == "ray" and summary.sealed and summary.ok
    assert store_snapshot(store) == store_snapshot(reference_store)


@pytest.mark.slow
def test_extract_from_shards_equals_extract_from_root(reference_store, tmp_path):
    """`cusa shard` then extract from the tars gives the same ids and bytes as the root."""
    from cusa.readers import open_dataset
    from cusa.readers.wds_writer import write_shards

    shards = tmp_path / "shards"
    write_shards(open_dataset("coco-sample", split="train"), shards, max_count=10)
    store = tmp_path / "store"
    summary = extract(_config(store, dataset=str(shards)))
    assert summary.ok and summary.sealed
    ours, ref = store_snapshot(store), store_snapshot(reference_store)
    assert sorted(ours.values()) == sorted(ref.values())


@pytest.mark.slow
def test_float16_and_float32_of_one_teacher_live_side_by_side(reference_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference_store, store)
    summary = extract(_config(store, dtype="float32", modalities=("text",)))
    assert summary.ok and summary.sealed
    groups = sorted(p.name for p in (store / "coco-sample" / "train").iterdir())
    text16 = next(g for g in groups if g.startswith(TEXT_T) and "-" not in g.split("@")[1])
    assert f"{text16}-float32" in groups and len(groups) == 3
    half = FeatureLookup.open(
        store, dataset="coco-sample", split="train", teacher=TEXT_T, dtype="float16"
    )
    full = FeatureLookup.open(
        store, dataset="coco-sample", split="train", teacher=f"{text16}-float32"
    )
    ids = sorted(half.ids)[:10]
    assert half.gather(ids).dtype == np.float16 and full.gather(ids).dtype == np.float32
    np.testing.assert_allclose(half.gather(ids).astype(np.float32), full.gather(ids), atol=2e-3)
    # The float16 groups were not touched.
    assert store_snapshot(reference_store).items() <= store_snapshot(store).items()
