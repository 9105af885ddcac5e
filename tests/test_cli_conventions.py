"""The CLI's shared conventions through typer's CliRunner: the exit code of each kind of failure
(usage, bad input, store error, interrupted), the one `--store` spelling (and the old positional
one, with its note), `--name`, index files as `--dataset`, and `cusa train`'s `--store`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cusa import cli
from cusa.cli import app


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_error(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture
def store(tmp_path):
    """A small sealed store: one 8-d toy text group of 2 shards x 3 ids (i0..i5)."""
    import numpy as np

    from cusa.store import FeatureStore
    from cusa.store.spec import TeacherSpec

    spec = TeacherSpec("toy-text", "text", "tests/toy", "ab" * 32, {}, "sentence", 8)
    fs = FeatureStore.open(tmp_path / "store", create=True)
    group = fs.group("coco", "train", spec, create=True)
    rng = np.random.default_rng(0)
    for s in range(2):
        x = rng.standard_normal((3, 8)).astype(np.float32)  # (3, 8)
        ids = [f"i{3 * s + r}" for r in range(3)]
        group.write_shard(f"{s:06d}", ids, x / np.linalg.norm(x, axis=1, keepdims=True))
    group.seal()
    return fs


# -- usage errors: 2 (click's own code), before anything runs ----------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("extract",),  # --dataset missing
        ("extract", "--dataset", "coco-sample", "--bogus"),
        ("extract", "--dataset", "coco-sample", "--runner", "spark"),
        ("extract", "--dataset", "coco-sample", "--dtype", "bfloat16"),
        ("store", "knn", "--teacher", "t", "--id", "x", "--metric", "cosine"),
        ("eval", "--ks"),  # an option without its value
        ("cache", "clean", "--what", "everything"),
        ("train", "--config", "x.yaml", "--resume-anyway", "--overwrite"),
    ],
)
def test_usage_errors_exit_2(args):
    res = _cli(*args)
    assert res.exit_code == cli.EXIT_REFUSED == 2, res.output


def test_the_store_given_twice_is_a_usage_error(store, tmp_path):
    res = _cli("store", "info", str(tmp_path / "other"), "--store", store.url)
    assert res.exit_code == 2 and "the store is given twice" in res.output


# -- bad input: 2 with one `error:` line naming the value and the fix ---------------------------


def test_bad_input_is_refused_in_one_line(tmp_path):
    res = _cli("extract", "--dataset", str(tmp_path / "nowhere"), "--store", str(tmp_path / "s"))
    assert res.exit_code == cli.EXIT_REFUSED
    assert "does not exist" in _one_error(res)
    res = _cli(
        "extract", "--dataset", "coco-sample", "--name", "../up", "--store", str(tmp_path / "s")
    )
    line = _one_error(res)
    assert res.exit_code == cli.EXIT_REFUSED and "--name '../up' is invalid" in line
    assert "e.g. --name coco-lab-b" in line
    res = _cli(
        "extract", "--dataset", "coco-sample", "--device", "gpu0", "--store", str(tmp_path / "s")
    )
    assert res.exit_code == cli.EXIT_REFUSED and "--device 'gpu0' is invalid" in _one_error(res)
    res = _cli("cache", "clean", "--older-than", "a while")
    assert res.exit_code == cli.EXIT_REFUSED and "--older-than 'a while' is invalid" in _one_error(
        res
    )
    assert not (tmp_path / "s").exists()


# -- store errors: 2 when refused, 1 when verify finds problems --------------------------------


def test_store_errors(store, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    res = _cli("store", "info", "--store", str(tmp_path / "junk"))
    assert res.exit_code == 2 and "is not a cusa store" in _one_error(res)
    res = _cli("store", "knn", "--store", store.url, "--teacher", "nobody", "--id", "x")
    assert res.exit_code == 2 and "has no features of teacher 'nobody'" in _one_error(res)
    (group,) = store.groups()
    path = store.fs.local_path(group.segments()[0].rel)
    with open(path, "r+b") as fh:
        fh.truncate(10)
    res = _cli("store", "verify", "--store", store.url)
    assert res.exit_code == cli.EXIT_FAILED == 1 and "truncated or corrupt" in res.output


# -- interrupted: 130, and re-running resumes ---------------------------------------------------


def test_ctrl_c_exits_130(store, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cusa.store.info.store_info", interrupted)
    res = _cli("store", "info", "--store", store.url)
    assert res.exit_code == cli.EXIT_INTERRUPTED == 130
    assert "interrupted; re-run the same command to resume" in _one_error(res)


# -- one spelling of the store ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("store", "info"), ("store", "verify"), ("store", "knn", "-t", "toy-text", "--id", "i0")],
)
def test_store_option_and_deprecated_positional(store, args):
    new = _cli(*args, "--store", store.url, "--json")
    assert new.exit_code == 0, new.output
    assert "deprecated" not in new.output
    old = _cli(*args, store.url, "--json")
    assert old.exit_code == 0, old.output
    assert "note: a positional STORE is deprecated; use --store" in old.stderr
    assert json.loads(old.stdout) == json.loads(new.stdout)


def test_every_store_taking_command_spells_it_store():
    import typer

    group = typer.main.get_command(app)
    for path in (("extract",), ("eval",), ("train",), ("report",), ("store", "info"),
                 ("store", "verify"), ("store", "knn"), ("store", "export")):  # fmt: skip
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        assert any("--store" in p.opts for p in cmd.params), path


def test_train_store_option_sets_data_store(monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg):
        seen["store"] = cfg.data.store
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr("cusa_train.trainer.train", fake_train)
    res = _cli("train", "--config", "configs/coco-sample.yaml", "--store", str(tmp_path / "s"))
    assert res.exit_code == 130, res.output
    assert seen["store"] == str(tmp_path / "s")


# -- datasets: an index file as --dataset, and --name --------------------------------------------


def test_shard_takes_an_index_file_and_a_name(tmp_path):
    from cusa.readers import coco_sample_root

    out = tmp_path / "shards"
    res = _cli("shard", "--dataset", str(coco_sample_root() / "new_val.json"), "--name",
               "lab-b", "--out", str(out), "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["source"]["dataset"] == "lab-b"
    assert manifest["splits"]["val"]["samples"] == 8
