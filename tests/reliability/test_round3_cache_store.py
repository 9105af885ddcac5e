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
def test_cache_clean_never_follows_a_symlink_out_of_home(
    tmp_path, monkeypatch, where, reliability_log
):
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
    kept = _files_under(target) == before
    reliability_log.bad_input(
        f"cache: clean with a symlink out of $CUSA_HOME at {where}",
        "cache",
        caught=kept and (not link.exists() or link.is_symlink()),
        outcome="nothing outside $CUSA_HOME removed; at most the link itself",
    )
    assert kept, f"{where}: files outside $CUSA_HOME were removed"
    assert not link.exists() or link.is_symlink()  # the link itself may go, nothing behind it


@pytest.mark.parametrize("command", ["info", "clean"])
def test_cusa_home_that_is_a_regular_file_is_refused(
    tmp_path, monkeypatch, command, reliability_log
):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("CUSA_HOME", str(home))
    monkeypatch.delenv("CUSA_MODELS_DIR", raising=False)
    res = _cli("cache", command)
    ok = res.exit_code == 2 and "is a regular file, not a folder" in res.output
    reliability_log.bad_input(
        f"cache: CUSA_HOME is a regular file (cache {command})",
        "cache",
        caught=ok,
        outcome="exit 2: one line saying CUSA_HOME is not a folder (was exit 0, '0 items')",
        message=res.output,
    )
    assert res.exit_code == 2, res.output
    assert "is a regular file, not a folder" in res.output and "CUSA_HOME" in res.output


# -- a small store with one sealed and one unsealed group of a toy teacher ---------------------


def _toy_store(root: Path, *, seal: bool = True) -> Path:
    from cusa.store import FeatureStore
    from cusa.store.spec import TeacherSpec

    spec = TeacherSpec("toy", "text", "tests/toy", "ab" * 32, {}, "sentence", 4)
    g = FeatureStore.open(root, create=True).group("lab", "train", spec, create=True)
    rng = np.random.default_rng(0)
    g.write_shard("000000", ["a", "b", "c"], rng.standard_normal((3, 4)).astype(np.float32))
    g.write_shard("000001", ["d", "e"], rng.standard_normal((2, 4)).astype(np.float32))
    if seal:
        g.seal()
    return root / g.rel


def _readers_refuse(store: Path, tmp_path: Path) -> dict[str, str]:
    """What each reader of the store says: info (BROKEN line), FeatureLookup.open, export, knn."""
    from cusa.errors import StoreError
    from cusa.store import FeatureLookup, FeatureStore
    from cusa.store.info import store_info

    out = {}
    info = store_info(FeatureStore.open(store))
    out["info"] = " | ".join(b["error"] for b in info["broken"]) if not info["groups"] else ""
    try:
        FeatureLookup.open(store, dataset="lab", split="train", teacher="toy")
        out["lookup"] = ""
    except StoreError as exc:
        out["lookup"] = str(exc)
    exp = tmp_path / f"exp{len(list(tmp_path.glob('exp*')))}"
    res = _cli("store", "export", str(store), "--teacher", "toy", "--to", str(exp))
    out["export"] = res.output if res.exit_code == 2 and not exp.exists() else ""
    res = _cli("store", "knn", str(store), "--teacher", "toy", "--id", "a", "-k", "2")
    out["knn"] = res.output if res.exit_code == 2 else ""
    return out


def _link_to_copy(path: Path, tmp_path: Path) -> None:
    """Replace ``path`` by a symlink to an identical copy outside the group."""
    copy = tmp_path / f"copy-of-{path.name}"
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)


def _edit_json(path: Path, **changes: Any) -> None:
    import json

    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


_TAMPERS = {
    # name: (sealed?, what it does to the group folder, the file the message must name)
    "store: sealed manifest.parquet is a symlink": (
        True, lambda g, t: _link_to_copy(g / "manifest.parquet", t), "manifest.parquet"),
    "store: features/zarr.json is a symlink": (
        True, lambda g, t: _link_to_copy(g / "features" / "zarr.json", t), "features/zarr.json"),
    "store: a commit record is a symlink (unsealed group)": (
        False, lambda g, t: _link_to_copy(g / "commits" / "000000.json", t),
        "commits/000000.json"),
    "store: array zarr.json dtype edited to float32, then read": (
        True, lambda g, t: _edit_json(g / "features" / "zarr.json", data_type="float32"),
        "features/zarr.json"),
    "store: part zarr.json shape edited (unsealed group)": (
        False, lambda g, t: _edit_json(
            next((g / "parts").glob("000001.*")) / "features" / "zarr.json", shape=[9, 4]),
        "features/zarr.json"),
    "store: garbage commit record, then read": (
        True, lambda g, t: (g / "commits" / "000001.json").write_text("garbage"),
        "commits/000001.json"),
}  # fmt: skip


@pytest.mark.parametrize("tamper", list(_TAMPERS))
def test_readers_refuse_what_verify_refuses(tmp_path, tamper, reliability_log):
    """info lists the group as BROKEN; FeatureLookup.open, export and knn refuse it, each naming
    the file (the same check, store.integrity.check_group, serves every reader)."""
    sealed, apply, name = _TAMPERS[tamper]
    store = tmp_path / "store"
    group = _toy_store(store, seal=sealed)
    assert all(not v for v in _readers_refuse(store, tmp_path).values())  # healthy: all serve
    apply(group, tmp_path)
    verify = _cli("store", "verify", str(store))
    said = _readers_refuse(store, tmp_path)
    ok = verify.exit_code == 1 and all(name in said[r] for r in said)
    reliability_log.bad_input(
        tamper,
        "store",
        caught=ok,
        outcome="verify exits 1; info lists the group BROKEN; FeatureLookup, export and knn "
        "refuse it naming the file",
        message=said["lookup"],
    )
    assert verify.exit_code == 1, verify.output
    for reader, message in said.items():
        assert name in message, (reader, said)
        assert len(message.strip()) <= 1000, reader


# -- cusa store export --to ---------------------------------------------------------------------


_DESTINATIONS = {
    "cli: store export --to the store root": lambda store, t: store,
    "cli: store export --to a new folder inside the store": lambda store, t: store / "new" / "x",
    "cli: store export --to a symlink into the store": lambda store, t: _symlink(
        t / "sneaky", store / "lab"
    ),
    "cli: store export --to a dangling symlink": lambda store, t: _symlink(
        t / "dangling", t / "nowhere"
    ),
}


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("case", list(_DESTINATIONS))
def test_export_refuses_a_destination_inside_the_store_or_dangling(tmp_path, case, reliability_log):
    from cusa.errors import StoreError
    from cusa.store import FeatureStore
    from cusa.store.export import export_group

    store = tmp_path / "store"
    _toy_store(store)
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    to = _DESTINATIONS[case](store, tmp_path)
    res = _cli("store", "export", str(store), "--teacher", "toy", "--to", str(to))
    after = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    ok = res.exit_code == 2 and after == before and len(res.output.strip()) <= 520
    reliability_log.bad_input(
        case,
        "cli",
        caught=ok,
        outcome="exit 2: one line naming the destination and the fix; nothing written",
        message=res.output,
    )
    assert res.exit_code == 2, res.output
    assert after == before  # nothing landed in the store
    assert "inside the store" in res.output or "does not exist" in res.output
    (group,) = FeatureStore.open(store).groups()
    with pytest.raises(StoreError, match="--to"):  # the library refuses the same way
        export_group(group, to)


# -- --name that normalises to another name ------------------------------------------------------


@pytest.mark.parametrize("name", ["lab.", "lab_", "lab._"])
def test_a_name_that_would_share_another_names_folder_is_refused(tmp_path, name, reliability_log):
    from cusa.errors import DatasetError
    from cusa.extract.job import ExtractConfig

    with pytest.raises(DatasetError, match="collide with --name 'lab'"):
        ExtractConfig(dataset="coco-sample", name=name, store=str(tmp_path / "s"))
    res = _cli(
        "extract", "--dataset", "coco-sample", "--name", name, "--store", str(tmp_path / "s")
    )
    ok = res.exit_code == 2 and "--name 'lab'" in res.output and not (tmp_path / "s").exists()
    reliability_log.bad_input(
        f"cli: --name {name!r} (stored in the folder of 'lab')",
        "cli",
        caught=ok,
        outcome="exit 2: says it would collide with --name 'lab' and names a distinct name",
        message=res.output,
    )
    assert ok, res.output
