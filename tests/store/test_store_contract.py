"""The store contract, run against every backend: a local directory and S3 (moto on 127.0.0.1).

Like zarr's StoreTests: one class of behaviour every backend must show, parametrised by backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from store_helpers import fill_group, toy_spec, unit_rows

from cusa.errors import NotAStoreError, SampleNotFoundError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.export import export_group
from cusa.store.fs import StoreFS
from cusa.store.info import store_info
from cusa.store.knn import build_index
from cusa.store.verify import verify_group, verify_store


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> tuple[str, dict[str, Any]]:
    if request.param == "local":
        return str(tmp_path / "store"), {}
    return request.getfixturevalue("s3_store_url")


@pytest.fixture
def opened(backend) -> FeatureStore:
    url, options = backend
    return FeatureStore.open(url, create=True, storage_options=options)


class TestStoreContract:
    def test_marker_and_reopen(self, backend, opened):
        url, options = backend
        assert opened.fs.exists("cusa_store.json")
        assert FeatureStore.open(url, storage_options=options).url == url
        assert store_info(opened)["groups"] == []

    def test_round_trip_seal_and_gather(self, opened, tmp_path):
        filled = fill_group(opened.group("coco", "train", toy_spec(), create=True), fail_every=4)
        ids = sorted(filled.expected, reverse=True)
        cache = tmp_path / "segment-cache"
        before = FeatureLookup(filled.group, cache_dir=cache).gather(ids)
        np.testing.assert_array_equal(
            before.astype(np.float32), np.stack([filled.expected[i] for i in ids])
        )
        filled.group.seal()
        lookup = FeatureLookup(filled.group, cache_dir=cache)
        np.testing.assert_array_equal(lookup.gather(ids), before)
        maps = lookup._mapped()
        assert all(
            isinstance(m, np.memmap) for m in maps
        )  # remote stores: mapped from the local cache
        with pytest.raises(SampleNotFoundError, match=rf"'nope' is not in '{opened.url}"):
            lookup.gather(["nope"])

    def test_verify_clean_and_ledger(self, opened):
        filled = fill_group(opened.group("coco", "train", toy_spec(), create=True), fail_every=3)
        report = verify_group(filled.group)
        assert report.ok, report.summary()
        assert {f["sample_id"] for f in report.failed} == set(filled.failures)
        filled.group.seal()
        reports = verify_store(opened)
        assert len(reports) == 1 and reports[0].ok and reports[0].sealed, reports[0].summary()

    def test_rerun_is_a_noop_and_reopen_sees_more(self, backend, opened):
        url, options = backend
        group = opened.group("coco", "train", toy_spec(), create=True)
        rng = np.random.default_rng(0)
        feats = unit_rows(rng, 3)
        assert group.write_shard("a", ["a0", "a1", "a2"], feats).status == "committed"
        assert group.write_shard("a", ["a0", "a1", "a2"], -feats).status == "skipped"
        first = FeatureLookup(group, cache_dir=None)
        group.write_shard("b", ["b0"], unit_rows(rng, 1))
        assert "b0" not in first
        again = FeatureStore.open(url, storage_options=options).find_group(
            "coco", "train", "toy-text"
        )
        assert sorted(FeatureLookup(again).ids) == ["a0", "a1", "a2", "b0"]
        np.testing.assert_array_equal(
            FeatureLookup(again).gather(["a1"]), feats[[1]].astype(np.float16)
        )

    def test_info_knn_export(self, opened, tmp_path):
        filled = fill_group(opened.group("coco", "train", toy_spec(), create=True), shards=3)
        info = store_info(opened)["groups"][0]
        assert info["rows"] == len(filled.expected) and info["committed_shards"] == 3
        q = sorted(filled.expected)[0]
        hits = build_index(filled.group).search_ids([q], k=2)[0]
        assert len(hits) == 2 and q not in [h[0] for h in hits]
        summary = export_group(filled.group, tmp_path / "exp")
        assert summary["rows"] == len(filled.expected)

    def test_not_a_store(self, backend, opened):
        url, options = backend
        other = url.rsplit("/", 1)[0] + "/other"
        StoreFS.from_url(other, **options).write_bytes_atomic("readme.txt", b"not features")
        with pytest.raises(NotAStoreError, match="is not a cusa store"):
            FeatureStore.open(other, storage_options=options)
