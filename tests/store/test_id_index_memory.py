"""A forked worker reading random ids from a sealed group does not copy the id index.

Reading a Python object writes its reference count, so a lookup made of Python objects (a list
of ids, a dict id -> row) is copied page by page into every forked DataLoader worker that reads
it. The id index is numpy over a memory map: a worker's private memory must stay flat.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import sys

import numpy as np
import pytest
from store_helpers import toy_spec, unit_rows

from cusa.store import FeatureLookup, FeatureStore

N_IDS = 100_000
READS = 10_000
#: Allowed growth of a worker's private dirty memory from its first lookup over READS random ids
#: (measured: 0.6-0.9 MiB, the allocator reusing inherited heap pages for each batch's
#: temporaries; it does not grow with more reads). The same reads through the parent's dict
#: id -> row copy ~3.2 MiB; a dict built in each worker ~16 MiB.
MAX_GROWTH_KIB = 1536
#: Forks measured per lookup; the smallest growth counts (noise from the allocator, the parent's
#: heap left by earlier tests, or a loaded machine only ever adds pages, never removes them).
REPEATS = 3

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/<pid>/smaps_rollup (Linux)"
)


def _private_kib() -> dict[str, int]:
    """USS parts of this process: private clean/dirty and anonymous memory, in KiB."""
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty", "Anonymous"):
                out[key] = int(rest.split()[0])
    out["USS"] = out["Private_Clean"] + out["Private_Dirty"]
    return out


def _worker(lookup: FeatureLookup, ids: np.ndarray, conn) -> None:
    rng = np.random.default_rng(1)
    batches = rng.integers(0, len(ids), size=(READS // 100, 100))
    # A garbage collection in the worker writes the header of every object it inherited (the
    # whole heap of the test session): done once before measuring and the survivors frozen, so
    # what is measured is what the lookup writes. Refcounts are still written (the control).
    gc.collect()
    gc.freeze()
    before = _private_kib()  # before the first lookup: an index built per worker counts too
    for b in batches:
        lookup.gather(ids[b].tolist())
    conn.send((before, _private_kib()))
    conn.close()


class _DictLookup:
    """What a user would otherwise write: a dict id -> row (the control of the test)."""

    def __init__(self, lookup: FeatureLookup) -> None:
        self.lookup = lookup
        self.row_of = {sid: row for row, sid in enumerate(lookup.ids)}

    def gather(self, sample_ids: list[str]) -> np.ndarray:
        return self.lookup.gather_rows(np.array([self.row_of[s] for s in sample_ids]))


class _WorkerDictLookup(_DictLookup):
    """The second control: the dict id -> row built by each worker on its first lookup."""

    def __init__(self, lookup: FeatureLookup) -> None:
        self.lookup = lookup
        self.row_of = None

    def gather(self, sample_ids: list[str]) -> np.ndarray:
        if self.row_of is None:
            self.row_of = {sid: row for row, sid in enumerate(self.lookup.ids)}
        return super().gather(sample_ids)


def _growth_in_a_fork(lookup, ids: np.ndarray) -> int:
    """The smallest growth of a forked worker's private dirty memory (KiB) over REPEATS forks."""
    return min(_one_fork(lookup, ids)["Private_Dirty"] for _ in range(REPEATS))


def _one_fork(lookup, ids: np.ndarray) -> dict[str, int]:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(lookup, ids, send))
    proc.start()
    before, after = recv.recv()
    proc.join(60)
    assert proc.exitcode == 0
    return {k: after[k] - before[k] for k in after}


def _measure(root: str, conn) -> None:
    """Fill and seal a group of N_IDS ids at ``root``, then measure a forked worker reading it
    through the index and through both controls; sends ``(index, parent's dict, worker's dict)``.

    Runs in a freshly spawned interpreter, so the heap a worker inherits is this measurement's
    alone, not whatever the test session built before (in the full suite, inherited heap pages
    reused by the allocator made the index look 3x larger than alone).
    """
    store = FeatureStore.open(root, create=True)
    group = store.group("web", "train", toy_spec(dim=8), create=True)
    ids = np.array([f"{i * 7919 % 10**12:012d}#{i % 5}" for i in range(N_IDS)])  # fixed width
    rng = np.random.default_rng(0)
    for s, part in enumerate(np.array_split(np.arange(N_IDS), 4)):
        group.write_shard(f"shard-{s}", ids[part].tolist(), unit_rows(rng, len(part), 8))
    group.seal()
    lookup = FeatureLookup(group)
    assert lookup._id_index().path is not None  # the sealed group's file, memory-mapped
    lookup.gather(ids[:10].tolist())
    growth = _growth_in_a_fork(lookup, ids)
    control = _growth_in_a_fork(_DictLookup(lookup), ids)  # same process, same heap
    per_worker = _growth_in_a_fork(_WorkerDictLookup(lookup), ids)
    conn.send((growth, control, per_worker))
    conn.close()


def test_a_forked_worker_does_not_copy_the_index(tmp_path):
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(str(tmp_path / "store"), send))
    proc.start()
    growth, control, per_worker = recv.recv()
    proc.join(120)
    assert proc.exitcode == 0
    seen = f"index +{growth} KiB, parent's dict +{control} KiB, worker's dict +{per_worker} KiB"
    assert growth <= MAX_GROWTH_KIB, seen
    assert control > 2 * growth, seen  # reading Python objects copies their pages
    assert per_worker > MAX_GROWTH_KIB, seen  # the bound catches an index built per worker
