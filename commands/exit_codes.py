"""How an error leaves ``cusa``: one ``error: ...`` line on stderr and an exit code.

Every command is wrapped in :func:`friendly_errors`. The codes are listed with examples in
docs/cli.md and docs/reliability.md; ``cusa.cli`` re-exports them as ``cusa.cli.EXIT_*``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from ..errors import CusaError

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran, but samples failed beyond --max-failures / verify found problems
EXIT_REFUSED = 2  # a CusaError: bad option, dataset, store or weights (and click's usage errors)
EXIT_FILE = 3  # a file-system error: missing file, permission denied, read-only, disk full
EXIT_MALFORMED = 4  # a file cusa read is malformed: invalid JSON/Parquet/text, nested too deep
EXIT_DEVICE = 5  # the compute device or a library failed at run time (CUDA, torch)
EXIT_REMOTE = 6  # remote storage: missing or refused credentials, network errors
EXIT_MEMORY = 7  # out of memory
EXIT_INTERNAL = 70  # anything else: a bug in cusa (re-run with -v for the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C

#: The epilog of ``cusa --help``.
CODES_HELP = (
    "Exit codes: 0 ok; 1 samples failed beyond --max-failures, or verify found problems; "
    "2 usage error, or refused input (bad option value, dataset, weights, store); "
    "3 file-system error; 4 malformed file; 5 device or library failure; 6 remote storage; "
    "7 out of memory; 70 internal error (a bug: re-run with -v); 130 interrupted (re-run to "
    "resume). See docs/cli.md."
)

_CLI_EXCEPTIONS = (typer.Exit, typer.Abort, typer.exceptions.TyperException)
_REMOTE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "requests")
_MAX_MESSAGE = 600

log = logging.getLogger("cusa.cli")


def _fail(message: str, code: int = EXIT_REFUSED) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def classify_error(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an error that is not a :class:`CusaError`."""
    names = {c.__module__.split(".")[0] for c in type(exc).__mro__}
    what = f"{type(exc).__name__}: {_one_line(exc)}"
    if names & set(_REMOTE_MODULES) or isinstance(exc, ConnectionError | TimeoutError):
        return EXIT_REMOTE, (
            f"remote storage failed ({what}); check the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or a profile), the endpoint (AWS_ENDPOINT_URL) and the network"
        )
    if isinstance(exc, MemoryError):
        return EXIT_MEMORY, f"out of memory ({what}); lower --batch-size or use a bigger machine"
    if isinstance(exc, OSError):
        path = getattr(exc, "filename", None)
        where = f" at {str(path)!r}" if path and str(path) not in what else ""
        return EXIT_FILE, (
            f"file system error{where} ({what}); check that the path exists, is the kind of "
            "file expected (a directory for --to and --store) and is readable/writable"
        )
    if isinstance(exc, RecursionError):
        return EXIT_MALFORMED, (
            f"a file cusa read nests data too deeply to parse ({type(exc).__name__}); regenerate it"
        )
    if isinstance(exc, ValueError):  # JSONDecodeError, UnicodeError, pyarrow's ArrowInvalid...
        return EXIT_MALFORMED, f"a file cusa read is malformed ({what}); fix or regenerate it"
    if isinstance(exc, RuntimeError):
        return EXIT_DEVICE, (
            f"the compute device or a library failed ({what}); try --device cpu, or check the "
            "GPU driver and free GPU memory"
        )
    return EXIT_INTERNAL, (
        f"unexpected internal error ({what}); re-run with -v for the traceback and report it"
    )


def friendly_errors(fn: Callable) -> Callable:
    """Turn any error into one line on stderr and its exit code (see the ``EXIT_*`` codes).

    A :class:`CusaError` exits 2 with its own message; other errors a user can cause (files,
    malformed data, devices, remote storage, memory) get their own codes; ``-v`` logs the
    traceback.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _CLI_EXCEPTIONS:  # exits and usage errors the CLI framework reports itself
            raise
        except CusaError as exc:
            log.debug("traceback", exc_info=exc)
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; re-run the same command to resume", EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - every error becomes one line and a code
            log.debug("traceback", exc_info=exc)
            code, message = classify_error(exc)
            _fail(message, code)

    return wrapper
