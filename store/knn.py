"""Nearest neighbours over a stored teacher, with results reported as sample ids.

The index is exact (``IndexFlatIP`` / ``IndexFlatL2`` on float32) and built in memory: a store of
a few hundred thousand rows takes seconds. With the ``gpu`` extra (faiss-gpu) and a visible GPU
the index is moved to the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError
from .group import FeatureGroup
from .lookup import READ_BLOCK_ROWS, FeatureLookup

log = logging.getLogger(__name__)

METRICS = ("ip", "l2")


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class KnnIndex:
    """A faiss index over one group's rows, searchable by sample id.

    Scores are inner products of L2-normalised features (cosine similarity) for ``metric="ip"``
    and squared L2 distances for ``metric="l2"``; results are best first either way.
    """

    def __init__(self, index: Any, lookup: FeatureLookup, metric: str, on_gpu: bool) -> None:
        self.index = index
        self.lookup = lookup
        self.ids: list[str] = lookup.ids
        self.metric = metric
        self.source = lookup.group.url
        self.on_gpu = on_gpu

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"KnnIndex({self.source!r}, rows={len(self)}, metric={self.metric!r}, {where})"

    def _prepare(self, queries: np.ndarray) -> np.ndarray:
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (Q, D)
        if self.metric == "ip":
            faiss.normalize_L2(q)
        return q

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest stored samples of each query vector, as ``(sample_id, score)``."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k!r}")
        q = self._prepare(queries)
        k_eff = min(k, len(self))
        if k_eff == 0:
            return [[] for _ in range(len(q))]
        scores, rows = self.index.search(q, k_eff)  # (Q, k) each
        return [
            [(self.ids[r], float(s)) for r, s in zip(row_r, row_s, strict=True) if r >= 0]
            for row_r, row_s in zip(rows, scores, strict=True)
        ]

    def search_ids(
        self, sample_ids: Sequence[str], k: int, *, include_self: bool = False
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest neighbours of stored samples, by id.

        Args:
            sample_ids: ids of stored samples to use as queries.
            k: neighbours per query.
            include_self: keep the query itself in its results (by default it is dropped).

        Raises:
            SampleNotFoundError: an id is not in the index; the message names it.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k!r}")
        if not sample_ids:
            return []
        q = self.lookup.gather(sample_ids)  # (Q, D); SampleNotFoundError names a missing id
        results = self.search(q, k + (0 if include_self else 1))
        out = []
        for sid, hits in zip(sample_ids, results, strict=True):
            if not include_self:
                hits = [h for h in hits if h[0] != sid]
            out.append(hits[:k])
        return out


def _as_lookup(source: FeatureGroup | FeatureLookup) -> FeatureLookup:
    if isinstance(source, FeatureLookup):
        return source
    if isinstance(source, FeatureGroup):
        return FeatureLookup(source)
    raise ConfigError(
        f"build_index takes a FeatureGroup or FeatureLookup, not {type(source).__name__}"
    )


def build_index(
    source: FeatureGroup | FeatureLookup,
    metric: Literal["ip", "l2"] = "ip",
    use_gpu: bool | Literal["auto"] = "auto",
) -> KnnIndex:
    """Build an exact faiss index over every committed row of a group.

    Args:
        source: a group or an open lookup.
        metric: ``"ip"`` (cosine: vectors are L2-normalised in float32) or ``"l2"``.
        use_gpu: ``"auto"`` uses a GPU when faiss-gpu and a GPU are present; True requires one.

    Raises:
        ConfigError: unknown metric, or ``use_gpu=True`` without faiss-gpu and a GPU.
    """
    import faiss

    if metric not in METRICS:
        raise ConfigError(f"unknown kNN metric {metric!r}; use one of {METRICS}")
    if use_gpu not in (True, False, "auto"):
        raise ConfigError(f"use_gpu must be True, False or 'auto', not {use_gpu!r}")
    lookup = _as_lookup(source)
    on_gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
    if on_gpu and not gpu_available():
        raise ConfigError(
            "use_gpu=True but faiss has no GPU support or sees no GPU; install the gpu extra "
            "(pip install 'cusa[gpu]') on a CUDA machine, or pass use_gpu='auto'"
        )
    index = faiss.IndexFlatIP(lookup.dim) if metric == "ip" else faiss.IndexFlatL2(lookup.dim)
    n = len(lookup)
    for start in range(0, n, READ_BLOCK_ROWS):
        rows = np.arange(start, min(n, start + READ_BLOCK_ROWS), dtype=np.int64)
        block = np.ascontiguousarray(lookup.gather_rows(rows), dtype=np.float32)  # (b, D)
        if metric == "ip":
            faiss.normalize_L2(block)
        index.add(block)
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.referenced_resources = resources  # keep the resources alive with the index
    log.info(
        "built %s kNN index over %d rows of %s (%s)",
        metric,
        n,
        lookup.group.rel,
        "gpu" if on_gpu else "cpu",
    )
    return KnnIndex(index, lookup, metric, on_gpu)
