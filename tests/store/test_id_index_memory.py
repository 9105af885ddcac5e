"""A forked worker reading random ids from a sealed group does not copy the id index.

Reading a Python object writes its reference count, so a lookup made of Python objects (a list
of ids, a dict id -> row) is copied page by page into every forked DataLoader worker that reads
it. The id index is numpy over a memory map: a worker's private memory must stay flat.
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import numpy as np
import pytest
from store_helpers import toy_spec, unit_rows

from cusa.store import FeatureLookup

N_IDS = 100_000
READS = 10_000
#: Allowed growth of a worker's private dirty memory over READS random ids (measured: ~0.8 MiB,
#: the allocator reusing inherited heap pages for each batch's temporaries; it does not grow
#: with more reads). The same reads through a Python dict id -> row copy ~2.8 MiB.
MAX_GROWTH_KIB = 1536

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
    lookup.gather(ids[batches[0]].tolist())  # the first batch: code paths warmed up
    before = _private_kib()
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


def _growth_in_a_fork(lookup, ids: np.ndarray) -> dict[str, int]:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(lookup, ids, send))
    proc.start()
    before, after = recv.recv()
    proc.join(60)
    assert proc.exitcode == 0
    return {k: after[k] - before[k] for k in after}


def test_a_forked_worker_does_not_copy_the_index(store):
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
    assert growth["Private_Dirty"] <= MAX_GROWTH_KIB, growth
    control = _growth_in_a_fork(_DictLookup(lookup), ids)
    assert control["Private_Dirty"] > 2 * growth["Private_Dirty"], (growth, control)
