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


# Classes for the conditions the CLI reports with their own exit codes (commands/exit_codes.py).
# The CLI turns an error from the operating system (with an errno), from a remote-storage client
# or out of memory into one of these; any other exception cusa did not raise is a bug (exit 70).


class FileSystemError(CusaError, OSError):
    """A local file-system operation failed: missing file, permission, read-only, disk full."""


class MalformedFileError(CusaError, ValueError):
    """A file cusa read cannot be parsed: invalid JSON, Parquet or text, or nested too deep."""


class DeviceError(CusaError, RuntimeError):
    """The compute device failed at run time (a CUDA error, an accelerator fault)."""


class RemoteStorageError(CusaError, OSError):
    """Remote storage refused or failed: missing credentials, endpoint or network errors."""


class OutOfMemoryError(CusaError, MemoryError):
    """The host or the device ran out of memory."""


class MissingExtraError(CusaError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""
