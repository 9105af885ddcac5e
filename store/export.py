"""Export one group as ``npy`` + parquet, the layout autofaiss and embedding-reader read.

Layout written under ``to_dir``::

    emb/0.npy             (N, D) features, np.save format, no pickle; rows sorted by sample id
    metadata/0.parquet    sample_id, row: row i of emb/0.npy is sample_id[i]
    failed.parquet        the ledger: sample_id, shard, error (only when samples failed)
    spec.json             teacher spec, dataset, split, fingerprint, counts, source store

``emb/`` and ``metadata/`` hold files aligned by sorted name, which is embedding-reader's
``parquet_npy`` convention, so these work unchanged::

    EmbeddingReader("DIR/emb", file_format="npy")
    EmbeddingReader("DIR/emb", metadata_folder="DIR/metadata", meta_columns=["sample_id"],
                    file_format="parquet_npy")
    autofaiss build_index --embeddings=DIR/emb --file_format=npy ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, StoreError
from ..safe_files import short_path
from .group import FeatureGroup
from .layout import Segment
from .lookup import READ_BLOCK_ROWS, FeatureLookup

log = logging.getLogger(__name__)

EMB_FILE = "emb/0.npy"
METADATA_FILE = "metadata/0.parquet"
FAILED_FILE = "failed.parquet"
SPEC_FILE = "spec.json"


def _check_destination(group: FeatureGroup, out: Path) -> None:
    """Refuse a dangling symlink and any destination inside the store (its root, a folder in
    it, or a symlink leading into it): an export must never add files to a store."""
    if out.is_symlink() and not out.exists():
        raise StoreError(
            f"cannot export to {short_path(str(out))}: it is a symlink to "
            f"{short_path(os.readlink(out))}, which does not exist; remove the link or pass --to "
            "a directory"
        )
    if not group.fs.is_local:
        return
    store_root = Path(group.fs.local_path("")).resolve()
    # realpath follows every link on the way and normalises '..' in the parts still to create
    target = Path(os.path.realpath(out))
    if target == store_root or target.is_relative_to(store_root):
        raise StoreError(
            f"cannot export to {short_path(str(out))}: it lies inside the store "
            f"{short_path(str(store_root))} (as {short_path(str(target))}); an export must not "
            "write into a store — pass --to a directory outside it"
        )


def export_group(
    group: FeatureGroup,
    to_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``group``'s committed features and ids to ``to_dir`` (see the module docstring).

    Args:
        group: the group to export.
        to_dir: a local directory; created if needed.
        dtype: ``"float16"`` or ``"float32"``; default: the store's dtype.
        overwrite: replace an earlier export in ``to_dir``.

    Returns:
        A summary: paths written, ``rows``, ``dim``, ``dtype``, ``failed``.

    Raises:
        StoreError: ``to_dir`` already holds an export and ``overwrite`` is False, ``to_dir`` is
            a file, or a chunk file does not match the SHA-256 recorded when it was written
            (nothing is exported from a corrupt group).
    """
    out = Path(to_dir).expanduser()
    _check_destination(group, out)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(
                    f"cannot export to {str(out)!r}: {str(parent)!r} is a file, not a directory; "
                    "pass --to a new or existing directory"
                )
            break
    out_dtype = np.dtype(dtype or (np.float32 if group.dtype == np.int8 else group.dtype))
    if out_dtype.name not in ("float16", "float32"):
        raise ConfigError(f"export dtype must be float16 or float32, not {dtype!r}")
    targets = [out / EMB_FILE, out / METADATA_FILE, out / SPEC_FILE]
    if not overwrite and any(t.exists() for t in targets):
        raise StoreError(
            f"{str(out)!r} already holds an export ({EMB_FILE}, {METADATA_FILE}); pass "
            "--overwrite to replace it (export_group(..., overwrite=True) from Python), or "
            "choose another directory"
        )
    lookup = FeatureLookup(group)
    check_chunk_hashes(group, lookup._segments)
    if not group.sealed:
        log.warning(
            "exporting unsealed group %s: only the %d committed rows", group.rel, len(lookup)
        )
    order = sorted(range(len(lookup)), key=lookup.ids.__getitem__)  # rows in sample-id order
    ids = [lookup.ids[i] for i in order]
    order_arr = np.asarray(order, dtype=np.int64)
    n, dim = len(ids), lookup.dim

    (out / "emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    # Write under temporary names and rename, so a crash never leaves a half export in place.
    tmp_emb = out / f"{EMB_FILE}.partial"
    arr = np.lib.format.open_memmap(tmp_emb, mode="w+", dtype=out_dtype, shape=(n, dim))
    for start in range(0, n, READ_BLOCK_ROWS):
        arr[start : start + READ_BLOCK_ROWS] = lookup.gather_rows(
            order_arr[start : start + READ_BLOCK_ROWS]
        )
    arr.flush()
    del arr
    os.replace(tmp_emb, out / EMB_FILE)

    table = pa.table(
        {"sample_id": pa.array(ids, pa.string()), "row": pa.array(range(n), pa.int64())}
    )
    _write_parquet(table, out / METADATA_FILE)
    failed = group.failures()
    if failed:
        _write_parquet(
            pa.Table.from_pylist(
                [
                    {"sample_id": f["sample_id"], "shard": f["shard"], "error": f["error"]}
                    for f in failed
                ],
                schema=pa.schema(
                    [("sample_id", pa.string()), ("shard", pa.string()), ("error", pa.string())]
                ),
            ),
            out / FAILED_FILE,
        )
    elif (out / FAILED_FILE).exists():
        (out / FAILED_FILE).unlink()
    summary = {
        "source": group.url,
        "dataset": group.dataset,
        "split": group.split,
        "teacher": group.spec["name"],
        "fingerprint": group.fingerprint,
        "rows": n,
        "dim": dim,
        "dtype": out_dtype.name,
        "failed": len(failed),
        "sealed": group.sealed is not None,
        "spec": group.spec,
        "manifest_hash": group.attrs.get("manifest_hash"),
        "files": {
            "embeddings": EMB_FILE,
            "metadata": METADATA_FILE,
            "failed": FAILED_FILE if failed else None,
        },
    }
    tmp_spec = out / f"{SPEC_FILE}.partial"
    tmp_spec.write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.replace(tmp_spec, out / SPEC_FILE)
    log.info("exported %d rows of %s to %s", n, group.rel, out)
    return {**summary, "to": str(out)}


def check_chunk_hashes(group: FeatureGroup, segments: list[Segment]) -> None:
    """Refuse a group whose chunk files differ from the SHA-256 recorded at commit or seal."""
    for seg in segments:
        digest = hashlib.sha256(group.fs.read_bytes(seg.rel)).hexdigest()
        if digest != seg.sha256:
            raise StoreError(
                f"chunk file {group.fs.path(seg.rel)!r} of {group.url!r} does not match the "
                "SHA-256 recorded when it was written; its bytes changed, so nothing was "
                "exported. Run `cusa store verify`, then re-extract the group"
            )


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
