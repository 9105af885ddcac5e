"""Publish a store, read it where it is (a folder, a real HTTP server, moto's S3), pull it.

The HTTP server is the standard library's ``ThreadingHTTPServer`` on 127.0.0.1 in a thread;
S3 is moto's server (the ``s3_server`` fixture). Nothing is mocked: the same fsspec code a
lab uses reads the bytes over the loopback network.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from store_helpers import fill_group, free_port, toy_spec
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, NotAStoreError, StoreError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.fs import ReadOnlyStoreError, StoreUnreachableError
from cusa.store.info import store_info
from cusa.store.publish import PublishRefusedError, publish_store
from cusa.store.pull import PullConflictError, pull_store
from cusa.store.verify import verify_store

runner = CliRunner()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts GETs per path; optional faults per path (set by the test)."""

    hits: dict[str, int]
    faults: dict[str, str]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        fault = self.faults.get(self.path)
        if fault == "cut":  # headers and half the body, then the host goes away
            self.faults.pop(self.path)
            local = Path(self.translate_path(self.path))
            data = local.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if fault == "stall":  # headers, then silence
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(8)
            return
        super().do_GET()


class Server:
    def __init__(self, root: Path) -> None:
        handler = type("H", (_Handler,), {"hits": {}, "faults": {}})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", free_port()), functools.partial(handler, directory=str(root))
        )
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def published(filled, tmp_path) -> Path:
    """The ``filled`` toy group sealed and published to a folder."""
    filled.group.seal()
    out = tmp_path / "published"
    publish_store(filled.store, str(out), dataset="coco")
    return out


@pytest.fixture
def served(published) -> Iterator[Server]:
    server = Server(published)
    try:
        yield server
    finally:
        server.stop()


def _chunk(root: Path) -> Path:
    (chunk,) = root.glob("coco/train/*/features/c/0/0")
    return chunk


def _chunk_copies(cache: Path) -> list[str]:
    """Chunk copies and temporary files in a segment cache (the id index copy aside)."""
    return [p.name for p in cache.glob("*") if not p.name.startswith("idx-")]


# -- publish --------------------------------------------------------------------------------------


def test_publish_writes_a_consolidated_index_of_every_file(published, filled):
    index = json.loads((published / "cusa_index.json").read_text())
    (group,) = index["groups"]
    assert group["path"] == filled.group.rel and group["rows"] == len(filled.expected)
    assert group["spec"] == filled.group.spec and group["failed"] == len(filled.failures)
    on_disk = {str(p.relative_to(published)) for p in published.rglob("*") if p.is_file()} - {
        "cusa_index.json"
    }
    assert set(index["files"]) == on_disk  # every file, so readers never list folders
    for rel, meta in index["files"].items():
        data = (published / rel).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    chunk = f"{filled.group.rel}/features/c/0/0"
    assert index["files"][chunk]["sha256"] == group["sealed"]["chunk_sha256"][0]
    assert not any("/parts/" in k or k.endswith(".partial") for k in index["files"])
    assert group["bytes"] == sum(
        v["size"] for k, v in index["files"].items() if k.startswith(group["path"])
    )


def test_publish_refuses_unsealed_groups_naming_them(filled, tmp_path):
    with pytest.raises(PublishRefusedError, match=r"coco/train/toy-text@\w+ \(not sealed"):
        publish_store(filled.store, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "cusa_index.json").exists()


def test_publish_refuses_a_group_that_fails_verify(filled, tmp_path):
    filled.group.seal()
    chunk = _chunk(Path(filled.store.url))
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(PublishRefusedError, match="verify: .*SHA-256"):
        publish_store(filled.store, str(tmp_path / "out"))


def test_publish_refuses_a_writable_store_as_target_and_empty_selection(
    published, filled, tmp_path
):
    with pytest.raises(ConfigError, match="writable cusa store"):
        publish_store(filled.store, filled.store.url)
    with pytest.raises(ConfigError, match="no group .* matches"):
        publish_store(filled.store, str(tmp_path / "o2"), teacher="nope")
    again = publish_store(filled.store, str(published), dataset="coco")  # idempotent
    assert again.copied_bytes == 0 and again.skipped_files > 0


# -- read it where it is ----------------------------------------------------------------------------


def test_a_published_folder_is_read_only(published):
    store = FeatureStore.open(published)
    assert store.published
    with pytest.raises(ReadOnlyStoreError, match="published, read-only.*cusa store pull"):
        store.group("coco", "train", toy_spec(name="other", model="m2"), create=True)


def test_http_store_info_verify_and_gather(served, filled, tmp_path):
    store = FeatureStore.open(served.url)
    assert store.published
    info = store_info(store)
    (g,) = info["groups"]
    assert g["rows"] == len(filled.expected) and g["sealed"] and g["size_bytes"] > 0
    (report,) = verify_store(store)
    assert report.ok, report.errors
    served.handler.hits.clear()  # verify streamed each chunk once; now count the lookups'
    cache = tmp_path / "cache"
    ids = sorted(filled.expected)[:5]
    want = np.stack([filled.expected[i] for i in ids])
    for _ in range(2):  # the second lookup maps the cached copy: no second download
        lookup = FeatureLookup.open(
            store, dataset="coco", split="train", teacher="toy-text", cache_dir=cache
        )
        np.testing.assert_array_equal(lookup.gather(ids).astype(np.float32), want)
    chunk_path = f"/{filled.group.rel}/features/c/0/0"
    assert served.handler.hits[chunk_path] == 1
    sha = filled.group.sealed["chunk_sha256"][0]
    assert (cache / f"{sha}.bin").is_file()
    assert not any("PROPFIND" in k for k in served.handler.hits)  # only GETs of known files


def test_read_many_over_http_reads_each_file_and_names_a_missing_one(served, filled):
    """Opening a remote group reads its commit records in one batch (fs.read_many): the same
    bytes as one request each, every record requested once, and a missing file named."""
    group = FeatureStore.open(served.url).find_group("coco", "train", "toy-text")
    rels = [f"{group.rel}/commits/{n}" for n in group.fs.ls(f"{group.rel}/commits")]
    assert len(rels) == 4
    served.handler.hits.clear()
    assert group.fs.read_many(rels) == [group.fs.read_bytes(r) for r in rels]
    assert all(served.handler.hits[f"/{r}"] == 2 for r in rels)  # once each way
    assert [r["shard"] for r in group.commit_records()] == sorted(filled.shards)
    with pytest.raises(FileNotFoundError, match="commits/nope.json"):
        group.fs.read_many([*rels, f"{group.rel}/commits/nope.json"])


def test_http_cli_info_verify_pull(served, tmp_path, monkeypatch):
    monkeypatch.setenv("CUSA_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["store", "info", "--store", served.url])
    assert result.exit_code == 0, result.output
    assert "toy-text@" in result.output and "sealed" in result.output
    result = runner.invoke(app, ["store", "verify", "--store", served.url])
    assert result.exit_code == 0, result.output
    assert "all clean" in result.output
    local = tmp_path / "local"
    result = runner.invoke(app, ["store", "pull", served.url, "--store", str(local), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["groups"] == {
        next(iter(json.loads(result.output)["groups"])): "pulled"
    }
    result = runner.invoke(app, ["store", "pull", served.url, "--store", str(local), "--json"])
    assert set(json.loads(result.output)["groups"].values()) == {"present"}
    assert all(r.ok for r in verify_store(FeatureStore.open(local)))


def test_tampered_chunk_is_refused_naming_it(served, published, tmp_path):
    chunk = _chunk(published)
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x40
    chunk.write_bytes(bytes(data))
    rel = str(chunk.relative_to(published))
    store = FeatureStore.open(served.url)
    with pytest.raises(StoreError, match=rf"{rel}'? does not match its recorded SHA-256"):
        FeatureLookup.open(
            store, dataset="coco", split="train", teacher="toy-text", cache_dir=tmp_path / "c"
        )
    assert _chunk_copies(tmp_path / "c") == []  # nothing half-copied is left to map
    with pytest.raises(StoreError, match=rf"{rel}'? does not match its recorded SHA-256"):
        pull_store(served.url, str(tmp_path / "local"))
    assert not (tmp_path / "local" / rel).exists()
    (report,) = verify_store(store)
    assert any(rel in e and "SHA-256" in e for e in report.errors)


def test_unreachable_host_is_one_line_and_quick(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/store"
    start = time.monotonic()
    with pytest.raises(StoreUnreachableError) as err:
        FeatureStore.open(url)
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value) and url in str(err.value) and len(str(err.value)) <= 500
    result = runner.invoke(app, ["store", "info", "--store", url])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "unreachable" in result.output


def test_host_going_away_mid_read_is_one_line(served, filled, tmp_path):
    store = FeatureStore.open(served.url)
    served.handler.faults[f"/{filled.group.rel}/features/c/0/0"] = "cut"
    with pytest.raises(StoreError) as err:
        FeatureLookup.open(
            store, dataset="coco", split="train", teacher="toy-text", cache_dir=tmp_path / "c"
        )
    assert "\n" not in str(err.value) and "features/c/0/0" in str(err.value)
    assert _chunk_copies(tmp_path / "c") == []
    # the next try reads the whole chunk
    lookup = FeatureLookup.open(
        store, dataset="coco", split="train", teacher="toy-text", cache_dir=tmp_path / "c"
    )
    assert len(lookup) == len(filled.expected)


def test_a_stalled_host_times_out(served, filled, tmp_path, monkeypatch):
    monkeypatch.setenv("CUSA_NET_TIMEOUT", "1")
    store = FeatureStore.open(served.url)
    served.handler.faults[f"/{filled.group.rel}/features/c/0/0"] = "stall"
    start = time.monotonic()
    with pytest.raises(StoreUnreachableError, match="timeout 1s"):
        FeatureLookup.open(
            store, dataset="coco", split="train", teacher="toy-text", cache_dir=tmp_path / "c"
        )
    assert time.monotonic() - start < 6


def test_http_without_index_is_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    server = Server(tmp_path / "empty")
    try:
        with pytest.raises(NotAStoreError, match="cusa store publish"):
            FeatureStore.open(server.url)
    finally:
        server.stop()


# -- pull -----------------------------------------------------------------------------------------


def test_interrupted_pull_resumes_keeping_what_was_copied(served, filled, tmp_path):
    rel = filled.group.rel
    served.handler.faults[f"/{rel}/sample_id/c/0"] = "cut"
    local = tmp_path / "local"
    with pytest.raises(StoreError):
        pull_store(served.url, str(local))
    assert not (local / rel / "zarr.json").exists()  # invisible until complete
    assert FeatureStore.open(local).groups() == []
    result = pull_store(served.url, str(local))
    assert result.groups == {rel: "resumed"} and result.kept_files > 0
    lookup = FeatureLookup.open(str(local), dataset="coco", split="train", teacher="toy-text")
    ids = sorted(filled.expected)
    np.testing.assert_array_equal(
        lookup.gather(ids).astype(np.float32), np.stack([filled.expected[i] for i in ids])
    )
    assert all(r.ok for r in verify_store(FeatureStore.open(local)))


def test_pull_refuses_the_same_fingerprint_with_other_bytes(served, tmp_path):
    local = FeatureStore.open(tmp_path / "local", create=True)
    other = local.group("coco", "train", toy_spec(), manifest_hash="m" * 16, create=True)
    fill_group(other, seed=7)
    with pytest.raises(PullConflictError, match="not sealed|unsealed"):
        pull_store(served.url, local)
    other.seal()
    with pytest.raises(PullConflictError, match="other bytes"):
        pull_store(served.url, local)


def test_pull_filters_and_requires_a_published_source(served, filled, tmp_path):
    with pytest.raises(ConfigError, match="no group .* matches"):
        pull_store(served.url, str(tmp_path / "l"), teacher="other-teacher")
    with pytest.raises(ConfigError, match="not a published store"):
        pull_store(filled.store, str(tmp_path / "l"))


# -- S3 (moto's server) ---------------------------------------------------------------------------


def test_publish_to_s3_and_read_pull_from_there(filled, s3_store_url, tmp_path):
    url, opts = s3_store_url
    filled.group.seal()
    publish_store(filled.store, url, storage_options=opts)
    store = FeatureStore.open(url, storage_options=opts)
    assert store.published
    (report,) = verify_store(store)
    assert report.ok, report.errors
    lookup = FeatureLookup.open(
        store, dataset="coco", split="train", teacher="toy-text", cache_dir=tmp_path / "c"
    )
    ids = sorted(filled.expected)[:4]
    np.testing.assert_array_equal(
        lookup.gather(ids).astype(np.float32), np.stack([filled.expected[i] for i in ids])
    )
    result = pull_store(store, str(tmp_path / "local"))
    assert list(result.groups.values()) == ["pulled"]
    assert os.path.isfile(tmp_path / "local" / filled.group.rel / "sealed.json")


def test_tampered_id_index_is_refused_naming_it(served, published, filled, tmp_path):
    index_file = published / filled.group.rel / "id_index.bin"
    if not index_file.exists():
        pytest.skip("this cusa seals without an id index")
    data = bytearray(index_file.read_bytes())
    data[-1] ^= 0x01
    index_file.write_bytes(bytes(data))
    store = FeatureStore.open(served.url)
    with pytest.raises(StoreError, match=r"id_index.bin'? does not match its recorded SHA-256"):
        FeatureLookup.open(
            store, dataset="coco", split="train", teacher="toy-text", cache_dir=tmp_path / "c"
        )


def test_publish_cli_refuses_then_publishes(filled, tmp_path):
    out = tmp_path / "pub"
    result = runner.invoke(
        app, ["store", "publish", "--store", filled.store.url, "--out", str(out)]
    )
    assert result.exit_code == 2 and "not sealed" in result.output
    assert result.output.strip().count("\n") == 0  # one line
    filled.group.seal()
    result = runner.invoke(
        app,
        ["store", "publish", "--store", filled.store.url, "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [g["path"] for g in summary["groups"]] == [filled.group.rel]
    assert FeatureStore.open(out).published


def test_large_chunk_copy_path_with_progress_bar(served, filled, tmp_path, monkeypatch):
    import cusa.store.fs as store_fs

    monkeypatch.setattr(store_fs, "PROGRESS_MIN_BYTES", 1)  # every chunk counts as large
    seen: list[int] = []
    real = store_fs.StoreFS.copy_to_local

    def spy(self, rel, target, **kw):
        assert kw.get("progress") is not None  # the bar's update hook is wired in
        seen.append(1)
        return real(self, rel, target, **kw)

    monkeypatch.setattr(store_fs.StoreFS, "copy_to_local", spy)
    lookup = FeatureLookup.open(
        FeatureStore.open(served.url), dataset="coco", split="train", teacher="toy-text",
        cache_dir=tmp_path / "c",
    )  # fmt: skip
    assert seen and len(lookup) == len(filled.expected)
