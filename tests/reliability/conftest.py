"""Fixtures of the fault-injection suite: reference stores, tiny real datasets, an S3 server,
and the log that ``benchmarks/reliability.py`` turns into ``benchmarks/results/reliability.json``.

Trials marked ``slow`` are deselected by the default ``-m 'not slow'`` (pyproject); run them with
``-m slow``. The default run keeps a fast subset of each fault.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import store_snapshot
from reliability_common import LOG_ENV, ReliabilityLog, S3Endpoint, sample_config

from cusa.extract.runner import extract

# -- the figures log -------------------------------------------------------------------------------


_LOG = ReliabilityLog()


@pytest.fixture(scope="session")
def reliability_log() -> ReliabilityLog:
    return _LOG


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(LOG_ENV)
    if path and (_LOG.faults or _LOG.bad_inputs):
        Path(path).write_text(json.dumps(_LOG.to_dict(), indent=2, sort_keys=True))


# -- reference stores ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_reference(tmp_path_factory) -> tuple[Path, dict[str, tuple[list[str], bytes]]]:
    """One uninterrupted local run over the sample split, and its snapshot (ids + bytes)."""
    store = tmp_path_factory.mktemp("reference") / "store"
    summary = extract(sample_config(store))
    assert summary.ok and summary.sealed
    return store, store_snapshot(store)


# -- S3 --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1 (a free port) for the whole session."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores (pip install 'cusa[s3]')")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(f"http://{host}:{port}")
    finally:
        server.stop()
