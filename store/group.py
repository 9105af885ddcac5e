"""``FeatureGroup``: the features of one teacher over one dataset split, in one Zarr v3 group.

A group checks its records when read (a malformed one raises :class:`BrokenGroupError` naming
the file and the fix), commits shards (:mod:`cusa.store.commits`), lists the committed feature
files for readers, and seals (:mod:`cusa.store.sealing`). The layout is in
:mod:`cusa.store.layout`; groups are opened through :class:`cusa.store.FeatureStore`.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ..errors import StoreError, StoreSpecMismatchError
from .commits import (
    WriteResult,
    check_rows,
    commit_rel,
    is_commit_record,
    new_commit_record,
    new_part_name,
    records_stamp,
    write_part,
)
from .fs import StoreFS
from .layout import DTYPES, MANIFEST, SEALED, Segment, json_bytes, parse_group_leaf
from .ledger import (
    MANIFEST_SCHEMA,
    failed_rows,
    ledger_text,
    manifest_batches,
    read_manifest,
)
from .sealing import (
    SEAL_ATTEMPTS,
    is_seal_record,
    new_seal_record,
    remove_temp_files,
    sort_ids_external,
    write_sealed_index,
    write_sealed_manifest,
    write_sorted_arrays,
)
from .spec import format_spec_diff, spec_diff

log = logging.getLogger(__name__)


class BrokenGroupError(StoreError):
    """One group of a store is malformed; other groups stay readable."""


class StoreRoot(Protocol):
    """What a group uses of the store it belongs to (a :class:`cusa.store.FeatureStore`)."""

    fs: StoreFS

    @property
    def url(self) -> str: ...


class FeatureGroup:
    """Features of one teacher over one dataset split."""

    def __init__(self, store: StoreRoot, rel: str) -> None:
        self.store = store
        self.fs = store.fs
        self.rel = rel
        self.attrs: dict[str, Any] = self._load_attrs()

    def _broken(self, what: str, fix: str | None = None) -> BrokenGroupError:
        fix = fix or (
            "restore it from a backup, or delete the group folder and re-extract it "
            "(other groups are not affected)"
        )
        return BrokenGroupError(f"group {self.url!r} is broken: {what}; {fix}")

    def _load_json(self, name: str) -> Any:
        """A JSON file of this group; malformed content raises :class:`BrokenGroupError`."""
        try:
            return self.fs.read_json(f"{self.rel}/{name}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._broken(f"{name} is not valid JSON ({type(exc).__name__}: {exc})") from exc

    def _load_attrs(self) -> dict[str, Any]:
        meta = self._load_json("zarr.json")
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        cusa = attrs.get("cusa") if isinstance(attrs, dict) else None
        if not isinstance(cusa, dict):
            raise self._broken(
                "zarr.json holds no cusa attributes (attributes['cusa'] must be an object)"
            )
        spec = cusa.get("spec")
        if not isinstance(spec, dict):
            raise self._broken(
                f"the teacher spec in zarr.json is {type(spec).__name__}, not an object"
            )
        missing = [
            k
            for k in (
                "name",
                "model",
                "weights_sha256",
                "preprocessing",
                "output_kind",
                "dim",
                "dtype",
            )
            if k not in spec
        ]
        if missing:
            raise self._broken(f"the teacher spec in zarr.json lacks fields {missing}")
        dim = spec["dim"]
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise self._broken(f"the teacher spec's dim is {dim!r}, not a positive integer")
        if spec["dtype"] not in DTYPES:
            raise self._broken(
                f"the teacher spec's dtype is {spec['dtype']!r}, not one of {DTYPES}"
            )
        if not isinstance(spec["name"], str):
            raise self._broken(f"the teacher spec's name is {spec['name']!r}, not a string")
        for key in ("fingerprint", "dataset", "split"):
            if not isinstance(cusa.get(key), str):
                raise self._broken(
                    f"attributes['cusa'][{key!r}] is {cusa.get(key)!r}, not a string"
                )
        return cusa

    def __repr__(self) -> str:
        return f"FeatureGroup({self.url!r})"

    @property
    def url(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.rel}"

    @property
    def spec(self) -> dict[str, Any]:
        return self.attrs["spec"]

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def dataset(self) -> str:
        return self.attrs["dataset"]

    @property
    def leaf(self) -> str:
        """The group's folder name: ``<teacher>@<fp>`` or ``<teacher>@<fp>-<dtype>``."""
        return self.rel.rsplit("/", 1)[-1]

    @property
    def label(self) -> str:
        """How commands name this group: its folder name, with the dtype when not in it."""
        return (
            self.leaf if parse_group_leaf(self.leaf)[2] else f"{self.leaf} ({self.spec['dtype']})"
        )

    def matches(self, teacher: str) -> bool:
        """Whether ``teacher`` names this group: name, fingerprint, ``name@fp`` or folder name."""
        name, fp = self.spec["name"], self.fingerprint
        return teacher in (name, fp, f"{name}@{fp}", self.leaf)

    @property
    def source(self) -> dict[str, Any] | None:
        """How the dataset was opened when this group was created (None for older groups)."""
        src = self.attrs.get("dataset_source")
        return src if isinstance(src, dict) else None

    @property
    def split(self) -> str:
        return self.attrs["split"]

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.spec["dtype"])

    def check_compatible(
        self,
        spec: dict[str, Any],
        manifest_hash: str | None,
        manifest_info: dict[str, Any] | None = None,
    ) -> None:
        """Refuse a spec or dataset manifest that differs from what the group recorded.

        The message says what changed (the teacher spec's fields; the dataset's ids or captions;
        or only its cut into shards) and how to proceed.
        """
        diff = spec_diff(self.spec, spec)
        if diff:
            fields = format_spec_diff(diff)
            raise StoreSpecMismatchError(
                f"teacher spec for {self.url!r} differs from the one recorded in the store "
                f"({fields}); use another --store, or remove the group to re-extract"
            )
        recorded = self.attrs.get("manifest_hash")
        if manifest_hash is None or recorded is None or recorded == manifest_hash:
            return
        if recorded == (manifest_info or {}).get("legacy_hash"):
            # Written before the image manifest covered file content (sizes, sampled hashes):
            # the ids and paths match, the bytes cannot be checked against this group.
            log.warning("%s: recorded before image content was hashed; not checked", self.rel)
            return
        raise StoreSpecMismatchError(self._manifest_change(recorded, manifest_hash, manifest_info))

    def _manifest_change(self, recorded: str, given: str, info: dict[str, Any] | None) -> str:
        old = self.attrs.get("dataset_manifest")
        old = old if isinstance(old, dict) else {}
        new = info or {}
        # The group's URL once (in the fix): the message must fit one line of 500 characters.
        where = f"{self.dataset}/{self.split}"
        redo = (
            f"To re-extract, delete the group folder {self.url!r}; to keep both, give this "
            "dataset its own name in the store with --name NAME, or another --store"
        )
        same_content = old.get("content_hash") and old.get("content_hash") == new.get(
            "content_hash"
        )
        if same_content and old.get("shard_size") != new.get("shard_size"):
            return (
                f"the dataset {where} is unchanged but cut into other shards: written with "
                f"--shard-size {old.get('shard_size')} ({old.get('shards')} shards), this run "
                f"uses {new.get('shard_size')} ({new.get('shards')}); re-run with --shard-size "
                f"{old.get('shard_size')} to resume it. {redo}"
            )
        hashes = f"manifest_hash: stored {str(recorded)[:8]!r} != given {str(given)[:8]!r}"
        if old.get("format") is None:
            what = (
                f"was written by an older cusa whose manifest did not cover captions, or its ids "
                f"or shards changed since ({hashes})"
            )
        else:
            counts = [
                f"{k} {old.get(k)} -> {new.get(k)}"
                for k in ("images", "captions", "shards")
                if k in old and k in new and old.get(k) != new.get(k)
            ]
            what = (
                "changed since this group was extracted: ids, captions, image files (size, "
                f"sampled bytes) or tars differ ({', '.join(counts or [hashes])})"
            )
        return (
            f"dataset manifest of {where} {what}; resuming would mix old and new features. {redo}"
        )

    # -- commits ----------------------------------------------------------------------------

    def is_committed(self, shard: str) -> bool:
        return self.fs.exists(commit_rel(self.rel, shard))

    def commit_records(self) -> list[dict[str, Any]]:
        """Every commit record, sorted by shard key.

        Raises:
            BrokenGroupError: a record is not valid JSON or lacks its fields; the message names
                the file and says to remove it and re-run the extraction for that shard.
        """
        names = [n for n in self.fs.ls(f"{self.rel}/commits") if n.endswith(".json")]
        # one batch of requests on a remote store, not a round trip per shard
        data = self.fs.read_many([f"{self.rel}/commits/{n}" for n in names])
        records = [self._commit_record(n, d) for n, d in zip(names, data, strict=True)]
        return sorted(records, key=lambda r: r["shard"])

    def _commit_record(self, name: str, data: bytes | None = None) -> dict[str, Any]:
        """The commit record ``commits/<name>``, from ``data`` when its bytes were read."""
        fix = f"delete commits/{name} of the group and re-run the extraction to redo that shard"
        try:
            if data is None:
                data = self.fs.read_bytes(f"{self.rel}/commits/{name}")
            rec = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._broken(f"commit record commits/{name} is not valid JSON", fix) from exc
        if not is_commit_record(rec):
            raise self._broken(
                f"commit record commits/{name} lacks a valid shard, part, rows or features_sha256",
                fix,
            )
        return rec

    def committed_shards(self) -> list[str]:
        return [r["shard"] for r in self.commit_records()]

    @property
    def sealed(self) -> dict[str, Any] | None:
        """The seal record, or None while shards are still being written.

        Raises:
            BrokenGroupError: ``sealed.json`` is malformed.
        """
        rel = f"{self.rel}/{SEALED}"
        if not self.fs.exists(rel):
            return None
        record = self._load_json(SEALED)
        fix = (
            f"delete {SEALED} and re-run the extraction (it re-seals from the commits if the "
            "parts are still there), or delete the group folder and re-extract"
        )
        if not is_seal_record(record):
            raise self._broken(
                f"{SEALED} is not a seal record (rows, chunk_rows and chunk_sha256 that agree)",
                fix,
            )
        return record

    def write_shard(
        self,
        shard: str,
        sample_ids: Sequence[str],
        features: np.ndarray,
        failures: Iterable[tuple[str, str]] = (),
        source: str = "",
    ) -> WriteResult:
        """Commit one shard atomically. Re-running a committed shard does nothing.

        Args:
            shard: the shard key.
            sample_ids: ids of the rows of ``features``; unique.
            features: ``(n, dim)`` array; cast to the spec dtype.
            failures: ``(sample_id, reason)`` of samples that produced no features (the ledger).
            source: where the shard came from, for the manifest.

        Raises:
            StoreError: NaN/inf features, duplicate ids, or a shape that does not match the spec.
        """
        failures = [(str(i), ledger_text(str(r))) for i, r in failures]
        if self.is_committed(shard):
            return WriteResult(shard, "skipped", 0, 0)
        if self.sealed:
            raise StoreError(
                f"cannot commit shard {shard!r} to {self.url!r}: the group is sealed (complete); "
                "its dataset manifest lists no such pending shard — re-extract into a new group"
            )
        ids = [str(i) for i in sample_ids]
        arr = check_rows(shard, ids, features, failures, self.spec, self.url)

        part = new_part_name(shard)
        part_rel = f"{self.rel}/parts/{part}"
        try:
            digest = self._write_part(part_rel, shard, ids, arr, failures, source)
        except BaseException as exc:
            # Never leave a half-written part behind (disk full, I/O error, a value zarr or
            # Parquet cannot store, an interrupt). A writer that committed this shard meanwhile
            # may also have sealed and removed parts/ under us.
            self.fs.remove(part_rel)
            if isinstance(exc, OSError) and self.is_committed(shard):
                return WriteResult(shard, "lost-race", 0, 0)
            raise
        record = new_commit_record(shard, part, len(ids), len(failures), self.spec, digest, source)
        if not self.fs.create_exclusive(commit_rel(self.rel, shard), json_bytes(record)):
            log.info(
                "shard %s of %s was committed by another writer; dropping ours", shard, self.rel
            )
            self.fs.remove(part_rel)
            return WriteResult(shard, "lost-race", 0, 0)
        return WriteResult(shard, "committed", len(ids), len(failures))

    def _write_part(
        self,
        part_rel: str,
        shard: str,
        ids: list[str],
        arr: np.ndarray,
        failures: list[tuple[str, str]],
        source: str,
    ) -> str:
        """Write the part folder of a shard, not yet committed; returns its features' SHA-256."""
        return write_part(self.fs, part_rel, shard, ids, arr, failures)

    # -- reading ----------------------------------------------------------------------------

    def manifest(self) -> pa.Table:
        """Every sample of the committed shards: id, row, shard, status and error (the ledger).

        Raises:
            BrokenGroupError: a manifest file is missing or not valid Parquet of the schema.
        """
        if self.sealed:
            return self._read_manifest(f"{self.rel}/{MANIFEST}")
        tables = [
            self._read_manifest(f"{self.rel}/parts/{r['part']}/{MANIFEST}")
            for r in self.commit_records()
        ]
        return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()

    def _read_manifest(self, rel: str) -> pa.Table:
        name = rel[len(self.rel) + 1 :]
        try:
            return read_manifest(self.fs.read_bytes(rel))
        except FileNotFoundError as exc:
            raise self._broken(f"{name} is missing") from exc
        except (pa.ArrowException, ValueError, KeyError) as exc:
            raise self._broken(
                f"{name} is not a valid ledger ({type(exc).__name__}: {exc})"
            ) from exc

    def failures(self) -> list[dict[str, Any]]:
        """The ledger's failed entries (id, row, shard, status, error), read a batch at a time:
        a Python dict per failure, none per committed sample.

        Raises:
            BrokenGroupError: a manifest file is missing or not valid Parquet of the schema.
        """
        if self.sealed:
            rels = [f"{self.rel}/{MANIFEST}"]
        else:
            rels = [f"{self.rel}/parts/{r['part']}/{MANIFEST}" for r in self.commit_records()]
        out: list[dict[str, Any]] = []
        for rel in rels:
            name = rel[len(self.rel) + 1 :]
            try:
                source = (
                    self.fs.local_path(rel)
                    if self.fs.is_local
                    else io.BytesIO(self.fs.read_bytes(rel))
                )
                for batch in manifest_batches(source):
                    out += failed_rows(batch).to_pylist()
            except FileNotFoundError as exc:
                raise self._broken(f"{name} is missing") from exc
            except (pa.ArrowException, ValueError, KeyError, OSError) as exc:
                raise self._broken(
                    f"{name} is not a valid ledger ({type(exc).__name__}: {exc})"
                ) from exc
        return out

    def segments(self) -> list[Segment]:
        """The raw feature files of the committed rows, in row order (see FeatureLookup)."""
        sealed = self.sealed
        if sealed:
            segs = []
            for i, (rows, digest) in enumerate(
                zip(sealed["chunk_rows"], sealed["chunk_sha256"], strict=True)
            ):
                segs.append(
                    Segment(
                        f"{self.rel}/features/c/{i}/0", rows, digest, f"{self.rel}/sample_id", i
                    )
                )
            return segs
        return self._part_segments(self.commit_records())

    def _part_segments(self, records: list[dict[str, Any]]) -> list[Segment]:
        """The committed parts of ``records`` as segments, in row order of an unsealed group."""
        return [
            Segment(
                f"{self.rel}/parts/{r['part']}/features/c/0/0",
                r["rows"],
                r["features_sha256"],
                f"{self.rel}/parts/{r['part']}/sample_id",
                0,
            )
            for r in records
            if r["rows"] > 0
        ]

    def read_ids(self, segment: Segment) -> list[str]:
        """The sample ids of one segment."""
        import zarr

        try:
            arr = zarr.open_array(
                store=self.fs.zarr_store(segment.ids_rel, read_only=True), mode="r"
            )
            if segment.ids_rel == f"{self.rel}/sample_id":  # a sealed chunk: its slice
                start = sum(s.rows for s in self.segments()[: segment.index])
                return [str(x) for x in arr[start : start + segment.rows]]
            return [str(x) for x in arr[:]]
        except BrokenGroupError:
            raise
        except FileNotFoundError:
            raise  # a concurrent seal may have removed a part: callers retry from the seal
        except (OSError, ValueError, KeyError, TypeError) as exc:
            name = segment.ids_rel[len(self.rel) + 1 :]
            raise self._broken(
                f"the sample_id array {name} is unreadable ({type(exc).__name__})"
            ) from exc

    def read_segment(self, segment: Segment) -> np.ndarray:
        """Read one segment's raw bytes (checked against its size) as an ``(rows, dim)`` array."""
        data = self.fs.read_bytes(segment.rel)
        expected = segment.rows * self.dim * self.dtype.itemsize
        if len(data) != expected:
            raise StoreError(
                f"chunk file {self.fs.path(segment.rel)!r} has {len(data)} bytes, expected "
                f"{expected} ({segment.rows} rows x {self.dim} x {self.dtype}); it is truncated "
                "or corrupt — run `cusa store verify` and re-extract the shard"
            )
        return np.frombuffer(data, dtype=self.dtype).reshape(segment.rows, self.dim)

    # -- sealing ----------------------------------------------------------------------------

    def seal(self, expected_shards: Iterable[str] | None = None) -> dict[str, Any]:
        """Consolidate every committed shard into group-level arrays sorted by sample id.

        Only seals when every ``expected_shards`` key is committed. Idempotent.

        Returns:
            The seal record.
        """
        existing = self.sealed
        if existing:
            # A seal killed after its record was written may have left parts behind.
            if self.fs.exists(f"{self.rel}/parts"):
                self.fs.remove(f"{self.rel}/parts")
            remove_temp_files(self.fs, self.rel)
            return existing
        records = self.commit_records()
        if expected_shards is not None:
            missing = sorted(set(expected_shards) - {r["shard"] for r in records})
            if missing:
                raise StoreError(
                    f"cannot seal {self.url!r}: {len(missing)} shard(s) not committed yet, "
                    f"e.g. {missing[:3]}; re-run the extraction to finish them"
                )
        for attempt in range(SEAL_ATTEMPTS):
            try:
                return self._seal(records)
            except Exception:
                # Another writer finishing the same dataset may be sealing at the same moment
                # (and removing the parts we read). Its seal record is the answer; without one
                # yet, give it a moment and try again.
                if self.sealed:
                    return self.sealed
                if attempt == SEAL_ATTEMPTS - 1:
                    raise
                log.info("sealing %s raced another writer; retrying", self.rel)
                time.sleep(1.0 + attempt)
                if self.sealed:
                    return self.sealed
                records = self.commit_records()
        raise AssertionError("unreachable")

    def _seal(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        existing = self.sealed
        if existing:
            # A writer that lost the race: the other's seal record is the answer, and its
            # arrays, index and manifest are left as they are (never rebuilt from themselves).
            return existing
        # The parts of ``records``, never ``segments()``: that would turn into the sealed chunks
        # if another writer seals meanwhile. A part it removes then fails the read
        # (FileNotFoundError), and ``seal`` answers with that writer's record.
        segs = self._part_segments(records)
        # The ids are sorted out of core into a temporary file that every step below streams:
        # memory does not grow with N (cusa.store.sealing); TMPDIR says where the files go.
        with tempfile.TemporaryDirectory(prefix="cusa-seal-") as tmp:
            ids = sort_ids_external(self, segs, tmp)
            chunk_rows, chunk_sha = write_sorted_arrays(
                self.fs, self.rel, segs, ids, self.dim, self.dtype, tmp
            )
            write_sealed_index(self.fs, self.rel, ids, tmp)
            failed = write_sealed_manifest(self, segs, ids, tmp)
        record = new_seal_record(
            ids.rows,
            failed,
            [r["shard"] for r in records],
            chunk_rows,
            chunk_sha,
            self.checked_records_stamp(),
        )
        self.fs.write_bytes_atomic(f"{self.rel}/{SEALED}", json_bytes(record))
        # The parts are now redundant; readers that still map them keep their open files.
        self.fs.remove(f"{self.rel}/parts")
        remove_temp_files(self.fs, self.rel)
        log.info("sealed %s: %d rows in %d chunk(s)", self.rel, ids.rows, len(chunk_rows))
        return record

    def checked_records_stamp(self) -> str | None:
        """The stamp of the commit records (:func:`~cusa.store.commits.records_stamp`) once
        every record is read and checked again, for the seal record (written by the seal and by
        ``cusa store reindex``): readers that find the same stamp skip reading them. None when a
        record changed while we read them, or on object stores.

        Raises:
            BrokenGroupError: a record is not valid JSON or lacks its fields.
        """
        stamp = records_stamp(self.fs, self.rel)
        if stamp is None:
            return None
        self.commit_records()  # each one valid JSON with its fields, else BrokenGroupError
        return stamp if records_stamp(self.fs, self.rel) == stamp else None

    def nbytes_on_disk(self) -> int:
        try:
            return self.fs.du(self.rel)
        except (OSError, NotImplementedError):
            return 0
