"""kNN over a stored teacher: exact results, reported as sample ids."""

from __future__ import annotations

import numpy as np
import pytest
from store_helpers import DIM, toy_spec, unit_rows

from cusa.errors import ConfigError, SampleNotFoundError
from cusa.store import FeatureLookup
from cusa.store.knn import build_index, gpu_available


@pytest.fixture
def planted(store):
    """Random unit vectors plus a near-twin of each 'q*' sample, over three shards."""
    rng = np.random.default_rng(0)
    group = store.group("coco", "train", toy_spec(), create=True)
    base = unit_rows(rng, 30)
    twins = base[:5] + 0.05 * unit_rows(rng, 5)
    twins /= np.linalg.norm(twins, axis=1, keepdims=True)
    ids = [f"q{i}" for i in range(5)] + [f"r{i:02d}" for i in range(5, 30)]
    group.write_shard("s0", ids[:15], base[:15])
    group.write_shard("s1", ids[15:], base[15:])
    group.write_shard("s2", [f"twin{i}" for i in range(5)], twins)
    return group


def test_neighbours_are_sample_ids_and_exclude_the_query(planted):
    index = build_index(planted)
    assert len(index) == 35 and not index.on_gpu
    results = index.search_ids([f"q{i}" for i in range(5)], k=3)
    for i, hits in enumerate(results):
        assert len(hits) == 3
        assert hits[0][0] == f"twin{i}"
        assert all(sid != f"q{i}" for sid, _ in hits)
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True) and 0.9 < scores[0] <= 1.0001


def test_results_match_brute_force_cosine(planted):
    lookup = FeatureLookup(planted)
    feats = lookup.gather_rows(np.arange(len(lookup))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    index = build_index(lookup)
    query = "r07"
    sims = feats @ feats[lookup.rows([query])[0]]  # (N,) cosine to the query
    expected = [lookup.ids[i] for i in np.argsort(-sims) if lookup.ids[i] != query][:5]
    got = index.search_ids([query], k=5)[0]
    assert [sid for sid, _ in got] == expected
    np.testing.assert_allclose([s for _, s in got], np.sort(sims)[::-1][1:6], atol=1e-5)


def test_include_self_and_l2(planted):
    index = build_index(planted, metric="ip")
    hits = index.search_ids(["q2"], k=2, include_self=True)[0]
    assert hits[0][0] == "q2" and hits[0][1] == pytest.approx(1.0, abs=1e-3)
    l2 = build_index(planted, metric="l2", use_gpu=False)
    hits = l2.search_ids(["q2"], k=1)[0]
    assert hits[0][0] == "twin2" and hits[0][1] < 0.01  # squared distance
    assert index.search_ids([], k=3) == []


def test_sealed_group_gives_the_same_neighbours(planted):
    before = build_index(planted).search_ids(["q1", "r20"], k=4)
    planted.seal()
    assert build_index(planted).search_ids(["q1", "r20"], k=4) == before


def test_bad_input(planted):
    index = build_index(planted)
    with pytest.raises(SampleNotFoundError, match=r"sample id 'missing' is not in '.*toy-text@"):
        index.search_ids(["missing"], k=3)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        index.search_ids(["q1"], k=0)
    with pytest.raises(
        ConfigError, match=r"unknown kNN metric 'cosine'; use one of \('ip', 'l2'\)"
    ):
        build_index(planted, metric="cosine")
    with pytest.raises(ConfigError, match="FeatureGroup or FeatureLookup"):
        build_index("not a group")


@pytest.mark.skipif(gpu_available(), reason="a GPU is present; this checks the no-GPU message")
def test_use_gpu_true_without_a_gpu_is_refused(planted):
    with pytest.raises(
        ConfigError, match=r"use_gpu=True but faiss has no GPU support .*cusa\[gpu\]"
    ):
        build_index(planted, use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA GPU")
def test_gpu_index_matches_cpu(planted):
    cpu = build_index(planted, use_gpu=False).search_ids(["q0", "r10"], k=5)
    gpu_index = build_index(planted, use_gpu="auto")
    assert gpu_index.on_gpu
    got = gpu_index.search_ids(["q0", "r10"], k=5)
    assert [[s for s, _ in h] for h in got] == [[s for s, _ in h] for h in cpu]


def test_k_larger_than_the_store(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    group.write_shard("s", ["a", "b", "c"], np.eye(DIM, dtype=np.float32)[:3])
    hits = build_index(group).search_ids(["a"], k=10)[0]
    assert sorted(s for s, _ in hits) == ["b", "c"]
