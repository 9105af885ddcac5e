"""Round 3 (issue 21): the lab cache and store readers. Each test failed before its fix.

- ``cusa cache clean`` never follows a symlink out of ``$CUSA_HOME`` (links planted in every
  area); ``CUSA_HOME`` set to a regular file is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cusa.cli import app


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


# -- cusa cache clean and symlinks -------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    """A folder outside $CUSA_HOME with files and a subfolder (what the links point to)."""
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    for name in ("a.bin", "b.partial", "x.whl", "sub/deep.bin"):
        (out / name).write_bytes(b"keep me" * 100)
    return out


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _group(store_root: Path, dataset: str) -> None:
    from cusa.store import FeatureStore
    from cusa.store.spec import TeacherSpec

    spec = TeacherSpec("toy", "text", "tests/toy", "ab" * 32, {}, "sentence", 4)
    g = FeatureStore.open(store_root, create=True).group(dataset, "train", spec, create=True)
    g.write_shard("000000", ["a", "b"], np.eye(4, dtype=np.float32)[:2])
    g.seal()


# Where a link is planted, relative to $CUSA_HOME: each area's folder, a folder inside an area,
# and an item of each area.
_LINKS = {
    "models/wheels (downloads folder)": "models/wheels",
    "models/parts (downloads folder)": "models/parts",
    "cache/segments (segments area)": "cache/segments",
    "cache (above segments)": "cache",
    "models (models area)": "models",
    "a model folder": "models/some-model",
    "a segment file": "cache/segments/s.bin",
    "a .partial file": "cache/segments/p.bin.1.partial",
    "store (store area)": "store",
    "a store dataset folder": "store/elsewhere",
}


@pytest.mark.parametrize("where", list(_LINKS))
def test_cache_clean_never_follows_a_symlink_out_of_home(tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    monkeypatch.setenv("CUSA_HOME", str(home))
    monkeypatch.setenv("CUSA_MODELS_DIR", str(home / "models"))
    (home / "models").mkdir(parents=True)
    (home / "cache" / "segments").mkdir(parents=True)
    (home / "models" / "wheels").mkdir()
    (home / "cache" / "segments" / "mine.bin").write_bytes(b"x" * 10)
    _group(home / "store", "lab")
    target = _outside(tmp_path)
    if where == "a store dataset folder":  # a whole store group lives outside, reached by a link
        _group(tmp_path / "other_store", "elsewhere")
        target = tmp_path / "other_store" / "elsewhere"
    link = home / _LINKS[where]
    if link.exists():
        os.rename(link, tmp_path / "moved-away")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    before = _files_under(target)

    for what in (["--what", "all", "--what", "store"],):
        res = _cli("cache", "info")
        assert res.exit_code == 0, res.output
        res = _cli("cache", "clean", *what, "--max-size", "0")
        assert res.exit_code == 0, res.output
    assert _files_under(target) == before, f"{where}: files outside $CUSA_HOME were removed"
    assert not link.exists() or link.is_symlink()  # the link itself may go, nothing behind it


@pytest.mark.parametrize("command", ["info", "clean"])
def test_cusa_home_that_is_a_regular_file_is_refused(tmp_path, monkeypatch, command):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("CUSA_HOME", str(home))
    monkeypatch.delenv("CUSA_MODELS_DIR", raising=False)
    res = _cli("cache", command)
    assert res.exit_code == 2, res.output
    assert "is a regular file, not a folder" in res.output and "CUSA_HOME" in res.output
