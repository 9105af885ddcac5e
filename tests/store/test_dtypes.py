"""Features of one teacher in float16 and float32 live side by side in one store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from store_helpers import fill_group, toy_spec

from cusa.errors import StoreError, StoreSpecMismatchError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.info import resolve_group
from cusa.store.layout import group_leaf, parse_group_leaf
from cusa.store.verify import verify_group, verify_store


def test_leaf_names_round_trip():
    assert group_leaf("t", "0123456789ab") == "t@0123456789ab"
    assert group_leaf("t", "0123456789ab", "float32") == "t@0123456789ab-float32"
    assert parse_group_leaf("t@0123456789ab") == ("t", "0123456789ab", None)
    assert parse_group_leaf("t@0123456789ab-float32") == ("t", "0123456789ab", "float32")
    assert parse_group_leaf("a-b@0123456789ab-float32") == ("a-b", "0123456789ab", "float32")


@pytest.fixture
def both(tmp_path):
    store = FeatureStore.open(tmp_path / "store", create=True)
    half = fill_group(store.group("coco", "train", toy_spec(), create=True), seed=1)
    full = fill_group(store.group("coco", "train", toy_spec(dtype="float32"), create=True), seed=2)
    half.group.seal()
    full.group.seal()
    return store, half, full


def test_float16_and_float32_groups_coexist(both):
    store, half, full = both
    fp = half.group.fingerprint
    assert fp == full.group.fingerprint  # same teacher, so the same fingerprint
    assert half.group.rel == f"coco/train/toy-text@{fp}"  # unchanged path for float16
    assert full.group.rel == f"coco/train/toy-text@{fp}-float32"
    assert [r.ok for r in verify_store(store)] == [True, True]
    for filled, dtype in ((half, np.float16), (full, np.float32)):
        lookup = FeatureLookup.open(store, dataset="coco", split="train", teacher=filled.group.leaf)
        ids = sorted(filled.expected)
        assert lookup.gather(ids).dtype == dtype
        np.testing.assert_array_equal(
            lookup.gather(ids).astype(np.float32), np.stack([filled.expected[i] for i in ids])
        )


def test_a_bare_name_means_the_default_float16_group(both):
    """fp32 beside fp16 (issue 23): the bare name keeps meaning the default float16 group, so
    configs and commands written for it keep working; float32 is reached by dtype or folder."""
    store, half, full = both
    for teacher in ("toy-text", half.group.fingerprint, f"toy-text@{half.group.fingerprint}"):
        lookup = FeatureLookup.open(store, dataset="coco", split="train", teacher=teacher)
        assert lookup.group.rel == half.group.rel and lookup.dtype == np.float16
        assert resolve_group(store, teacher).rel == half.group.rel
    picked = FeatureLookup.open(
        store, dataset="coco", split="train", teacher="toy-text", dtype="float32"
    )
    assert picked.group.rel == full.group.rel
    by_spec = FeatureLookup.open(  # a training config's teachers.text_spec: {dtype: float32}
        store, dataset="coco", split="train", teacher="toy-text", expected_spec={"dtype": "float32"}
    )
    assert by_spec.group.rel == full.group.rel
    assert resolve_group(store, "toy-text", dtype="float16").rel == half.group.rel
    assert resolve_group(store, full.group.leaf).rel == full.group.rel


def test_two_fingerprints_of_one_name_ask_for_one_and_name_the_config_key(both):
    store, half, _ = both
    other = fill_group(
        store.group("coco", "train", toy_spec(weights_sha256="cd" * 32), create=True), seed=3
    )
    with pytest.raises(StoreError, match="matches several groups") as err:
        FeatureLookup.open(store, dataset="coco", split="train", teacher="toy-text")
    message = str(err.value)
    assert half.group.leaf in message and other.group.leaf in message
    assert "teachers.text in a training config" in message and "--teacher" in message
    with pytest.raises(StoreError, match="matches several groups"):
        resolve_group(store, "toy-text")


def test_reopening_finds_each_dtype_again(both):
    store, half, full = both
    again = store.group("coco", "train", toy_spec(dtype="float32"))
    assert again.rel == full.group.rel
    assert store.group("coco", "train", toy_spec()).rel == half.group.rel


def _legacy_float32_store(tmp_path):
    """A store as cusa wrote it before dtypes could coexist: float32 in the plain folder."""
    store = FeatureStore.open(tmp_path / "old", create=True)
    full = fill_group(
        store.group("coco", "train", toy_spec(dtype="float32"), create=True), shards=2
    )
    root = tmp_path / "old" / "coco" / "train"
    plain = root / f"toy-text@{full.group.fingerprint}"
    shutil.move(root / full.group.leaf, plain)
    return FeatureStore.open(tmp_path / "old"), full, plain


def test_an_old_float32_group_is_still_read_and_resumed(tmp_path):
    store, full, plain = _legacy_float32_store(tmp_path)
    group = store.group("coco", "train", toy_spec(dtype="float32"))
    assert group.rel.endswith(plain.name) and len(group.committed_shards()) == 2
    assert verify_group(group).ok
    lookup = FeatureLookup.open(store, dataset="coco", split="train", teacher="toy-text")
    assert lookup.gather(sorted(full.expected)).dtype == np.float32


def test_float16_next_to_an_old_float32_group_says_how(tmp_path):
    store, full, plain = _legacy_float32_store(tmp_path)
    target = plain.with_name(plain.name + "-float32")
    with pytest.raises(StoreSpecMismatchError) as err:
        store.group("coco", "train", toy_spec(), create=True)
    msg = str(err.value)
    assert "holds float32 features" in msg and f"rename that folder to {target}" in msg
    assert "--dtype float32" in msg
    shutil.move(plain, target)  # what the message says to do
    half = store.group("coco", "train", toy_spec(), create=True)
    assert half.rel.endswith(plain.name)
    moved = store.group("coco", "train", toy_spec(dtype="float32"))
    assert moved.rel.endswith(target.name) and verify_group(moved).ok


def test_verify_flags_a_folder_whose_dtype_is_not_the_spec(tmp_path):
    store = FeatureStore.open(tmp_path / "store", create=True)
    half = fill_group(store.group("coco", "train", toy_spec(), create=True), shards=1)
    root = tmp_path / "store" / "coco" / "train"
    shutil.move(root / half.group.leaf, root / (half.group.leaf + "-float32"))
    (report,) = verify_store(FeatureStore.open(tmp_path / "store"))
    assert not report.ok
    assert any("path names dtype 'float32'" in e for e in report.errors), report.errors
