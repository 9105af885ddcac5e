"""``ReportOptions``: the knobs of :func:`cusa.viz.build_report`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .thumbnails import THUMB_SIDE


@dataclass(frozen=True)
class ReportOptions:
    """Knobs of :func:`build_report`; the defaults make a page of a few MB in seconds.

    Args:
        batch_size: images in the soft-label batch.
        seed: seeds every random choice (shard order, batch, queries, t-SNE).
        tau: soft-label temperature, ``softmax(cos / tau)`` (the official teacher tau is 1.0).
        pool_size: images read from the dataset to draw the batch, false negatives and queries.
        false_negatives: pairs shown in the gallery.
        queries: query images and query captions in the neighbours section.
        neighbours: neighbours shown per query.
        max_scan: images read at most from the dataset while looking for neighbour thumbnails.
        max_index_rows: above this many rows a group's kNN index holds a random subset.
        tsne_points: rows at most in each t-SNE panel.
        thumb_side: thumbnail size in pixels.
        find_dataset: without ``dataset``, open the dataset the store recorded at extraction
            (False: show sample ids only).
    """

    batch_size: int = 16
    seed: int = 0
    tau: float = 1.0
    pool_size: int = 256
    false_negatives: int = 8
    queries: int = 3
    neighbours: int = 5
    max_scan: int = 5000
    max_index_rows: int = 200_000
    tsne_points: int = 1500
    thumb_side: int = THUMB_SIDE
    find_dataset: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(
                f"batch_size={self.batch_size!r}: a soft-label batch needs at least 2 images"
            )
        if not self.tau > 0:
            raise ConfigError(f"tau={self.tau!r} must be > 0 (soft labels are softmax(cos / tau))")
        for name in (
            "pool_size",
            "false_negatives",
            "queries",
            "neighbours",
            "max_index_rows",
            "tsne_points",
            "thumb_side",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.pool_size < self.batch_size:
            raise ConfigError(
                f"pool_size={self.pool_size!r} is smaller than batch_size={self.batch_size!r}; "
                "raise pool_size or lower batch_size"
            )
