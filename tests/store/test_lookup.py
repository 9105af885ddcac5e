"""FeatureLookup: gathers by id from memory maps, fork safety, DataLoader workers, refusals."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import re

import numpy as np
import pytest
import torch
from store_helpers import DIM, fill_group, toy_spec

from cusa.errors import SampleNotFoundError, StoreError
from cusa.store import FeatureLookup, FeatureStore


@pytest.fixture(params=["unsealed", "sealed"])
def lookup_and_expected(request, filled):
    if request.param == "sealed":
        filled.group.seal()
    return FeatureLookup(filled.group), filled.expected


def test_gather_keeps_the_order_of_the_ids(lookup_and_expected):
    lookup, expected = lookup_and_expected
    ids = sorted(expected, reverse=True)[:7] + [sorted(expected)[0]] * 2  # repeats are fine
    got = lookup.gather(ids)
    np.testing.assert_array_equal(got.astype(np.float32), np.stack([expected[i] for i in ids]))
    np.testing.assert_array_equal(lookup.gather_rows(lookup.rows(ids)), got)
    assert lookup.gather([]).shape == (0, DIM)
    t = lookup.gather_torch(ids[:3])
    assert t.dtype == torch.float32 and t.shape == (3, DIM)
    torch.testing.assert_close(t, torch.from_numpy(got[:3].astype(np.float32)))


def test_unknown_id_names_the_id_and_the_store(lookup_and_expected):
    lookup, expected = lookup_and_expected
    with pytest.raises(
        SampleNotFoundError, match=r"sample id 'no-such-id' is not in '.*store/coco/train/toy-text@"
    ):
        lookup.gather([next(iter(expected)), "no-such-id"])


def test_failed_samples_are_not_found(filled):
    lookup = FeatureLookup(filled.group)
    failed = next(iter(filled.failures))
    with pytest.raises(
        SampleNotFoundError, match=rf"{re.escape(repr(failed))} is not in .*failed extraction"
    ):
        lookup.gather([failed])


def test_reads_come_from_memory_maps_of_the_store_files(filled):
    """Ranks and workers share the page cache: the lookup maps the store's own files."""
    filled.group.seal()
    lookup = FeatureLookup(filled.group)
    maps = lookup._mapped()
    assert len(maps) == 1 and isinstance(maps[0], np.memmap)
    assert maps[0].filename == filled.group.fs.local_path(filled.group.segments()[0].rel)
    assert not maps[0].flags.writeable


def _child_gather(lookup, ids, conn) -> None:
    conn.send(lookup.gather(ids))
    conn.close()


def test_gather_in_a_forked_child(filled):
    lookup = FeatureLookup(filled.group)
    ids = sorted(filled.expected)[::2]
    parent_result = lookup.gather(ids)  # maps opened before the fork
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_gather, args=(lookup, ids, send))
    proc.start()
    got = recv.recv()
    proc.join(30)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(got, parent_result)


def test_pickled_lookup_reopens_its_maps(filled):
    """Spawned DataLoader workers receive a pickled lookup; it maps the files again."""
    lookup = FeatureLookup(filled.group)
    ids = sorted(filled.expected)[:5]
    clone = pickle.loads(pickle.dumps(lookup))
    assert clone._maps is None
    np.testing.assert_array_equal(clone.gather(ids), lookup.gather(ids))


class _SoftLabelDataset(torch.utils.data.Dataset):
    def __init__(self, lookup: FeatureLookup, ids: list[str]) -> None:
        self.lookup, self.ids = lookup, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], torch.from_numpy(
            self.lookup.gather([self.ids[i]])[0].astype(np.float32)
        )


def test_dataloader_with_two_workers(filled):
    filled.group.seal()
    lookup = FeatureLookup(filled.group)
    ids = sorted(filled.expected)
    loader = torch.utils.data.DataLoader(
        _SoftLabelDataset(lookup, ids), batch_size=4, num_workers=2
    )
    seen = {}
    for batch_ids, feats in loader:
        for sid, f in zip(batch_ids, feats, strict=True):
            seen[sid] = f.numpy()
    assert sorted(seen) == ids
    for sid in ids:
        np.testing.assert_array_equal(seen[sid], filled.expected[sid])


def test_truncated_chunk_file_is_refused_on_open(filled):
    filled.group.seal()
    path = filled.group.fs.local_path(filled.group.segments()[0].rel)
    with open(path, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(
        StoreError, match=rf"chunk file '{re.escape(path)}' has 100 bytes, expected .*truncated"
    ):
        FeatureLookup(filled.group)


def test_open_by_store_path_and_teacher(store):
    filled = fill_group(store.group("coco", "train", toy_spec(), create=True), shards=2)
    lookup = FeatureLookup.open(
        store.url, dataset="coco", split="train", teacher="toy-text", expected_spec=toy_spec()
    )
    assert len(lookup) == len(filled.expected)
    assert "FeatureLookup(" in repr(lookup)
    with pytest.raises(StoreError, match="no features of teacher 'other'"):
        FeatureLookup.open(
            FeatureStore.open(store.url), dataset="coco", split="train", teacher="other"
        )


def test_duplicate_id_across_shards_is_refused_by_the_lookup(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    f = np.eye(DIM, dtype=np.float32)[:2]
    group.write_shard("a", ["x", "y"], f)
    group.write_shard("b", ["z", "x"], f)
    with pytest.raises(StoreError, match=r"duplicate sample id 'x' .*cusa store verify"):
        FeatureLookup(group)
