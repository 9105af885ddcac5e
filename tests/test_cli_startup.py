"""Start-up stays light: ``cusa --help``, ``cusa --version``, ``cusa store info`` and
``import cusa_train.config`` import neither torch, Ray nor transformers (issue 27 item 4).

Each runs in a fresh interpreter, and the test reads that interpreter's ``sys.modules``. The
time of ``cusa --help`` is measured by ``benchmarks/cli_startup.py``, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from typer.testing import CliRunner

from cusa.cli import app

HEAVY = ("torch", "ray", "transformers", "sentence_transformers")

_PROBE = """
import json, sys
{body}
print("HEAVY=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""

_RUN_CLI = """
from cusa.cli import app
try:
    app(args={args!r}, prog_name="cusa")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def _heavy_modules(body: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body, heavy=HEAVY)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return json.loads(line[len("HEAVY=") :])


@pytest.fixture
def store_with_a_group(tmp_path) -> str:
    import numpy as np

    from cusa.store import FeatureStore
    from cusa.store.spec import TeacherSpec

    spec = TeacherSpec(
        name="toy-image", modality="image", model="tests/toy", weights_sha256="ab" * 32,
        preprocessing={}, output_kind="pooled", dim=4, dtype="float16", normalized=True,
    )  # fmt: skip
    group = FeatureStore.open(tmp_path / "store", create=True).group(
        "coco", "val", spec, create=True
    )
    group.write_shard("s0", ["a", "b"], np.eye(4, dtype=np.float32)[:2])
    group.seal()
    return str(tmp_path / "store")


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["store", "--help"], ["extract", "--help"], ["train", "--help"]],
    ids=" ".join,
)
def test_help_and_version_import_no_heavy_library(args, tmp_path):
    env = {**os.environ, "CUSA_HOME": str(tmp_path)}
    assert _heavy_modules(_RUN_CLI.format(args=args), env) == []


def test_store_info_imports_no_heavy_library(store_with_a_group, tmp_path):
    env = {**os.environ, "CUSA_HOME": str(tmp_path)}
    args = ["store", "info", "--store", store_with_a_group]
    assert _heavy_modules(_RUN_CLI.format(args=args), env) == []


def test_importing_the_training_config_imports_no_heavy_library(tmp_path):
    env = {**os.environ, "CUSA_HOME": str(tmp_path)}
    assert _heavy_modules("import cusa_train.config", env) == []


def test_version_names_the_package_layout_and_libraries():
    from cusa import __version__
    from cusa.store.layout import LAYOUT_VERSION

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"cusa {__version__} (writes store layout v{LAYOUT_VERSION})"
    for name in ("torch", "zarr", "sentence-transformers"):
        assert f"{name} {metadata.version(name)}" in lines
