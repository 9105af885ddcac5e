"""`cusa cache info|clean`: what $CUSA_HOME holds, and cleaning it under size and age bounds.

Every test points both CUSA_HOME and CUSA_MODELS_DIR at its own temporary folder, so the
user's real models cache (which the rest of the suite shares) is never touched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cusa.cache import cache_info, clean_cache, parse_age
from cusa.cli import app
from cusa.errors import ConfigError
from cusa.paths import models_dir

DAY = 86400.0
NOW = time.time()


def _file(path: Path, size: int, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    t = NOW - age_days * DAY
    os.utime(path, (t, t))
    return path


def _group(store_root: Path, dataset: str, *, seal: bool, age_days: float) -> None:
    from cusa.store import FeatureStore
    from cusa.store.spec import TeacherSpec

    spec = TeacherSpec("toy", "text", "tests/toy", "ab" * 32, {}, "sentence", 4)
    fs = FeatureStore.open(store_root, create=True)
    g = fs.group(dataset, "train", spec, create=True)
    x = np.eye(4, dtype=np.float32)[:2]  # (2, 4) unit rows
    g.write_shard("000000", ["a", "b"], x)
    if seal:
        g.seal()
    t = NOW - age_days * DAY
    for dirpath, _dirs, names in os.walk(store_root / g.rel):
        for n in names:
            os.utime(os.path.join(dirpath, n), (t, t))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A $CUSA_HOME with every kind of item, of known sizes and ages."""
    home = tmp_path / "home"
    monkeypatch.setenv("CUSA_HOME", str(home))
    monkeypatch.setenv("CUSA_MODELS_DIR", str(home / "models"))
    assert models_dir() == home / "models"  # never the real models cache
    seg = home / "cache" / "segments"
    _file(seg / "aaa.bin", 40960, age_days=40)  # multiples of 4 KiB: sizes are disk blocks
    _file(seg / "bbb.bin", 32768, age_days=10)
    _file(seg / "ccc.bin", 20480, age_days=1)
    _file(seg / "ddd.bin.123.partial", 500, age_days=2)
    models = home / "models"
    _file(models / "all-mpnet-base-v2" / "model.safetensors", 6000, age_days=50)
    _file(models / "mobilenet_v2-b0353104.pth", 1500, age_days=5)
    (models / ".all-mpnet-base-v2.lock").touch()
    _file(models / "wheels" / "pkg-0.1-py3-none-any.whl", 2500, age_days=60)
    _file(models / "parts" / "chunk.003", 1000, age_days=3)
    _group(home / "store", "old", seal=True, age_days=90)
    _group(home / "store", "busy", seal=False, age_days=90)
    _file(home / "unrelated.txt", 10, age_days=0)
    return home


def _names(items) -> set[str]:
    return {f"{i.area}/{i.name}" for i in items}


def test_info_lists_every_area(home):
    info = cache_info()
    areas = info["areas"]
    assert {i["name"] for i in areas["segments"]["items"]} == {"aaa.bin", "bbb.bin", "ccc.bin"}
    assert {i["name"] for i in areas["models"]["items"]} == {
        "all-mpnet-base-v2",
        "mobilenet_v2-b0353104.pth",
    }
    assert {i["name"] for i in areas["downloads"]["items"]} == {
        "wheels/pkg-0.1-py3-none-any.whl",
        "parts/chunk.003",
        "ddd.bin.123.partial",
    }
    store = {i["name"]: i for i in areas["store"]["items"]}
    assert len(store) == 2
    (busy,) = [i for n, i in store.items() if n.startswith("busy/")]
    assert busy["note"].startswith("not sealed")
    assert [o["path"] for o in info["other"]] == [str(home / "unrelated.txt")]
    assert areas["segments"]["bytes"] >= 40960 + 32768 + 20480
    assert info["total_bytes"] >= sum(a["bytes"] for a in areas.values())


def test_clean_defaults_to_downloads_and_segments(home):
    result = clean_cache(dry_run=True)
    assert _names(result.removed) == {
        "segments/aaa.bin", "segments/bbb.bin", "segments/ccc.bin",
        "downloads/wheels/pkg-0.1-py3-none-any.whl", "downloads/parts/chunk.003",
        "downloads/ddd.bin.123.partial",
    }  # fmt: skip
    assert (home / "cache" / "segments" / "aaa.bin").exists()  # dry run
    clean_cache()
    assert not list((home / "cache" / "segments").iterdir())
    assert (home / "models" / "all-mpnet-base-v2" / "model.safetensors").exists()
    assert (home / "store" / "cusa_store.json").exists()


def test_older_than_and_max_size_remove_least_recently_used_first(home):
    old = clean_cache(["segments"], older_than_s=30 * DAY)
    assert _names(old.removed) == {"segments/aaa.bin"}
    # bbb (10 d) + ccc (1 d) remain; a bound of 25 KB removes the older one only.
    sized = clean_cache(["segments"], max_bytes=25_000)
    assert _names(sized.removed) == {"segments/bbb.bin"}
    assert _names(sized.kept) == {"segments/ccc.bin"}
    assert sized.freed >= 32768


def test_models_are_kept_while_their_lock_is_held(home):
    import fcntl

    with open(home / "models" / ".all-mpnet-base-v2.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        result = clean_cache(["models"])
    assert _names(result.removed) == {"models/mobilenet_v2-b0353104.pth"}
    assert [i.note for i in result.skipped] == ["in use (locked)"]
    assert (home / "models" / "all-mpnet-base-v2").exists()
    assert _names(clean_cache(["models"]).removed) == {"models/all-mpnet-base-v2"}


def test_store_only_when_named_and_only_sealed_groups(home):
    assert not [
        i for i in clean_cache(["segments", "models", "downloads"]).removed if i.area == "store"
    ]
    result = clean_cache(["store"], older_than_s=30 * DAY)
    assert len(result.removed) == 1 and result.removed[0].name.startswith("old/")
    assert [i.note[:10] for i in result.skipped] == ["not sealed"]
    assert not (home / "store" / "old").exists()  # the emptied dataset folder goes too
    assert (home / "store" / "busy").exists()


def test_bad_bounds_are_refused(home):
    with pytest.raises(ConfigError, match="use a number and a unit"):
        parse_age("soon")
    assert parse_age("2w") == 14 * DAY and parse_age("12h") == 12 * 3600
    with pytest.raises(ConfigError, match="unknown cache area"):
        clean_cache(["attic"])


def test_cli_info_and_clean(home):
    res = CliRunner().invoke(app, ["cache", "info"])
    assert res.exit_code == 0, res.output
    for text in ("$CUSA_HOME = ", "segments", "models", "downloads", "store", "not sealed",
                 "unrelated.txt"):  # fmt: skip
        assert text in res.output
    res = CliRunner().invoke(app, ["cache", "info", "--json"])
    assert json.loads(res.stdout)["home"] == str(home)

    dry = CliRunner().invoke(
        app, ["cache", "clean", "--what", "segments", "--older-than", "5d", "-n"]
    )
    assert dry.exit_code == 0, dry.output
    assert "would remove segments/aaa.bin" in dry.output and "would remove 2 item(s)" in dry.output
    assert (home / "cache" / "segments" / "aaa.bin").exists()

    res = CliRunner().invoke(app, ["cache", "clean", "--what", "all", "--max-size", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert not out["dry_run"] and {i["area"] for i in out["removed"]} == {
        "segments",
        "models",
        "downloads",
    }
    assert (home / "store" / "cusa_store.json").exists()  # `all` never includes the store
