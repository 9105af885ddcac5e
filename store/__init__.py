"""The feature store: Zarr v3 groups of teacher features keyed by sample id.

Public API:
    FeatureStore   open or create a store (a directory or an fsspec URL)
    FeatureGroup   one teacher's features over one dataset split; per-shard atomic commits
    FeatureLookup  memory-mapped gathers by sample id for training
"""

from .commits import WriteResult
from .feature_store import FeatureStore
from .group import FeatureGroup
from .layout import LAYOUT_VERSION
from .lookup import FeatureLookup

__all__ = ["LAYOUT_VERSION", "FeatureGroup", "FeatureLookup", "FeatureStore", "WriteResult"]
