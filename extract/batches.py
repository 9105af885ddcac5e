"""Batches of prepared inputs, shared by the local and the Ray runner so both give the same bits.

A shard is read and prepared into *work rows*: fixed batches of prepared images or captions
(in shard order, ``batch_size`` at a time) plus one ``end`` row carrying the failure ledger and
stage timings. A teacher encodes a row into features. Because both runners cut batches the
same way, each sample is encoded in the same batch whatever runner or worker count is used.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, SampleError
from ..image_transforms import default_max_pixels
from ..readers.base import DatasetReader, ShardRef
from ..store.ledger import ledger_text
from .job import END, IMAGE, TEXT, ExtractConfig, ExtractSummary, RowKind
from .progress import ProgressSink
from .teachers import get_teacher
from .teachers.base import Preparer, Teacher
from .writer import ShardWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkRow:
    """One batch of prepared inputs (``kind`` image/text) or a shard's ``end`` record.

    In-process (local runner) a batch of prepared images stays a numpy array. Rows become plain
    dicts of str/bytes/int/lists only when they travel through Ray Data; the array is then
    carried as ``.npy`` bytes (loaded with ``allow_pickle=False``).
    """

    shard: str
    kind: RowKind
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
            "kind": str(self.kind),
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
            kind=RowKind(d["kind"]),
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
    """A ledger reason: bounded, escaped, no file bytes (see :func:`ledger_text`)."""
    return ledger_text(f"{type(exc).__name__}: {exc}")


def is_utf8_text(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (no lone surrogates from undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_id(sample_id: str) -> str:
    """A sample id that is not valid UTF-8, with its undecodable bytes escaped (``caf\\xe9``)."""
    try:
        raw = sample_id.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = sample_id.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


class OutputSizeGuard:
    """Refuse an image whose *resized* size is over the pixel budget, from its header alone.

    The decompression-bomb guard counts source pixels, but a 1 x 100,000 PNG of a few hundred
    bytes passes it and then resizing its short side to 224 asks for 224 x 22,400,000 pixels
    (~26 GB of RGB floats). The teacher's transform says how the short side is resized; images
    whose output would exceed ``max_pixels`` are ledgered before any pixel is decoded.
    """

    def __init__(self, teacher: Preparer) -> None:
        prep = teacher.preparer() if hasattr(teacher, "preparer") else teacher
        resize = getattr(getattr(prep, "transform", None), "resize", None)
        self.resize = int(resize) if isinstance(resize, int) and resize > 0 else None
        self.max_pixels = int(getattr(prep, "max_pixels", None) or default_max_pixels())

    def check(self, data: bytes) -> None:
        if self.resize is None:
            return
        import warnings

        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w, h = Image.open(io.BytesIO(data)).size
        except Exception:  # noqa: BLE001 - undecodable headers are the teacher's to report
            return
        short, long = min(w, h), max(w, h)
        if short <= 0:
            return
        out = self.resize * int(self.resize * long / short)
        if out > self.max_pixels:
            raise SampleError(
                f"image is {w}x{h}; resizing its short side to {self.resize} would make "
                f"{out:,} pixels, over the limit of {self.max_pixels:,} (extreme aspect ratio, "
                "output-size guard); not decoded"
            )


def prepare_shard(
    reader: DatasetReader,
    shard: ShardRef,
    image_teacher: Preparer | None,
    text_teacher: Preparer | None,
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

    def flush(kind: RowKind) -> Iterator[WorkRow]:
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

    guard = OutputSizeGuard(image_teacher) if image_teacher is not None else None
    # Ids ledgered or batched in this shard, per kind: a reader that reports one id twice (e.g.
    # two escaping tar members of one name) must not make the commit fail on a duplicate id.
    used: dict[str, set[str]] = {IMAGE: set(), TEXT: set()}

    def fail(kind: RowKind, sample_id: str, reason: str) -> None:
        if sample_id in used[kind]:
            log.warning(
                "%s %r was already ledgered in shard %s: %s", kind, sample_id, shard.key, reason
            )
            return
        used[kind].add(sample_id)
        failures[kind].append((sample_id, ledger_text(reason)))

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
        if not is_utf8_text(sample.image_id):
            # zarr and Parquet store UTF-8 text only: ledger the sample under an escaped id.
            shown = printable_id(sample.image_id)
            why = (
                f"DatasetError: image id {shown!r} is not valid UTF-8 (undecodable bytes shown "
                "escaped); rename it to UTF-8 to extract it"
            )
            if image_teacher is not None:
                fail(IMAGE, shown, why)
            if text_teacher is not None:
                fail(TEXT, f"{shown}#*", why)
            timing["prepare_s"] += time.perf_counter() - t1
            continue
        if image_teacher is not None:
            try:
                if sample.image is None:
                    raise SampleError(sample.image_error or "no image data")
                if sample.image_id in used[IMAGE]:
                    raise SampleError(f"image id {sample.image_id!r} appears twice in shard")
                if guard is not None:
                    guard.check(sample.image)
                pending[IMAGE][1].append(image_teacher.prepare(sample.image))
                pending[IMAGE][0].append(sample.image_id)
                used[IMAGE].add(sample.image_id)
                counts[IMAGE] += 1
            except SampleError as exc:
                fail(IMAGE, sample.image_id, _reason(exc))
        if text_teacher is not None:
            if getattr(sample, "caption_error", None):
                # The captions could not be read at all (e.g. malformed JSON in a tar).
                fail(TEXT, f"{sample.image_id}#*", f"DatasetError: {sample.caption_error}")
            elif not sample.captions and (sample.image_error or "").startswith("truncated tar"):
                # A tar that broke off inside this sample lost its captions too; a text-only
                # run must ledger that as well (the image ledger only exists with an image teacher).
                fail(TEXT, f"{sample.image_id}#*", f"DatasetError: {sample.image_error}")
            for cid, caption in zip(sample.caption_ids, sample.captions, strict=True):
                try:
                    if cid in used[TEXT]:
                        raise SampleError(f"caption id {cid!r} appears twice in shard")
                    pending[TEXT][1].append(text_teacher.prepare(caption))
                    pending[TEXT][0].append(cid)
                    used[TEXT].add(cid)
                    counts[TEXT] += 1
                except SampleError as exc:
                    fail(TEXT, cid, _reason(exc))
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


def load_teachers(config: ExtractConfig, device: str | None = None) -> dict[RowKind, Teacher]:
    """Build the teachers an :class:`ExtractConfig` names; refuses a teacher of the wrong modality.

    It lives here, beside the other pieces both runners share, so that the Ray actors build
    teachers exactly as the local runner does without importing the runner.
    """
    device = device or config.device
    check_device(device)
    teachers: dict[RowKind, Teacher] = {}
    for modality, name in config.teacher_names().items():
        options: dict[str, Any] = {
            "device": None if device == "auto" else device,
            "dtype": config.dtype,
        }
        if modality == IMAGE and config.image_teacher_weights:
            options["weights"] = config.image_teacher_weights
            if config.allow_unofficial_weights:
                options["allow_unofficial"] = True
        if modality == TEXT and config.raw_captions:
            options["normalize_captions"] = False
        teacher = get_teacher(name, **options)
        if teacher.modality != modality:
            raise ConfigError(
                f"--{modality}-teacher {name!r} is a {teacher.modality} teacher; "
                f"see `cusa teachers list` for {modality} teachers"
            )
        teachers[modality] = teacher
    return teachers


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have, before any model is loaded."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= count:
        have = f"only {count} CUDA device(s) are visible" if count else "no CUDA GPU is visible"
        raise ConfigError(
            f"--device {device!r} is not available: {have} to this process; use --device cpu "
            "(or auto), or check CUDA_VISIBLE_DEVICES and the driver"
        )


@dataclass(frozen=True)
class RunnerJob:
    """What a runner gets from :func:`cusa.extract.runner.extract`: the job, its reader, the
    shards still to do and the loaded teachers, and where results go (the writer commits each
    complete shard; the summary and the progress sink count)."""

    config: ExtractConfig
    reader: DatasetReader
    shards: list[ShardRef]
    teachers: Mapping[RowKind, Teacher]
    writer: ShardWriter
    summary: ExtractSummary
    progress: ProgressSink


class Runner(Protocol):
    """Encodes a job's pending shards and hands each batch to the job's writer.

    Two implement it: :func:`cusa.extract.local_runner.run_local` (in-process) and
    :func:`cusa.extract.ray_runner.run_ray` (Ray Data); both cut batches with
    :func:`prepare_shard`, so they write the same bits.
    """

    def __call__(self, job: RunnerJob) -> None: ...
