"""Collects encoded batches per shard and commits each complete shard to the store."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import StoreError
from ..store import FeatureGroup
from ..store.commits import CommittedIds
from .job import IMAGE, TEXT, RowKind, ShardStats

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    batches: dict[RowKind, dict[int, tuple[list[str], np.ndarray]]] = field(
        default_factory=lambda: {IMAGE: {}, TEXT: {}}
    )
    meta: dict | None = None


class ShardWriter:
    """Commits a shard to each modality's group once all its batches and its end row arrived.

    Batches may arrive in any order (Ray workers finish out of order); rows are keyed by id,
    so order does not matter. Memory holds features only for shards still in flight.
    """

    def __init__(
        self,
        groups: dict[RowKind, FeatureGroup],
        on_commit: Callable[[ShardStats], None] | None = None,
    ) -> None:
        self.groups = groups
        self.on_commit = on_commit
        # An id a second shard brings is ledgered when that shard commits (not found at seal).
        self._committed = {kind: CommittedIds(g) for kind, g in groups.items()}
        self._pending: dict[str, _Pending] = {}

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def add_features(
        self, shard: str, kind: RowKind, seq: int, ids: list[str], feats: np.ndarray
    ) -> ShardStats | None:
        self._pending.setdefault(shard, _Pending()).batches[kind][seq] = (ids, feats)
        return self._maybe_commit(shard)

    def add_end(self, shard: str, meta: str | dict) -> ShardStats | None:
        self._pending.setdefault(shard, _Pending()).meta = (
            json.loads(meta) if isinstance(meta, str) else meta
        )
        return self._maybe_commit(shard)

    def _maybe_commit(self, shard: str) -> ShardStats | None:
        p = self._pending[shard]
        if p.meta is None:
            return None
        expected = p.meta["batches"]
        for kind in self.groups:
            if len(p.batches[kind]) < expected[kind]:
                return None
        del self._pending[shard]
        return self._commit(shard, p)

    def _commit(self, shard: str, p: _Pending) -> ShardStats:
        t0 = time.perf_counter()
        rows, failed, status = {}, {}, {}
        for kind, group in self.groups.items():
            ids: list[str] = []
            parts: list[np.ndarray] = []
            for seq in sorted(p.batches[kind]):
                b_ids, b_feats = p.batches[kind][seq]
                ids.extend(b_ids)
                parts.append(b_feats)
            feats = np.concatenate(parts) if parts else np.zeros((0, group.dim), np.float32)
            failures = [tuple(f) for f in p.meta["failures"][kind]]
            # A teacher that returns NaN/inf for a sample must not poison the store: ledger it.
            bad = (
                ~np.isfinite(feats.astype(group.dtype)).all(axis=1)
                if len(ids)
                else np.zeros(0, bool)
            )
            if bad.any():
                failures += [
                    (ids[i], "teacher produced non-finite features") for i in np.flatnonzero(bad)
                ]
                keep = ~bad
                ids = [i for i, k in zip(ids, keep, strict=True) if k]
                feats = feats[keep]
            dups = self._committed[kind].duplicates(shard, ids)
            if dups:
                failures += [
                    (i, f"duplicate sample id {i!r}: shard {first!r} already committed it to "
                     "this group (its features are kept); make ids unique across shards and "
                     "re-extract")
                    for i, first in dups.items()
                ]  # fmt: skip
                keep = np.array([i not in dups for i in ids], dtype=bool)
                ids = [i for i in ids if i not in dups]
                feats = feats[keep]
            try:
                result = group.write_shard(
                    shard, ids, feats, failures=failures, source=p.meta.get("source", "")
                )
            except StoreError:
                raise
            except OSError as exc:  # disk full, I/O or network error while writing the part
                raise StoreError(
                    f"could not write shard {shard!r} to {group.url!r}: {exc}; the shard was not "
                    "committed and readers do not see any of it. Free space or fix the store, "
                    "then re-run the same command to complete it"
                ) from exc
            self._committed[kind].add(shard, ids)
            rows[kind], failed[kind], status[kind] = len(ids), len(failures), result.status
        p.meta.setdefault("timing", {})["write_s"] = time.perf_counter() - t0
        stats = ShardStats(shard, rows, failed, status, p.meta)
        if self.on_commit:
            self.on_commit(stats)
        return stats


__all__ = ["ShardStats", "ShardWriter"]
