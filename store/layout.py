"""The on-disk layout of a store: file names, folder names and how its JSON records are written.

Layout of a store rooted at ``ROOT`` (a directory or an fsspec URL)::

    ROOT/cusa_store.json                       marker: format name and layout version
    ROOT/<dataset>/<split>/<teacher>@<fp>/     one Zarr v3 group (float16 features; float32
                                               ones live beside it in <teacher>@<fp>-float32/)
        zarr.json                              attributes["cusa"]: teacher spec, manifest hash...
        parts/<shard>.<token>/                 one committed shard: a Zarr group holding
            features  (n, D)                       uncompressed, one chunk
            sample_id (n,)                         UTF-8 strings
            manifest.parquet                       sample_id, row, shard, status, error
        commits/<shard>.json                   the commit record, written last and exclusively
        features  (N, D)                       after sealing: all rows sorted by sample id
        sample_id (N,)
        manifest.parquet                       after sealing: every sample, failures included
        id_index.bin                           after sealing: id hashes, rows and id bytes
                                               that readers memory-map (cusa.store.id_index)
        sealed.json                            the seal record, written last

A shard becomes visible to readers only when its commit record exists; the record names the
part directory, its row count and the SHA-256 of its feature bytes. Two writers racing on a
shard each write their own uniquely named part, and only the one that creates the commit
record wins; the loser deletes its part (:mod:`cusa.store.commits`). Sealing consolidates every
committed shard into the group-level ``features``/``sample_id`` arrays so that a training reader
memory-maps one file (:mod:`cusa.store.sealing`). Rows are keyed by sample id, never by
position: sealing sorts by id, so a store does not depend on shard layout, worker count or run
order.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from typing import Any

LAYOUT_VERSION = 1
MARKER = "cusa_store.json"
SEALED = "sealed.json"
MANIFEST = "manifest.parquet"
#: The sealed group's id index (:mod:`cusa.store.id_index`), an extra file older cusa ignores.
ID_INDEX = "id_index.bin"
#: Held (created exclusively) while ``cusa store reindex`` writes the id index.
ID_INDEX_LOCK = "id_index.lock"
DTYPES = ("float16", "float32", "int8")
#: dtypes that extraction writes; ``int8`` groups are made from a sealed group
#: (``cusa store quantize``, :mod:`cusa.store.quant`).
WRITE_DTYPES = ("float16", "float32")
#: A published store's consolidated index (``cusa store publish``, :mod:`cusa.store.publish`).
PUBLISHED_INDEX = "cusa_index.json"
#: Groups of this dtype keep the plain ``<teacher>@<fp>`` folder; others add ``-<dtype>``, so
#: features of one teacher in several dtypes live side by side and old stores keep their paths.
PLAIN_DTYPE = "float16"
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
# Files a desktop or a sync tool drops into folders; never foreign content, never a group.
_JUNK = re.compile(r"^(\.DS_Store|Thumbs\.db|desktop\.ini|\._.*|\.directory)$")


@dataclass(frozen=True)
class Segment:
    """A raw little-endian C-order feature file holding ``rows`` consecutive rows."""

    rel: str
    rows: int
    sha256: str
    ids_rel: str
    index: int


def is_junk(name: str) -> bool:
    """Whether ``name`` is a desktop/sync-tool file (``.DS_Store``...) to be ignored."""
    return bool(_JUNK.match(name))


def safe_name(name: str) -> str:
    """A path component made of safe characters only (``/`` and friends become ``_``)."""
    cleaned = _SAFE.sub("_", str(name)).strip("._") or "_"
    return cleaned


def group_leaf(teacher: str, fingerprint: str, dtype: str = PLAIN_DTYPE) -> str:
    """The folder name of a group: ``<teacher>@<fp>``, plus ``-<dtype>`` unless float16."""
    leaf = f"{safe_name(teacher)}@{fingerprint}"
    return leaf if dtype == PLAIN_DTYPE else f"{leaf}-{dtype}"


def parse_group_leaf(leaf: str) -> tuple[str, str, str | None]:
    """``(teacher, fingerprint, dtype)`` of a group folder name; dtype None when not suffixed.

    A folder without a suffix holds float16 features, or float32 ones written by cusa before
    dtypes could live side by side.
    """
    name, _, rest = leaf.partition("@")
    fp, sep, dtype = rest.rpartition("-")
    if sep and dtype in DTYPES and dtype != PLAIN_DTYPE:
        return name, fp, dtype
    return name, rest, None


def now() -> str:
    """The timestamp a record carries: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def json_bytes(obj: Any) -> bytes:
    """A JSON record as the store writes it: indented, keys sorted."""
    return json.dumps(obj, indent=2, sort_keys=True).encode()
