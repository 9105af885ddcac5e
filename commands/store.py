"""``cusa store info|verify|knn|export``: inspect, verify, search and export a feature store."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ..sizes import human_bytes
from .exit_codes import EXIT_FAILED, friendly_errors
from .options import (
    DType,
    GroupDatasetOption,
    GroupSplitOption,
    JsonOption,
    JsonSummaryOption,
    StoreOption,
    StorePositional,
    TeacherOption,
    echo_json,
    store_arg,
    typer_app,
)

app = typer_app("Inspect, verify, search and export a feature store (--store).")


class Metric(str, Enum):
    """kNN metrics."""

    ip = "ip"
    l2 = "l2"


def _open_store(store: str | None):
    from ..store import FeatureStore

    return FeatureStore.open(store)


def _group(
    store: str | None, store_pos: str | None, teacher: str, dataset: str | None, split: str | None
):
    """The group that ``--teacher``, ``--dataset`` and ``--split`` name in the store."""
    from ..store.info import resolve_group

    return resolve_group(_open_store(store_arg(store, store_pos)), teacher, dataset, split)


@app.command("info")
@friendly_errors
def info_cmd(
    store_pos: StorePositional = None,
    store: StoreOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (includes full specs).")
    ] = False,
) -> None:
    """Groups, teachers, N, dim, dtype, specs, size on disk, committed and failed counts."""
    from ..store.info import store_info

    info = store_info(_open_store(store_arg(store, store_pos)))
    if as_json:
        echo_json(info)
        return
    broken = (
        f", {len(info['broken'])} broken (see below; `cusa store verify`)" if info["broken"] else ""
    )
    typer.echo(
        f"store {info['store']} (layout v{info['layout_version']}): {len(info['groups'])} group(s){broken}"
    )
    for g in info["groups"]:
        typer.echo(
            f"  {g['dataset']}/{g['split']}  {g['path'].rsplit('/', 1)[-1]}  "
            f"N={g['rows']} dim={g['dim']} {g['dtype']}{' normalized' if g['normalized'] else ''}  "
            f"shards={g['committed_shards']} failed={g['failed']}  "
            f"{'sealed' if g['sealed'] else 'NOT sealed'}  {human_bytes(g['size_bytes'])}"
        )
        spec = g["spec"]
        typer.echo(
            f"    model={spec.get('model')} weights_sha256={str(spec.get('weights_sha256'))[:16]}… "
            f"output={spec.get('output_kind')} modality={spec.get('modality')}"
        )
    for b in info["broken"]:
        typer.echo(f"  BROKEN {b['path']}: {b['error']}")


@app.command("verify")
@friendly_errors
def verify_cmd(
    store_pos: StorePositional = None,
    store: StoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
    no_hashes: Annotated[
        bool, typer.Option("--no-hashes", help="Skip SHA-256 checks of chunk files.")
    ] = False,
) -> None:
    """Check every group; exit 0 when clean, 1 with a precise report when not."""
    from ..store.verify import verify_store

    fs = _open_store(store_arg(store, store_pos))
    reports = verify_store(fs, check_hashes=not no_hashes)
    if as_json:
        echo_json(
            {
                "store": fs.url,
                "ok": all(r.ok for r in reports),
                "groups": [r.to_dict() for r in reports],
            }
        )
    else:
        for r in reports:
            typer.echo(r.summary())
            for f in r.failed[:20]:
                typer.echo(
                    f"  failed sample {f['sample_id']!r} (shard {f['shard']!r}): {f['error']}"
                )
            if len(r.failed) > 20:
                typer.echo(f"  ... and {len(r.failed) - 20} more failed samples")
        bad = sum(not r.ok for r in reports)
        typer.echo(
            f"{len(reports)} group(s) checked in {fs.url}: "
            + ("all clean" if not bad else f"{bad} with errors")
        )
    if not all(r.ok for r in reports):
        raise typer.Exit(EXIT_FAILED)


@app.command("knn")
@friendly_errors
def knn_cmd(
    store_pos: StorePositional = None,
    store: StoreOption = None,
    teacher: TeacherOption = ...,
    sample_id: Annotated[
        list[str], typer.Option("--id", help="Query sample id (repeatable).")
    ] = ...,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 10,
    dataset: GroupDatasetOption = None,
    split: GroupSplitOption = None,
    metric: Annotated[
        Metric,
        typer.Option(
            "--metric", help="ip (inner product of L2-normalised features: cosine) or l2."
        ),
    ] = Metric.ip,
    include_self: Annotated[
        bool, typer.Option("--include-self", help="Keep the query in its results.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Nearest stored samples of a stored sample, by id."""
    from ..store.knn import build_index

    group = _group(store, store_pos, teacher, dataset, split)
    index = build_index(group, metric=metric.value)  # type: ignore[arg-type]
    results = index.search_ids(sample_id, k, include_self=include_self)
    if as_json:
        echo_json(
            {
                "group": group.rel,
                "metric": metric.value,
                "k": k,
                "results": [
                    {"query": q, "neighbors": [{"sample_id": s, "score": sc} for s, sc in hits]}
                    for q, hits in zip(sample_id, results, strict=True)
                ],
            }
        )
        return
    for q, hits in zip(sample_id, results, strict=True):
        typer.echo(f"{q} ({group.rel}, {metric.value}):")
        for rank, (sid, score) in enumerate(hits, 1):
            typer.echo(f"  {rank:3d}. {sid}  {score:.4f}")


@app.command("export")
@friendly_errors
def export_cmd(
    store_pos: StorePositional = None,
    store: StoreOption = None,
    teacher: TeacherOption = ...,
    to: Annotated[
        str,
        typer.Option("--to", help="Output directory (emb/0.npy, metadata/0.parquet, spec.json)."),
    ] = ...,
    dataset: GroupDatasetOption = None,
    split: GroupSplitOption = None,
    dtype: Annotated[
        DType | None,
        typer.Option("--dtype", help="dtype of the exported rows [default: as stored]."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export.")
    ] = False,
    as_json: JsonSummaryOption = False,
) -> None:
    """Export a teacher's features as npy + parquet for autofaiss / embedding-reader."""
    from ..store.export import export_group

    group = _group(store, store_pos, teacher, dataset, split)
    summary = export_group(
        group, to, dtype=None if dtype is None else dtype.value, overwrite=overwrite
    )
    if as_json:
        echo_json(summary)
        return
    typer.echo(
        f"exported {summary['rows']} x {summary['dim']} {summary['dtype']} of {group.rel} "
        f"to {summary['to']} ({summary['failed']} failed samples in the ledger)"
    )
