"""Where cusa keeps things: ``$CUSA_HOME`` (default ``~/.cache/cusa``)."""

from __future__ import annotations

import os
from pathlib import Path


def cusa_home() -> Path:
    return Path(os.environ.get("CUSA_HOME", Path.home() / ".cache" / "cusa")).expanduser()


def default_store() -> str:
    """The default store, ``$CUSA_HOME/store``, shared by a lab when CUSA_HOME points to one path."""
    return str(cusa_home() / "store")


def models_dir() -> Path:
    """Assembled teacher weights; ``$CUSA_MODELS_DIR`` overrides ``$CUSA_HOME/models``."""
    override = os.environ.get("CUSA_MODELS_DIR")
    return Path(override).expanduser() if override else cusa_home() / "models"


def segments_dir() -> Path:
    """Local copies of a remote store's segments, memory mapped by ``FeatureLookup``."""
    return cusa_home() / "cache" / "segments"
