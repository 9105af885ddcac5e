"""Fixtures for the feature-store tests: real stores on disk (and on a local S3 server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from store_helpers import Filled, S3Server, fill_group, free_port, toy_spec

from cusa.store import FeatureStore


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore.open(tmp_path / "store", create=True)


@pytest.fixture
def filled(store) -> Filled:
    """Four shards of six ids, every third one failed, written in shuffled order."""
    group = store.group("coco", "train", toy_spec(), manifest_hash="m" * 16, create=True)
    return fill_group(group, fail_every=3)


# -- a local S3 server ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 on a free port, for the whole session."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores (pip install 'cusa[s3]')")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_store_url(s3_server) -> tuple[str, dict[str, Any]]:
    """A fresh bucket: ``("s3://bucket/store", storage_options)``."""
    return f"s3://{s3_server.new_bucket()}/store", s3_server.storage_options()
