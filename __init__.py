"""cusa: teacher features for CUSA soft-label training of image-text retrieval models.

Packages:
    cusa.extract   readers, teachers and runners that fill the feature store
    cusa.store     the Zarr feature store keyed by sample id
    cusa_train     CSA/USA losses, the plug-and-play wrapper, trainer and evaluation
"""

from __future__ import annotations

__version__ = "0.1.0"
