"""Small filesystem layer over a local directory or an fsspec URL (``s3://``, ``gs://``...).

Everything the store writes goes through here so that the same code commits atomically on a
local disk (write to ``*.partial``, then ``os.replace``/``os.link``) and on object storage (a PUT
is atomic: an object is either absent or complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import StoreError


@dataclass(frozen=True)
class StoreFS:
    """A filesystem and a root path inside it."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @classmethod
    def from_url(cls, url: str, **storage_options: Any) -> StoreFS:
        fs, path = fsspec.core.url_to_fs(str(url), **storage_options)
        if isinstance(fs, LocalFileSystem):
            path = os.path.abspath(path)
        return cls(fs=fs, root=path.rstrip("/"), url=str(url))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def exists(self, rel: str) -> bool:
        full = self.path(rel)
        # Object-store filesystems (s3fs) cache listings per process forever; other writers'
        # commits would stay invisible to a long-lived reader, so always ask the server.
        self.fs.invalidate_cache(full)
        return self.fs.exists(full)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        full = self.path(rel)
        self.fs.invalidate_cache(full)  # see exists()
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def ls_dirs(self, rel: str) -> list[str]:
        """Names of the directories directly under ``rel`` (files such as ``.DS_Store`` skipped)."""
        full = self.path(rel)
        if self.is_local:
            try:
                with os.scandir(full) as entries:
                    return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(full)
        try:
            entries = self.fs.ls(full, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in entries
            if e.get("type") == "directory" and e["name"].rstrip("/") != full.rstrip("/")
        )

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing or the whole file."""
        full = self.path(rel)
        if self.is_local:
            _write_local_atomic(full, data)
        else:
            self.fs.pipe_file(full, data)

    def write_stream_atomic(self, rel: str, blocks: Iterable[bytes | memoryview]) -> None:
        """Like :meth:`write_bytes_atomic`, from ``blocks``: the file is never whole in memory.

        Object stores get a local temporary file, uploaded when complete (a PUT is atomic).
        """
        full = self.path(rel)
        if self.is_local:
            _write_local_atomic(full, blocks)
            return
        with tempfile.TemporaryDirectory(prefix="cusa-upload-") as tmpdir:
            local = os.path.join(tmpdir, "data")
            with open(local, "wb") as fh:
                for block in blocks:
                    fh.write(block)
            self.fs.put_file(local, full)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` only if it does not exist yet. Returns True if we created it.

        Local disks get a true atomic test-and-set (``os.link`` fails if the target exists).
        Object stores get check-then-put; two writers racing in that window both write the
        same record shape and readers still see one complete record (last writer wins).
        """
        full = self.path(rel)
        if self.is_local:
            tmp = _write_partial(full, data)
            try:
                os.link(tmp, full)
            except FileExistsError:
                return False
            except FileNotFoundError:
                # A sealer cleaned up our temporary file: the target was committed meanwhile.
                if os.path.exists(full):
                    return False
                raise
            finally:
                _unlink_quietly(tmp)
            return True
        if self.fs.exists(full):
            return False
        self.fs.pipe_file(full, data)
        return True

    def remove(self, rel: str) -> None:
        full = self.path(rel)
        try:
            if self.fs.isdir(full):
                self.fs.rm(full, recursive=True)
            else:
                self.fs.rm_file(full)
        except FileNotFoundError:
            return

    def local_path(self, rel: str) -> str:
        if not self.is_local:
            raise StoreError(f"{self.url!r} is not a local store; no local path for {rel!r}")
        return self.path(rel)

    def zarr_store(self, rel: str = "", read_only: bool = False):
        """A zarr v3 store object rooted at ``rel``."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path(rel), read_only=read_only)
        return FsspecStore(_async_instance(self.fs), path=self.path(rel), read_only=read_only)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _async_instance(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """An ``asynchronous=True`` twin of ``fs`` for zarr, which awaits it on its own event loop.

    A sync instance of an async filesystem (s3fs, gcsfs) is bound to fsspec's loop; handing it to
    zarr fails with "attached to a different loop". Sync-only filesystems get fsspec's wrapper.
    """
    if fs.async_impl:
        if fs.asynchronous:
            return fs
        return type(fs)(**{**fs.storage_options, "asynchronous": True})
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs, asynchronous=True)


def _write_local_atomic(full: str, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write ``data`` to a temporary file beside ``full``, then rename it to ``full``."""
    tmp = _write_partial(full, data)
    try:
        os.replace(tmp, full)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _write_partial(full: str, data: bytes | Iterable[bytes | memoryview]) -> str:
    """Write ``data`` (bytes, or an iterable of blocks) durably to a unique
    ``<full>.<token>.partial`` file and return its path.

    A failed write (disk full, I/O error, interrupt) removes its temporary file.
    """
    os.makedirs(os.path.dirname(full), exist_ok=True)
    tmp = f"{full}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(tmp, "wb") as fh:
            for block in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp
