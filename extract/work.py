"""Units of extraction work, shared by the local and the Ray runner so both give the same bits.

A shard is read and prepared into *work rows*: fixed batches of prepared images or captions
(in shard order, ``batch_size`` at a time) plus one ``end`` row carrying the failure ledger and
stage timings. A teacher encodes a row into features. Because both runners cut batches the
same way, each sample is encoded in the same batch whatever runner or worker count is used.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cusa.errors import SampleError
from cusa.extract.readers.base import ShardRef
from cusa.extract.teachers.base import Teacher

IMAGE, TEXT, END = "image", "text", "end"


@dataclass(frozen=True)
class WorkRow:
    """One batch of prepared inputs (``kind`` image/text) or a shard's ``end`` record.

    In-process (local runner) a batch of prepared images stays a numpy array. Rows become plain
    dicts of str/bytes/int/lists only when they travel through Ray Data; the array is then
    carried as ``.npy`` bytes (loaded with ``allow_pickle=False``).
    """

    shard: str
    kind: str
    seq: int
    ids: list[str]
    payload: bytes = b""
    texts: tuple[str, ...] = ()
    meta: str = "{}"
    array: np.ndarray | None = None  # prepared images in-process; ``payload`` once serialised

    def images(self) -> np.ndarray:
        """The prepared image batch ``(B, 3, S, S)``."""
        return self.array if self.array is not None else bytes_to_array(self.payload)

    def to_dict(self) -> dict[str, Any]:
        payload = self.payload if self.array is None else array_to_bytes(self.array)
        return {
            "shard": self.shard,
            "kind": self.kind,
            "seq": self.seq,
            "ids": list(self.ids),
            "payload": payload,
            "texts": list(self.texts),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkRow:
        return cls(
            shard=str(d["shard"]),
            kind=str(d["kind"]),
            seq=int(d["seq"]),
            ids=[str(i) for i in d["ids"]],
            payload=bytes(d["payload"]),
            texts=tuple(str(t) for t in d["texts"]),
            meta=str(d["meta"]),
        )


def array_to_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def bytes_to_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def prepare_shard(
    reader: Any,
    shard: ShardRef,
    image_teacher: Teacher | None,
    text_teacher: Teacher | None,
    batch_size: int,
) -> Iterator[WorkRow]:
    """Read one shard and yield its prepared batches, then its ``end`` row.

    Bad samples never stop the shard: each goes to the ledger with its reason.
    """
    failures: dict[str, list[tuple[str, str]]] = {IMAGE: [], TEXT: []}
    pending: dict[str, tuple[list[str], list[Any]]] = {IMAGE: ([], []), TEXT: ([], [])}
    seq = {IMAGE: 0, TEXT: 0}
    counts = {"read": 0, IMAGE: 0, TEXT: 0}
    timing = {"read_s": 0.0, "prepare_s": 0.0}

    def flush(kind: str) -> Iterator[WorkRow]:
        ids, items = pending[kind]
        if not ids:
            return
        if kind == IMAGE:
            row = WorkRow(shard.key, IMAGE, seq[kind], list(ids), array=np.stack(items))
        else:
            row = WorkRow(shard.key, TEXT, seq[kind], list(ids), texts=tuple(items))
        seq[kind] += 1
        pending[kind] = ([], [])
        yield row

    samples = iter(reader.read(shard))
    while True:
        t0 = time.perf_counter()
        try:
            sample = next(samples)
        except StopIteration:
            timing["read_s"] += time.perf_counter() - t0
            break
        t1 = time.perf_counter()
        timing["read_s"] += t1 - t0
        counts["read"] += 1
        if image_teacher is not None:
            try:
                if sample.image is None:
                    raise SampleError(sample.image_error or "no image data")
                pending[IMAGE][1].append(image_teacher.prepare(sample.image))
                pending[IMAGE][0].append(sample.image_id)
                counts[IMAGE] += 1
            except SampleError as exc:
                failures[IMAGE].append((sample.image_id, _reason(exc)))
        if text_teacher is not None:
            if getattr(sample, "caption_error", None):
                # The captions could not be read at all (e.g. malformed JSON in a tar).
                failures[TEXT].append((f"{sample.image_id}#*", f"DatasetError: {sample.caption_error}"))
            elif not sample.captions and (sample.image_error or "").startswith("truncated tar"):
                # A tar that broke off inside this sample lost its captions too; a text-only
                # run must ledger that as well (the image ledger only exists with an image teacher).
                failures[TEXT].append((f"{sample.image_id}#*", f"DatasetError: {sample.image_error}"))
            for cid, caption in zip(sample.caption_ids, sample.captions, strict=True):
                try:
                    pending[TEXT][1].append(text_teacher.prepare(caption))
                    pending[TEXT][0].append(cid)
                    counts[TEXT] += 1
                except SampleError as exc:
                    failures[TEXT].append((cid, _reason(exc)))
        timing["prepare_s"] += time.perf_counter() - t1
        for kind in (IMAGE, TEXT):
            if len(pending[kind][0]) >= batch_size:
                yield from flush(kind)
    for kind in (IMAGE, TEXT):
        yield from flush(kind)
    meta = {
        "batches": {IMAGE: seq[IMAGE], TEXT: seq[TEXT]},
        "failures": failures,
        "counts": counts,
        "timing": timing,
        "source": shard.source,
    }
    yield WorkRow(shard.key, END, 0, [], meta=json.dumps(meta))


def encode_row(row: WorkRow, teacher: Teacher) -> tuple[np.ndarray, float]:
    """Encode one prepared batch; returns ``(features (B, dim) float32, seconds)``."""
    t0 = time.perf_counter()
    batch: Any = row.images() if row.kind == IMAGE else list(row.texts)
    feats = np.asarray(teacher.encode(batch), dtype=np.float32)
    return feats, time.perf_counter() - t0
