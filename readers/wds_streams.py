"""Opening webdataset shards: URL patterns, and the byte streams the reader's tar parser reads.

- :func:`expand_urls` brace-expands a pattern; :func:`is_local` and :func:`local_path` tell a
  local path (or ``file://`` URL) from a remote or ``pipe:`` one;
- :func:`open_regular` opens a local tar, refusing a FIFO or device before reading anything;
- :class:`PipeStream` reads a ``pipe:`` command's stdout and reports its exit status;
- :class:`TrackingStream` wraps any of them to count bytes and check the end-of-archive block.

``pipe:`` URLs run a shell command: use them only with commands you trust.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand

from ._common import file_kind

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace-expand a URL pattern (``shard-{000000..000009}.tar``); ``::`` separates patterns."""
    specs = spec if isinstance(spec, list) else spec.split("::")
    return [u for s in specs for u in braceexpand.braceexpand(s)]


def is_local(url: str) -> bool:
    return ("://" not in url and not url.startswith("pipe:")) or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file://") else url).expanduser()


def open_regular(path: Path) -> Any:
    """Open a local tar for reading; a FIFO or device is refused before anything is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"it is {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class PipeStream:
    """Read the stdout of a trusted shell command (a ``pipe:`` URL) and check its exit status."""

    def __init__(self, command: str) -> None:
        self.command = command
        # A shell on purpose: ``pipe:`` URLs are shell commands the user wrote (webdataset's form).
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if not data:
            self.eof = True
        return data

    def close(self) -> str | None:
        """Close; return an error message when the command failed."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self.eof and self.proc.poll() is None:
            self.proc.kill()  # the reader stopped early; the command has nothing more to give
            self.proc.wait()
            return None
        code = self.proc.wait()
        if code not in (0, -13, 141):  # 141 / -SIGPIPE: we closed the pipe first
            return f"command {self.command!r} exited with status {code}"
        return None


class TrackingStream:
    """Counts the bytes read and keeps the last ones, to check the tar's end-of-archive block."""

    KEEP = 1 << 18

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.pos = 0
        self.head = b""
        self.tail = bytearray()
        self.tail_start = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            drop = len(self.tail) - self.KEEP
            del self.tail[:drop]
            self.tail_start += drop
        return data

    def drain(self, limit: int = 1 << 20) -> None:
        while limit > 0:
            data = self.read(min(65536, limit))
            if not data:
                return
            limit -= len(data)

    def compressed(self) -> bool:
        return self.head.startswith(_COMPRESSED_MAGIC)

    def zero_block_at(self, offset: int) -> bool | None:
        """Whether a full zero 512-byte block starts at ``offset``; None if no longer known."""
        start = offset - self.tail_start
        if start < 0:
            return None
        block = bytes(self.tail[start : start + 512])
        return len(block) == 512 and not any(block)


__all__ = [
    "PipeStream",
    "TrackingStream",
    "expand_urls",
    "is_local",
    "local_path",
    "open_regular",
]
