"""The ``cusa`` command line. It parses options, calls one library function and turns
library errors into a clear message and a non-zero exit code.

Conventions shared by every command (docs/cli.md):

- the feature store is ``--store PATH_OR_URL`` (default ``$CUSA_HOME/store``); the positional
  ``STORE`` of ``cusa store ...`` and ``cusa report`` still works, with a deprecation note;
- a dataset is ``--dataset NAME_OR_PATH`` (a folder, or its index file such as
  ``new_test.json``), ``--root`` and ``--split``; ``--name`` names it in the store;
- enumerations are choices (``--dtype``, ``--runner``, ``--metric``, ``--task``...), checked by
  the parser; ``--device`` takes auto, cpu, mps, cuda or cuda:N;
- ``--json`` prints machine-readable output on stdout; notes and errors go to stderr;
- every error is one ``error: ...`` line and an exit code (``EXIT_*``, from
  ``commands/exit_codes.py``).

The commands live in ``commands/``, one module per command or group, with the options they
share declared once in ``commands/options.py``; this module makes the app, registers the
commands in the order ``cusa --help`` lists them, and holds the global ``-v``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from .commands import cache, datasets, evaluate, extract, report, store, teachers, train
from .commands.exit_codes import (
    CODES_HELP,
    EXIT_DEVICE,
    EXIT_FAILED,
    EXIT_FILE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MALFORMED,
    EXIT_MEMORY,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_REMOTE,
    classify_error,
    friendly_errors,
)
from .commands.options import typer_app
from .commands.version import print_version

__all__ = [
    "EXIT_DEVICE",
    "EXIT_FAILED",
    "EXIT_FILE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_MALFORMED",
    "EXIT_MEMORY",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_REMOTE",
    "app",
    "classify_error",
    "friendly_errors",
    "main",
]

app = typer_app(
    "cusa: teacher features in a shared store, and CUSA soft-label training for image-text "
    "retrieval.",
    add_completion=False,
    epilog=CODES_HELP,
)
# The commands, then the groups: the order of `cusa --help`.
app.command("shard")(datasets.shard_cmd)
app.command("extract")(extract.extract_cmd)
app.command("train")(train.train_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("report")(report.report_cmd)
app.add_typer(store.app, name="store")
app.add_typer(teachers.app, name="teachers")
app.add_typer(cache.app, name="cache")
app.add_typer(datasets.app, name="datasets")


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Log debug output, tracebacks and Ray's own messages."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=print_version,
            help="Print cusa's version, the store layout version it writes, and the versions "
            "of torch, zarr, sentence-transformers, transformers and numpy; then exit.",
        ),
    ] = False,
) -> None:
    # cusa's own progress messages at INFO; other libraries only when they warn, unless -v.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("cusa").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # The weight-loading bars of huggingface_hub/transformers interleave with ours. Set for
        # this command only (and its child processes): a caller running the CLI in-process
        # (tests, scripts) gets its environment back, so a later `import transformers` keeps
        # its own progress-bar and verbosity defaults.
        quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        before = {k: os.environ.get(k) for k in quiet}
        for key, value in quiet.items():
            os.environ.setdefault(key, value)
        ctx.call_on_close(lambda: _restore_env(before))


def _restore_env(before: dict[str, str | None]) -> None:
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def main() -> None:
    app()


if __name__ == "__main__":
    main()
