"""The ``cusa`` command line. It parses options, calls one library function and turns
library errors into a clear message and a non-zero exit code."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from cusa.errors import CusaError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
store_app = typer.Typer(no_args_is_help=True, help="Inspect, verify, search and export a feature store.")
teachers_app = typer.Typer(no_args_is_help=True, help="List and fetch teachers.")
app.add_typer(store_app, name="store")
app.add_typer(teachers_app, name="teachers")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """Turn a CusaError into a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CusaError as exc:
            _fail(str(exc))

    return wrapper


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug output.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ---- store ----------------------------------------------------------------------------------

# ---- teachers -------------------------------------------------------------------------------

# ---- extract / shard ------------------------------------------------------------------------

# ---- train / eval ---------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
