"""Helpers shared by the store tests (imported by conftest and by test modules)."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from cusa.store import FeatureGroup, FeatureStore
from cusa.store.spec import TeacherSpec

DIM = 16


def toy_spec(**changes: Any) -> TeacherSpec:
    """A small real teacher spec (16-d, fp16, normalised)."""
    spec = TeacherSpec(
        name="toy-text",
        modality="text",
        model="tests/toy-text-encoder",
        weights_sha256="ab" * 32,
        preprocessing={"caption": {"lowercase": True, "strip": True}},
        output_kind="sentence",
        dim=DIM,
        dtype="float16",
        normalized=True,
    )
    return spec.replace(**changes) if changes else spec


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)  # (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass
class Filled:
    """A group written shard by shard, and what was written (as stored: fp16 -> float32)."""

    store: FeatureStore
    group: FeatureGroup
    expected: dict[str, np.ndarray]  # sample id -> stored feature row
    failures: dict[str, str]  # sample id -> reason
    shards: dict[str, list[str]]  # shard -> ids with features


def fill_group(
    group: FeatureGroup,
    *,
    shards: int = 4,
    rows: int = 6,
    seed: int = 0,
    shuffle: bool = True,
    fail_every: int = 0,
    prefix: str = "",
) -> Filled:
    """Write ``shards`` shards of ``rows`` ids each, in shuffled shard order.

    Ids interleave across shards (``s{row}_{shard}``) so that sealing must really re-sort.
    With ``fail_every=k`` every k-th sample of each shard is recorded as a failure instead.
    """
    rng = np.random.default_rng(seed)
    expected: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    by_shard: dict[str, list[str]] = {}
    order = rng.permutation(shards) if shuffle else np.arange(shards)
    for s in order:
        shard = f"{prefix}shard-{s:03d}"
        ids = [f"{prefix}s{r:03d}_{s:03d}" for r in range(rows)]
        bad = {i for j, i in enumerate(ids) if fail_every and j % fail_every == fail_every - 1}
        good = [i for i in ids if i not in bad]
        feats = unit_rows(rng, len(good), group.dim)
        result = group.write_shard(
            shard,
            good,
            feats,
            failures=[(i, f"decode error in {i}") for i in sorted(bad)],
            source=f"{shard}.tar",
        )
        assert result.status == "committed"
        stored = feats.astype(group.dtype).astype(np.float32)
        expected.update(zip(good, stored, strict=True))
        failures.update({i: f"decode error in {i}" for i in bad})
        by_shard[shard] = good
    return Filled(group.store, group, expected, failures, by_shard)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def storage_options(self) -> dict[str, Any]:
        # A region other than us-east-1 so s3fs sends a valid LocationConstraint on mkdir.
        return {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "eu-west-1"},
        }

    def new_bucket(self) -> str:
        import s3fs

        name = f"cusa-{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(**self.storage_options()).mkdir(name)
        return name
