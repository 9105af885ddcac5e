"""``FeatureStore``: a directory or URL of feature groups, one per (dataset, split, teacher).

Opening checks the store marker and its layout version; a group is found or created by its
teacher spec's fingerprint and refuses another spec or dataset manifest. The layout is in
:mod:`cusa.store.layout`; a group's own work (commits, reading, sealing) is in
:mod:`cusa.store.group`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ConfigError,
    NotAStoreError,
    StoreError,
    StoreSpecMismatchError,
    StoreVersionError,
)
from ..paths import default_store
from .fs import StoreFS, is_writable_url, open_published
from .group import BrokenGroupError, FeatureGroup
from .layout import (
    DTYPES,
    LAYOUT_VERSION,
    MARKER,
    PLAIN_DTYPE,
    PUBLISHED_INDEX,
    WRITE_DTYPES,
    group_leaf,
    is_junk,
    json_bytes,
    now,
    parse_group_leaf,
    safe_name,
)
from .spec import spec_fingerprint

log = logging.getLogger(__name__)


def _spec_dict(spec: Any) -> dict[str, Any]:
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    missing = {"name", "model", "weights_sha256", "preprocessing", "output_kind", "dim"} - set(d)
    if missing:
        raise ConfigError(f"teacher spec is missing fields {sorted(missing)}: {d!r}")
    d.setdefault("dtype", "float16")
    if d["dtype"] not in DTYPES:
        raise ConfigError(f"unsupported feature dtype {d['dtype']!r}; use one of {DTYPES}")
    return d


class FeatureStore:
    """A directory or URL holding feature groups. Open with :meth:`FeatureStore.open`."""

    def __init__(self, sfs: StoreFS) -> None:
        self.fs = sfs

    @property
    def url(self) -> str:
        return self.fs.url

    @property
    def published(self) -> bool:
        """Whether this is a published, read-only store (``cusa store publish``)."""
        return self.fs.read_only

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
        published = open_published(sfs)
        if published is not None:
            sfs = published
        elif not is_writable_url(sfs.url):
            raise NotAStoreError(
                f"no published cusa store at {sfs.url!r} (no {PUBLISHED_INDEX}); a store served "
                "over HTTP or the Hub must be made with `cusa store publish`; check the address"
            )
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
                    "created": now(),
                }
                if sfs.create_exclusive(MARKER, json_bytes(marker)):
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
        fp = spec_fingerprint(spec_d)
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
            "created": now(),
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
            if spec_d["dtype"] not in WRITE_DTYPES:
                raise ConfigError(
                    f"extraction writes {' or '.join(WRITE_DTYPES)}, not {spec_d['dtype']!r}; "
                    "make an int8 group from a sealed one with `cusa store quantize`"
                )
            meta = {"zarr_format": 3, "node_type": "group", "attributes": {"cusa": attrs}}
            self.fs.create_exclusive(f"{rel}/zarr.json", json_bytes(meta))
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
        self,
        dataset: str,
        split: str,
        teacher: str,
        dtype: str | None = None,
        *,
        expected_label: str = "expected",
    ) -> FeatureGroup:
        """The group of ``teacher`` (a name, a fingerprint, ``name@fingerprint`` or the group's
        folder name such as ``name@fingerprint-float32``).

        Args:
            dtype: only groups of this dtype, when a teacher is stored in several.
            expected_label: how a dtype mismatch names the expectation (e.g. ``"configured"``).

        Raises:
            StoreError: no such group, or the name matches several groups.
            StoreSpecMismatchError: ``teacher`` is stored, but only in other dtypes than ``dtype``.
            BrokenGroupError: the only matching group is malformed; the message says how.
        """
        good, broken = self.scan()
        candidates = [g for g in good if g.dataset == dataset and g.split == split]
        matches = [g for g in candidates if g.matches(teacher) and dtype in (None, g.spec["dtype"])]
        exact = [g for g in matches if g.leaf == teacher]  # a folder name names one group
        if len(matches) == 1 or len(exact) == 1:
            return (exact or matches)[0]
        default = default_dtype_group(matches) if dtype is None else None
        if default is not None:
            return default
        known = ", ".join(g.label for g in candidates) or "(none)"
        if not matches:
            prefix = f"{safe_name(dataset)}/{safe_name(split)}/"
            for b in broken:
                name, fp, _ = parse_group_leaf(b.rel.rsplit("/", 1)[-1])
                leaf = b.rel.rsplit("/", 1)[-1]
                if b.rel.startswith(prefix) and teacher in (name, fp, f"{name}@{fp}", leaf):
                    raise BrokenGroupError(b.error)
            others = sorted({str(g.spec["dtype"]) for g in candidates if g.matches(teacher)})
            if dtype and others:  # the teacher is there, in another dtype: a spec mismatch
                stored = repr(others[0]) if len(others) == 1 else f"one of {others}"
                raise StoreSpecMismatchError(
                    f"store {self.url!r} holds teacher {teacher!r} for {dataset}/{split} only "
                    f"in {', '.join(others)} (dtype: store {stored} != {expected_label} "
                    f"{dtype!r}); extract it with `cusa extract ... --dtype {dtype}`, or ask "
                    f"for the stored dtype ({', '.join(others)})"
                )
            wanted = f"teacher {teacher!r}" + (f" in {dtype}" if dtype else "")
            raise StoreError(
                f"store {self.url!r} has no features of {wanted} for {dataset}/{split}; "
                f"teachers there: {known}. Run `cusa extract` for it first."
            )
        modality = "/".join(sorted({str(g.spec.get("modality")) for g in matches}))
        raise StoreError(
            f"teacher {teacher!r} matches several groups for {dataset}/{split} in {self.url!r}: "
            f"{', '.join(g.label for g in matches)}; name one of them instead (as --teacher, or "
            f"as teachers.{modality} in a training config): its name@fingerprint, or its folder "
            "name, which also picks the dtype"
        )


def default_dtype_group(matches: list[FeatureGroup]) -> FeatureGroup | None:
    """The group a bare teacher name means when one teacher is stored in several dtypes.

    float16 and float32 features of one teacher live side by side (``name@fp`` and
    ``name@fp-float32``); a name or fingerprint that matches both means the default float16
    group, and the other is reached by its dtype or folder name. None when ``matches`` are
    groups of different teachers, fingerprints or splits (then the name is ambiguous).
    """
    if len({(g.dataset, g.split, g.spec["name"], g.fingerprint) for g in matches}) != 1:
        return None
    plain = [g for g in matches if g.spec["dtype"] == PLAIN_DTYPE]
    return plain[0] if len(plain) == 1 else None


@dataclass(frozen=True)
class BrokenGroup:
    """A group directory whose metadata cannot be read; ``error`` says what and how to fix it."""

    rel: str
    url: str
    error: str
