"""export: npy + parquet in embedding-reader's parquet_npy layout, joinable by sample id."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cusa.errors import ConfigError, StoreError
from cusa.store import FeatureLookup
from cusa.store.export import EMB_FILE, FAILED_FILE, METADATA_FILE, SPEC_FILE, export_group


@pytest.mark.parametrize("sealed", [False, True])
def test_export_round_trips_by_id(filled, tmp_path, sealed):
    if sealed:
        filled.group.seal()
    out = tmp_path / "export"
    summary = export_group(filled.group, out)
    emb = np.load(out / EMB_FILE, allow_pickle=False)
    meta = pq.read_table(out / METADATA_FILE).to_pylist()
    assert emb.shape == (len(filled.expected), filled.group.dim) and emb.dtype == np.float16
    assert [m["row"] for m in meta] == list(range(len(meta)))
    ids = [m["sample_id"] for m in meta]
    assert ids == sorted(filled.expected)
    for sid, row in zip(ids, emb, strict=True):
        np.testing.assert_array_equal(row.astype(np.float32), filled.expected[sid])
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["spec"] == filled.group.spec and spec["fingerprint"] == filled.group.fingerprint
    assert spec["rows"] == len(ids) and spec["failed"] == len(filled.failures)
    assert spec["sealed"] is sealed and summary["to"] == str(out)
    failed = pq.read_table(out / FAILED_FILE).to_pylist()
    assert {f["sample_id"]: f["error"] for f in failed} == filled.failures
    assert not list(out.rglob("*.partial"))


def test_export_float32_and_overwrite(filled, tmp_path):
    out = tmp_path / "e"
    export_group(filled.group, out)
    with pytest.raises(StoreError, match=r"already holds an export .*overwrite=True"):
        export_group(filled.group, out)
    export_group(filled.group, out, dtype="float32", overwrite=True)
    emb = np.load(out / EMB_FILE, allow_pickle=False)
    assert emb.dtype == np.float32
    lookup = FeatureLookup(filled.group)
    ids = [m["sample_id"] for m in pq.read_table(out / METADATA_FILE).to_pylist()]
    np.testing.assert_array_equal(emb, lookup.gather(ids).astype(np.float32))
    with pytest.raises(ConfigError, match="float16 or float32"):
        export_group(filled.group, tmp_path / "x", dtype="int8")


def test_export_layout_is_embedding_reader_parquet_npy(filled, tmp_path):
    """embedding-reader zips the sorted *.npy of one folder with the sorted *.parquet of another."""
    out = tmp_path / "e"
    export_group(filled.group, out)
    npys = sorted(p.name for p in (out / "emb").iterdir())
    parquets = sorted(p.name for p in (out / "metadata").iterdir())
    assert npys == ["0.npy"] and parquets == ["0.parquet"]
    with open(out / EMB_FILE, "rb") as fh:
        header = np.lib.format.read_magic(fh)
    assert header in ((1, 0), (2, 0), (3, 0))
