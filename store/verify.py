"""``verify``: check a store's groups against their own records, byte for byte.

What is checked, for every group (see the layout in :mod:`cusa.store.layout`):

* the group's metadata can be read at all (a malformed ``zarr.json``, seal or commit record is
  reported for that group; the other groups are still verified);
* the spec in the attributes still hashes to the fingerprint in the group's path (attributes
  edited to another teacher spec are caught), and commit records agree on ``dim``/``dtype``;
* each array's own ``zarr.json`` agrees with the spec and the records: shape, ``data_type``,
  chunk shape, and raw little-endian bytes with no compressor (what readers memory-map);
* every commit record points at an existing part; parts nobody committed are *warnings*
  (a crashed or losing writer leaves them; they are invisible to readers);
* every chunk file has the size and SHA-256 recorded in its commit or seal record;
* no NaN/inf values, and norms ≈ 1 when the spec says the features are L2-normalised;
* ids: every ``ok`` manifest entry has exactly its feature row, every feature row is in the
  manifest, and no sample id appears twice (within or across shards);
* failed samples (the ledger) are listed with their reasons: they are missing by design;
* a sealed group's id index (``id_index.bin``) holds exactly its sealed ids, each hash that of
  its row's id (a group sealed by an older cusa, without one, gets a warning).

A group sealed by another process while it is being verified is verified again from its seal,
so a concurrent seal never shows up as lost rows.

A sealed group with its index file is verified in blocks, with no Python object per id and
memory that does not grow with N beyond a byte per row (:func:`_verify_sealed`); unsealed groups
and sealed groups without a usable index hold their ids in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StoreError
from . import reindex
from .feature_store import BrokenGroup, FeatureStore
from .group import FeatureGroup
from .integrity import array_meta_problems
from .layout import ID_INDEX, MANIFEST, SEALED, Segment, parse_group_leaf, safe_name
from .quant import unit_scales
from .reindex import (
    SealedIds,
    arrow_buffers,
    chunk_matches,
    index_problems,
    memory_ids,
    open_mapped_ids,
    read_sealed_id_array,
)
from .spec import FINGERPRINT_FIELDS, spec_fingerprint

log = logging.getLogger(__name__)

# |‖x‖ - 1| allowed for normalised features. fp16 keeps 11 significant bits, so each element
# carries a relative rounding error up to 2**-11 and a 768-d norm drifts by ~1e-3 at worst.
NORM_TOLERANCE = {"float16": 1e-2, "float32": 1e-3, "int8": 1e-2}
# Bytes of float32 scratch per step (rows = this // (dim * 4)): verifying a group reads each chunk
# file block by block, so its memory is bounded by this, not by the chunk (up to 2 GiB) or N.
_BLOCK_BYTES = 64 * 2**20
# How many sample ids an error message lists before it says "and N more".
_PREVIEW = 5


@dataclass
class VerifyReport:
    """The outcome of verifying one group.

    Attributes:
        group: the group's path inside the store (``dataset/split/teacher@fingerprint``).
        url: the group's full URL.
        errors: problems that make the group wrong; each names the group, shard and sample ids.
        warnings: harmless leftovers (orphaned uncommitted parts, temporary files).
        rows: feature rows checked.
        committed_shards: commit records found.
        sealed: whether the group is sealed.
        failed: the ledger: ``{"sample_id", "shard", "error"}`` of samples without features.
    """

    group: str
    url: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: int = 0
    committed_shards: int = 0
    sealed: bool = False
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        """A few human-readable lines: status, counts, then every error and warning."""
        status = "OK" if self.ok else f"FAILED ({len(self.errors)} error(s))"
        lines = [
            f"{self.group}: {status} — {self.rows} rows, {self.committed_shards} committed "
            f"shard(s), {len(self.failed)} failed sample(s), {'sealed' if self.sealed else 'not sealed'}"
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _preview(ids: Iterable[str], total: int | None = None) -> str:
    """The first ids of ``ids`` and how many more; ``total``: how many there are in all, when
    ``ids`` holds only the first few."""
    ids = list(ids)
    total = len(ids) if total is None else total
    shown = ", ".join(repr(i) for i in ids[:_PREVIEW])
    return shown + (f" and {total - _PREVIEW} more" if total > _PREVIEW else "")


class _Tally:
    """How many of something there are, and the first few of them (for messages)."""

    __slots__ = ("count", "first")

    def __init__(self) -> None:
        self.count, self.first = 0, []

    def add(self, items: list[Any], count: int | None = None) -> None:
        self.count += len(items) if count is None else count
        if len(self.first) < _PREVIEW:
            self.first += items[: _PREVIEW - len(self.first)]

    def preview(self) -> str:
        return _preview(self.first, self.count)


@dataclass
class _Unit:
    """One chunk file with its ids: a committed part (unsealed) or a sealed chunk."""

    label: str  # "shard 'x'" or "sealed chunk 0"
    segment: Segment
    ids: list[str] | None  # a part's ids; None for a sealed chunk (named from ``sealed``)
    record: str  # where the size/hash were recorded, for messages
    sealed: SealedIds | None = None  # the sealed ids; this chunk's are ``start:start+count``
    start: int = 0
    count: int = 0

    @property
    def n_ids(self) -> int:
        return len(self.ids) if self.ids is not None else self.count

    def name(self, i: int) -> str:
        """The id of the chunk's row ``i`` (one string, for messages)."""
        if self.ids is not None:
            return self.ids[i]
        return self.sealed.id_at(self.start + i) if self.sealed is not None else f"row {i}"


# A group sealed by another writer while it is verified is verified again, at most this often.
_SEAL_RACE_ATTEMPTS = 3


def verify_store(store: FeatureStore, *, check_hashes: bool = True) -> list[VerifyReport]:
    """Verify every group of ``store``, broken ones included; see :func:`verify_group`.

    Stray files in the store (``.DS_Store``...) are ignored. A group whose metadata cannot be
    read gets a report with that error, and the other groups are verified as usual.
    """
    good, broken = store.scan()
    reports = [verify_group(g, check_hashes=check_hashes) for g in good]
    reports += [broken_report(b) for b in broken]
    return sorted(reports, key=lambda r: r.group)


def broken_report(broken: BrokenGroup) -> VerifyReport:
    """The report of a group whose metadata cannot be read."""
    return VerifyReport(group=broken.rel, url=broken.url, errors=[broken.error])


def verify_group(group: FeatureGroup, *, check_hashes: bool = True) -> VerifyReport:
    """Check one group against its manifest, commit/seal records and spec.

    Args:
        group: the group to check.
        check_hashes: also compare each chunk file's SHA-256 with its record (reads every byte).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is wrong.
    """
    for _ in range(_SEAL_RACE_ATTEMPTS):
        was_sealed = _sealed_state(group)
        report = _verify_once(group, check_hashes)
        if report.ok or was_sealed is not False or _sealed_state(group) is not True:
            break
        # Unsealed when we started and sealed now: the sealer removed the parts we were
        # reading. Its seal holds the same rows; verify that instead of reporting them lost.
        log.info("%s was sealed by another writer while verifying; verifying again", group.rel)
    log.debug(  # callers print the report; INFO here made `cusa store verify` say it twice
        "verified %s: %d error(s), %d warning(s)",
        group.rel,
        len(report.errors),
        len(report.warnings),
    )
    return report


def _sealed_state(group: FeatureGroup) -> bool | None:
    """True/False when the group is sealed or not; None when the seal record is unreadable."""
    try:
        return group.sealed is not None
    except StoreError:
        return None


def _verify_once(group: FeatureGroup, check_hashes: bool) -> VerifyReport:
    report = VerifyReport(group=group.rel, url=group.url)
    try:
        _verify_into(group, report, check_hashes)
    except StoreError as exc:  # BrokenGroupError: a record or file of this group is malformed
        report.errors.append(str(exc))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.errors.append(
            f"{group.rel}: could not be read ({type(exc).__name__}: {exc}); delete the group "
            "folder and re-extract it (other groups are not affected)"
        )
    return report


def _verify_into(group: FeatureGroup, report: VerifyReport, check_hashes: bool) -> None:
    spec_ok = _check_spec(group, report)
    records = _commit_records(group, report)
    report.committed_shards = len(records)
    try:
        sealed = group.sealed
    except StoreError as exc:
        report.errors.append(str(exc))
        return
    report.sealed = sealed is not None
    if not spec_ok:
        return  # dim/dtype are unknown, so nothing below can be read reliably

    if sealed is not None:
        with contextlib.ExitStack() as stack:  # temporary local copies (object stores)
            _verify_sealed(group, sealed, records, report, check_hashes, stack)
        return
    units, manifest = _part_units(group, records, report)
    _check_orphans(group, records, report)

    for unit in units:
        _check_unit(group, unit, report, check_hashes)
        report.rows += unit.segment.rows
    if manifest is None:
        return
    _check_ids(group, units, manifest, report)
    report.failed = [
        {"sample_id": m["sample_id"], "shard": m["shard"], "error": m["error"]}
        for m in manifest
        if m["status"] != "ok"
    ]


# -- array metadata ------------------------------------------------------------------------------


def _check_array_meta(
    group: FeatureGroup,
    arr_rel: str,
    report: VerifyReport,
    where: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...] | None,
    data_type: str,
    raw_bytes: bool,
) -> None:
    """Compare an array's own ``zarr.json`` with what the spec and the records say it holds."""
    name = arr_rel[len(group.rel) + 1 :]
    try:
        meta = group.fs.read_json(f"{arr_rel}/zarr.json")
    except FileNotFoundError:
        report.errors.append(f"{where}: array metadata {name}/zarr.json is missing")
        return
    except (ValueError, UnicodeDecodeError) as exc:
        report.errors.append(f"{where}: array metadata {name}/zarr.json is not valid JSON ({exc})")
        return
    problems = array_meta_problems(
        meta, shape=shape, chunks=chunks, data_type=data_type, raw_bytes=raw_bytes
    )
    if problems:
        report.errors.append(
            f"{where}: array metadata {name}/zarr.json does not match the spec and records "
            f"({'; '.join(problems)}); readers would misread its bytes — restore it or "
            "re-extract the group"
        )


# -- spec ----------------------------------------------------------------------------------------


def _check_spec(group: FeatureGroup, report: VerifyReport) -> bool:
    attrs, rel = group.attrs, group.rel
    spec = attrs.get("spec")
    if not isinstance(spec, dict):
        report.errors.append(f"{rel}: attributes hold no teacher spec (attributes['cusa']['spec'])")
        return False
    missing = [k for k in (*FINGERPRINT_FIELDS, "name", "dim", "dtype") if k not in spec]
    if missing:
        report.errors.append(f"{rel}: teacher spec in the attributes lacks fields {missing}")
        return False
    path_name, path_fp, path_dtype = parse_group_leaf(rel.rsplit("/", 1)[-1])
    if path_dtype is not None and spec.get("dtype") != path_dtype:
        report.errors.append(
            f"{rel}: spec/attrs mismatch: the path names dtype {path_dtype!r} but the "
            f"attributes record {spec.get('dtype')!r}"
        )
    recomputed = spec_fingerprint(spec)
    if recomputed != path_fp or attrs.get("fingerprint") != path_fp:
        report.errors.append(
            f"{rel}: spec/attrs mismatch: the group's path fingerprint is {path_fp!r} but the "
            f"attributes record fingerprint {attrs.get('fingerprint')!r} and their spec (model "
            f"{spec.get('model')!r}) hashes to {recomputed!r}; the attributes were edited to "
            "another teacher spec — restore them or re-extract the group"
        )
    if safe_name(spec["name"]) != path_name:
        report.errors.append(
            f"{rel}: spec/attrs mismatch: the path names teacher {path_name!r} but the "
            f"attributes name {spec['name']!r}"
        )
    try:
        ok = int(spec["dim"]) > 0 and (
            np.dtype(spec["dtype"]).kind == "f" or spec["dtype"] == "int8"
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        report.errors.append(
            f"{rel}: spec has an invalid dim/dtype ({spec['dim']!r}, {spec['dtype']!r})"
        )
    return ok


# -- records and parts ---------------------------------------------------------------------------


def _commit_records(group: FeatureGroup, report: VerifyReport) -> list[dict[str, Any]]:
    fs, rel = group.fs, group.rel
    records = []
    for name in fs.ls(f"{rel}/commits"):
        if name.endswith(".partial"):
            report.warnings.append(f"{rel}: leftover temporary file commits/{name} (harmless)")
            continue
        if not name.endswith(".json"):
            continue
        try:
            rec = dict(group._commit_record(name))
        except StoreError as exc:
            report.errors.append(str(exc))
            continue
        rec["_file"] = f"commits/{name}"
        for key in ("dim", "dtype"):
            if key in rec and str(rec[key]) != str(group.spec.get(key)):
                report.errors.append(
                    f"{rel}: spec/attrs mismatch: shard {rec['shard']!r} was committed with "
                    f"{key}={rec[key]!r} but the attributes say {key}={group.spec.get(key)!r}"
                )
        records.append(rec)
    return sorted(records, key=lambda r: r["shard"])


def _read_manifest(group: FeatureGroup, rel: str) -> list[dict[str, Any]]:
    return pq.read_table(io.BytesIO(group.fs.read_bytes(rel))).to_pylist()


def _part_units(
    group: FeatureGroup, records: list[dict[str, Any]], report: VerifyReport
) -> tuple[list[_Unit], list[dict[str, Any]]]:
    fs, rel = group.fs, group.rel
    units, manifest = [], []
    for rec in records:
        shard, part_rel = rec["shard"], f"{rel}/parts/{rec['part']}"
        needed = [MANIFEST] + (["features/c/0/0", "sample_id/zarr.json"] if rec["rows"] else [])
        absent = [n for n in needed if not fs.exists(f"{part_rel}/{n}")]
        if absent:
            what = "missing part" if not fs.exists(part_rel) else f"a part lacking {absent}"
            report.errors.append(
                f"{rel}: shard {shard!r}: commit record {rec['_file']} points at {what} "
                f"parts/{rec['part']}; its {rec['rows']} rows are lost — remove the commit "
                "record and re-run the extraction for that shard"
            )
            continue
        try:
            entries = _read_manifest(group, f"{part_rel}/{MANIFEST}")
        except (OSError, ValueError) as exc:
            report.errors.append(
                f"{rel}: shard {shard!r}: manifest of parts/{rec['part']} unreadable ({exc})"
            )
            continue
        manifest.extend(entries)
        if not rec["rows"]:
            continue
        seg = Segment(
            f"{part_rel}/features/c/0/0",
            rec["rows"],
            rec["features_sha256"],
            f"{part_rel}/sample_id",
            0,
        )
        where = f"{rel}: shard {shard!r}"
        dim, dtype = group.dim, group.spec["dtype"]
        _check_array_meta(
            group, f"{part_rel}/features", report, where, shape=(rec["rows"], dim),
            chunks=(rec["rows"], dim), data_type=dtype, raw_bytes=True,
        )  # fmt: skip
        _check_array_meta(
            group, f"{part_rel}/sample_id", report, where, shape=(rec["rows"],),
            chunks=None, data_type="string", raw_bytes=False,
        )  # fmt: skip
        try:
            ids = group.read_ids(seg)
        except (OSError, ValueError, KeyError) as exc:
            report.errors.append(f"{rel}: shard {shard!r}: sample_id array unreadable ({exc})")
            continue
        units.append(_Unit(f"shard {shard!r}", seg, ids, rec["_file"]))
    return units, manifest


def _verify_sealed(
    group: FeatureGroup,
    sealed: dict[str, Any],
    records: list[dict[str, Any]],
    report: VerifyReport,
    check_hashes: bool,
    stack: contextlib.ExitStack,
) -> None:
    """Verify a sealed group with memory bounded by a block, not by N.

    The ids are those of ``id_index.bin`` (memory-mapped) once the sealed ``sample_id`` chunk is
    found to hold exactly them, byte for byte, and the file is consistent; every pass (ids
    sorted, feature chunks, manifest) streams blocks of them. Memory: a block of
    :data:`cusa.store.reindex.VERIFY_BLOCK_IDS` ids, one byte per row (the rows the manifest
    names), and the failed entries. Without a usable index file (sealed by an older cusa, or
    damaged) the ids are read with zarr and indexed in memory (about 40 bytes per id).
    """
    rel = group.rel
    committed = {r["shard"] for r in records}
    in_seal = set(sealed.get("shards", []))
    late = sorted(committed - in_seal)
    if late:
        report.errors.append(
            f"{rel}: shard(s) {_preview(late)} were committed after sealing, so their rows are "
            "not in the sealed arrays; re-seal the group (remove sealed.json and run seal again)"
        )
    gone = sorted(in_seal - committed)
    if gone:
        report.warnings.append(f"{rel}: sealed shard(s) {_preview(gone)} have no commit record")
    manifest = _open_sealed_manifest(group, report, stack)
    rows = int(sealed.get("rows", 0))
    ids: SealedIds | None = None
    dups: list[tuple[int, int]] = []
    if rows:
        chunk_rows = sealed["chunk_rows"]
        where = f"{rel}: sealed arrays"
        _check_array_meta(
            group, f"{rel}/features", report, where, shape=(rows, group.dim),
            chunks=(chunk_rows[0], group.dim) if chunk_rows else None,
            data_type=group.spec["dtype"], raw_bytes=True,
        )  # fmt: skip
        if any(r != chunk_rows[0] for r in chunk_rows[:-1]) or chunk_rows[-1] > chunk_rows[0]:
            report.errors.append(f"{where}: {SEALED} records uneven chunk rows {chunk_rows[:5]!r}")
        _check_array_meta(
            group, f"{rel}/sample_id", report, where, shape=(rows,), chunks=None,
            data_type="string", raw_bytes=False,
        )  # fmt: skip
        ids, dups = _sealed_ids(group, report, stack)
    segs = group.segments() if rows else []
    if ids is not None:
        if len(ids) != rows:
            report.errors.append(
                f"{rel}: sealed sample_id array has {len(ids)} ids but {SEALED} records {rows} "
                "rows; rows were deleted or added after sealing"
            )
        if not _ids_sorted(ids):
            report.errors.append(
                f"{rel}: sealed sample ids are not sorted; the arrays were rewritten"
            )
        start = 0
        for seg in segs:
            count = max(0, min(seg.rows, len(ids) - start))
            unit = _Unit(f"sealed chunk {seg.index}", seg, None, SEALED, ids, start, count)
            _check_unit(group, unit, report, check_hashes)
            report.rows += seg.rows
            start += seg.rows
    if manifest is None:
        return
    if ids is None:  # unreadable ids: every committed entry lacks its row
        ids = memory_ids(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))[0]
    starts = np.cumsum([0] + [seg.rows for seg in segs])[:-1]
    try:
        _check_sealed_ids(group, ids, dups, manifest, starts, report)
    except (OSError, ValueError, pa.ArrowException) as exc:  # a row group unreadable midway
        report.errors.append(f"{rel}: sealed manifest {MANIFEST} is missing or unreadable ({exc})")


def _open_sealed_manifest(
    group: FeatureGroup, report: VerifyReport, stack: contextlib.ExitStack
) -> pq.ParquetFile | None:
    """The sealed manifest, opened for streaming (an object store's is copied to a temporary
    file first); None, with the error reported, when it is missing or unreadable."""
    fs, rel = group.fs, f"{group.rel}/{MANIFEST}"
    try:
        if fs.is_local:
            if not os.path.isfile(fs.local_path(rel)):
                raise FileNotFoundError(fs.path(rel))
            path = fs.local_path(rel)
        else:
            path = os.path.join(_tempdir(stack), MANIFEST)
            fs.copy_to_local(rel, path, sha256=fs.recorded_sha256(rel))
        return stack.enter_context(pq.ParquetFile(path))
    except (OSError, ValueError, StoreError, pa.ArrowException) as exc:
        report.errors.append(
            f"{group.rel}: sealed manifest {MANIFEST} is missing or unreadable ({exc})"
        )
        return None


def _tempdir(stack: contextlib.ExitStack) -> str:
    return stack.enter_context(tempfile.TemporaryDirectory(prefix="cusa-verify-"))


def _sealed_ids(
    group: FeatureGroup, report: VerifyReport, stack: contextlib.ExitStack
) -> tuple[SealedIds | None, list[tuple[int, int]]]:
    """``(ids, duplicates)``: the sealed ids with an index over them, and the row pairs of
    duplicate ids; ``(None, [])`` when the sealed ``sample_id`` array is unreadable.

    Checks the index file on the way: it must hold exactly the sealed ids (the ``sample_id``
    chunk compared with its bytes as it streams) and be consistent
    (:func:`cusa.store.reindex.index_problems`). A sound file is the reference itself; otherwise
    the ids are indexed in memory.
    """
    fs, rel = group.fs, group.rel
    fix = "run `cusa store reindex --force` to rebuild it"
    mapped: SealedIds | None = None
    if not fs.exists(f"{rel}/{ID_INDEX}"):
        report.warnings.append(
            f"{rel}: no {ID_INDEX} (sealed by an older cusa): every lookup reads all its ids "
            "when it opens; `cusa store reindex` writes the index"
        )
    else:
        try:
            if fs.is_local:
                path = fs.local_path(f"{rel}/{ID_INDEX}")
            else:  # an object store: the index is checked from a local copy, removed after
                path = os.path.join(_tempdir(stack), ID_INDEX)
                fs.copy_to_local(
                    f"{rel}/{ID_INDEX}", path, sha256=fs.recorded_sha256(f"{rel}/{ID_INDEX}")
                )
            mapped = open_mapped_ids(group, path)
        except (StoreError, OSError) as exc:
            report.errors.append(f"{rel}: {ID_INDEX} is unusable ({exc}); {fix}")
    mismatch = f"{rel}: {ID_INDEX} does not match the sealed ids: {{}}; {fix}"
    if mapped is not None and chunk_matches(group, mapped):
        problem, dups = index_problems(mapped)
        if problem is None:
            return mapped, dups
        report.errors.append(mismatch.format(problem))
        return memory_ids(np.asarray(mapped.offsets), np.asarray(mapped.blob))
    # No usable index, or a sample_id chunk that is not its bytes: read the ids with zarr.
    try:
        offsets, blob = arrow_buffers(read_sealed_id_array(group))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        report.errors.append(f"{rel}: sealed sample_id array is missing or unreadable ({exc})")
        return None, []
    if mapped is not None:
        if np.array_equal(mapped.offsets, offsets) and np.array_equal(mapped.blob, blob):
            problem, dups = index_problems(mapped)  # the same ids, in another zarr encoding
            if problem is None:
                return mapped, dups
            report.errors.append(mismatch.format(problem))
        else:
            report.errors.append(
                mismatch.format("its id bytes differ from the sealed sample_id array")
            )
    return memory_ids(offsets, blob)


def _ids_sorted(ids: SealedIds) -> bool:
    """Whether the ids are in ascending (UTF-8 byte, i.e. code point) order, block by block."""
    prev: bytes | None = None
    for lo, hi in ids.bounds():
        block = ids.binary(lo, hi)
        if hi - lo > 1 and pc.any(pc.less(block.slice(1), block.slice(0, hi - lo - 1))).as_py():
            return False
        first = ids.id_bytes(lo)
        if prev is not None and first < prev:
            return False
        prev = ids.id_bytes(hi - 1)
        ids.release()
    return True


def _check_orphans(
    group: FeatureGroup, records: list[dict[str, Any]], report: VerifyReport
) -> None:
    referenced = {r["part"] for r in records}
    for name in group.fs.ls(f"{group.rel}/parts"):
        if name not in referenced:
            report.warnings.append(
                f"{group.rel}: orphaned uncommitted part parts/{name} (a crashed or losing "
                "writer left it; readers never see it and the next seal removes it)"
            )


# -- chunk files ---------------------------------------------------------------------------------


def _check_unit(group: FeatureGroup, unit: _Unit, report: VerifyReport, check_hashes: bool) -> None:
    fs, rel, seg = group.fs, group.rel, unit.segment
    where = f"{rel}: {unit.label}"
    if unit.n_ids != seg.rows:
        report.errors.append(
            f"{where}: {unit.n_ids} sample ids for {seg.rows} feature rows recorded in {unit.record}"
        )
    expected = seg.rows * group.dim * group.dtype.itemsize
    try:
        size = fs.size(seg.rel)
    except FileNotFoundError:
        report.errors.append(f"{where}: chunk file {fs.path(seg.rel)!r} is missing")
        return
    if size != expected:
        report.errors.append(
            f"{where}: chunk file {fs.path(seg.rel)!r} is truncated or corrupt: {size} bytes, "
            f"expected {expected} ({seg.rows} rows x {group.dim} x {group.dtype}); samples "
            f"{_preview(map(unit.name, range(min(unit.n_ids, _PREVIEW))), unit.n_ids)} are "
            "unreadable — re-extract the shard"
        )
        return
    # rows named by id only for the messages' previews, and only when each row has its id
    name = unit.name if unit.n_ids == seg.rows else (lambda i: f"row {i}")
    nonfinite = _Tally()  # rows
    off_norm = _Tally()  # (row, norm)
    normalized = bool(group.spec.get("normalized", False))
    tol = NORM_TOLERANCE.get(group.dtype.name, 1e-3)
    row_bytes = group.dim * group.dtype.itemsize
    block_rows = max(1, _BLOCK_BYTES // (group.dim * 4))
    digest = hashlib.sha256() if check_hashes else None
    scales = None
    if group.spec["dtype"] == "int8":  # int8 rows decode with their scales (cusa.store.quant)
        scales, problem = unit_scales(group, seg.index)
        if problem:
            report.errors.append(f"{where}: {problem}")
            return
    with fs.open_read(seg.rel) as fh:  # streamed: never the whole chunk in memory
        for start in range(0, seg.rows, block_rows):
            n = min(block_rows, seg.rows - start)
            raw = fh.read(n * row_bytes)
            if len(raw) != n * row_bytes:
                report.errors.append(
                    f"{where}: chunk file {fs.path(seg.rel)!r} ended after {start * row_bytes + len(raw)} "
                    f"of {expected} bytes while it was read; it is truncated — re-extract the shard"
                )
                return
            if digest is not None:
                digest.update(raw)
            block = np.frombuffer(raw, dtype=group.dtype).reshape(n, group.dim).astype(np.float32)
            if scales is not None:
                block *= scales[start : start + n, None]
            finite = np.isfinite(block).all(axis=1)  # (b,)
            bad = np.flatnonzero(~finite)
            nonfinite.add((bad[:_PREVIEW] + start).tolist(), len(bad))
            if normalized:
                with np.errstate(all="ignore"):  # rows with NaN/inf are reported above
                    norms = np.linalg.norm(block, axis=1)
                bad = np.flatnonzero(finite & (np.abs(norms - 1.0) > tol))
                off_norm.add([(start + i, float(norms[i])) for i in bad[:_PREVIEW]], len(bad))
            del raw, block
    if digest is not None and digest.hexdigest() != seg.sha256:
        report.errors.append(
            f"{where}: chunk file {fs.path(seg.rel)!r} does not match the SHA-256 recorded in "
            f"{unit.record}; its bytes changed after the commit"
        )
    if nonfinite.count:
        report.errors.append(
            f"{where}: NaN/inf features for {nonfinite.count} sample(s): "
            f"{_preview(map(name, nonfinite.first), nonfinite.count)}"
        )
    if off_norm.count:
        shown = ", ".join(f"{name(i)!r} (norm {n:.4f})" for i, n in off_norm.first)
        more = f" and {off_norm.count - _PREVIEW} more" if off_norm.count > _PREVIEW else ""
        report.errors.append(
            f"{where}: the spec says features are L2-normalised but {off_norm.count} sample(s) have "
            f"norms off 1 by more than {tol}: {shown}{more}"
        )


# -- ids -----------------------------------------------------------------------------------------


def _check_ids(
    group: FeatureGroup, units: list[_Unit], manifest: list[dict[str, Any]], report: VerifyReport
) -> None:
    rel = group.rel
    # Where each id has a feature row: (unit label, row within the chunk file's id list).
    located: dict[str, str] = {}
    dups: dict[tuple[str, str], list[str]] = {}
    for unit in units:
        for sid in unit.ids:
            if sid in located:
                dups.setdefault((located[sid], unit.label), []).append(sid)
            else:
                located[sid] = unit.label
    for (first, second), ids in sorted(dups.items()):
        place = first if first == second else f"{first} and {second}"
        report.errors.append(f"{rel}: duplicate sample id(s) {_preview(ids)} in {place}")

    ok_entries: dict[str, dict[str, Any]] = {}
    failed_dups = []
    for m in manifest:
        if m["status"] == "ok":
            if m["sample_id"] in ok_entries:
                continue  # already reported through the feature rows above
            ok_entries[m["sample_id"]] = m
        elif m["sample_id"] in located:
            failed_dups.append(m["sample_id"])
    if failed_dups:
        report.warnings.append(
            f"{rel}: sample(s) {_preview(failed_dups)} are recorded as failed in one shard and "
            "have features from another"
        )
    missing = [sid for sid in ok_entries if sid not in located]
    by_shard: dict[str, list[str]] = {}
    for sid in missing:
        by_shard.setdefault(ok_entries[sid]["shard"], []).append(sid)
    for shard, ids in sorted(by_shard.items()):
        report.errors.append(
            f"{rel}: shard {shard!r}: {len(ids)} sample(s) listed in the manifest as committed "
            f"have no feature row: {_preview(ids)}"
        )
    extra = [sid for sid in located if sid not in ok_entries]
    by_unit: dict[str, list[str]] = {}
    for sid in extra:
        by_unit.setdefault(located[sid], []).append(sid)
    for label, ids in sorted(by_unit.items()):
        report.errors.append(
            f"{rel}: {label}: {len(ids)} sample(s) have feature rows but are not in the "
            f"manifest: {_preview(ids)}"
        )
    # Rows recorded in the manifest must point at the id's own row.
    positions: dict[str, int] = {}
    if report.sealed:
        offset = 0
        for unit in units:
            for i, sid in enumerate(unit.ids):
                positions.setdefault(sid, offset + i)
            offset += unit.segment.rows
    else:
        for unit in units:
            for i, sid in enumerate(unit.ids):
                positions.setdefault(sid, i)
    wrong = [
        sid for sid, m in ok_entries.items() if sid in positions and m["row"] != positions[sid]
    ]
    if wrong:
        report.errors.append(
            f"{rel}: {len(wrong)} manifest entr(ies) point at the wrong row: {_preview(wrong)}"
        )


def _block() -> int:
    """Ids per block of the streamed passes (read at each use, so tests can make it small)."""
    return reindex.VERIFY_BLOCK_IDS


def _check_sealed_ids(
    group: FeatureGroup,
    ids: SealedIds,
    dups: list[tuple[int, int]],
    manifest: pq.ParquetFile,
    starts: np.ndarray,
    report: VerifyReport,
) -> None:
    """The ids checks of :func:`_check_ids` for a sealed group, streamed: the manifest a row
    group at a time, each ``ok`` entry compared with the id of the row it names (vectorised);
    entries that do not match are looked up in the index. Memory: one byte per sealed row (the
    rows the manifest names), a block, and the failed entries (the ledger).

    ``starts``: the first row of each sealed chunk (to name the chunk of a row).
    """
    rel, n = group.rel, len(ids)

    def label(row: int) -> str:
        return f"sealed chunk {max(0, int(np.searchsorted(starts, row, side='right')) - 1)}"

    by_place: dict[tuple[str, str], _Tally] = {}
    for first, second in dups:
        by_place.setdefault((label(first), label(second)), _Tally()).add([ids.id_at(second)])
    for (first, second), tally in sorted(by_place.items()):
        place = first if first == second else f"{first} and {second}"
        report.errors.append(f"{rel}: duplicate sample id(s) {tally.preview()} in {place}")

    seen = np.zeros(n, dtype=bool)
    missing: dict[str, _Tally] = {}
    wrong, failed_dups = _Tally(), _Tally()
    failed: list[dict[str, Any]] = []
    columns = ["sample_id", "row", "shard", "status", "error"]
    for batch in _manifest_batches(manifest, columns):
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
        ok = ok.to_numpy(zero_copy_only=False)
        bad_status = np.flatnonzero(~ok)
        if len(bad_status):  # the ledger; failed ids that have a feature row get a warning
            entries = batch.take(pa.array(bad_status)).select(["sample_id", "shard", "error"])
            entries = entries.to_pylist()
            failed += entries
            _, found = ids.index.lookup([str(e["sample_id"]) for e in entries])
            failed_dups.add(
                [e["sample_id"] for e, f in zip(entries, found.tolist(), strict=True) if f]
            )
        at = np.flatnonzero(ok)
        if len(at):
            sample_ids = batch.column("sample_id").take(pa.array(at))
            rows = pc.fill_null(batch.column("row").take(pa.array(at)), -1)
            rows = rows.to_numpy(zero_copy_only=False).astype(np.int64)
            same = _same_ids(ids, sample_ids, rows)
            seen[rows[same]] = True
            other = np.flatnonzero(~same)
            if len(other):  # not the id of the row it names: where is it, if anywhere?
                names = sample_ids.take(pa.array(other)).to_pylist()
                shards = batch.column("shard").take(pa.array(at[other])).to_pylist()
                found_rows, found = ids.index.lookup([str(s) for s in names])
                for sid, shard, row, hit in zip(
                    names, shards, found_rows.tolist(), found.tolist(), strict=True
                ):
                    if hit:
                        seen[row] = True
                        wrong.add([sid])
                    else:
                        missing.setdefault(shard, _Tally()).add([sid])
        # the batch holds its row group: let go of it before the next group is read
        del batch
        ids.release()

    if failed_dups.count:
        report.warnings.append(
            f"{rel}: sample(s) {failed_dups.preview()} are recorded as failed in one shard and "
            "have features from another"
        )
    for shard, tally in sorted(missing.items(), key=lambda kv: str(kv[0])):
        report.errors.append(
            f"{rel}: shard {shard!r}: {tally.count} sample(s) listed in the manifest as committed "
            f"have no feature row: {tally.preview()}"
        )
    for i, lo in enumerate(starts.tolist()):
        hi = int(starts[i + 1]) if i + 1 < len(starts) else n  # the last chunk: any extra ids
        unseen = _Tally()
        for b0 in range(min(lo, n), min(hi, n), _block()):
            gap = np.flatnonzero(~seen[b0 : min(hi, b0 + _block())])
            unseen.add([ids.id_at(b0 + int(r)) for r in gap[:_PREVIEW]], len(gap))
            ids.release()
        if unseen.count:
            report.errors.append(
                f"{rel}: sealed chunk {i}: {unseen.count} sample(s) have feature rows but are "
                f"not in the manifest: {unseen.preview()}"
            )
    if wrong.count:
        report.errors.append(
            f"{rel}: {wrong.count} manifest entr(ies) point at the wrong row: {wrong.preview()}"
        )
    report.failed = [
        {"sample_id": e["sample_id"], "shard": e["shard"], "error": e["error"]} for e in failed
    ]


def _manifest_batches(manifest: pq.ParquetFile, columns: list[str]) -> Iterable[pa.RecordBatch]:
    """The manifest's rows, a row group at a time (sealing writes groups of 1M rows), in
    batches of a block. ``ParquetFile.iter_batches`` was not used: its memory grew with every
    row group it read (pyarrow 26: +15 MiB per group of 1M rows), this stays flat."""
    for i in range(manifest.num_row_groups):
        table = manifest.read_row_group(i, columns=columns, use_threads=False)
        yield from table.to_batches(max_chunksize=_block())
        del table


def _same_ids(ids: SealedIds, sample_ids: pa.Array, rows: np.ndarray) -> np.ndarray:
    """(k,) whether ``sample_ids[k]`` is the id of row ``rows[k]``: byte comparisons, vectorised."""
    same = np.zeros(len(rows), dtype=bool)
    q_off, q_blob = arrow_buffers(sample_ids)
    valid = sample_ids.is_valid().to_numpy(zero_copy_only=False)
    sel = np.flatnonzero(valid & (rows >= 0) & (rows < len(ids)))
    if not len(sel):
        return same
    r = rows[sel]
    r_start = ids.offsets[r]
    length = q_off[sel + 1] - q_off[sel]
    keep = (ids.offsets[r + 1] - r_start) == length
    sel, r_start, length = sel[keep], r_start[keep], length[keep]
    total = int(length.sum())
    if total:
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
        stored = ids.blob[np.repeat(r_start, length) + within]
        asked = q_blob[np.repeat(q_off[sel], length) + within]
        owner = np.repeat(np.arange(len(sel)), length)
        differs = np.zeros(len(sel), dtype=bool)
        differs[owner[stored != asked]] = True
        sel = sel[~differs]
    same[sel] = True
    return same
