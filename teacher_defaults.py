"""The paper's teachers: the one place their registry names are defined.

The official CUSA soft labels come from Unicom ViT-B/32's raw ``forward_features`` (49 patch
tokens x 768 = 37,632 values per image; the release's ``{split}_unicom.npy``: the paper's
15.9 GB for COCO image features is 113,287 x 37,632 fp32 values) and from sentence-transformers all-mpnet-base-v2. ``cusa extract``,
``ExtractConfig``, the registry labels and ``cusa_train``'s ``TeachersConfig`` all import these
names from here.

This module imports nothing, so configs can use it without loading any model code.
"""

from __future__ import annotations

DEFAULT_IMAGE_TEACHER = "unicom-vit-b32-tokens"
"""Unicom ViT-B/32 ``forward_features`` (37,632-d, stored raw): what the paper used."""

DEFAULT_TEXT_TEACHER = "all-mpnet-base-v2"
"""sentence-transformers all-mpnet-base-v2 (768-d, L2-normalised): what the paper used."""

__all__ = ["DEFAULT_IMAGE_TEACHER", "DEFAULT_TEXT_TEACHER"]
