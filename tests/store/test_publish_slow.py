"""Slow published-store trials: a pull killed mid-way (a real subprocess, SIGKILL) resumes, and
a short ``cusa train`` reads its soft-label features from a store served over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_publish import Server
from typer.testing import CliRunner

from cusa.cli import app
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.publish import publish_store
from cusa.store.pull import pull_store
from cusa.store.verify import verify_store

pytestmark = pytest.mark.slow


def test_pull_killed_mid_way_resumes(filled, tmp_path):
    filled.group.seal()
    published = tmp_path / "published"
    publish_store(filled.store, str(published))
    rel = filled.group.rel
    server = Server(published)
    # The manifest is copied after the feature chunk: hold it, so the kill lands mid-pull.
    server.handler.faults[f"/{rel}/manifest.parquet"] = "stall"
    local = tmp_path / "local"
    env = {**os.environ, "CUSA_NET_TIMEOUT": "60", "CUSA_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cusa.cli", "store", "pull", server.url, "--store", str(local)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        chunk = local / rel / "features" / "c" / "0" / "0"
        deadline = time.monotonic() + 60
        while not chunk.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert chunk.exists(), "the pull never copied the feature chunk"
        while served_hits(server, f"/{rel}/manifest.parquet") == 0:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert not (local / rel / "zarr.json").exists()
        assert FeatureStore.open(local).groups() == []  # invisible while incomplete
        server.handler.faults.clear()
        result = pull_store(server.url, str(local))
        assert result.groups == {rel: "resumed"} and result.kept_files >= 1
        assert not list((local / rel).rglob("*.partial"))
        assert all(r.ok for r in verify_store(FeatureStore.open(local)))
        lookup = FeatureLookup.open(str(local), dataset="coco", split="train", teacher="toy-text")
        ids = sorted(filled.expected)
        np.testing.assert_array_equal(
            lookup.gather(ids).astype(np.float32), np.stack([filled.expected[i] for i in ids])
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


def served_hits(server: Server, path: str) -> int:
    return server.handler.hits.get(path, 0)


IMAGE_TEACHER = "mobilenetv2"
TEXT_TEACHER = "all-MiniLM-L6-v2"


def _real_store(path: Path) -> None:
    """Real MobileNetV2 / MiniLM features of the embedded coco-sample train split."""
    from cusa.extract.teachers import get_teacher
    from cusa.readers.registry import open_dataset

    try:
        image_teacher, text_teacher = get_teacher(IMAGE_TEACHER), get_teacher(TEXT_TEACHER)
    except Exception as exc:  # noqa: BLE001 - weights not installed: say why and skip
        pytest.skip(f"offline teacher weights unavailable ({exc})")
    reader = open_dataset("coco-sample", split="train")
    store = FeatureStore.open(path, create=True)
    img = store.group(reader.name, reader.split, image_teacher.spec, reader.manifest_hash(), create=True)  # fmt: skip
    txt = store.group(reader.name, reader.split, text_teacher.spec, reader.manifest_hash(), create=True)  # fmt: skip
    for shard in reader.shards():
        samples = list(reader.read(shard))
        images = [image_teacher.prepare(s.image) for s in samples]
        img.write_shard(shard.key, [s.image_id for s in samples], image_teacher.encode(images))
        pairs = [(c, t) for s in samples for c, t in zip(s.caption_ids, s.captions, strict=True)]
        texts = [text_teacher.prepare(t) for _, t in pairs]
        txt.write_shard(shard.key, [c for c, _ in pairs], text_teacher.encode(texts))
    img.seal()
    txt.seal()


def test_short_train_reads_a_store_served_over_http(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from cusa_train.students.clip import ClipConfig, ClipStudent

    monkeypatch.setenv("CUSA_HOME", str(tmp_path / "home"))
    _real_store(tmp_path / "store")
    publish_store(FeatureStore.open(tmp_path / "store"), str(tmp_path / "published"))
    server = Server(tmp_path / "published")
    try:
        torch.manual_seed(0)
        weights = tmp_path / "small-clip.pt"
        small = ClipConfig(
            embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
            vision_patch_size=16, transformer_width=64, transformer_heads=1,
            transformer_layers=1,
        )  # fmt: skip
        torch.save(ClipStudent(small).state_dict(), weights)
        cfg = {
            "model": {"student": "clip-checkpoint", "student_options": {"weights": str(weights)}},
            "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER},
            "data": {
                "dataset": "coco-sample",
                "store": server.url,
                "batch_size": 8,
                "max_samples": 8,
                "captions": "pre_caption",
            },
            "optim": {"epochs": 1, "lr": 1e-4},
            "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
        }
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = CliRunner().invoke(app, ["train", "--config", str(path), "--no-progress"])
        assert result.exit_code == 0, result.output
        # every feature chunk was fetched once into the segment cache, by its SHA-256
        cached = {p.name for p in (tmp_path / "home" / "cache" / "segments").glob("*.bin")}
        for g in FeatureStore.open(server.url).groups():
            assert {f"{h}.bin" for h in g.sealed["chunk_sha256"]} <= cached
            hits = server.handler.hits.get(f"/{g.rel}/features/c/0/0", 0)
            assert hits == 1, (g.rel, hits)
    finally:
        server.stop()
