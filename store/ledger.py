"""The manifest of a group, its failure ledger: one row per sample, ok or failed with a reason.

Every part holds the ``manifest.parquet`` of its shard; sealing merges them into the group's
``manifest.parquet``, where each ok sample carries its row in the sealed arrays (see
:mod:`cusa.store.layout`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("row", pa.int64()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
#: Longest failure reason kept in the ledger; longer ones are cut (a reason never holds a whole
#: caption or file).
MAX_REASON_CHARS = 500
_BYTES_LITERAL = re.compile(r"""\bb(['"])(?:\\.|(?!\1).)*\1""")


def ledger_text(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """A failure reason as the ledger keeps it: one line, escaped, bounded, no file bytes.

    Byte-string literals (e.g. the first bytes of a file that is not an image) are withheld,
    characters that are not printable (newlines, control codes, undecodable bytes) are escaped,
    and the text is cut to ``limit`` characters.
    """
    text = _BYTES_LITERAL.sub("<bytes withheld>", str(reason))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape_char(c) for c in text)
    if len(text) > limit:
        text = f"{text[: limit - 30]}... [{len(text):,} chars, cut]"
    return text


def _escape_char(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return c.encode("unicode_escape", "backslashreplace").decode("ascii")


def manifest_table(
    ids: list[str], rows: list[int], shard: str, errors: list[str | None]
) -> pa.Table:
    """The ledger of one shard: ``errors[i]`` None marks an ok sample, a reason a failed one."""
    return pa.table(
        {
            "sample_id": ids,
            "row": rows,
            "shard": [shard] * len(ids),
            "status": ["ok" if e is None else "failed" for e in errors],
            "error": errors,
        },
        schema=MANIFEST_SCHEMA,
    )


def sealed_manifest(manifest: pa.Table, sorted_ids: list[str]) -> pa.Table:
    """The merged ledger with each ok sample's sealed row, ok samples first, each part by id.

    Vectorised in Arrow: a million-row ledger as Python dicts would cost about 0.5 GB while sealing.
    Both sorts are stable, and UTF-8 byte order is code point order, as in Python.
    """
    import pyarrow.compute as pc

    ok = pc.fill_null(pc.equal(manifest["status"], "ok"), False)
    found = pc.index_in(manifest["sample_id"], value_set=pa.array(sorted_ids, pa.string()))
    rows = pc.if_else(ok, pc.fill_null(found.cast(pa.int64()), -1), pa.scalar(-1, pa.int64()))
    table = manifest.set_column(manifest.schema.get_field_index("row"), "row", rows)
    table = table.append_column("_failed", pc.invert(ok))
    table = table.sort_by([("_failed", "ascending"), ("sample_id", "ascending")])
    return table.drop_columns(["_failed"]).cast(MANIFEST_SCHEMA)


def failed_count(table: pa.Table) -> int:
    """Ledger entries whose status is not ``ok``."""
    import pyarrow.compute as pc

    failed = pc.fill_null(pc.not_equal(table["status"], "ok"), True)
    return int(pc.sum(failed.cast(pa.int64())).as_py() or 0)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a Parquet file."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


#: Rows per batch when a ledger is streamed (:func:`manifest_batches`).
MANIFEST_BATCH_ROWS = 1_000_000


def manifest_batches(source: Any, batch_rows: int = MANIFEST_BATCH_ROWS) -> Iterator[pa.Table]:
    """The ledger in the Parquet file ``source`` (a path or a seekable file), a batch of rows at
    a time, each cut and cast to :data:`MANIFEST_SCHEMA`: a 100M-row ledger never whole.

    Raises:
        pyarrow.ArrowException, ValueError, KeyError: the file is not such a ledger.
    """
    parquet = pq.ParquetFile(source)
    missing = [n for n in MANIFEST_SCHEMA.names if n not in parquet.schema_arrow.names]
    if missing:
        raise KeyError(f"ledger columns {missing} are missing")
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=MANIFEST_SCHEMA.names):
        yield pa.Table.from_batches([batch]).cast(MANIFEST_SCHEMA)


def failed_rows(table: pa.Table) -> pa.Table:
    """The entries of ``table`` whose status is not ``ok`` (a missing status counts as failed)."""
    import pyarrow.compute as pc

    return table.filter(pc.fill_null(pc.not_equal(table["status"], "ok"), True))


def read_manifest(data: bytes) -> pa.Table:
    """The ledger in the Parquet bytes ``data``, cut and cast to :data:`MANIFEST_SCHEMA`.

    Raises:
        pyarrow.ArrowException, ValueError, KeyError: the bytes are not such a ledger.
    """
    table = pq.read_table(io.BytesIO(data))
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
