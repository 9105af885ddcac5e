"""``cusa eval --image-features NAME --text-features NAME`` reads groups of the default store.

``--help`` says ``--store`` defaults to ``$CUSA_HOME/store``; a value that is not a feature
file names a group there (issue 23: it was read as a missing file name).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cusa.cli import app
from cusa.paths import default_store
from cusa.store import FeatureStore
from cusa.store.spec import TeacherSpec

N, DIM = 12, 8


def _spec(name: str, modality: str) -> TeacherSpec:
    return TeacherSpec(
        name=name,
        modality=modality,
        model=f"tests/{name}",
        weights_sha256="ab" * 32,
        preprocessing={},
        output_kind="embedding",
        dim=DIM,
        dtype="float32",
        normalized=True,
    )


@pytest.fixture
def default_store_groups() -> str:
    """Student-like image and caption features in ``$CUSA_HOME/store`` (coco/val), where each
    caption's nearest image is its own: R@1 is 100."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((N, DIM)).astype(np.float32)  # (N, D)
    captions = images + 0.01 * rng.standard_normal((N, DIM)).astype(np.float32)  # (N, D)
    ids = [f"img{i:02d}" for i in range(N)]
    store = FeatureStore.open(default_store(), create=True)
    for name, modality, rows, row_ids in (
        ("toy-image", "image", images, ids),
        ("toy-text", "text", captions, [f"{i}#0" for i in ids]),
    ):
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        group = store.group("coco", "val", _spec(name, modality), create=True)
        assert group.write_shard("shard-000", row_ids, rows).status == "committed"
        group.seal()
    return default_store()


def test_eval_reads_group_names_from_the_default_store(default_store_groups):
    res = CliRunner().invoke(
        app,
        ["eval", "--image-features", "toy-image", "--text-features", "toy-text",
         "--dataset", "coco", "--split", "val", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)["metrics"]
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 100.0, metrics


def test_a_group_name_without_dataset_and_split_says_what_is_missing(default_store_groups):
    res = CliRunner().invoke(
        app, ["eval", "--image-features", "toy-image", "--text-features", "toy-text"]
    )
    assert res.exit_code == 2, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("error: ")][0]
    assert "--image-features 'toy-image' is not a feature file" in line
    assert default_store_groups in line and "--dataset and --split" in line
