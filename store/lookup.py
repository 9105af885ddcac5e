"""Training-time reads: ``FeatureLookup.gather(sample_ids)`` from memory-mapped feature files.

Per batch, zarr's chunk decoding is slow (``zarr_oindex`` in benchmarks/results/store_gather.json:
0.32 s for 128 rows of a 200k x 768 store); a memory map of the raw, uncompressed chunk bytes
costs about what numpy fancy indexing on an in-RAM array costs (``gather`` 117 us against 152 us
for a dict of ids plus fancy indexing, the same file). The maps are opened lazily and reopened after ``fork``, so DataLoader workers and ranks
on one machine share the same page-cache pages instead of holding per-process copies.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, SampleNotFoundError, StoreError, StoreSpecMismatchError
from ..paths import segments_dir
from .feature_store import FeatureStore
from .fs import fetch_verified
from .group import FeatureGroup
from .id_index import IdIndex, open_index_file
from .integrity import check_group  # what verify refuses, readers refuse too
from .layout import ID_INDEX, Segment
from .quant import gather_dequantized
from .reindex import check_index_header
from .sealing import (
    build_index_from_ids,
    empty_ids,
    read_sealed_ids,
    read_segment_ids,
)
from .spec import format_spec_diff, spec_diff

log = logging.getLogger(__name__)

#: Rows read at a time when a tool streams a whole group (``cusa store knn``, ``export``).
READ_BLOCK_ROWS = 65536


class FeatureLookup:
    """Random access to one group's committed features by sample id.

    Example:
        >>> lookup = FeatureLookup.open("~/.cache/cusa/store", dataset="coco", split="train",
        ...                             teacher="all-mpnet-base-v2")
        >>> feats = lookup.gather(["391895#0", "391895#1"])   # (2, 768) float16
    """

    def __init__(self, group: FeatureGroup, cache_dir: str | os.PathLike | None = None) -> None:
        self.group = group
        self.spec: dict[str, Any] = dict(group.spec)
        self.dim = group.dim
        self.dtype = group.dtype
        # int8 groups gather float32 rows, dequantised (cusa.store.quant); decided once here,
        # not per batch (a dtype comparison costs about 1 us of every gather_rows call).
        self._int8 = self.dtype == np.int8
        self._cache_dir = Path(cache_dir) if cache_dir else segments_dir()
        for attempt in range(3):
            # A writer may seal the group (and remove its parts) while we open it; then the
            # sealed arrays hold the same rows, so open again from those.
            try:
                check_group(group)
                self._segments: list[Segment] = group.segments()
                self._index: IdIndex | None = self._open_index()
                self._maps: list[np.ndarray] | None = [self._map(s) for s in self._segments]
                break
            except FileNotFoundError as exc:
                if attempt == 2 or not group.sealed:
                    what = getattr(exc, "filename", None) or str(exc) or "a file"
                    raise group._broken(
                        f"{what!s} is missing",
                        "run `cusa store verify` to see what else is wrong, then delete the "
                        "group folder and re-extract it (other groups are not affected)",
                    ) from exc
        self._offsets = np.cumsum([0] + [s.rows for s in self._segments]).astype(np.int64)
        self._rows = int(self._offsets[-1])
        self._views: list[np.ndarray] | None = None
        # gather_rows' fast path: the one plain (not int8) segment's rows as an ndarray view
        self._single: np.ndarray | None = None

    @classmethod
    def open(
        cls,
        store: str | os.PathLike | FeatureStore | None,
        *,
        dataset: str,
        split: str,
        teacher: str,
        expected_spec: Any | None = None,
        cache_dir: str | os.PathLike | None = None,
        dtype: str | None = None,
        expected_label: str = "expected",
    ) -> FeatureLookup:
        """Open the features of ``teacher`` for a split.

        Args:
            teacher: a name, a fingerprint, ``name@fp``, or the group's folder name
                (``name@fp-float32``) when the teacher is stored in several dtypes.
            expected_spec: when given (a TeacherSpec, or a dict of any subset of its fields, e.g.
                ``{"modality": "image", "dim": 768}``), refuse a store whose recorded spec
                differs, naming the fields.
            cache_dir: where segments of a remote store are copied before mapping.
            dtype: pick the group of this dtype when the teacher is stored in several.
            expected_label: how the message names the expectation (e.g. ``"configured"``).

        Raises:
            StoreSpecMismatchError: the recorded spec differs from ``expected_spec``.
        """
        fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        given = (
            None
            if expected_spec is None
            else expected_spec.to_dict()
            if hasattr(expected_spec, "to_dict")
            else dict(expected_spec)
        )
        if dtype is None and given and given.get("dtype"):  # e.g. teachers.text_spec.dtype
            dtype = str(given["dtype"])
        group = fs.find_group(dataset, split, teacher, dtype=dtype, expected_label=expected_label)
        if given is not None:
            diff = spec_diff(group.spec, given, subset=True)
            if diff:
                fields = format_spec_diff(diff, "store", expected_label)
                raise StoreSpecMismatchError(
                    f"the {group.spec.get('modality')} teacher features in {group.url!r} "
                    f"({group.spec.get('name')!r}) do not match the {expected_label} teacher "
                    f"({fields}); re-extract with the {expected_label} teacher, or configure "
                    "the stored one"
                )
        return cls(group, cache_dir=cache_dir)

    def __len__(self) -> int:
        return self._rows

    def __contains__(self, sample_id: object) -> bool:
        if not isinstance(sample_id, str | bytes):
            return False
        return bool(self._id_index().lookup([sample_id])[1][0])

    def __repr__(self) -> str:
        return f"FeatureLookup({self.group.url!r}, rows={len(self)}, dim={self.dim})"

    # -- id mapping ---------------------------------------------------------------------------

    def rows(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``sample_ids``; precompute them once to skip the id lookup per batch.

        ``sample_ids`` may be a list or tuple of ``str`` (or UTF-8 ``bytes``), or a numpy array of
        them; the lookup is vectorised over the id index, with no Python object per stored id.
        """
        if isinstance(sample_ids, str | bytes):
            raise ConfigError(
                f"sample_ids must be a list of ids, got the single string {sample_ids[:80]!r}; "
                f"pass [{sample_ids[:80]!r}]"
            )
        if isinstance(sample_ids, np.ndarray):
            sample_ids = sample_ids.tolist()
        rows, found = self._id_index().lookup(sample_ids)
        if not found.all():
            missing = sample_ids[int(np.argmin(found))]
            if isinstance(missing, bytes):
                missing = missing.decode("utf-8", "backslashreplace")
            raise SampleNotFoundError(
                f"sample id {missing!r} is not in {self.group.url!r} (teacher "
                f"{self.spec['name']!r}); it failed extraction or belongs to another "
                "dataset/split — `cusa store verify` lists the failed ids with their reasons"
            )
        return rows

    def contains(self, sample_ids: Sequence[str]) -> np.ndarray:
        """(n,) bool: which of ``sample_ids`` the group holds, in one vectorised lookup."""
        if isinstance(sample_ids, np.ndarray):
            sample_ids = sample_ids.tolist()
        return self._id_index().lookup(sample_ids)[1]

    @functools.cached_property
    def ids(self) -> list[str]:
        """Every sample id, in row order (sealed: sorted).

        This builds one Python string per id (about 60-70 bytes each) the first time it is read,
        and keeps them: meant for tools that list a whole group (export, kNN, small tests), not
        for training readers, which use :meth:`rows`, :meth:`gather` and ``in``.
        """
        out: list[str] = []
        for block in self.iter_ids():
            out.extend(block)
        return out

    def iter_ids(self, block: int = 65536) -> Iterator[list[str]]:
        """Every sample id in row order, ``block`` at a time: walks a group while holding one
        block of Python strings, where :attr:`ids` keeps them all."""
        return self._id_index().iter_ids(block)

    # -- gathering ----------------------------------------------------------------------------

    def gather(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Features of ``sample_ids`` as ``(len(ids), dim)`` in the store dtype, in id order.

        Raises:
            SampleNotFoundError: an id is not in the store; the message names it.
            ConfigError: ``sample_ids`` is a single string (which would be read as its letters).
        """
        return self.gather_rows(self.rows(sample_ids))

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Features of precomputed :meth:`rows` (skips the id lookup), ``(len(rows), dim)``.

        A sealed group is one segment: then this is bare numpy row indexing of the memory map
        (the fast path below is all the Python it adds; ``benchmarks/web_scale.py`` measures it).
        """
        single = self._single
        if single is not None:
            return single[rows]
        return self._gather_rows(rows)

    def _gather_rows(self, rows: np.ndarray) -> np.ndarray:
        if self._int8:
            return gather_dequantized(self, rows)
        maps = self._views if self._views is not None else self._plain_views()
        if len(maps) == 1:
            self._single = maps[0]
            return maps[0][rows]
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        seg = np.searchsorted(self._offsets, rows, side="right") - 1
        for s in np.unique(seg):
            sel = seg == s
            out[sel] = maps[s][rows[sel] - self._offsets[s]]
        return out

    def gather_torch(self, sample_ids: Sequence[str], dtype: Any = None, device: Any = None):
        """Like :meth:`gather` but returns a torch tensor (default float32)."""
        import torch

        arr = self.gather(sample_ids)
        return torch.from_numpy(arr).to(device=device, dtype=dtype or torch.float32)

    # -- maps ---------------------------------------------------------------------------------

    def _plain_views(self) -> list[np.ndarray]:
        # Plain ndarray views of the maps: np.memmap wraps every indexing result in its own
        # subclass, which costs about as much as reading 128 narrow rows.
        self._views = [m.view(np.ndarray) for m in self._mapped()]
        return self._views

    def _mapped(self) -> list[np.ndarray]:
        # Read-only shared maps survive fork unchanged (children share the parent's pages);
        # after unpickling in a spawned worker they are opened again.
        if self._maps is None:
            self._maps = [self._map(s) for s in self._segments]
        return self._maps

    def _map(self, seg: Segment) -> np.ndarray:
        path = self._local_file(seg)
        expected = seg.rows * self.dim * self.dtype.itemsize
        size = os.path.getsize(path)  # FileNotFoundError propagates: see __init__
        if size != expected:
            raise StoreError(
                f"chunk file {path!r} has {size} bytes, expected {expected} ({seg.rows} rows x "
                f"{self.dim} x {self.dtype}); it is truncated or corrupt — run `cusa store verify`"
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(seg.rows, self.dim))

    def _local_file(self, seg: Segment) -> str:
        fs = self.group.fs
        if fs.is_local:
            return fs.local_path(seg.rel)
        # Object storage: copy each immutable segment once, named by its content hash.
        target = self._cache_dir / f"{seg.sha256}.bin"
        if target.exists():
            # Mark it used now, so `cusa cache clean --older-than` keeps what is still read.
            with contextlib.suppress(OSError):
                os.utime(target)
        else:
            # streamed with its SHA-256 checked (a progress bar for large chunks)
            fetch_verified(fs, seg.rel, str(target), seg.sha256)
        return str(target)

    def _id_index(self) -> IdIndex:
        if self._index is None:  # unpickled in a spawned worker: map the same file again
            self._index = open_index_file(self._index_path)[0]
        return self._index

    def _open_index(self) -> IdIndex:
        """The sealed group's ``id_index.bin`` memory-mapped, else an index built in memory."""
        self._index_path: str | None = None
        if not self._segments:
            return build_index_from_ids(empty_ids(), self.group.url)
        sealed_ids = self._segments[0].ids_rel == f"{self.group.rel}/sample_id"
        # Decide from the segments themselves, not by asking again: the group may have been
        # sealed since they were listed (their parts then vanish, and __init__ retries).
        if sealed_ids:
            index = self._mapped_index()
            if index is not None:
                return index
            ids = read_sealed_ids(self.group)
        else:
            ids = read_segment_ids(self.group, self._segments)
        rows = sum(seg.rows for seg in self._segments)
        if len(ids) != rows:
            raise self.group._broken(
                f"its sample_id arrays hold {len(ids)} ids for {rows} feature rows",
                "run `cusa store verify`, then delete the group folder and re-extract it",
            )
        return build_index_from_ids(ids, self.group.url)

    def _mapped_index(self) -> IdIndex | None:
        """The group's index file, mapped, when it is present and matches the sealed arrays.

        A group sealed by an older cusa has none (`cusa store reindex` writes it); a stale,
        damaged or newer-version file is ignored with a warning, and the ids are read instead.
        """
        rel = f"{self.group.rel}/{ID_INDEX}"
        try:
            path = self._local_index_file(rel)
        except FileNotFoundError:
            log.info(
                "%s has no %s; reading its ids (`cusa store reindex` writes it)",
                self.group.url,
                ID_INDEX,
            )
            return None
        try:
            index, header = open_index_file(path)
            check_index_header(header, self.group)
        except StoreError as exc:
            log.warning("ignoring the id index of %s: %s", self.group.url, exc)
            return None
        self._index_path = path
        return index

    def _local_index_file(self, rel: str) -> str:
        fs = self.group.fs
        if fs.is_local:
            path = fs.local_path(rel)
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            return path
        # Object storage: one copy per node, named by what identifies this version of the
        # file (a reindex rewrites it in place: its ETag or modification time changes).
        info = fs.fs.info(fs.path(rel))
        version = info.get("ETag") or info.get("LastModified") or info.get("mtime")
        key = hashlib.sha256(f"{self.group.url}|{info.get('size')}|{version}".encode()).hexdigest()
        target = self._cache_dir / f"idx-{key}.bin"
        if not target.exists():
            # streamed; a published store's index records its SHA-256, checked here
            fetch_verified(fs, rel, str(target), fs.recorded_sha256(rel))
        return str(target)

    # -- pickling for spawn-based DataLoader workers -------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None
        state["_views"] = None
        state["_single"] = None
        state.pop("_scale_maps", None)  # int8 scale maps: mapped again on first use
        state.pop("ids", None)  # the cached list of every id, if a tool asked for it
        if self._index_path is not None:
            state["_index"] = None  # a memory map: the worker maps the same file again
        return state
