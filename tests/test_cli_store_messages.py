"""What ``cusa store`` says about failed samples, and saying it once (issue 23 items 7 and 9).

Every pointer to the failure ledger names ``cusa store verify``, which lists the failed ids and
their reasons; ``store info`` points there; ``store verify`` prints each group once; the export
refusal says ``pass --overwrite``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import SampleNotFoundError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.spec import TeacherSpec

REPO = Path(__file__).resolve().parents[1]
BAD, REASON = "img03#0", "empty caption after normalisation"


@pytest.fixture
def store_with_a_failure(tmp_path) -> str:
    spec = TeacherSpec(
        name="toy-text", modality="text", model="tests/toy", weights_sha256="ab" * 32,
        preprocessing={}, output_kind="sentence", dim=4, dtype="float16", normalized=True,
    )  # fmt: skip
    store = FeatureStore.open(tmp_path / "store", create=True)
    group = store.group("coco", "val", spec, create=True)
    ids = [f"img{i:02d}#0" for i in range(6) if f"img{i:02d}#0" != BAD]
    rows = np.eye(4, dtype=np.float32)[np.arange(len(ids)) % 4]  # (5, 4) unit rows
    assert group.write_shard("s0", ids, rows, failures=[(BAD, REASON)]).status == "committed"
    group.seal()
    return str(tmp_path / "store")


def test_a_missing_id_points_at_verify_which_lists_it(store_with_a_failure):
    lookup = FeatureLookup.open(
        store_with_a_failure, dataset="coco", split="val", teacher="toy-text"
    )
    with pytest.raises(SampleNotFoundError, match="`cusa store verify` lists the failed ids"):
        lookup.gather([BAD])
    res = CliRunner().invoke(app, ["store", "verify", "--store", store_with_a_failure])
    assert f"failed sample {BAD!r} (shard 's0'): {REASON}" in res.output, res.output


def test_info_points_at_verify_for_the_ids(store_with_a_failure):
    res = CliRunner().invoke(app, ["store", "info", "--store", store_with_a_failure])
    assert res.exit_code == 0, res.output
    assert "failed=1 (ids: cusa store verify)" in res.output


def test_verify_prints_each_group_once(store_with_a_failure):
    res = CliRunner().invoke(app, ["store", "verify", "--store", store_with_a_failure])
    assert res.output.count("coco/val/toy-text@") == 1, res.output


def test_export_refusal_says_pass_overwrite(store_with_a_failure, tmp_path):
    args = ["store", "export", "--store", store_with_a_failure, "--teacher", "toy-text"]
    assert CliRunner().invoke(app, [*args, "--to", str(tmp_path / "x")]).exit_code == 0
    res = CliRunner().invoke(app, [*args, "--to", str(tmp_path / "x")])
    assert res.exit_code == 2 and "pass --overwrite to replace it" in res.output, res.output


def test_no_message_points_at_store_info_for_the_ledger():
    """One pointer everywhere: the failure ledger's ids are in `cusa store verify`."""
    stale = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"cusa store info[^\n]{0,40}(failure ledger|more)", text):
            stale.append(str(path.relative_to(REPO)))
    assert not stale, stale
