"""What the commands share on the way in (the options that more than one command declares, each
declared once as an ``Annotated`` alias) and on the way out (``--json``).

A command uses an alias as the annotation and gives the default with ``=``, as typer documents::

    def info(store: StoreOption = None, as_json: JsonOption = False) -> None: ...

An option that only one command has is declared in that command's module.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer


def typer_app(help_text: str, **kwargs: Any) -> typer.Typer:
    """The ``cusa`` app or one of its command groups (``cusa store``, ``cusa cache``...)."""
    # rich_markup_mode=None: help texts are plain text, so rich cannot swallow bracketed notes
    # such as "[default: $CUSA_HOME/store]".
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=help_text, **kwargs)


def echo_json(obj: Any) -> None:
    """``--json`` output: indented, sorted, on stdout."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


class DType(str, Enum):
    """Stored feature dtypes."""

    float16 = "float16"
    float32 = "float32"


# ---- the store ------------------------------------------------------------------------------

STORE_HELP = (
    "Feature store: a directory or an fsspec URL such as s3://bucket/cusa "
    "[default: $CUSA_HOME/store]."
)
StoreOption = Annotated[str | None, typer.Option("--store", help=STORE_HELP, show_default=False)]
# The old spelling `cusa store info PATH` / `cusa report PATH`: still accepted, hidden, noted.
StorePositional = Annotated[
    str | None,
    typer.Argument(
        metavar="[STORE]", hidden=True, show_default=False, help="Deprecated: use --store."
    ),
]


def store_arg(option: str | None, positional: str | None) -> str | None:
    """The store from ``--store`` or the deprecated positional ``STORE``."""
    if positional is None:
        return option
    if option is not None and option != positional:
        raise typer.BadParameter(
            f"the store is given twice ({positional!r} and --store {option!r}); pass it once, "
            "as --store",
            param_hint="STORE",
        )
    typer.secho(
        f"note: a positional STORE is deprecated; use --store {positional}",
        fg=typer.colors.YELLOW,
        err=True,
    )
    return positional


# ---- a group in the store (`cusa store knn|export`) -----------------------------------------

TeacherOption = Annotated[
    str,
    typer.Option(
        "--teacher",
        "-t",
        help="Teacher: a name, a fingerprint, name@fingerprint, or the group's folder name; a "
        "name stored in both dtypes means float16, its folder name (name@fingerprint-float32) "
        "picks float32.",
    ),
]
GroupDatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset", help="Dataset name in the store; needed when the teacher has several."
    ),
]
GroupSplitOption = Annotated[
    str | None, typer.Option("--split", help="Split; needed when the teacher has several.")
]

# ---- a dataset to read (`cusa shard`, `cusa extract`) ---------------------------------------

DatasetOption = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="A registered name (coco, flickr30k, albef, coco-sample...; `cusa datasets list`), "
        "a folder, its index file (new_test.json, dataset_coco.json, captions.tsv, "
        "manifest.json), *.tar shards, a brace pattern, an s3:// URL or pipe:CMD.",
    ),
]
RootOption = Annotated[
    str | None,
    typer.Option(
        "--root",
        help="Dataset folder, or its index file, for registered names that need one (coco, "
        "albef...).",
    ),
]
SplitOption = Annotated[
    str | None,
    typer.Option(
        "--split",
        help="Dataset split [default: the split an index file names (new_test.json: test), "
        "else train].",
        show_default=False,
    ),
]
NameOption = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="The dataset's name in the store (<store>/<name>/<split>/...) [default: the "
        "reader's own, e.g. albef]; gives two folders of one layout their own groups.",
        show_default=False,
    ),
]

# ---- the rest -------------------------------------------------------------------------------

DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto, cpu, mps, cuda or cuda:N (auto: the first GPU when one is visible, else cpu).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
JsonSummaryOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
