"""One rule for every file cusa reads: regular files only, inside their root, size-capped, and
symlinks never followed out of the root.

Dataset readers (:mod:`cusa.readers`), evaluation benchmarks and SentEval files
(:mod:`cusa_train.evaluation`), config files and weights files all go through these helpers, so
a FIFO never blocks a read, ``/dev/zero`` is never read, a 3 GB sparse file is refused from its
size, a ``../`` path or a symlink never reaches outside the root it was given, and a directory
walk never follows a symlinked folder into a loop. Messages name the path (cut to a bounded
length: a 50 MB path makes a short message) and never hold file contents.

This is a leaf: it imports nothing from cusa but :mod:`cusa.errors`.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable, Iterator
from typing import Any

#: Largest image file (or tar member) read, in bytes; bigger ones are refused, never read.
MAX_IMAGE_BYTES = 256 * 2**20
#: Largest index file (dataset JSON/JSONL/TSV, benchmark list, SentEval file) read, in bytes.
MAX_INDEX_BYTES = 4 * 2**30
#: Largest config file (YAML/JSON) read, in bytes; checked before parsing.
MAX_CONFIG_BYTES = 4 * 2**20
#: Longest path text taken from an index file (Linux PATH_MAX); longer is no file name at all.
MAX_PATH_CHARS = 4096
#: How much of a value (a path, a line) a message shows.
MESSAGE_VALUE_CHARS = 160

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def short_repr(value: Any, limit: int = MESSAGE_VALUE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for one-line messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...({len(text):,} chars)"


def short_path(path: str | os.PathLike, limit: int = MESSAGE_VALUE_CHARS) -> str:
    """``repr`` of a path for a message: whole when short, else its start and end."""
    text = os.fspath(path)
    if len(text) <= limit:
        return repr(text)
    keep = max(limit // 2 - 10, 10)
    return repr(f"{text[:keep]}...[{len(text):,} chars]...{text[-keep:]}")


def path_text_problem(text: str, *, what: str = "path") -> str | None:
    """Why ``text`` (a path read from an index file) cannot name a file, or None: longer than
    :data:`MAX_PATH_CHARS`, or holding a NUL byte. Checked before any ``Path`` is built from it,
    so a 50 MB "path" costs nothing and its message stays short."""
    if len(text) > MAX_PATH_CHARS:
        return (
            f"{what} {short_repr(text)} is {len(text):,} characters, longer than any file name "
            f"({MAX_PATH_CHARS:,}); not read"
        )
    if "\x00" in text:
        return f"{what} {short_repr(text)} holds a NUL byte, which no file name can; not read"
    return None


def file_kind(mode: int) -> str:
    """A human name for a non-regular file type (``"a FIFO (named pipe)"``...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def regular_file_problem(
    path: str | os.PathLike, max_bytes: int | None = None, *, what: str = "file"
) -> str | None:
    """Why ``path`` may not be read (missing, not a regular file, over ``max_bytes``), or None.

    Looks at the file (``stat``, following a link) without opening it.
    """
    name = short_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{what} {name} does not exist"
    except (OSError, ValueError) as exc:
        return f"cannot read {what} {name}: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {name} is {file_kind(st.st_mode)}, not a regular file; not read"
    if max_bytes is not None and st.st_size > max_bytes:
        return f"{what} {name} is {st.st_size:,} bytes, over the limit of {max_bytes:,}; not read"
    return None


def read_regular_file(
    path: str | os.PathLike, max_bytes: int, *, what: str = "image file"
) -> tuple[bytes | None, str | None]:
    """Bytes of a *regular* file of at most ``max_bytes``, or ``(None, reason)``.

    The file is opened non-blocking and checked with ``fstat`` before any byte is read, so a
    FIFO never blocks the reader and ``/dev/zero`` is never read. The reason names the path and
    the problem; it never holds file contents.
    """
    name = os.fspath(path)
    shown = short_path(name)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return None, f"{what} not found: {shown}"
    except IsADirectoryError:
        return None, f"{what} path is a directory, not a file: {shown}"
    except OSError as exc:
        return None, f"cannot read {what} {shown}: {exc.strerror or type(exc).__name__}"
    except ValueError as exc:  # an embedded NUL byte, or text that is no file name at all
        return None, f"{what} path {short_repr(name)} is not a valid file name ({exc})"
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return None, f"{what} path is a directory, not a file: {shown}"
        if not stat.S_ISREG(st.st_mode):
            return None, f"{what} {shown} is {file_kind(st.st_mode)}, not a regular file; not read"
        if st.st_size > max_bytes:
            return None, (
                f"{what} {shown} is {st.st_size:,} bytes, over the limit of {max_bytes:,}; not read"
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # the file grew while we read it
                return None, f"{what} {shown} is over the limit of {max_bytes:,} bytes; not read"
        return b"".join(chunks), None
    except OSError as exc:
        return None, f"cannot read {what} {shown}: {exc.strerror or type(exc).__name__}"
    finally:
        os.close(fd)


def is_inside(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    """Whether ``path`` (already resolved) lies inside one of the resolved ``roots``."""
    target = os.fspath(path)
    for root in roots:
        base = os.fspath(root)
        if target == base or target.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def outside_root_problem(
    path: str | os.PathLike, root: str | os.PathLike, *, what: str = "file"
) -> str | None:
    """Why ``path`` is refused as outside ``root`` (an absolute or ``../`` path, or a symlink
    on the way leading out), or None when its real path lies inside ``root``'s real path."""
    try:
        real = os.path.realpath(path)
        base = os.path.realpath(root)
    except ValueError as exc:  # an embedded NUL byte
        return f"{what} path {short_repr(os.fspath(path))} is not a valid file name ({exc})"
    if is_inside(real, [base]):
        return None
    how = "resolves (through a symlink)" if real != os.path.abspath(path) else "lies"
    return f"{what} {short_path(path)} {how} outside its root {short_path(root)}; not read"


def text_lines(data: bytes, *, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file's bytes as Python's ``for line in open(path)`` yields them.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` only (universal newlines), never at the other
    characters ``str.splitlines`` splits on (U+2028, U+0085, ``\\x0b``, ``\\x0c``, ``\\x1c``...),
    which official benchmark readers keep inside a line; the last line needs no newline. The
    line ends are removed.

    Raises:
        UnicodeDecodeError: ``data`` is not valid in ``encoding``.
    """
    text = data.decode(encoding)
    return [line[:-1] if line.endswith("\n") else line for line in io.StringIO(text, newline=None)]


def walk_files(top: str | os.PathLike, root: str | os.PathLike) -> Iterator[tuple[str, list[str]]]:
    """``(dirpath, file names)`` under ``top``, in sorted order, like ``os.walk(top,
    followlinks=True)`` but safe: a symlinked folder is followed only when it resolves inside
    ``root`` and was not visited yet (``ln -s . loop`` is walked once, never into a loop), and
    a symlinked folder leading outside ``root`` raises.

    Raises:
        PermissionError: a folder (or a symlinked folder) resolves outside ``root``; the message
            names it.
    """
    base = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(top)]
    out: list[tuple[str, list[str]]] = []
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if not is_inside(real, [base]):
            raise PermissionError(
                f"folder {short_path(folder)} resolves outside its root {short_path(root)}; "
                "not read"
            )
        try:
            st = os.stat(folder)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue  # a folder reached again through a link (a loop, or a second link)
        seen.add(key)
        dirs, files = [], []
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    try:
                        (dirs if e.is_dir() else files).append(e.name)
                    except OSError:
                        continue
        except OSError:
            continue
        out.append((folder, sorted(files)))
        stack.extend(os.path.join(folder, d) for d in sorted(dirs, reverse=True))
    yield from sorted(out)


def read_lines_under(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    max_bytes: int = MAX_INDEX_BYTES,
    what: str = "file",
) -> tuple[list[str] | None, str | None]:
    """The lines (see :func:`text_lines`) of a regular UTF-8 file inside ``root``, or
    ``(None, reason)``."""
    if root is not None:
        problem = outside_root_problem(path, root, what=what)
        if problem:
            return None, problem
    data, reason = read_regular_file(path, max_bytes, what=what)
    if data is None:
        return None, reason
    try:
        return text_lines(data), None
    except UnicodeDecodeError as exc:
        return (
            None,
            f"{what} {short_path(path)} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
        )


__all__ = [
    "MAX_PATH_CHARS",
    "MAX_CONFIG_BYTES",
    "MAX_IMAGE_BYTES",
    "MAX_INDEX_BYTES",
    "file_kind",
    "is_inside",
    "outside_root_problem",
    "path_text_problem",
    "read_lines_under",
    "read_regular_file",
    "regular_file_problem",
    "short_path",
    "short_repr",
    "text_lines",
    "walk_files",
]
