"""`cusa store info|verify|knn|export` through typer's CliRunner, bad input included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from store_helpers import fill_group, toy_spec
from typer.testing import CliRunner

from cusa.cli import app
from cusa.paths import default_store
from cusa.store import FeatureStore

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def cli_store(tmp_path):
    store = FeatureStore.open(tmp_path / "store", create=True)
    text = fill_group(store.group("coco", "train", toy_spec(), create=True), fail_every=3)
    image = fill_group(
        store.group(
            "coco",
            "train",
            toy_spec(name="toy-img", modality="image", model="tests/toy-img"),
            create=True,
        ),
        shards=2,
        prefix="img",
    )
    text.group.seal()
    return store, text, image


def test_info_text_and_json(cli_store):
    store, text, image = cli_store
    res = _run("store", "info", "--store", store.url)
    assert res.exit_code == 0, res.output
    assert f"toy-text@{text.group.fingerprint}" in res.output and "sealed" in res.output
    assert f"N={len(text.expected)}" in res.output and "NOT sealed" in res.output  # image group
    res = _run("store", "info", "--store", store.url, "--json")
    info = json.loads(res.output)
    groups = {g["teacher"]: g for g in info["groups"]}
    assert groups["toy-text"]["rows"] == len(text.expected)
    assert groups["toy-text"]["failed"] == len(text.failures)
    assert groups["toy-text"]["sealed"] is True and groups["toy-img"]["sealed"] is False
    assert groups["toy-img"]["committed_shards"] == 2
    assert groups["toy-text"]["spec"]["weights_sha256"] == "ab" * 32
    assert groups["toy-text"]["dim"] == 16 and groups["toy-text"]["dtype"] == "float16"
    assert groups["toy-text"]["size_bytes"] > 0


def test_default_store_comes_from_cusa_home():
    store = FeatureStore.open(default_store(), create=True)
    fill_group(store.group("coco", "val", toy_spec(), create=True), shards=1)
    res = _run("store", "info", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["store"] == default_store()


def test_verify_clean_exits_0_and_corrupt_exits_1(cli_store):
    store, text, _ = cli_store
    res = _run("store", "verify", "--store", store.url)
    assert res.exit_code == 0, res.output
    assert "all clean" in res.output and "failed sample" in res.output  # the ledger is listed
    path = store.fs.local_path(text.group.segments()[0].rel)
    with open(path, "r+b") as fh:
        fh.truncate(50)
    res = _run("store", "verify", "--store", store.url)
    assert res.exit_code == 1
    assert "truncated or corrupt: 50 bytes" in res.output and text.group.rel in res.output
    res = _run("store", "verify", "--store", store.url, "--json")
    assert res.exit_code == 1
    payload = json.loads(res.output)
    assert payload["ok"] is False and any(not g["ok"] for g in payload["groups"])


def test_knn(cli_store):
    store, text, _ = cli_store
    query = sorted(text.expected)[0]
    res = _run(
        "store",
        "knn",
        "--store",
        store.url,
        "--teacher",
        "toy-text",
        "--id",
        query,
        "-k",
        "3",
        "--json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    hits = out["results"][0]["neighbors"]
    assert out["results"][0]["query"] == query and len(hits) == 3
    assert all(h["sample_id"] in text.expected and h["sample_id"] != query for h in hits)
    feats = np.stack([text.expected[h["sample_id"]] for h in hits])
    np.testing.assert_allclose([h["score"] for h in hits], feats @ text.expected[query], atol=2e-3)
    res = _run(
        "store",
        "knn",
        "--store",
        store.url,
        "-t",
        "toy-text",
        "--id",
        query,
        "-k",
        "2",
        "--dataset",
        "coco",
        "--split",
        "train",
    )
    assert res.exit_code == 0 and "1. " in res.output and "2. " in res.output


def test_export(cli_store, tmp_path):
    store, text, _ = cli_store
    out = tmp_path / "exported"
    res = _run("store", "export", "--store", store.url, "--teacher", "toy-text", "--to", str(out))
    assert res.exit_code == 0, res.output
    assert f"exported {len(text.expected)} x 16 float16" in res.output
    emb = np.load(out / "emb" / "0.npy", allow_pickle=False)
    assert emb.shape == (len(text.expected), 16)
    res = _run("store", "export", "--store", store.url, "--teacher", "toy-text", "--to", str(out))
    assert res.exit_code == 2 and "already holds an export" in res.output


def test_bad_input_gets_a_clear_message_and_exit_2(cli_store, tmp_path):
    store, text, _ = cli_store
    not_a_store = tmp_path / "photos"
    not_a_store.mkdir()
    (not_a_store / "a.jpg").write_bytes(b"x")
    for cmd in (["info"], ["verify"], ["knn", "--teacher", "t", "--id", "x"]):
        res = _run("store", cmd[0], "--store", str(not_a_store), *cmd[1:])
        assert res.exit_code == 2, res.output
        assert "error:" in res.output and "is not a cusa store" in res.output

    res = _run("store", "knn", "--store", store.url, "--teacher", "nobody", "--id", "x")
    assert res.exit_code == 2
    assert "no features of teacher 'nobody'" in res.output and "toy-text@" in res.output

    res = _run(
        "store", "knn", "--store", store.url, "--teacher", "toy-text", "--id", "no-such-sample"
    )
    assert res.exit_code == 2
    assert "sample id 'no-such-sample' is not in" in res.output and store.url in res.output

    res = _run(
        "store", "export", "--store", store.url, "--teacher", "nobody", "--to", str(tmp_path / "o")
    )
    assert res.exit_code == 2 and "no features of teacher 'nobody'" in res.output


def test_ambiguous_teacher_asks_for_dataset_and_split(cli_store):
    store, _, _ = cli_store
    fill_group(store.group("coco", "val", toy_spec(), create=True), shards=1, prefix="v")
    res = _run("store", "knn", "--store", store.url, "--teacher", "toy-text", "--id", "s000_000")
    assert res.exit_code == 2
    assert "matches several groups" in res.output and "--dataset and --split" in res.output
    res = _run(
        "store",
        "knn",
        "--store",
        store.url,
        "--teacher",
        "toy-text",
        "--id",
        "s000_000",
        "--split",
        "train",
    )
    assert res.exit_code == 0, res.output
