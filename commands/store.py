"""``cusa store info|verify|knn|export|reindex|publish|pull|quantize``: inspect, verify, search,
export, index, share and compact a feature store."""

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

app = typer_app(
    "Inspect, verify, search, export, index, share (publish, pull) and compact (quantize) a feature store (--store)."
)


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
            f"shards={g['committed_shards']} failed={g['failed']}"
            f"{' (ids: cusa store verify)' if g['failed'] else ''}  "
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


def _progress_bar(desc: str):
    """A tqdm byte bar on stderr (hidden when stderr is not a terminal) and its update hook."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)
    return bar, bar.update


SelectTeacherOption = Annotated[
    str | None,
    typer.Option(
        "--teacher",
        "-t",
        help="Only this teacher: a name, a fingerprint, name@fingerprint or a group folder name.",
    ),
]
SelectDatasetOption = Annotated[str | None, typer.Option("--dataset", help="Only this dataset.")]
SelectSplitOption = Annotated[str | None, typer.Option("--split", help="Only this split.")]


@app.command("publish")
@friendly_errors
def publish_cmd(
    store: StoreOption = None,
    out: Annotated[
        str,
        typer.Option(
            "--out", help="New or empty folder (or s3:// prefix), or a store published before."
        ),
    ] = ...,
    dataset: SelectDatasetOption = None,
    split: SelectSplitOption = None,
    teacher: SelectTeacherOption = None,
    as_json: JsonSummaryOption = False,
) -> None:
    """Write a self-contained, read-only copy of sealed, verified groups for any file host."""
    from ..store.publish import publish_store

    bar, hook = _progress_bar("publish")
    try:
        result = publish_store(
            _open_store(store), out, dataset=dataset, split=split, teacher=teacher, progress=hook
        )
    finally:
        bar.close()
    if as_json:
        echo_json(
            {
                "out": result.out,
                "groups": [
                    {k: g[k] for k in ("path", "rows", "dim", "dtype", "bytes")}
                    for g in result.groups
                ],
                "copied_bytes": result.copied_bytes,
                "skipped_files": result.skipped_files,
            }
        )
        return
    for g in result.groups:
        typer.echo(
            f"  {g['path']}  N={g['rows']} dim={g['dim']} {g['dtype']}  {human_bytes(g['bytes'])}"
        )
    typer.echo(
        f"published {len(result.groups)} group(s), {human_bytes(result.total_bytes)}, to "
        f"{result.out} ({human_bytes(result.copied_bytes)} copied); serve that folder as it is "
        "and open it with --store URL, or `cusa store pull URL`"
    )


@app.command("pull")
@friendly_errors
def pull_cmd(
    url: Annotated[
        str,
        typer.Argument(
            help="A published store: https://..., hf://datasets/ORG/REPO, s3://..., or a folder."
        ),
    ],
    store: StoreOption = None,
    dataset: SelectDatasetOption = None,
    split: SelectSplitOption = None,
    teacher: SelectTeacherOption = None,
    as_json: JsonSummaryOption = False,
) -> None:
    """Copy published groups into --store, verified; run again to resume an interrupted pull."""
    from ..store.pull import pull_store

    bar, hook = _progress_bar("pull")
    try:
        result = pull_store(
            url, store, dataset=dataset, split=split, teacher=teacher, progress=hook
        )
    finally:
        bar.close()
    if as_json:
        echo_json(
            {
                "source": result.source,
                "store": result.dest,
                "groups": result.groups,
                "copied_bytes": result.copied_bytes,
                "kept_files": result.kept_files,
            }
        )
        return
    for rel, status in result.groups.items():
        typer.echo(f"  {rel}: {status}")
    typer.echo(
        f"pulled {len(result.groups)} group(s) from {result.source} into {result.dest} "
        f"({human_bytes(result.copied_bytes)} copied, {result.kept_files} file(s) kept from "
        "an earlier pull)"
    )


@app.command("reindex")
@friendly_errors
def reindex_cmd(
    store_pos: StorePositional = None,
    store: StoreOption = None,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", "-t", help="Only this teacher's group [default: every group]."),
    ] = None,
    dataset: GroupDatasetOption = None,
    split: GroupSplitOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild indexes that look valid too.")
    ] = False,
    as_json: JsonSummaryOption = False,
) -> None:
    """Write the id index of sealed groups that lack one (sealed by an older cusa).

    Idempotent: a group whose index matches its sealed arrays is left alone. The index is
    written under a temporary name and renamed; a second reindex of a group at the same time is
    refused. On a local store it also renews the seal's stamp of the commit records where it no
    longer matches (a copied or chmod-ed store), so that opening the group stats them instead
    of reading each one.
    """
    from ..store.reindex import reindex_group

    fs = _open_store(store_arg(store, store_pos))
    if teacher is not None:
        groups = [_group(store, store_pos, teacher, dataset, split)]
    else:
        groups = [
            g
            for g in fs.scan()[0]
            if (dataset is None or g.dataset == dataset) and (split is None or g.split == split)
        ]
    results = {g.rel: reindex_group(g, force=force) for g in groups}
    if as_json:
        echo_json({"store": fs.url, "groups": results})
        return
    for rel, status in results.items():
        typer.echo(f"{rel}: {status.replace('-', ' ')}")
    written = sum(s == "written" for s in results.values())
    restamped = sum(s == "restamped" for s in results.values())
    typer.echo(
        f"{len(results)} group(s) in {fs.url}: {written} index(es) written, "
        f"{restamped} stamp(s) of commit records renewed"
    )


@app.command("quantize")
@friendly_errors
def quantize_cmd(
    store: StoreOption = None,
    teacher: TeacherOption = ...,
    dataset: GroupDatasetOption = None,
    split: GroupSplitOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rewrite an int8 group made before.")
    ] = False,
    as_json: JsonSummaryOption = False,
) -> None:
    """Write an int8 copy (per-row scale) of a sealed group beside it, as <teacher>@<fp>-int8."""
    from ..store.info import group_info
    from ..store.quant import find_source, quantize_group

    fs = _open_store(store)
    source = find_source(fs, teacher, dataset, split)
    group = quantize_group(fs, source, overwrite=overwrite)
    info, src = group_info(group), group_info(source)
    if as_json:
        echo_json(
            {
                "source": src["path"],
                "group": info["path"],
                "source_bytes": src["size_bytes"],
                "bytes": info["size_bytes"],
            }
        )
        return
    typer.echo(
        f"wrote {info['path']}: N={info['rows']} dim={info['dim']} int8, "
        f"{human_bytes(info['size_bytes'])} (from {src['dtype']} {human_bytes(src['size_bytes'])}); "
        f"read it with --teacher {group.leaf}"
    )
