"""``cusa --version``: what a bug report needs, without importing torch."""

from __future__ import annotations

import platform

import typer

from .. import __version__

#: Libraries whose versions decide the store's bytes and the features (read from their
#: installed metadata, so none of them is imported).
LIBRARIES = ("torch", "zarr", "sentence-transformers", "transformers", "numpy")


def library_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``not installed``."""
    from importlib import metadata  # stdlib, but 25 ms: only for --version

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_lines() -> list[str]:
    """``cusa X (writes store layout vN)``, then one ``name version`` line per library."""
    from ..store.layout import LAYOUT_VERSION  # stdlib-only module; numpy/zarr, never torch

    lines = [f"cusa {__version__} (writes store layout v{LAYOUT_VERSION})"]
    lines += [f"{name} {library_version(name)}" for name in LIBRARIES]
    lines.append(f"python {platform.python_version()}")
    return lines


def print_version(value: bool) -> None:
    """The eager ``--version`` callback: print and exit 0."""
    if value:
        for line in version_lines():
            typer.echo(line)
        raise typer.Exit(0)
