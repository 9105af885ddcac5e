"""The feature store: one Zarr v3 group per (dataset, split, teacher fingerprint).

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
        sealed.json                            the seal record, written last

A shard becomes visible to readers only when its commit record exists; the record names the
part directory, its row count and the SHA-256 of its feature bytes. Two writers racing on a
shard each write their own uniquely named part, and only the one that creates the commit
record wins; the loser deletes its part. Sealing consolidates every committed shard into the
group-level ``features``/``sample_id`` arrays so that a training reader memory-maps one file.
Rows are keyed by sample id, never by position: sealing sorts by id, so a store does not
depend on shard layout, worker count or run order.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cusa.errors import (
    ConfigError,
    NotAStoreError,
    StoreError,
    StoreSpecMismatchError,
    StoreVersionError,
)
from cusa.paths import default_store
from cusa.store.fs import StoreFS
from cusa.store.spec import format_spec_diff, spec_diff, spec_fingerprint

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MARKER = "cusa_store.json"
SEALED = "sealed.json"
MANIFEST = "manifest.parquet"
# A sealed chunk holds at most this many bytes, so one chunk file stays mmap- and zarr-friendly.
MAX_CHUNK_BYTES = 2**31 - 1
#: Sealing assembles the sorted rows this many bytes at a time (environment variable
#: ``CUSA_SEAL_BLOCK_BYTES`` overrides it): seal memory is bounded by this setting, not by N.
SEAL_BLOCK_BYTES = 64 * 2**20
SEAL_ATTEMPTS = 3
DTYPES = ("float16", "float32")
#: Groups of this dtype keep the plain ``<teacher>@<fp>`` folder; others add ``-<dtype>``, so
#: features of one teacher in several dtypes live side by side and old stores keep their paths.
PLAIN_DTYPE = "float16"
MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("row", pa.int64()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
#: Longest failure reason kept in the ledger; longer ones are cut (a reason never holds a whole
#: caption or file).
MAX_REASON_CHARS = 500
# Files a desktop or a sync tool drops into folders; never foreign content, never a group.
_JUNK = re.compile(r"^(\.DS_Store|Thumbs\.db|desktop\.ini|\._.*|\.directory)$")
_BYTES_LITERAL = re.compile(r"""\bb(['"])(?:\\.|(?!\1).)*\1""")


class BrokenGroupError(StoreError):
    """One group of a store is malformed; other groups stay readable."""


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


def is_junk(name: str) -> bool:
    """Whether ``name`` is a desktop/sync-tool file (``.DS_Store``...) to be ignored."""
    return bool(_JUNK.match(name))


def safe_name(name: str) -> str:
    """A path component made of safe characters only (``/`` and friends become ``_``)."""
    cleaned = _SAFE.sub("_", str(name)).strip("._") or "_"
    return cleaned


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def _spec_dict(spec: Any) -> dict[str, Any]:
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    missing = {"name", "model", "weights_sha256", "preprocessing", "output_kind", "dim"} - set(d)
    if missing:
        raise ConfigError(f"teacher spec is missing fields {sorted(missing)}: {d!r}")
    d.setdefault("dtype", "float16")
    if d["dtype"] not in DTYPES:
        raise ConfigError(f"unsupported feature dtype {d['dtype']!r}; use one of {DTYPES}")
    return d


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


def _fingerprint(spec: dict[str, Any]) -> str:
    return spec_fingerprint(spec)


@dataclass(frozen=True)
class WriteResult:
    """What ``write_shard`` did: ``committed``, ``skipped`` (already committed) or ``lost-race``."""

    shard: str
    status: str
    rows: int
    failed: int


class FeatureStore:
    """A directory or URL holding feature groups. Open with :meth:`FeatureStore.open`."""

    def __init__(self, sfs: StoreFS) -> None:
        self.fs = sfs

    @property
    def url(self) -> str:
        return self.fs.url

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r})"

    @classmethod
    def open(
        cls,
        url: str | os.PathLike | None = None,
        *,
        create: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """Open the store at ``url`` (default ``$CUSA_HOME/store``).

        Args:
            url: a local directory or an fsspec URL such as ``s3://bucket/cusa``.
            create: create an empty store when none exists.
            storage_options: passed to fsspec (endpoint, credentials...).

        Raises:
            NotAStoreError: the path exists but holds no cusa store marker.
            StoreVersionError: the store was written by a newer layout version.
        """
        sfs = StoreFS.from_url(str(url or default_store()), **(storage_options or {}))
        if not sfs.exists(MARKER):
            # Another writer may be creating this store right now: the temporary file of its
            # marker is not foreign content, and its marker may appear between our checks.
            # Desktop junk such as .DS_Store is not foreign content either.
            foreign = [
                n
                for n in sfs.ls("")
                if not (n.startswith(MARKER) and n.endswith(".partial")) and not is_junk(n)
            ]
            if foreign and not sfs.exists(MARKER):
                raise NotAStoreError(
                    f"{sfs.url!r} exists and is not a cusa store (no {MARKER}); "
                    "point --store at an empty or new directory, or at an existing cusa store"
                )
            if not sfs.exists(MARKER):
                if not create:
                    raise NotAStoreError(
                        f"no cusa store at {sfs.url!r}; run `cusa extract` to create one, or "
                        "check the path"
                    )
                marker = {
                    "format": "cusa-store",
                    "layout_version": LAYOUT_VERSION,
                    "created": _now(),
                }
                if sfs.create_exclusive(MARKER, _json_bytes(marker)):
                    log.info("created cusa store at %s", sfs.url)
                    return cls(sfs)
        # The marker exists (possibly just created by a concurrent writer).
        good = {"format": "cusa-store", "layout_version": LAYOUT_VERSION}
        try:
            meta = sfs.read_json(MARKER)
            version = int(meta.get("layout_version", 0)) if isinstance(meta, dict) else None
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise NotAStoreError(
                f"the store marker {sfs.path(MARKER)!r} is unreadable ({type(exc).__name__}); if "
                f"this is a cusa store, restore the file with the content {json.dumps(good)}"
            ) from exc
        if not isinstance(meta, dict) or meta.get("format") != "cusa-store" or version is None:
            raise NotAStoreError(
                f"{sfs.url!r} has a {MARKER} that is not a cusa store marker; if this is a cusa "
                f"store, restore the file with the content {json.dumps(good)}"
            )
        if version > LAYOUT_VERSION:
            raise StoreVersionError(
                f"store {sfs.url!r} has layout version {version}, newer than this cusa "
                f"understands ({LAYOUT_VERSION}); upgrade cusa (pip install -U cusa)"
            )
        return cls(sfs)

    # -- groups -----------------------------------------------------------------------------

    @staticmethod
    def group_path(
        dataset: str, split: str, teacher: str, fingerprint: str, dtype: str = PLAIN_DTYPE
    ) -> str:
        """``<dataset>/<split>/<teacher>@<fp>`` (float16) or ``...@<fp>-<dtype>``."""
        return f"{safe_name(dataset)}/{safe_name(split)}/{group_leaf(teacher, fingerprint, dtype)}"

    def _group_rel(self, dataset: str, split: str, spec_d: dict[str, Any], fp: str) -> str:
        """Where the group of this spec lives; refuses a legacy folder of another dtype.

        Before dtypes could live side by side, a float32 group used the plain folder that float16
        now uses. Such a group is still found (and resumed) by float32 runs; a float16 run is told
        how to make room for it.
        """
        dtype = spec_d["dtype"]
        rel = self.group_path(dataset, split, spec_d["name"], fp, dtype)
        plain = self.group_path(dataset, split, spec_d["name"], fp)
        legacy_dtype = self._recorded_dtype(plain)
        if (
            dtype != PLAIN_DTYPE
            and legacy_dtype == dtype
            and not self.fs.exists(f"{rel}/zarr.json")
        ):
            return plain  # a float32 group written by an older cusa: keep using it
        if dtype == PLAIN_DTYPE and legacy_dtype not in (None, PLAIN_DTYPE):
            moved = self.group_path(dataset, split, spec_d["name"], fp, legacy_dtype)
            raise StoreSpecMismatchError(
                f"{self.url.rstrip('/')}/{plain} holds {legacy_dtype} features of teacher "
                f"{spec_d['name']!r}, written by an older cusa in the folder that {PLAIN_DTYPE} "
                f"features now use. To keep both, rename that folder to "
                f"{self.url.rstrip('/')}/{moved} (cusa reads it there) and run again; or extract "
                f"with --dtype {legacy_dtype} to resume it"
            )
        return rel

    def _recorded_dtype(self, rel: str) -> str | None:
        """The dtype recorded by the group at ``rel``, or None when there is none (or unreadable)."""
        if not self.fs.exists(f"{rel}/zarr.json"):
            return None
        try:
            meta = self.fs.read_json(f"{rel}/zarr.json")
            return str(meta["attributes"]["cusa"]["spec"]["dtype"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return None  # malformed: FeatureGroup reports it with the fix

    def group(
        self,
        dataset: str,
        split: str,
        spec: Any,
        manifest_hash: str | None = None,
        *,
        create: bool = False,
        manifest_info: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
    ) -> FeatureGroup:
        """Open (or create) the group for ``(dataset, split, spec)``.

        Features of one teacher in float16 and float32 are two groups side by side
        (``<teacher>@<fp>`` and ``<teacher>@<fp>-float32``).

        Args:
            manifest_hash: the reader's dataset manifest hash; a group recorded with another
                one is refused (the dataset's ids, captions or shard layout changed).
            manifest_info: the reader's ``manifest_info()`` (content hash, shard size, counts),
                recorded with the group so a refusal can say what changed and how to proceed.
            source: how to open the dataset again (``dataset``, ``root``, ``split``...), recorded
                in a new group so ``cusa report`` can find its pictures.

        Raises:
            StoreSpecMismatchError: the group exists with a different spec or dataset manifest;
                the message names the differing fields.
            BrokenGroupError: the group exists but its metadata is malformed.
        """
        spec_d = _spec_dict(spec)
        fp = _fingerprint(spec_d)
        rel = self._group_rel(dataset, split, spec_d, fp)
        if manifest_hash is None and manifest_info is not None:
            manifest_hash = manifest_info.get("hash")
        attrs = {
            "layout_version": LAYOUT_VERSION,
            "dataset": dataset,
            "split": split,
            "fingerprint": fp,
            "spec": spec_d,
            "manifest_hash": manifest_hash,
            "created": _now(),
        }
        if manifest_info is not None:
            attrs["dataset_manifest"] = dict(manifest_info)
        if source is not None:
            attrs["dataset_source"] = dict(source)
        if not self.fs.exists(f"{rel}/zarr.json"):
            if not create:
                raise StoreError(
                    f"no group for teacher {spec_d['name']!r} ({fp}) of "
                    f"{dataset}/{split} in store {self.url!r}"
                )
            meta = {"zarr_format": 3, "node_type": "group", "attributes": {"cusa": attrs}}
            self.fs.create_exclusive(f"{rel}/zarr.json", _json_bytes(meta))
        group = FeatureGroup(self, rel)
        group.check_compatible(spec_d, manifest_hash, manifest_info)
        return group

    def scan(self) -> tuple[list[FeatureGroup], list[BrokenGroup]]:
        """Every group of the store, sorted by path: the readable ones and the broken ones.

        Only ``<dataset>/<split>/<teacher>@<fp>/`` directories holding a ``zarr.json`` are
        groups; stray files (``.DS_Store``...) and other folders are ignored. A group whose
        metadata is malformed is returned in the second list with the reason, so one bad group
        never makes the others unreadable.
        """
        good: list[FeatureGroup] = []
        broken: list[BrokenGroup] = []
        for dataset in self.fs.ls_dirs(""):
            if dataset.startswith("."):
                continue
            for split in self.fs.ls_dirs(dataset):
                for teacher in self.fs.ls_dirs(f"{dataset}/{split}"):
                    rel = f"{dataset}/{split}/{teacher}"
                    if "@" not in teacher or not self.fs.exists(f"{rel}/zarr.json"):
                        continue
                    try:
                        good.append(FeatureGroup(self, rel))
                    except StoreError as exc:
                        broken.append(BrokenGroup(rel, f"{self.url.rstrip('/')}/{rel}", str(exc)))
        return good, broken

    def groups(self) -> list[FeatureGroup]:
        """Every readable group in the store, sorted by path (see :meth:`scan`)."""
        good, broken = self.scan()
        for b in broken:
            log.warning("skipping broken group %s: %s", b.rel, b.error)
        return good

    def broken_groups(self) -> list[BrokenGroup]:
        """Groups whose metadata is malformed, each with the reason (see :meth:`scan`)."""
        return self.scan()[1]

    def find_group(
        self, dataset: str, split: str, teacher: str, dtype: str | None = None
    ) -> FeatureGroup:
        """The group of ``teacher`` (a name, a fingerprint, ``name@fingerprint`` or the group's
        folder name such as ``name@fingerprint-float32``).

        Args:
            dtype: only groups of this dtype, when a teacher is stored in several.

        Raises:
            StoreError: no such group, or the name matches several groups.
            BrokenGroupError: the only matching group is malformed; the message says how.
        """
        good, broken = self.scan()
        candidates = [g for g in good if g.dataset == dataset and g.split == split]
        matches = [g for g in candidates if g.matches(teacher) and dtype in (None, g.spec["dtype"])]
        exact = [g for g in matches if g.leaf == teacher]  # a folder name names one group
        if len(matches) == 1 or len(exact) == 1:
            return (exact or matches)[0]
        known = ", ".join(g.label for g in candidates) or "(none)"
        if not matches:
            prefix = f"{safe_name(dataset)}/{safe_name(split)}/"
            for b in broken:
                name, fp, _ = parse_group_leaf(b.rel.rsplit("/", 1)[-1])
                leaf = b.rel.rsplit("/", 1)[-1]
                if b.rel.startswith(prefix) and teacher in (name, fp, f"{name}@{fp}", leaf):
                    raise BrokenGroupError(b.error)
            wanted = f"teacher {teacher!r}" + (f" in {dtype}" if dtype else "")
            raise StoreError(
                f"store {self.url!r} has no features of {wanted} for {dataset}/{split}; "
                f"teachers there: {known}. Run `cusa extract` for it first."
            )
        raise StoreError(
            f"teacher {teacher!r} matches several groups for {dataset}/{split} in {self.url!r}: "
            f"{', '.join(g.label for g in matches)}; pass one of these names"
        )


@dataclass(frozen=True)
class BrokenGroup:
    """A group directory whose metadata cannot be read; ``error`` says what and how to fix it."""

    rel: str
    url: str
    error: str


class FeatureGroup:
    """Features of one teacher over one dataset split."""

    def __init__(self, store: FeatureStore, rel: str) -> None:
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
        raise StoreSpecMismatchError(self._manifest_change(recorded, manifest_hash, manifest_info))

    def _manifest_change(self, recorded: str, given: str, info: dict[str, Any] | None) -> str:
        old = self.attrs.get("dataset_manifest")
        old = old if isinstance(old, dict) else {}
        new = info or {}
        where = f"{self.dataset}/{self.split} in {self.url!r}"
        redo = (
            f"to re-extract, delete the group folder {self.url!r} and run the same command "
            "again; to keep both, give this dataset its own name in the store with --name NAME, "
            "or write to another --store"
        )
        same_content = old.get("content_hash") and old.get("content_hash") == new.get(
            "content_hash"
        )
        if same_content and old.get("shard_size") != new.get("shard_size"):
            return (
                f"the dataset {where} is unchanged but cut into other shards: this group was "
                f"written with --shard-size {old.get('shard_size')} ({old.get('shards')} shards), "
                f"this run uses {new.get('shard_size')} ({new.get('shards')} shards); re-run with "
                f"--shard-size {old.get('shard_size')} to resume it, or {redo}"
            )
        if old.get("format") is None:
            what = (
                "this group was written by an older cusa whose manifest hash did not cover "
                "captions, or the dataset's ids or shard layout changed since"
            )
        else:
            counts = [
                f"{k} {old.get(k)} -> {new.get(k)}"
                for k in ("images", "captions", "shards")
                if k in old and k in new and old.get(k) != new.get(k)
            ]
            what = (
                "the dataset's image ids, captions or tars changed since this group was "
                "extracted"
                + (f" ({', '.join(counts)})" if counts else " (same counts, edited content)")
            )
        return (
            f"dataset manifest of {where} differs from the one recorded (manifest_hash: stored "
            f"{recorded!r} != given {given!r}): {what}. Resuming would mix features of "
            f"the old and the new data, so cusa refuses; {redo}"
        )

    # -- commits ----------------------------------------------------------------------------

    def _commit_rel(self, shard: str) -> str:
        return f"{self.rel}/commits/{safe_name(shard)}.json"

    def is_committed(self, shard: str) -> bool:
        return self.fs.exists(self._commit_rel(shard))

    def commit_records(self) -> list[dict[str, Any]]:
        """Every commit record, sorted by shard key.

        Raises:
            BrokenGroupError: a record is not valid JSON or lacks its fields; the message names
                the file and says to remove it and re-run the extraction for that shard.
        """
        records = []
        for name in self.fs.ls(f"{self.rel}/commits"):
            if name.endswith(".json"):
                records.append(self._commit_record(name))
        return sorted(records, key=lambda r: r["shard"])

    def _commit_record(self, name: str) -> dict[str, Any]:
        fix = f"delete commits/{name} of the group and re-run the extraction to redo that shard"
        try:
            rec = self.fs.read_json(f"{self.rel}/commits/{name}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._broken(f"commit record commits/{name} is not valid JSON", fix) from exc
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("shard"), str)
            and isinstance(rec.get("part"), str)
            and safe_name(rec["part"]) == rec["part"]
            and isinstance(rec.get("rows"), int)
            and not isinstance(rec.get("rows"), bool)
            and rec["rows"] >= 0
            and isinstance(rec.get("features_sha256"), str)
        )
        if not ok:
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
        rows = record.get("chunk_rows") if isinstance(record, dict) else None
        sums = record.get("chunk_sha256") if isinstance(record, dict) else None
        ok = (
            isinstance(record, dict)
            and isinstance(record.get("rows"), int)
            and isinstance(record.get("failed", 0), int)
            and isinstance(record.get("shards", []), list)
            and isinstance(rows, list)
            and isinstance(sums, list)
            and len(rows) == len(sums)
            and all(isinstance(r, int) and r > 0 for r in rows)
            and all(isinstance(h, str) for h in sums)
            and sum(rows) == record.get("rows")
        )
        if not ok:
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
        arr = self._validate(shard, ids, features, failures)

        part = f"{safe_name(shard)}.{uuid.uuid4().hex[:12]}"
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
        record = {
            "shard": shard,
            "part": part,
            "rows": len(ids),
            "failed": len(failures),
            "dim": self.dim,
            "dtype": self.spec["dtype"],
            "features_sha256": digest,
            "source": source,
            "committed": _now(),
            "writer": f"{socket.gethostname()}:{os.getpid()}",
        }
        if not self.fs.create_exclusive(self._commit_rel(shard), _json_bytes(record)):
            log.info(
                "shard %s of %s was committed by another writer; dropping ours", shard, self.rel
            )
            self.fs.remove(part_rel)
            return WriteResult(shard, "lost-race", 0, 0)
        return WriteResult(shard, "committed", len(ids), len(failures))

    def _validate(
        self, shard: str, ids: list[str], features: np.ndarray, failures: list[tuple[str, str]]
    ) -> np.ndarray:
        arr = np.asarray(features)
        if arr.ndim != 2 or arr.shape[0] != len(ids) or (len(ids) and arr.shape[1] != self.dim):
            raise StoreError(
                f"shard {shard!r}: features of shape {arr.shape} do not match {len(ids)} ids "
                f"x dim {self.dim} of teacher {self.spec['name']!r} in {self.url!r}"
            )
        with np.errstate(over="ignore"):  # an overflow to inf is caught just below
            arr = np.ascontiguousarray(arr.reshape(len(ids), self.dim), dtype=self.dtype)
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            names = [ids[i] for i in np.flatnonzero(bad)[:5]]
            raise StoreError(
                f"shard {shard!r}: non-finite features (NaN/inf after casting to "
                f"{self.spec['dtype']}) for sample ids {names}; refusing to write them to "
                f"{self.url!r}. Record such samples as failures instead."
            )
        seen: set[str] = set()
        for sid in [*ids, *(f for f, _ in failures)]:
            if sid in seen:
                raise StoreError(
                    f"shard {shard!r}: duplicate sample id {sid!r}; ids must be unique"
                )
            try:
                sid.encode("utf-8")
            except UnicodeEncodeError:
                shown = sid.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")
                raise StoreError(
                    f"shard {shard!r}: sample id {shown!r} is not valid UTF-8 text; zarr and "
                    "Parquet store UTF-8 only — record such samples as failures under an "
                    "escaped id"
                ) from None
            seen.add(sid)
        return arr

    def _write_part(
        self,
        part_rel: str,
        shard: str,
        ids: list[str],
        arr: np.ndarray,
        failures: list[tuple[str, str]],
        source: str,
    ) -> str:
        import zarr

        root = zarr.open_group(store=self.fs.zarr_store(part_rel), mode="w")
        if ids:
            feats = root.create_array(
                "features",
                shape=arr.shape,
                chunks=arr.shape,
                dtype=arr.dtype,
                compressors=None,
                filters=None,
                fill_value=0,
                config={"write_empty_chunks": True},
            )
            feats[...] = arr
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr warns that vlen strings are a v3 extension
                sid = root.create_array(
                    "sample_id", shape=(len(ids),), chunks=(len(ids),), dtype=str
                )
            sid[...] = np.array(ids, dtype=object)
        table = _manifest_table(
            ids=[*ids, *(f for f, _ in failures)],
            rows=[*range(len(ids)), *([-1] * len(failures))],
            shard=shard,
            errors=[None] * len(ids) + [r for _, r in failures],
        )
        self.fs.write_bytes_atomic(f"{part_rel}/{MANIFEST}", _parquet_bytes(table))
        return hashlib.sha256(arr.tobytes()).hexdigest()

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
            table = pq.read_table(io.BytesIO(self.fs.read_bytes(rel)))
            return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
        except FileNotFoundError as exc:
            raise self._broken(f"{name} is missing") from exc
        except (pa.ArrowException, ValueError, KeyError) as exc:
            raise self._broken(
                f"{name} is not a valid ledger ({type(exc).__name__}: {exc})"
            ) from exc

    def failures(self) -> list[dict[str, Any]]:
        table = self.manifest()
        return [r for r in table.to_pylist() if r["status"] != "ok"]

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
        return [
            Segment(
                f"{self.rel}/parts/{r['part']}/features/c/0/0",
                r["rows"],
                r["features_sha256"],
                f"{self.rel}/parts/{r['part']}/sample_id",
                0,
            )
            for r in self.commit_records()
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

    def _local_segment_files(self, segs: list[Segment], stack: contextlib.ExitStack) -> list[str]:
        """A local file per segment, each checked for its size, to memory-map while sealing.

        Parts of an object store are copied to a temporary folder first (removed by ``stack``),
        so sealing there needs local disk for the parts but no more memory than on a disk.
        """
        tmpdir = (
            None
            if self.fs.is_local
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="cusa-seal-"))
        )
        files = []
        for i, seg in enumerate(segs):
            if tmpdir is None:
                path = self.fs.local_path(seg.rel)
            else:
                path = os.path.join(tmpdir, f"{i}.bin")
                self.fs.fs.get_file(self.fs.path(seg.rel), path)
            size, expected = os.path.getsize(path), seg.rows * self.dim * self.dtype.itemsize
            if size != expected:
                raise StoreError(
                    f"chunk file {self.fs.path(seg.rel)!r} has {size} bytes, expected {expected} "
                    f"({seg.rows} rows x {self.dim} x {self.dtype}); it is truncated or corrupt "
                    "— run `cusa store verify` and re-extract the shard"
                )
            files.append(path)
        return files

    def _sorted_blocks(
        self,
        segs: list[Segment],
        files: list[str],
        order: np.ndarray,
        offsets: np.ndarray,
        start: int,
        stop: int,
        block: int,
        digest: Any,
    ) -> Iterator[np.ndarray]:
        """Sorted rows ``start:stop`` in blocks of ``block`` rows, each added to ``digest``.

        The two block buffers are reused (the consumer writes each block before asking for the
        next), so no per-block allocation can fragment the heap.
        """
        size = min(block, stop - start)
        out = np.empty((size, self.dim), dtype=self.dtype)
        buf = np.empty((size, self.dim), dtype=self.dtype)
        for b0 in range(start, stop, block):
            src = order[b0 : min(b0 + block, stop)]  # global unsorted rows, in sorted-id order
            seg_of = np.searchsorted(offsets, src, side="right") - 1
            by_seg = np.argsort(seg_of, kind="stable")
            present, firsts = np.unique(seg_of[by_seg], return_index=True)
            for s, lo, hi in zip(present, firsts, [*firsts[1:], len(src)], strict=True):
                pick = by_seg[lo:hi]
                part = np.memmap(
                    files[s], dtype=self.dtype, mode="r", shape=(segs[s].rows, self.dim)
                )
                # mode="clip" writes straight into buf (mode="raise" would buffer a copy first)
                np.take(part, src[pick] - offsets[s], axis=0, out=buf[: len(pick)], mode="clip")
                del part  # unmap now: only this block's pages are ever resident
                out[pick] = buf[: len(pick)]
            digest.update(out[: len(src)])
            yield out[: len(src)]

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
            self._remove_temp_files()
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
        segs = self.segments()
        ids: list[str] = []
        for seg in segs:
            ids.extend(self.read_ids(seg))
        order = sorted(range(len(ids)), key=ids.__getitem__)
        sorted_ids = [ids[i] for i in order]
        for a, b in zip(sorted_ids, sorted_ids[1:]):  # noqa: B905 (offset by one on purpose)
            if a == b:
                raise StoreError(
                    f"cannot seal {self.url!r}: sample id {a!r} was committed by two shards; "
                    "ids must be unique across the dataset — fix the dataset (duplicate ids) "
                    "and re-extract into a new store"
                )
        n, dim, dtype = len(ids), self.dim, self.dtype
        row_bytes = max(dim * dtype.itemsize, 1)
        chunk = max(1, min(n, MAX_CHUNK_BYTES // row_bytes)) if n else 1

        # Map global (unsorted) rows to their segment. Each output chunk is streamed to its file
        # block by block, and a block gathers its rows from memory maps of the parts that are
        # unmapped again right after: memory stays bounded by the block setting, not by N.
        offsets = np.cumsum([0] + [s.rows for s in segs])
        order_arr = np.asarray(order, dtype=np.int64)
        chunk_rows, chunk_sha = [], []
        group_store = self.fs.zarr_store(self.rel)
        if n:
            _seal_array(
                group_store,
                "features",
                shape=(n, dim),
                chunks=(chunk, dim),
                dtype=dtype,
                compressors=None,
                filters=None,
                fill_value=0,
            )
            block = max(1, seal_block_bytes() // row_bytes)
            with contextlib.ExitStack() as stack:
                local = self._local_segment_files(segs, stack)
                for ci, start in enumerate(range(0, n, chunk)):
                    stop = min(start + chunk, n)
                    digest = hashlib.sha256()
                    blocks = self._sorted_blocks(
                        segs, local, order_arr, offsets, start, stop, block, digest
                    )
                    self.fs.write_stream_atomic(f"{self.rel}/features/c/{ci}/0", blocks)
                    chunk_rows.append(stop - start)
                    chunk_sha.append(digest.hexdigest())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sid = _seal_array(group_store, "sample_id", shape=(n,), chunks=(n,), dtype=str)
            sid[...] = np.array(sorted_ids, dtype=object)
        else:
            for name in ("features", "sample_id"):
                self.fs.remove(f"{self.rel}/{name}")

        table = _sealed_manifest(self.manifest(), sorted_ids)
        self.fs.write_bytes_atomic(f"{self.rel}/{MANIFEST}", _parquet_bytes(table))
        record = {
            "rows": n,
            "failed": _failed_count(table),
            "shards": [r["shard"] for r in records],
            "chunk_rows": chunk_rows,
            "chunk_sha256": chunk_sha,
            "sealed": _now(),
        }
        self.fs.write_bytes_atomic(f"{self.rel}/{SEALED}", _json_bytes(record))
        # The parts are now redundant; readers that still map them keep their open files.
        self.fs.remove(f"{self.rel}/parts")
        self._remove_temp_files()
        log.info("sealed %s: %d rows in %d chunk(s)", self.rel, n, len(chunk_rows))
        return record

    def _remove_temp_files(self) -> None:
        """Delete ``*.partial`` files that writers killed mid-write left in a sealed group.

        Every file of a sealed group is final, so a temporary file can only be garbage, or the
        in-flight write of a writer that lost a race (its rename then fails harmlessly).
        Object stores write whole objects and have none.
        """
        if not self.fs.is_local:
            return
        for dirpath, _, filenames in os.walk(self.fs.local_path(self.rel)):
            for name in filenames:
                if name.endswith(".partial"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))

    def nbytes_on_disk(self) -> int:
        try:
            return int(self.fs.fs.du(self.fs.path(self.rel)))
        except (OSError, NotImplementedError):
            return 0


@dataclass(frozen=True)
class Segment:
    """A raw little-endian C-order feature file holding ``rows`` consecutive rows."""

    rel: str
    rows: int
    sha256: str
    ids_rel: str
    index: int


def seal_block_bytes() -> int:
    """Bytes of sorted rows sealing holds at a time: ``CUSA_SEAL_BLOCK_BYTES`` or the default.

    Raises:
        ConfigError: the variable is not a positive integer.
    """
    raw = os.environ.get("CUSA_SEAL_BLOCK_BYTES", "").strip()
    if not raw:
        return SEAL_BLOCK_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"CUSA_SEAL_BLOCK_BYTES={raw!r} is invalid; use a positive number of bytes "
            f"(default {SEAL_BLOCK_BYTES})"
        )
    return value


def _seal_array(store: Any, name: str, **kwargs: Any) -> Any:
    """The group-level array ``name``, created unless one of that shape already exists.

    Sealing writes deterministic bytes with atomic renames, so two writers sealing at once (or a
    re-seal after a crash) can both write safely; but ``overwrite=True`` would first delete the
    other writer's finished chunks, so an existing array of the right shape is reused instead.
    """
    import zarr

    try:
        arr = zarr.open_array(store=store, path=name, mode="r+")
        if arr.shape == kwargs["shape"] and arr.chunks == kwargs["chunks"]:
            return arr
    except FileNotFoundError:  # zarr's ArrayNotFoundError
        pass
    return zarr.create_array(store=store, name=name, overwrite=True, **kwargs)


def _manifest_table(
    ids: list[str], rows: list[int], shard: str, errors: list[str | None]
) -> pa.Table:
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


def _sealed_manifest(manifest: pa.Table, sorted_ids: list[str]) -> pa.Table:
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


def _failed_count(table: pa.Table) -> int:
    """Ledger entries whose status is not ``ok``."""
    import pyarrow.compute as pc

    failed = pc.fill_null(pc.not_equal(table["status"], "ok"), True)
    return int(pc.sum(failed.cast(pa.int64())).as_py() or 0)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
