"""``info``: what a store holds, read from its records only (no feature bytes are read)."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import StoreError
from .feature_store import FeatureStore, default_dtype_group
from .group import FeatureGroup
from .integrity import check_group
from .layout import LAYOUT_VERSION, MARKER

log = logging.getLogger(__name__)


def group_info(group: FeatureGroup) -> dict[str, Any]:
    """One group's summary: teacher, fingerprint, N, dim, dtype, spec, sizes and counts.

    ``rows`` counts committed feature rows (the sealed arrays once sealed); ``failed`` counts
    ledger entries, i.e. samples that produced no features.
    """
    check_group(group)  # a group readers would refuse is BROKEN here too
    records = group.commit_records()
    sealed = group.sealed
    if sealed:
        rows, failed = int(sealed["rows"]), int(sealed["failed"])
    else:
        rows = sum(int(r["rows"]) for r in records)
        failed = sum(int(r.get("failed", 0)) for r in records)
    spec = group.spec
    return {
        "path": group.rel,
        "url": group.url,
        "dataset": group.dataset,
        "split": group.split,
        "teacher": spec["name"],
        "modality": spec.get("modality"),
        "fingerprint": group.fingerprint,
        "rows": rows,
        "dim": group.dim,
        "dtype": spec["dtype"],
        "normalized": bool(spec.get("normalized", False)),
        "committed_shards": len(records),
        "failed": failed,
        "sealed": sealed is not None,
        "sealed_at": sealed.get("sealed") if sealed else None,
        "size_bytes": group.nbytes_on_disk(),
        "manifest_hash": group.attrs.get("manifest_hash"),
        "created": group.attrs.get("created"),
        "spec": spec,
    }


def store_info(store: FeatureStore) -> dict[str, Any]:
    """Summary of every group in ``store``; broken groups are listed apart with the reason.

    Returns:
        ``{"store": url, "layout_version": int, "groups": [group_info(...), ...],
        "broken": [{"path", "url", "error"}, ...]}``.
    """
    marker = store.fs.read_json(MARKER)
    good, broken = store.scan()
    groups, bad = [], [{"path": b.rel, "url": b.url, "error": b.error} for b in broken]
    for g in good:
        try:
            groups.append(group_info(g))
        except StoreError as exc:  # a malformed seal or commit record: report, keep the rest
            bad.append({"path": g.rel, "url": g.url, "error": str(exc)})
    return {
        "store": store.url,
        "layout_version": int(marker.get("layout_version", LAYOUT_VERSION)),
        "created": marker.get("created"),
        "groups": groups,
        "broken": sorted(bad, key=lambda b: b["path"]),
    }


def resolve_group(
    store: FeatureStore,
    teacher: str,
    dataset: str | None = None,
    split: str | None = None,
    dtype: str | None = None,
) -> FeatureGroup:
    """The one group of ``teacher`` (name, fingerprint, ``name@fp`` or the group's folder name);
    dataset, split and dtype optional.

    Dataset and split may be left out when the teacher has features for only one of each; dtype
    when it is stored in one dtype only.

    Raises:
        StoreError: no group matches, or several do; the message lists the candidates.
    """
    if dataset is not None and split is not None:
        return store.find_group(dataset, split, teacher, dtype=dtype)
    groups = [
        g
        for g in store.groups()
        if g.matches(teacher)
        and dataset in (None, g.dataset)
        and split in (None, g.split)
        and dtype in (None, g.spec["dtype"])
    ]
    exact = [g for g in groups if g.leaf == teacher]  # a folder name names one group per split
    if len(groups) == 1 or len(exact) == 1:
        return (exact or groups)[0]
    default = default_dtype_group(groups) if dtype is None else None
    if default is not None:  # the bare name of a teacher stored in two dtypes: float16
        return default
    if not groups:
        known = sorted({f"{g.label} ({g.dataset}/{g.split})" for g in store.groups()})
        raise StoreError(
            f"store {store.url!r} has no features of teacher {teacher!r}"
            + (f" for dataset {dataset!r}" if dataset else "")
            + (f" split {split!r}" if split else "")
            + (f" in {dtype}" if dtype else "")
            + f"; groups there: {', '.join(known) or '(none)'}"
        )
    where = ", ".join(f"{g.label} ({g.dataset}/{g.split})" for g in groups)
    raise StoreError(
        f"teacher {teacher!r} matches several groups in {store.url!r}: {where}; "
        "pass --dataset and --split, or one of these names as --teacher, to choose one"
    )
