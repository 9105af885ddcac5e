"""One family of exceptions. Each also inherits the built-in it resembles."""

from __future__ import annotations


class CusaError(Exception):
    """Base class of every error cusa raises on purpose."""


class ConfigError(CusaError, ValueError):
    """A user-given option, config key or value is invalid."""


class UnknownNameError(CusaError, KeyError):
    """A registry has no entry of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SampleError(CusaError, ValueError):
    """One sample cannot be processed (bad image, bad caption). Recorded in the ledger."""


class WeightsError(CusaError, FileNotFoundError):
    """Teacher weights are missing, unreachable or fail their checksum."""


class StoreError(CusaError, OSError):
    """The feature store is missing, malformed or inconsistent."""


class NotAStoreError(StoreError):
    """The path exists but is not a cusa store."""


class StoreVersionError(StoreError):
    """The store was written by a newer layout version."""


class StoreSpecMismatchError(StoreError):
    """A teacher spec or dataset manifest differs from what the store recorded."""


class SampleNotFoundError(CusaError, KeyError):
    """A sample id is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DatasetError(CusaError, ValueError):
    """A dataset is malformed: duplicate ids, unreadable shards, bad layout."""


class NonFiniteError(CusaError, FloatingPointError):
    """Training met a non-finite value (loss term, temperature, gradient, eval metric)."""
