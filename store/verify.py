"""``verify``: check a store's groups against their own records, byte for byte.

What is checked, for every group (see the layout in :mod:`cusa.store.feature_store`):

* the spec in the attributes still hashes to the fingerprint in the group's path (attributes
  edited to another teacher spec are caught), and commit records agree on ``dim``/``dtype``;
* every commit record points at an existing part; parts nobody committed are *warnings*
  (a crashed or losing writer leaves them; they are invisible to readers);
* every chunk file has the size and SHA-256 recorded in its commit or seal record;
* no NaN/inf values, and norms ≈ 1 when the spec says the features are L2-normalised;
* ids: every ``ok`` manifest entry has exactly its feature row, every feature row is in the
  manifest, and no sample id appears twice (within or across shards);
* failed samples (the ledger) are listed with their reasons: they are missing by design.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cusa.store.feature_store import MANIFEST, SEALED, FeatureGroup, FeatureStore, Segment

log = logging.getLogger(__name__)

# |‖x‖ - 1| allowed for normalised features. fp16 keeps 11 significant bits, so each element
# carries a relative rounding error up to 2**-11 and a 768-d norm drifts by ~1e-3 at worst.
NORM_TOLERANCE = {"float16": 1e-2, "float32": 1e-3}
# Rows checked per step, so verifying a large group needs bounded float32 scratch memory.
_BLOCK_ROWS = 65536
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


def _preview(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_PREVIEW])
    return shown + (f" and {len(ids) - _PREVIEW} more" if len(ids) > _PREVIEW else "")


@dataclass
class _Unit:
    """One chunk file with its ids: a committed part (unsealed) or a sealed chunk."""

    label: str  # "shard 'x'" or "sealed chunk 0"
    segment: Segment
    ids: list[str]
    record: str  # where the size/hash were recorded, for messages


def verify_store(store: FeatureStore, *, check_hashes: bool = True) -> list[VerifyReport]:
    """Verify every group of ``store``; see :func:`verify_group`."""
    return [verify_group(g, check_hashes=check_hashes) for g in store.groups()]


def verify_group(group: FeatureGroup, *, check_hashes: bool = True) -> VerifyReport:
    """Check one group against its manifest, commit/seal records and spec.

    Args:
        group: the group to check.
        check_hashes: also compare each chunk file's SHA-256 with its record (reads every byte).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is wrong.
    """
    report = VerifyReport(group=group.rel, url=group.url)
    spec_ok = _check_spec(group, report)
    records = _commit_records(group, report)
    report.committed_shards = len(records)
    try:
        sealed = group.sealed
    except ValueError as exc:
        report.errors.append(f"{group.rel}: {SEALED} is unreadable ({exc}); re-seal the group")
        return report
    report.sealed = sealed is not None
    if not spec_ok:
        return report  # dim/dtype are unknown, so nothing below can be read reliably

    if sealed is not None:
        units, manifest = _sealed_units(group, sealed, records, report)
    else:
        units, manifest = _part_units(group, records, report)
        _check_orphans(group, records, report)

    for unit in units:
        _check_unit(group, unit, report, check_hashes)
        report.rows += unit.segment.rows
    _check_ids(group, units, manifest, report)
    report.failed = [
        {"sample_id": m["sample_id"], "shard": m["shard"], "error": m["error"]}
        for m in manifest
        if m["status"] != "ok"
    ]
    log.info(
        "verified %s: %d error(s), %d warning(s)",
        group.rel,
        len(report.errors),
        len(report.warnings),
    )
    return report


# -- spec ----------------------------------------------------------------------------------------


def _check_spec(group: FeatureGroup, report: VerifyReport) -> bool:
    from cusa.extract.teachers.spec import FINGERPRINT_FIELDS, spec_fingerprint

    attrs, rel = group.attrs, group.rel
    spec = attrs.get("spec")
    if not isinstance(spec, dict):
        report.errors.append(f"{rel}: attributes hold no teacher spec (attributes['cusa']['spec'])")
        return False
    missing = [k for k in (*FINGERPRINT_FIELDS, "name", "dim", "dtype") if k not in spec]
    if missing:
        report.errors.append(f"{rel}: teacher spec in the attributes lacks fields {missing}")
        return False
    path_name, _, path_fp = rel.rsplit("/", 1)[-1].partition("@")
    recomputed = spec_fingerprint(spec)
    if recomputed != path_fp or attrs.get("fingerprint") != path_fp:
        report.errors.append(
            f"{rel}: spec/attrs mismatch: the group's path fingerprint is {path_fp!r} but the "
            f"attributes record fingerprint {attrs.get('fingerprint')!r} and their spec (model "
            f"{spec.get('model')!r}) hashes to {recomputed!r}; the attributes were edited to "
            "another teacher spec — restore them or re-extract the group"
        )
    from cusa.store.feature_store import safe_name

    if safe_name(spec["name"]) != path_name:
        report.errors.append(
            f"{rel}: spec/attrs mismatch: the path names teacher {path_name!r} but the "
            f"attributes name {spec['name']!r}"
        )
    try:
        ok = int(spec["dim"]) > 0 and np.dtype(spec["dtype"]).kind == "f"
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
            rec = fs.read_json(f"{rel}/commits/{name}")
            rec["_file"] = f"commits/{name}"
            for key in ("shard", "part", "rows", "features_sha256"):
                rec[key]  # noqa: B018 -- presence check
        except (ValueError, KeyError, TypeError) as exc:
            report.errors.append(f"{rel}: commit record commits/{name} is unreadable ({exc!r})")
            continue
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
        try:
            ids = group.read_ids(seg)
        except (OSError, ValueError, KeyError) as exc:
            report.errors.append(f"{rel}: shard {shard!r}: sample_id array unreadable ({exc})")
            continue
        units.append(_Unit(f"shard {shard!r}", seg, ids, rec["_file"]))
    return units, manifest


def _sealed_units(
    group: FeatureGroup, sealed: dict[str, Any], records: list[dict[str, Any]], report: VerifyReport
) -> tuple[list[_Unit], list[dict[str, Any]]]:
    import zarr

    fs, rel = group.fs, group.rel
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
    try:
        manifest = _read_manifest(group, f"{rel}/{MANIFEST}")
    except (OSError, ValueError) as exc:
        report.errors.append(f"{rel}: sealed manifest {MANIFEST} is missing or unreadable ({exc})")
        manifest = []
    rows = int(sealed.get("rows", 0))
    if not rows:
        return [], manifest
    try:
        arr = zarr.open_array(store=fs.zarr_store(f"{rel}/sample_id", read_only=True), mode="r")
        all_ids = [str(x) for x in arr[:]]
    except (OSError, ValueError, KeyError) as exc:
        report.errors.append(f"{rel}: sealed sample_id array is missing or unreadable ({exc})")
        return [], manifest
    if len(all_ids) != rows:
        report.errors.append(
            f"{rel}: sealed sample_id array has {len(all_ids)} ids but {SEALED} records {rows} "
            "rows; rows were deleted or added after sealing"
        )
    if all_ids != sorted(all_ids):
        report.errors.append(f"{rel}: sealed sample ids are not sorted; the arrays were rewritten")
    units, start = [], 0
    for seg in group.segments():
        units.append(
            _Unit(f"sealed chunk {seg.index}", seg, all_ids[start : start + seg.rows], SEALED)
        )
        start += seg.rows
    return units, manifest


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
    if len(unit.ids) != seg.rows:
        report.errors.append(
            f"{where}: {len(unit.ids)} sample ids for {seg.rows} feature rows recorded in {unit.record}"
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
            f"{_preview(unit.ids)} are unreadable — re-extract the shard"
        )
        return
    data = fs.read_bytes(seg.rel)
    if check_hashes and hashlib.sha256(data).hexdigest() != seg.sha256:
        report.errors.append(
            f"{where}: chunk file {fs.path(seg.rel)!r} does not match the SHA-256 recorded in "
            f"{unit.record}; its bytes changed after the commit"
        )
    arr = np.frombuffer(data, dtype=group.dtype).reshape(seg.rows, group.dim)
    ids = unit.ids if len(unit.ids) == seg.rows else [f"row {i}" for i in range(seg.rows)]
    nonfinite: list[str] = []
    off_norm: list[tuple[str, float]] = []
    normalized = bool(group.spec.get("normalized", False))
    tol = NORM_TOLERANCE.get(group.dtype.name, 1e-3)
    for start in range(0, seg.rows, _BLOCK_ROWS):
        block = arr[start : start + _BLOCK_ROWS].astype(np.float32)  # (b, D)
        finite = np.isfinite(block).all(axis=1)
        nonfinite += [ids[start + i] for i in np.flatnonzero(~finite)]
        if normalized:
            norms = np.linalg.norm(np.where(np.isfinite(block), block, 0), axis=1)
            bad = np.flatnonzero(finite & (np.abs(norms - 1.0) > tol))
            off_norm += [(ids[start + i], float(norms[i])) for i in bad]
    if nonfinite:
        report.errors.append(
            f"{where}: NaN/inf features for {len(nonfinite)} sample(s): {_preview(nonfinite)}"
        )
    if off_norm:
        shown = ", ".join(f"{i!r} (norm {n:.4f})" for i, n in off_norm[:_PREVIEW])
        more = f" and {len(off_norm) - _PREVIEW} more" if len(off_norm) > _PREVIEW else ""
        report.errors.append(
            f"{where}: the spec says features are L2-normalised but {len(off_norm)} sample(s) have "
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
