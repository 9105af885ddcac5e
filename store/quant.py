"""int8 storage: features quantised per row, a quarter of float32 (about half of float16).

An int8 group is made from a sealed float16 or float32 group of the same teacher
(``cusa store quantize``) and lives beside it as ``<teacher>@<fp>-int8/``, like ``-float32``.
It is a sealed group with one more array. Its exact byte layout, so that any reader can decode
it without cusa::

    <teacher>@<fp>-int8/
        zarr.json          attributes["cusa"]: the source's, with spec.dtype = "int8" and
                           "quantization": {"scheme": "int8-absmax-per-row", ...}
        features/c/<i>/0   chunk i: rows_i x D int8 (two's complement), C order, no header
        scale/c/<i>        chunk i: rows_i float32, little-endian: the scale of each row
        sample_id/...      the source's sorted sample ids (same Zarr array, same bytes)
        manifest.parquet   the source's ledger (same bytes)
        id_index.bin       the source's id index, when it has one (same bytes)
        sealed.json        rows, failed, chunk_rows (the same for both arrays), chunk_sha256
                           (features chunks), scale_sha256 (scale chunks), quantized_from

Row ``r`` with int8 values ``q`` (D of them) and scale ``s`` decodes to ``x = q * s`` in
float32. Encoding: ``s = max_j |x_j| / 127`` (float32) and ``q = round(x / s)`` (round half to
even) clipped to [-127, 127]; an all-zero row has ``s = 0`` and ``q = 0``. Each element's error is
at most ``s / 2``. Both arrays are plain Zarr v3 (``int8`` and ``float32``, ``bytes`` codec,
little-endian, no compressor), so ``zarr.open_group(...)`` reads them too.

:class:`cusa.store.FeatureLookup` dequantises on gather: ``gather``/``gather_rows`` return
float32 rows for an int8 group.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from .feature_store import FeatureStore
from .fs import COPY_BLOCK_BYTES
from .group import FeatureGroup
from .layout import MANIFEST, SEALED, Segment, group_leaf, json_bytes, now

log = logging.getLogger(__name__)

INT8 = "int8"
SCHEME = "int8-absmax-per-row"
QMAX = 127


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)``: (n, D) int8 and (n,) float32 of the (n, D) rows ``x``."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / QMAX).astype(np.float32)  # (n,)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(x / safe[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, D) float32 rows ``q * scale`` of int8 rows and their (n,) scales."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def is_int8(group: FeatureGroup) -> bool:
    return group.spec.get("dtype") == INT8


def scale_segments(group: FeatureGroup) -> list[Segment]:
    """The ``scale`` chunk files of a sealed int8 group, aligned with its feature chunks."""
    sealed = group.sealed
    if not sealed or not is_int8(group):
        return []
    sums = sealed.get("scale_sha256") or []
    if len(sums) != len(sealed["chunk_rows"]):
        raise group._broken(
            f"{SEALED} records {len(sums)} scale chunk hashes for {len(sealed['chunk_rows'])} "
            "feature chunks"
        )
    return [
        Segment(f"{group.rel}/scale/c/{i}", rows, h, f"{group.rel}/sample_id", i)
        for i, (rows, h) in enumerate(zip(sealed["chunk_rows"], sums, strict=True))
    ]


def read_scales(group: FeatureGroup, segment_index: int) -> np.ndarray:
    """The (rows,) float32 scales of feature chunk ``segment_index``, checked in size."""
    seg = scale_segments(group)[segment_index]
    data = group.fs.read_bytes(seg.rel)
    if len(data) != seg.rows * 4:
        raise StoreError(
            f"scale chunk {group.fs.path(seg.rel)!r} has {len(data)} bytes, expected "
            f"{seg.rows * 4}; it is truncated or corrupt - run `cusa store verify`"
        )
    return np.frombuffer(data, dtype="<f4")


def unit_scales(group: FeatureGroup, index: int) -> tuple[np.ndarray | None, str | None]:
    """``(scales, problem)`` of feature chunk ``index`` for ``verify``: the scale chunk read
    and checked against its size and the SHA-256 in the seal record."""
    try:
        seg = scale_segments(group)[index]
        data = group.fs.read_bytes(seg.rel)
    except (OSError, IndexError, StoreError) as exc:
        return None, f"scale chunk {index} is missing or unreadable ({exc})"
    where = group.fs.path(seg.rel)
    if len(data) != seg.rows * 4:
        return None, f"scale chunk {where!r} has {len(data)} bytes, expected {seg.rows * 4}"
    if hashlib.sha256(data).hexdigest() != seg.sha256:
        return None, f"scale chunk {where!r} does not match the SHA-256 recorded in {SEALED}"
    scales = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(scales).all() or (scales < 0).any():
        return None, f"scale chunk {where!r} holds negative or non-finite scales"
    return scales, None


def lookup_scales(lookup: Any) -> list[np.ndarray]:
    """Memory maps of an int8 lookup's scale chunks (copied once, verified, when remote)."""
    cached = lookup.__dict__.get("_scale_maps")
    if cached is not None:
        return cached
    maps = []
    for seg in scale_segments(lookup.group):
        path = lookup._local_file(seg)
        maps.append(np.memmap(path, dtype="<f4", mode="r", shape=(seg.rows,)))
    lookup.__dict__["_scale_maps"] = maps
    return maps


def gather_dequantized(lookup: Any, rows: np.ndarray) -> np.ndarray:
    """(len(rows), D) float32 rows of an int8 lookup, dequantised."""
    rows = np.asarray(rows, dtype=np.int64)
    maps, scales = lookup._mapped(), lookup_scales(lookup)
    out = np.empty((len(rows), lookup.dim), dtype=np.float32)
    seg = np.searchsorted(lookup._offsets, rows, side="right") - 1
    for s in np.unique(seg):
        sel = seg == s
        local = rows[sel] - lookup._offsets[s]
        out[sel] = dequantize_rows(maps[s][local], scales[s][local])
    return out


# -- making an int8 group ------------------------------------------------------------------------


def find_source(
    store: FeatureStore, teacher: str, dataset: str | None = None, split: str | None = None
) -> FeatureGroup:
    """The float16/float32 group of ``teacher`` to quantize (int8 groups are not candidates).

    Raises:
        StoreError: no such group, or several (the message lists their folder names).
    """
    found = [
        g
        for g in store.groups()
        if g.matches(teacher)
        and not is_int8(g)
        and dataset in (None, g.dataset)
        and split in (None, g.split)
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise StoreError(
            f"store {store.url!r} has no float16/float32 group of teacher {teacher!r}"
            + (f" for {dataset}/{split}" if dataset or split else "")
        )
    names = ", ".join(f"{g.dataset}/{g.split}/{g.leaf}" for g in found)
    raise StoreError(
        f"teacher {teacher!r} matches several groups: {names}; pass --dataset/--split, or the "
        "group's folder name as --teacher"
    )


def _source_group(store: FeatureStore, group: FeatureGroup) -> FeatureGroup:
    if is_int8(group):
        raise ConfigError(f"{group.url!r} is already int8; quantize its float16/float32 group")
    if not group.sealed:
        raise ConfigError(
            f"{group.url!r} is not sealed; finish its extraction before quantizing it"
        )
    return group


def quantize_group(
    store: FeatureStore, group: FeatureGroup, *, overwrite: bool = False
) -> FeatureGroup:
    """Write the int8 copy of the sealed float group ``group`` beside it; returns the new group.

    Streams the source chunk by chunk (``COPY_BLOCK_BYTES`` at a time), so memory stays bounded.
    An int8 group that exists already is returned as it is (``overwrite`` rewrites it).
    """
    import zarr

    src = _source_group(store, group)
    sealed = src.sealed
    assert sealed is not None
    rel = f"{src.rel.rsplit('/', 1)[0]}/{group_leaf(src.spec['name'], src.fingerprint, INT8)}"
    fs = store.fs
    if fs.exists(f"{rel}/zarr.json") and fs.exists(f"{rel}/{SEALED}") and not overwrite:
        return FeatureGroup(store, rel)
    if fs.exists(rel):
        fs.remove(rel)
    dim, rows = src.dim, int(sealed["rows"])
    chunk_rows = list(sealed["chunk_rows"])
    zstore = fs.zarr_store(rel)
    if rows:
        zarr.create_array(
            store=zstore, name="features", shape=(rows, dim), chunks=(chunk_rows[0], dim),
            dtype="int8", compressors=None, filters=None, fill_value=0, overwrite=True,
        )  # fmt: skip
        zarr.create_array(
            store=zstore, name="scale", shape=(rows,), chunks=(chunk_rows[0],),
            dtype="<f4", compressors=None, filters=None, fill_value=0.0, overwrite=True,
        )  # fmt: skip
    feat_sums, scale_sums = [], []
    for i, seg in enumerate(src.segments()):
        scales: list[np.ndarray] = []
        digest = hashlib.sha256()
        fs.write_stream_atomic(
            f"{rel}/features/c/{i}/0", _quantized_blocks(src, seg, scales, digest)
        )
        scale = np.concatenate(scales) if scales else np.zeros(0, np.float32)
        fs.write_bytes_atomic(f"{rel}/scale/c/{i}", scale.astype("<f4").tobytes())
        feat_sums.append(digest.hexdigest())
        scale_sums.append(hashlib.sha256(scale.astype("<f4").tobytes()).hexdigest())
    # Ids, ledger and id index are the source's, byte for byte.
    for name in _copied_files(src):
        fs.write_stream_atomic(f"{rel}/{name[len(src.rel) + 1 :]}", _file_blocks(src, name))
    attrs = dict(src.attrs)
    attrs["spec"] = {**src.spec, "dtype": INT8}
    attrs["created"] = now()
    attrs["quantization"] = {
        "scheme": SCHEME,
        "source_dtype": src.spec["dtype"],
        "source_group": src.leaf,
        "scale_array": "scale",
        "decode": "x = q.astype(float32) * scale[:, None]",
    }
    record = {
        "rows": rows,
        "failed": int(sealed.get("failed", 0)),
        "shards": [],
        "chunk_rows": chunk_rows,
        "chunk_sha256": feat_sums,
        "scale_sha256": scale_sums,
        "sealed": now(),
        "quantized_from": {"group": src.leaf, "chunk_sha256": sealed["chunk_sha256"]},
    }
    fs.write_bytes_atomic(f"{rel}/{SEALED}", json_bytes(record))
    # zarr.json last: until it exists, no reader sees the group (a killed run is redone).
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {"cusa": attrs}}
    fs.write_bytes_atomic(f"{rel}/zarr.json", json_bytes(meta))
    log.info("quantized %s to %s (%d rows)", src.rel, rel, rows)
    return FeatureGroup(store, rel)


def _copied_files(src: FeatureGroup) -> list[str]:
    base = src.fs.path(src.rel)
    out = []
    for full in src.fs.fs.find(f"{base}/sample_id"):
        if not full.endswith(".partial"):
            out.append(f"{src.rel}/{full[len(base) :].lstrip('/')}")
    for name in (MANIFEST, "id_index.bin"):
        if src.fs.exists(f"{src.rel}/{name}"):
            out.append(f"{src.rel}/{name}")
    return out


def _file_blocks(src: FeatureGroup, rel: str) -> Iterator[bytes]:
    with src.fs.open_read(rel) as fh:
        while block := fh.read(COPY_BLOCK_BYTES):
            yield block


def _quantized_blocks(
    src: FeatureGroup, seg: Segment, scales: list[np.ndarray], digest: Any
) -> Iterator[bytes]:
    row_bytes = src.dim * src.dtype.itemsize
    block_rows = max(1, COPY_BLOCK_BYTES // row_bytes)
    src_digest = hashlib.sha256()
    with src.fs.open_read(seg.rel) as fh:
        for start in range(0, seg.rows, block_rows):
            n = min(block_rows, seg.rows - start)
            raw = fh.read(n * row_bytes)
            if len(raw) != n * row_bytes:
                raise StoreError(f"chunk file {src.fs.path(seg.rel)!r} is truncated")
            src_digest.update(raw)
            x = np.frombuffer(raw, dtype=src.dtype).reshape(n, src.dim)
            q, s = quantize_rows(x)
            scales.append(s)
            data = q.tobytes()
            digest.update(data)
            yield data
    if src_digest.hexdigest() != seg.sha256:
        raise StoreError(
            f"chunk file {src.fs.path(seg.rel)!r} does not match the SHA-256 in its seal record; "
            "run `cusa store verify`"
        )
