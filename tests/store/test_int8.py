"""int8 storage: per-row scale, the documented byte layout, dequantised on gather, verified,
published and read over HTTP like any other group."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from store_helpers import toy_spec
from test_publish import Server
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.publish import publish_store
from cusa.store.quant import dequantize_rows, quantize_group, quantize_rows
from cusa.store.verify import verify_group

runner = CliRunner()


def test_quantize_rows_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 64)).astype(np.float32) * rng.uniform(0.01, 10, (50, 1))
    x[3] = 0.0  # an all-zero row keeps scale 0
    q, s = quantize_rows(x)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q).max() == 127
    err = np.abs(dequantize_rows(q, s) - x)
    assert (err <= s[:, None] / 2 + 1e-6 * np.abs(x)).all()
    assert s[3] == 0 and not q[3].any()


@pytest.fixture
def int8_group(filled):
    filled.group.seal()
    return filled, quantize_group(filled.store, filled.group)


def test_int8_group_lives_beside_and_decodes_by_the_documented_layout(int8_group):
    filled, group = int8_group
    assert group.leaf == f"{filled.group.leaf}-int8" and group.spec["dtype"] == "int8"
    root = Path(filled.store.url) / group.rel
    sealed = json.loads((root / "sealed.json").read_text())
    n, d = sealed["rows"], group.dim
    # Decode with numpy alone, as docs/store.md describes: int8 rows x D, float32 LE scales.
    q = np.frombuffer((root / "features/c/0/0").read_bytes(), dtype=np.int8).reshape(n, d)
    s = np.frombuffer((root / "scale/c/0").read_bytes(), dtype="<f4")
    assert (
        hashlib.sha256((root / "scale/c/0").read_bytes()).hexdigest() == sealed["scale_sha256"][0]
    )
    decoded = q.astype(np.float32) * s[:, None]
    ids = sorted(filled.expected)
    want = np.stack([filled.expected[i] for i in ids])
    np.testing.assert_allclose(decoded, want, atol=float(s.max()) / 2 + 1e-7)
    # FeatureLookup dequantises on gather: float32 rows, same values.
    lookup = FeatureLookup.open(filled.store, dataset="coco", split="train", teacher=group.leaf)
    got = lookup.gather(ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, decoded)
    assert lookup.gather_torch(ids[:2]).dtype.is_floating_point
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999
    # the size: a quarter of the float32 rows plus 4 bytes of scale per row
    assert (root / "features/c/0/0").stat().st_size == n * d


def test_int8_group_verifies_and_a_damaged_scale_is_reported(int8_group):
    filled, group = int8_group
    report = verify_group(group)
    assert report.ok, report.errors
    assert not report.warnings or all("id_index" not in w for w in report.warnings)
    scale = Path(filled.store.url) / group.rel / "scale/c/0"
    data = bytearray(scale.read_bytes())
    data[1] ^= 0x10
    scale.write_bytes(bytes(data))
    report = verify_group(group)
    assert any("scale/c/0" in e and "SHA-256" in e for e in report.errors)


def test_int8_teacher_name_picks_by_dtype_and_extraction_refuses_int8(int8_group):
    filled, group = int8_group
    lookup = FeatureLookup.open(
        filled.store, dataset="coco", split="train", teacher="toy-text", dtype="int8"
    )
    assert lookup.group.rel == group.rel
    with pytest.raises(ConfigError, match="cusa store quantize"):
        filled.store.group("coco", "val", toy_spec(dtype="int8"), create=True)


def test_quantize_cli_and_int8_over_http(filled, tmp_path):
    filled.group.seal()
    result = runner.invoke(
        app, ["store", "quantize", "--store", filled.store.url, "--teacher", "toy-text"]
    )
    assert result.exit_code == 0, result.output
    assert "-int8" in result.output
    again = runner.invoke(app, ["store", "quantize", "--store", filled.store.url, "-t", "toy-text"])
    assert again.exit_code == 0, again.output  # the int8 group is not a second source
    publish_store(filled.store, str(tmp_path / "pub"))
    server = Server(tmp_path / "pub")
    try:
        store = FeatureStore.open(server.url)
        assert {g.spec["dtype"] for g in store.groups()} == {"float16", "int8"}
        lookup = FeatureLookup.open(
            store, dataset="coco", split="train", teacher="toy-text", dtype="int8",
            cache_dir=tmp_path / "cache",
        )  # fmt: skip
        ids = sorted(filled.expected)
        want = np.stack([filled.expected[i] for i in ids])
        assert np.abs(lookup.gather(ids) - want).max() < 0.01
        assert all(verify_group(g).ok for g in store.groups())
    finally:
        server.stop()
