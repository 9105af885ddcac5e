"""verify of a sealed group, streamed block by block: every kind of damage is still reported.

Blocks are forced to a few ids (``reindex.VERIFY_BLOCK_IDS``) so that every pass crosses block
boundaries; the damage is placed at a boundary where it matters.
"""

from __future__ import annotations

import io
import json
import os
import re

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from store_helpers import fill_group, toy_spec, unit_rows

from cusa.store import reindex
from cusa.store.id_index import MAGIC, read_index_header
from cusa.store.layout import ID_INDEX
from cusa.store.reindex import reindex_group
from cusa.store.verify import verify_group

BLOCK = 3  # ids per block in these tests


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(reindex, "VERIFY_BLOCK_IDS", BLOCK)


@pytest.fixture
def sealed(store):
    """Five shards of seven ids (every third failed), sealed: 25 rows, 10 failures."""
    group = store.group("coco", "train", toy_spec(), create=True)
    filled = fill_group(group, shards=5, rows=7, fail_every=3)
    group.seal()
    return filled


def _sealed_ids(group) -> list[str]:
    import zarr

    arr = zarr.open_array(store=group.fs.zarr_store(f"{group.rel}/sample_id"), mode="r")
    return [str(x) for x in arr[:]]


def _text(report) -> str:
    return "\n".join(report.errors)


# -- the manifest ----------------------------------------------------------------------------------


def _edit_manifest(group, edit) -> None:
    rel = f"{group.rel}/manifest.parquet"
    table = pq.read_table(io.BytesIO(group.fs.read_bytes(rel)))
    buf = io.BytesIO()
    pq.write_table(edit(table), buf, row_group_size=4)  # several row groups
    group.fs.write_bytes_atomic(rel, buf.getvalue())


def test_clean_sealed_group_at_every_block_size(sealed, monkeypatch):
    reports = []
    for block in (1, 2, 3, 7, 1000):
        monkeypatch.setattr(reindex, "VERIFY_BLOCK_IDS", block)
        report = verify_group(sealed.group)
        assert report.ok and not report.warnings, (block, report.summary())
        reports.append(report.to_dict())
    assert all(r == reports[0] for r in reports)
    assert reports[0]["rows"] == len(sealed.expected) == 25
    assert {f["sample_id"]: f["error"] for f in reports[0]["failed"]} == sealed.failures


def test_manifest_row_pointing_at_another_row(sealed):
    ids = _sealed_ids(sealed.group)
    victim = ids[BLOCK]  # the first id of the second block

    def edit(t):
        rows = [
            r + 5 if s == victim else r
            for s, r in zip(t["sample_id"].to_pylist(), t["row"].to_pylist(), strict=True)
        ]
        return t.set_column(t.schema.get_field_index("row"), "row", pa.array(rows, pa.int64()))

    _edit_manifest(sealed.group, edit)
    report = verify_group(sealed.group)
    assert report.errors == [
        f"{sealed.group.rel}: 1 manifest entr(ies) point at the wrong row: {victim!r}"
    ]


def test_manifest_row_dropped(sealed):
    ids = _sealed_ids(sealed.group)
    victims = [ids[BLOCK - 1], ids[-1]]  # the end of a block, and the last row
    _edit_manifest(
        sealed.group,
        lambda t: t.filter(pc.invert(pc.is_in(t["sample_id"], pa.array(victims)))),
    )
    report = verify_group(sealed.group)
    assert report.errors == [
        f"{sealed.group.rel}: sealed chunk 0: 2 sample(s) have feature rows but are not in the "
        f"manifest: {victims[0]!r}, {victims[1]!r}"
    ]


def test_manifest_row_for_an_unknown_id(sealed):
    def edit(t):
        extra = pa.table(
            {"sample_id": ["zz-unknown", "s003_001x"], "row": [2, 400], "shard": ["shard-009"] * 2,
             "status": ["ok"] * 2, "error": pa.nulls(2, pa.string())},
        ).cast(t.schema)  # fmt: skip
        return pa.concat_tables([t, extra])

    _edit_manifest(sealed.group, edit)
    report = verify_group(sealed.group)
    assert report.errors == [
        f"{sealed.group.rel}: shard 'shard-009': 2 sample(s) listed in the manifest as committed "
        "have no feature row: 'zz-unknown', 's003_001x'"
    ]


def test_failed_entry_whose_id_has_features(sealed):
    victim = _sealed_ids(sealed.group)[7]

    def edit(t):
        extra = pa.table(
            {"sample_id": [victim], "row": [-1], "shard": ["shard-004"], "status": ["failed"],
             "error": ["decode error"]},
        ).cast(t.schema)  # fmt: skip
        return pa.concat_tables([t, extra])

    _edit_manifest(sealed.group, edit)
    report = verify_group(sealed.group)
    assert report.ok
    assert report.warnings == [
        f"{sealed.group.rel}: sample(s) {victim!r} are recorded as failed in one shard and have "
        "features from another"
    ]
    assert {"sample_id": victim, "shard": "shard-004", "error": "decode error"} in report.failed


def test_many_missing_rows_are_counted_and_previewed(sealed):
    _edit_manifest(sealed.group, lambda t: t.filter(pc.not_equal(t["status"], "ok")))
    report = verify_group(sealed.group)
    (msg,) = report.errors
    ids = _sealed_ids(sealed.group)
    assert msg.startswith(f"{sealed.group.rel}: sealed chunk 0: 25 sample(s) have feature rows")
    assert msg.endswith(", ".join(map(repr, ids[:5])) + " and 20 more")


# -- the sealed sample_id chunk ---------------------------------------------------------------------


def _rewrite_chunk(group, ids: list[str], *, keep_index_header: bool = True) -> None:
    """Write the sealed sample_id chunk holding ``ids`` (vlen-utf8 + zstd, as zarr does); with
    ``keep_index_header`` the index's header is updated to the new chunk size, so that the index
    is not refused on its size and only its bytes can tell."""
    parts = [len(ids).to_bytes(4, "little")]
    for i in ids:
        b = i.encode()
        parts += [len(b).to_bytes(4, "little"), b]
    meta = group.fs.read_json(f"{group.rel}/sample_id/zarr.json")
    level = meta["codecs"][1]["configuration"]["level"]
    data = numcodecs.Zstd(level=level).encode(b"".join(parts))
    group.fs.write_bytes_atomic(f"{group.rel}/sample_id/c/0", bytes(data))
    if keep_index_header:
        _edit_index_header(group, sample_id_chunk_bytes=len(data))


def _edit_index_header(group, **fields) -> None:
    path = group.fs.local_path(f"{group.rel}/{ID_INDEX}")
    header, start = read_index_header(path)
    header.update(fields)
    head = json.dumps(header, sort_keys=True).encode()
    raw = MAGIC + len(head).to_bytes(8, "little") + head
    assert len(raw) <= start  # the arrays stay where they are
    with open(path, "r+b") as fh:
        fh.write(raw + bytes(start - len(raw)))


def test_sample_id_chunk_with_a_changed_id(sealed):
    group = sealed.group
    path = group.fs.local_path(f"{group.rel}/{ID_INDEX}")
    assert reindex.chunk_matches(group, reindex.open_mapped_ids(group, path)) is True
    ids = _sealed_ids(group)
    old = ids[BLOCK]
    ids[BLOCK] = old + "a"  # still sorted
    assert ids == sorted(ids)
    _rewrite_chunk(group, ids)
    # the index's header still fits the chunk: only its bytes, compared as it streams, differ
    assert reindex.chunk_matches(group, reindex.open_mapped_ids(group, path)) is False
    report = verify_group(group)
    text = _text(report)
    rel = sealed.group.rel
    assert f"{rel}: {ID_INDEX} does not match the sealed ids: its id bytes differ" in text
    assert f"have no feature row: {old!r}" in text
    assert (
        f"sealed chunk 0: 1 sample(s) have feature rows but are not in the manifest: {ids[BLOCK]!r}"
        in text
    )
    assert len(report.errors) == 3, report.errors


def test_sample_id_chunk_rewritten_stale_index(sealed):
    """A chunk of another size: the index is refused on its header, the ids come from zarr."""
    ids = _sealed_ids(sealed.group)
    old = ids[4]
    ids[4] = old + "-longer"
    _rewrite_chunk(sealed.group, ids, keep_index_header=False)
    report = verify_group(sealed.group)
    text = _text(report)
    assert f"{ID_INDEX} is unusable" in text and "reindex" in text
    assert f"have no feature row: {old!r}" in text
    assert f"not in the manifest: {ids[4]!r}" in text


def test_unsorted_ids_across_a_block_boundary(sealed):
    ids = _sealed_ids(sealed.group)
    ids[BLOCK - 1], ids[BLOCK] = ids[BLOCK], ids[BLOCK - 1]
    _rewrite_chunk(sealed.group, ids, keep_index_header=False)
    assert reindex_group(sealed.group, force=True) == "written"  # an index of the unsorted ids
    report = verify_group(sealed.group)
    rel = sealed.group.rel
    assert f"{rel}: sealed sample ids are not sorted; the arrays were rewritten" in report.errors
    wrong = next(e for e in report.errors if "point at the wrong row" in e)
    assert wrong.startswith(f"{rel}: 2 manifest entr(ies)") and repr(ids[BLOCK]) in wrong
    assert not any(ID_INDEX in e for e in report.errors), report.errors
    assert len(report.errors) == 2, report.errors


def test_unsorted_ids_within_a_block(sealed):
    ids = _sealed_ids(sealed.group)
    ids[BLOCK], ids[BLOCK + 1] = ids[BLOCK + 1], ids[BLOCK]
    _rewrite_chunk(sealed.group, ids, keep_index_header=False)
    reindex_group(sealed.group, force=True)
    report = verify_group(sealed.group)
    assert any("sealed sample ids are not sorted" in e for e in report.errors), report.errors


def test_duplicate_id_without_an_index(sealed):
    """A group without an index file (sealed by an older cusa) is indexed in memory; a duplicate
    id is named, even where the ids are not sorted."""
    group = sealed.group
    ids = _sealed_ids(group)
    dup = ids[2]
    ids[BLOCK * 2] = dup  # far from its twin, across blocks
    _rewrite_chunk(group, ids, keep_index_header=False)
    os.unlink(group.fs.local_path(f"{group.rel}/{ID_INDEX}"))
    report = verify_group(group)
    assert f"{group.rel}: duplicate sample id(s) {dup!r} in sealed chunk 0" in report.errors
    assert any("not sorted" in e for e in report.errors)
    assert any(f"no {ID_INDEX} (sealed by an older cusa)" in w for w in report.warnings)


def test_no_index_file_clean_group_is_ok_with_a_warning(sealed):
    os.unlink(sealed.group.fs.local_path(f"{sealed.group.rel}/{ID_INDEX}"))
    report = verify_group(sealed.group)
    assert report.ok and len(report.warnings) == 1 and ID_INDEX in report.warnings[0]


# -- the index file --------------------------------------------------------------------------------


def _index_arrays(group):
    """Writable maps of the index file's ``hashes``, ``rows`` and ``buckets``."""
    path = group.fs.local_path(f"{group.rel}/{ID_INDEX}")
    header, start = read_index_header(path)
    out = {}
    for name in ("hashes", "rows", "buckets"):
        spec = header["arrays"][name]
        out[name] = np.memmap(
            path, dtype=spec["dtype"], mode="r+", offset=start + spec["offset"],
            shape=tuple(spec["shape"]),
        )  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("row twice", "its rows are not each row once"),
        ("row out of range", "its rows are not each row once"),
        ("rows swapped", "a hash is not the hash of its row's id"),
        ("hash changed", "a hash is not the hash of its row's id"),
        ("entries swapped", "its hashes are not sorted"),
        ("bucket moved", "its bucket table does not match its hashes"),
    ],
)
def test_index_file_with_altered_rows_or_hashes(sealed, damage, problem):
    group = sealed.group
    a = _index_arrays(group)
    h, r = a["hashes"], a["rows"]
    k = BLOCK - 1  # entries k and k+1 sit on both sides of a block boundary
    if damage == "row twice":
        r[k + 1] = r[k]
    elif damage == "row out of range":
        r[k] = len(r)
    elif damage == "rows swapped":
        r[k], r[k + 1] = r[k + 1], r[k]
    elif damage == "hash changed":
        h[k] = (int(h[k]) + int(h[k + 1])) // 2  # still sorted, but not its id's hash
    elif damage == "entries swapped":
        h[k], h[k + 1] = h[k + 1], h[k]
        r[k], r[k + 1] = r[k + 1], r[k]
    else:
        b = a["buckets"]
        i = int(np.flatnonzero(b[1:-1] > 0)[0]) + 1  # an interior bucket that starts after 0
        b[i] -= 1  # its first hash now sits in the bucket before
    for arr in a.values():
        arr.flush()
    del a, h, r
    report = verify_group(group)
    assert report.errors == [
        f"{group.rel}: {ID_INDEX} does not match the sealed ids: {problem}; run `cusa store "
        "reindex --force` to rebuild it"
    ]  # the ids themselves are checked against an index built in memory: nothing else is wrong
    assert reindex_group(group, force=True) == "written"
    assert verify_group(group).ok


# -- the feature chunks name rows by the index's ids -------------------------------------------


def test_sealed_norm_previews_name_the_ids(store):
    group = store.group("coco", "train", toy_spec(), create=True)
    rng = np.random.default_rng(0)
    ids = [f"id{i:02d}" for i in range(12)]
    feats = unit_rows(rng, 12)
    feats[[2, 5, 6, 7, 8, 9, 10]] *= 1.5  # seven off-norm rows, across blocks
    group.write_shard("s0", ids, feats)
    group.seal()
    text = _text(verify_group(group))
    assert re.search(
        r"sealed chunk 0: the spec says features are L2-normalised but 7 sample\(s\) have norms "
        r"off 1 by more than 0\.01: 'id02' \(norm 1\.[45]\d+\), 'id05' .* and 2 more",
        text,
    ), text


def test_sealed_group_on_an_object_store(s3_store_url, tmp_path):
    """The index and the manifest are copied to temporary local files, the sample_id chunk is
    streamed from the bucket."""
    from cusa.store import FeatureStore

    url, opts = s3_store_url
    store = FeatureStore.open(url, storage_options=opts, create=True)
    group = store.group("coco", "train", toy_spec(), create=True)
    filled = fill_group(group, shards=3, rows=5, fail_every=3)
    group.seal()
    local = str(tmp_path / ID_INDEX)
    group.fs.copy_to_local(f"{group.rel}/{ID_INDEX}", local)
    assert reindex.chunk_matches(group, reindex.open_mapped_ids(group, local)) is True
    report = verify_group(group)
    assert report.ok and not report.warnings, report.summary()
    assert report.rows == len(filled.expected)
    victim = sorted(filled.expected)[BLOCK]
    _edit_manifest(group, lambda t: t.filter(pc.not_equal(t["sample_id"], victim)))
    assert verify_group(group).errors == [
        f"{group.rel}: sealed chunk 0: 1 sample(s) have feature rows but are not in the "
        f"manifest: {victim!r}"
    ]
