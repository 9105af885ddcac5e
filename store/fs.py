"""Small filesystem layer over a local directory or an fsspec URL (``s3://``, ``gs://``...).

Everything the store writes goes through here so that the same code commits atomically on a
local disk (write to ``*.partial``, then ``os.replace``/``os.link``) and on object storage (a PUT
is atomic: an object is either absent or complete).

A *published* store (``cusa store publish``) is read through a file listing taken from its
consolidated index (:meth:`StoreFS.with_listing`): ``exists``/``ls``/``size`` never ask the
server, so static hosts that cannot list folders (``https://``, ``hf://``) serve it, and every
write is refused. Network reads have bounded timeouts (``CUSA_NET_TIMEOUT``, seconds) and a
network failure becomes one :class:`StoreUnreachableError` naming the file and the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import RemoteStorageError, StoreError
from .layout import PUBLISHED_INDEX

#: Seconds a network connect or read may wait before it fails (``CUSA_NET_TIMEOUT`` overrides).
NET_TIMEOUT_S = 30.0
#: Bytes copied per read when a remote file is streamed (to the segment cache, a pull...).
COPY_BLOCK_BYTES = 8 * 2**20


class StoreUnreachableError(StoreError):
    """A remote store's host could not be reached, or stopped answering, within the timeout."""


class StoreCredentialsError(StoreError, RemoteStorageError):
    """Object storage needs credentials that are missing or name no profile (CLI exit 6)."""


#: botocore's exceptions for credentials that are absent, incomplete or name no profile.
_CREDENTIALS_ERRORS = (
    "NoCredentialsError",
    "PartialCredentialsError",
    "ProfileNotFound",
    "CredentialRetrievalError",
)


class ReadOnlyStoreError(StoreError):
    """A write was asked of a published (read-only) store."""


def net_timeout() -> float:
    """``CUSA_NET_TIMEOUT`` in seconds, or :data:`NET_TIMEOUT_S`."""
    raw = os.environ.get("CUSA_NET_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else NET_TIMEOUT_S
    except ValueError:
        value = 0.0
    if value <= 0:
        raise StoreError(
            f"CUSA_NET_TIMEOUT={raw!r} is invalid; use a positive number of seconds "
            f"(default {NET_TIMEOUT_S:g})"
        )
    return value


def _net_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errs.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        errs.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        import requests

        errs.append(requests.exceptions.RequestException)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errs += [
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
        ]
    return tuple(errs)


@contextlib.contextmanager
def network_errors(what: str) -> Iterator[None]:
    """Turn a network failure while reading ``what`` into one :class:`StoreUnreachableError`.

    A missing file stays ``FileNotFoundError``, and cusa's own errors pass unchanged.
    """
    try:
        yield
    except (FileNotFoundError, StoreError):
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200] or "no answer"
        if _is_credentials_error(exc):
            raise StoreCredentialsError(
                f"cannot read {what!r}: no usable AWS credentials ({type(exc).__name__}: "
                f"{detail}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE to "
                "a profile in ~/.aws/credentials (unset an empty AWS_PROFILE), and "
                "AWS_ENDPOINT_URL for a non-AWS host, then run the command again"
            ) from exc
        if not _is_net_error(exc):
            raise
        raise StoreUnreachableError(
            f"cannot read {what!r}: {type(exc).__name__}: {detail}; the host is unreachable, "
            f"refused access or stopped answering (timeout {net_timeout():g}s, "
            "CUSA_NET_TIMEOUT) - check the address, your access (HF_TOKEN, AWS credentials) "
            "and the network, then run the command again"
        ) from exc


#: Libraries whose exceptions are network or remote-access failures (HTTP clients, the Hub).
_NET_MODULES = ("aiohttp", "httpx", "httpx2", "requests", "urllib3", "huggingface_hub", "botocore")


def _is_credentials_error(exc: BaseException) -> bool:
    return any(
        k.__module__.split(".", 1)[0] == "botocore" and k.__name__ in _CREDENTIALS_ERRORS
        for k in type(exc).__mro__
    )


def _is_net_error(exc: BaseException) -> bool:
    if isinstance(exc, _net_errors()):
        return True
    return any(
        k.__module__.split(".", 1)[0] in _NET_MODULES and issubclass(k, Exception)
        for k in type(exc).__mro__
        if k.__module__ not in ("builtins",)
    )


def network_options(url: str) -> dict[str, Any]:
    """Default fsspec options for ``url``: bounded timeouts, and streamed HTTP reads.

    HTTP files are read as streams (``block_size=0``), so hosts without range requests (such
    as Python's ``http.server``) serve them too; S3 gets connect/read timeouts and few retries.
    """
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    t = net_timeout()
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
        return {"block_size": 0, "client_kwargs": {"timeout": timeout}}
    if protocol in ("s3", "s3a"):
        retries = {"max_attempts": 3, "mode": "standard"}
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": retries}}
    return {}


#: Protocols that only read (static hosts, the Hugging Face Hub): only published stores.
READ_ONLY_PROTOCOLS = ("http", "https", "hf")
PUBLISHED_FORMAT = "cusa-published-store"
#: The published index format this cusa reads and writes.
PUBLISHED_INDEX_VERSION = 1
#: A published index larger than this is refused (about 1 KB per file it lists).
MAX_INDEX_BYTES = 256 * 2**20


def is_writable_url(url: str) -> bool:
    """Whether a store at ``url`` can be written (a folder, object storage), not a static host."""
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    return protocol not in READ_ONLY_PROTOCOLS


def read_published_index(sfs: StoreFS) -> dict[str, Any] | None:
    """The consolidated index of a published store at ``sfs``, or None when there is none.

    Raises:
        StoreError: the index is malformed, too large, or of a newer format.
        StoreUnreachableError: the host cannot be reached.
    """
    where = sfs.display(PUBLISHED_INDEX)
    try:
        if sfs.is_local:
            local = sfs.path(PUBLISHED_INDEX)
            if not os.path.isfile(local) or os.path.islink(local):
                return None
            if os.path.getsize(local) > MAX_INDEX_BYTES:
                raise StoreError(
                    f"published index {where!r} is larger than {MAX_INDEX_BYTES} bytes"
                )
        raw = sfs.read_bytes(PUBLISHED_INDEX)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except PermissionError:
        return None  # a private bucket without one: not published (its own errors follow)
    if len(raw) > MAX_INDEX_BYTES:
        raise StoreError(f"published index {where!r} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"published index {where!r} is not valid JSON ({type(exc).__name__}); re-publish "
            "the store, or fetch the file again"
        ) from exc
    ok = (
        isinstance(index, dict)
        and index.get("format") == PUBLISHED_FORMAT
        and isinstance(index.get("files"), dict)
        and isinstance(index.get("groups"), list)
        and isinstance(index.get("index_version"), int)
        and all(
            isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str)
            for v in index["files"].values()
        )
    )
    if not ok:
        raise StoreError(
            f"{where!r} is not a cusa published index (format {PUBLISHED_FORMAT!r} with files "
            "and groups); re-publish the store with `cusa store publish`"
        )
    if index["index_version"] > PUBLISHED_INDEX_VERSION:
        raise StoreError(
            f"published index {where!r} has version {index['index_version']}, newer than this "
            f"cusa reads ({PUBLISHED_INDEX_VERSION}); upgrade cusa (pip install -U cusa)"
        )
    for rel in index["files"]:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"published index {where!r} lists the unsafe path {rel!r}; refused")
    return index


def open_published(sfs: StoreFS) -> StoreFS | None:
    """``sfs`` read-only through its published index (sizes and hashes), or None when the
    store at ``sfs`` is not a published one."""
    index = read_published_index(sfs)
    if index is None:
        return None
    listing = {rel: int(v["size"]) for rel, v in index["files"].items()}
    listing[PUBLISHED_INDEX] = 0
    return sfs.with_listing(listing, {rel: v["sha256"] for rel, v in index["files"].items()})


def _merge_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


#: Requests ``StoreFS.read_many`` keeps in flight on a remote store. ``python -m http.server``
#: (docs/store.md serves published stores with it) queues 5 connections and Linux one more:
#: more at once and some wait for a resent handshake, ~1 s (``benchmarks/remote_open.py``).
READ_MANY_CONCURRENCY = 6


@dataclass(frozen=True)
class StoreFS:
    """A filesystem and a root path inside it."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str
    #: A published store's files (path relative to the root -> size), from its index; None for
    #: a writable store, which is listed by asking the file system.
    listing: Mapping[str, int] | None = None
    #: A published store's SHA-256 per file (from its index), checked when a file is copied.
    hashes: Mapping[str, str] | None = None

    @classmethod
    def from_url(cls, url: str, **storage_options: Any) -> StoreFS:
        options = _merge_options(network_options(str(url)), storage_options)
        fs, path = fsspec.core.url_to_fs(str(url), **options)
        if isinstance(fs, LocalFileSystem):
            path = os.path.abspath(path)
        return cls(fs=fs, root=path.rstrip("/"), url=str(url))

    def with_listing(
        self, listing: Mapping[str, int], hashes: Mapping[str, str] | None = None
    ) -> StoreFS:
        """This store read-only, answering ``exists``/``ls``/``size`` from ``listing``."""
        return dataclasses.replace(self, listing=dict(listing), hashes=dict(hashes or {}))

    def recorded_sha256(self, rel: str) -> str | None:
        """The SHA-256 a published store's index records for ``rel`` (None elsewhere)."""
        return (self.hashes or {}).get(rel.strip("/"))

    @property
    def read_only(self) -> bool:
        return self.listing is not None

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def display(self, rel: str) -> str:
        """``rel`` as a user names it: the store's URL (with its protocol) and the path."""
        return f"{self.url.rstrip('/')}/{rel.strip('/')}" if rel else self.url

    def _refuse_write(self, rel: str) -> None:
        if self.listing is not None:
            raise ReadOnlyStoreError(
                f"cannot write {rel!r}: {self.url!r} is a published, read-only store; pull it "
                "into a store of your own with `cusa store pull URL --store LOCAL` to add to it"
            )

    def _listed_children(self, rel: str) -> tuple[set[str], set[str]]:
        """(files, folders) directly under ``rel`` in the listing."""
        prefix = f"{rel.strip('/')}/" if rel.strip("/") else ""
        files: set[str] = set()
        dirs: set[str] = set()
        for key in self.listing or {}:
            if key.startswith(prefix):
                head, sep, _ = key[len(prefix) :].partition("/")
                (dirs if sep else files).add(head)
        return files, dirs

    def exists(self, rel: str) -> bool:
        if self.listing is not None:
            key = rel.strip("/")
            return key in self.listing or any(k.startswith(f"{key}/") for k in self.listing)
        full = self.path(rel)
        # Object-store filesystems (s3fs) cache listings per process forever; other writers'
        # commits would stay invisible to a long-lived reader, so always ask the server.
        self.fs.invalidate_cache(full)
        return self.fs.exists(full)

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:  # plain file I/O, without fsspec's path handling per call: opening a
            # group reads one commit record per shard
            with open(self.local_path(rel), "rb") as fh:
                return fh.read()
        with network_errors(self.display(rel)):
            return self.fs.cat_file(self.path(rel))

    def read_many(self, rels: Sequence[str]) -> list[bytes]:
        """The bytes of each of ``rels``, in order. On a remote store the requests go out
        together (fsspec's batched ``cat``): opening a group reads one commit record per shard,
        and waits about one round trip per batch instead of one per record.

        Raises:
            FileNotFoundError: one of them is missing (naming it).
        """
        if self.is_local or len(rels) < 2:
            return [self.read_bytes(rel) for rel in rels]
        paths = [self.path(rel) for rel in rels]
        with network_errors(self.display(rels[0])):
            got = self.fs.cat(paths, on_error="return", batch_size=READ_MANY_CONCURRENCY)
        got = {self.fs._strip_protocol(k): v for k, v in got.items()}
        out = []
        for rel, path in zip(rels, paths, strict=True):
            value = got.get(self.fs._strip_protocol(path))
            if value is None:
                raise FileNotFoundError(self.display(rel))
            if isinstance(value, BaseException):
                with network_errors(self.display(rel)):
                    raise value
            out.append(value)
        return out

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open_read(self, rel: str) -> BinaryIO:
        """``rel`` opened for streamed reading; network failures become one clear error."""
        with network_errors(self.display(rel)):
            fh = self.fs.open(self.path(rel), "rb")
        return _NetFile(fh, self.display(rel))  # type: ignore[return-value]

    def copy_to_local(
        self,
        rel: str,
        target: str,
        *,
        sha256: str | None = None,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Stream ``rel`` into the local file ``target`` (atomically), checking its SHA-256.

        Returns the SHA-256 of the bytes copied. ``progress`` is called with each block's size.

        Raises:
            StoreError: the size or SHA-256 differs from the expected one (the file names the
                chunk and both hashes; nothing is left at ``target``).
            StoreUnreachableError: the host went away or stopped answering mid-copy.
        """
        blocks = CheckedBlocks(self, rel, size=size, sha256=sha256, progress=progress)
        tmp = _write_partial(target, blocks)
        try:
            os.replace(tmp, target)
        finally:
            _unlink_quietly(tmp)
        return blocks.sha256

    def du(self, rel: str) -> int:
        """Bytes of every file under ``rel``."""
        if self.listing is not None:
            key = rel.strip("/")
            return sum(v for k, v in self.listing.items() if k == key or k.startswith(f"{key}/"))
        return int(self.fs.du(self.path(rel)))

    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        if self.listing is not None:
            files, dirs = self._listed_children(rel)
            return sorted(files | dirs)
        full = self.path(rel)
        if self.is_local:  # one listdir, where fsspec stats every entry (a group's commits/)
            try:
                return sorted(os.listdir(full))
            except FileNotFoundError:
                return []
            except NotADirectoryError:
                pass  # a file: fsspec lists it as itself
        self.fs.invalidate_cache(full)  # see exists()
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def ls_dirs(self, rel: str) -> list[str]:
        """Names of the directories directly under ``rel`` (files such as ``.DS_Store`` skipped)."""
        if self.listing is not None:
            return sorted(self._listed_children(rel)[1])
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
        if self.listing is not None:
            if rel.strip("/") not in self.listing:
                raise FileNotFoundError(self.path(rel))
            return int(self.listing[rel.strip("/")])
        with network_errors(self.display(rel)):
            return int(self.fs.size(self.path(rel)))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing or the whole file."""
        self._refuse_write(rel)
        full = self.path(rel)
        if self.is_local:
            _write_local_atomic(full, data)
        else:
            self.fs.pipe_file(full, data)

    def write_stream_atomic(self, rel: str, blocks: Iterable[bytes | memoryview]) -> None:
        """Like :meth:`write_bytes_atomic`, from ``blocks``: the file is never whole in memory.

        Object stores get a local temporary file, uploaded when complete (a PUT is atomic).
        """
        self._refuse_write(rel)
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
        self._refuse_write(rel)
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
        self._refuse_write(rel)
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


#: Chunks at least this large show a progress bar while they are copied (on a terminal).
PROGRESS_MIN_BYTES = 64 * 2**20


class CheckedBlocks:
    """The blocks of one file, streamed, with its size and SHA-256 checked at the end.

    Iterating yields ``COPY_BLOCK_BYTES`` blocks; after the last one a size or SHA-256 that
    differs from the expected one raises :class:`StoreError` naming the file and both values, so
    a writer consuming the blocks (``_write_partial``, ``write_stream_atomic``) removes its
    temporary file and nothing becomes visible. ``sha256`` and ``nbytes`` hold what was read.
    """

    def __init__(
        self,
        sfs: StoreFS,
        rel: str,
        *,
        size: int | None = None,
        sha256: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.sfs, self.rel, self.size, self.expected = sfs, rel, size, sha256
        self.progress = progress
        self.nbytes = 0
        self.sha256 = ""

    def __iter__(self) -> Iterator[bytes]:
        digest = hashlib.sha256()
        with self.sfs.open_read(self.rel) as fh:
            while block := fh.read(COPY_BLOCK_BYTES):
                digest.update(block)
                self.nbytes += len(block)
                if self.progress is not None:
                    self.progress(len(block))
                yield block
        self.sha256 = digest.hexdigest()
        what = self.sfs.display(self.rel)
        if self.size is not None and self.nbytes != self.size:
            raise StoreError(
                f"{what!r} has {self.nbytes} bytes, expected {self.size}; it is truncated or was "
                "replaced - refused; ask its publisher to re-publish it"
            )
        if self.expected is not None and self.sha256 != self.expected:
            raise StoreError(
                f"{what!r} does not match its recorded SHA-256 (got {self.sha256[:16]}..., "
                f"recorded {self.expected[:16]}...); it was changed or damaged - refused; ask "
                "its publisher to re-publish it"
            )


def fetch_verified(sfs: StoreFS, rel: str, target: str, sha256: str | None) -> str:
    """Copy the chunk ``rel`` once into the local file ``target``, checking its SHA-256.

    A chunk of :data:`PROGRESS_MIN_BYTES` or more shows a byte progress bar on stderr when it
    is a terminal. Returns ``target``.
    """
    try:
        size: int | None = sfs.size(rel)
    except (FileNotFoundError, NotImplementedError):
        size = None
    if size is None or size < PROGRESS_MIN_BYTES:
        sfs.copy_to_local(rel, target, sha256=sha256, size=size)
        return target
    from tqdm import tqdm

    name = rel.rsplit("/", 4)
    with tqdm(
        total=size,
        desc=f"copying {'/'.join(name[-4:])}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None,
        leave=False,
    ) as bar:
        sfs.copy_to_local(rel, target, sha256=sha256, size=size, progress=bar.update)
    return target


class _NetFile:
    """A read-only file whose network failures become :class:`StoreUnreachableError`."""

    def __init__(self, fh: Any, where: str) -> None:
        self._fh, self._where = fh, where

    def read(self, n: int = -1) -> bytes:
        with network_errors(self._where):
            return self._fh.read(n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._fh.close()

    def __enter__(self) -> _NetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
