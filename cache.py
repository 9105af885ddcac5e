"""What ``$CUSA_HOME`` holds, and keeping it bounded (``cusa cache info|clean``).

``$CUSA_HOME`` (default ``~/.cache/cusa``) holds four kinds of things, each an *area*:

- ``store``: the default feature store, ``$CUSA_HOME/store``, one item per feature group;
- ``models``: teacher weights assembled from registry packages (``$CUSA_MODELS_DIR``, default
  ``$CUSA_HOME/models``), one item per model folder or file;
- ``downloads``: registry wheels and parts kept between the steps of an assembly
  (``models/wheels``, ``models/parts``) and leftover ``*.partial`` files: all re-fetchable;
- ``segments``: copies of a remote store's chunk files, made by :class:`FeatureLookup` before
  memory-mapping them (``$CUSA_HOME/cache/segments``); re-copied on the next use.

Cleaning removes whole items, least recently used first, under an age and/or a size bound.
``store`` is cleaned only when named, and then only sealed groups (an unsealed group may be
being written). A model whose assembly lock is held by another process is skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .paths import cusa_home, default_store, models_dir, segments_dir
from .safe_files import short_path
from .store import FeatureStore
from .store.layout import MARKER
from .weights import lock_path

AREAS = ("store", "models", "downloads", "segments")
#: What ``cusa cache clean`` removes when no ``--what`` is given: things that are re-fetched
#: or re-copied on demand, never computed features or assembled models.
DEFAULT_CLEAN = ("downloads", "segments")
_DOWNLOAD_DIRS = ("wheels", "parts")
_AGE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class CacheItem:
    """One removable thing: a model, a group, a segment file, a download.

    Args:
        area: one of :data:`AREAS`.
        path: its absolute path.
        name: how it is shown (relative to its area's folder).
        size: bytes on disk (allocated blocks).
        last_used: newest modification time of its files (for models also access time), in
            epoch seconds; :class:`FeatureLookup` touches a cached segment each time it uses it.
        note: why it would be kept whatever the bounds (e.g. ``"not sealed"``), or ``""``.
    """

    area: str
    path: str
    name: str
    size: int
    last_used: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CleanResult:
    """What :func:`clean_cache` removed (or would remove, with ``dry_run``) and kept."""

    dry_run: bool
    removed: list[CacheItem] = field(default_factory=list)
    kept: list[CacheItem] = field(default_factory=list)
    skipped: list[CacheItem] = field(default_factory=list)  # protected: in use, not sealed

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "freed_bytes": self.freed,
            "removed": [i.to_dict() for i in self.removed],
            "kept": [i.to_dict() for i in self.kept],
            "skipped": [i.to_dict() for i in self.skipped],
        }


def parse_age(text: str) -> float:
    """Seconds in an age such as ``30d``, ``12h``, ``2w``, ``90m`` or ``45s``.

    Raises:
        ConfigError: the text is not a number followed by s, m, h, d or w.
    """
    m = _AGE.fullmatch(str(text).strip().lower())
    if not m:
        raise ConfigError(
            f"--older-than {text!r} is invalid; use a number and a unit: s, m, h, d or w "
            "(e.g. 30d, 12h)"
        )
    return float(m.group("n")) * _UNIT_SECONDS[m.group("unit")]


def area_paths() -> dict[str, Path]:
    """The folder of each area (``downloads`` lives inside ``models``)."""
    models = models_dir()
    return {
        "store": Path(default_store()),
        "models": models,
        "downloads": models,
        "segments": segments_dir(),
    }


def _check_home() -> Path:
    """``$CUSA_HOME``, refused when it exists but is not a folder (``cache info`` would say
    "0 items" and ``clean`` "removed 0" about a path that cannot hold anything)."""
    home = cusa_home()
    if os.path.lexists(home) and not home.is_dir():
        kind = "a regular file" if home.is_file() else "not a folder"
        raise ConfigError(
            f"$CUSA_HOME {short_path(str(home))} is {kind}, not a folder; point CUSA_HOME at a "
            "folder (or unset it to use ~/.cache/cusa)"
        )
    return home


def _link_on_way(path: Path, home: Path) -> Path | None:
    """The first symlink among ``path``'s components below ``home`` (``path`` included), or
    None. ``$CUSA_HOME`` itself (and an explicit ``$CUSA_MODELS_DIR``) may be a link: the user
    chose it; a link *inside* it may lead anywhere, so cleaning never goes through one."""
    try:
        rel = path.relative_to(home)
    except ValueError:
        return None
    cur = home
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            return cur
    return None


def _files(path: Path) -> Iterator[os.stat_result]:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            yield path.lstat()
        return
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                yield os.lstat(os.path.join(dirpath, n))


def _measure(path: Path, with_atime: bool) -> tuple[int, float]:
    """Bytes on disk and the last use: the newest modification time of its files, or of their
    access times too (``with_atime``: models are read, never written, when used)."""
    size, newest = 0, 0.0
    for st in _files(path):
        size += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
        newest = max(newest, st.st_mtime, st.st_atime if with_atime else 0.0)
    if not newest:
        with contextlib.suppress(OSError):
            newest = path.lstat().st_mtime
    return size, newest


def _item(area: str, path: Path, base: Path, note: str = "") -> CacheItem:
    # Reading a store's records (e.g. `cache info` itself) bumps access times, so groups,
    # segments (touched by FeatureLookup on every use) and downloads go by modification time.
    size, last = _measure(path, with_atime=area == "models")
    try:
        name = str(path.relative_to(base))
    except ValueError:
        name = str(path)
    return CacheItem(area, str(path), name, size, last, note)


def _link_item(area: str, link: Path, base: Path) -> CacheItem:
    """A symlink met where a folder of ``area`` was expected: the link itself is the item
    (removing it unlinks it); what it points to is never listed, measured or removed."""
    return _item(area, link, base, "")


def _store_items(root: Path) -> list[CacheItem]:
    if not (root / MARKER).is_file():
        return []
    items = []
    store = FeatureStore.open(root)
    good, broken = store.scan()
    for g in good:
        note = "" if g.sealed else "not sealed (may be being written)"
        items.append(_item("store", root / g.rel, root, note))
    for b in broken:
        items.append(_item("store", root / b.rel, root, "broken (see `cusa store verify`)"))
    return items


def _model_items(root: Path) -> list[CacheItem]:
    items = []
    if not root.is_dir():
        return items
    for p in sorted(root.iterdir()):
        if p.name in _DOWNLOAD_DIRS or p.name.startswith(".") or p.name.endswith(".partial"):
            continue
        items.append(_item("models", p, root))
    return items


def _download_items(root: Path, segments: Path) -> list[CacheItem]:
    items = []
    for sub in _DOWNLOAD_DIRS:
        folder = root / sub
        if folder.is_symlink():  # never listed through: the link itself is the item
            items.append(_link_item("downloads", folder, root))
        elif folder.is_dir():
            items.extend(_item("downloads", p, root) for p in sorted(folder.iterdir()))
    for folder in (root, segments):
        if folder.is_dir() and not _link_on_way(folder, cusa_home()):
            items.extend(_item("downloads", p, folder) for p in sorted(folder.glob("*.partial")))
    return items


def _segment_items(root: Path) -> list[CacheItem]:
    if not root.is_dir():
        return []
    return [_item("segments", p, root) for p in sorted(root.glob("*.bin"))]


def cache_items(areas: Iterable[str] = AREAS) -> list[CacheItem]:
    """Every item of the given areas, as found on disk now.

    No symlink inside ``$CUSA_HOME`` is followed: an area folder (or a ``wheels``/``parts``
    folder, a store's dataset folder) that is a symlink is one item, the link itself, and an
    item that is a symlink is measured and removed as the link.
    """
    wanted = _check_areas(areas)
    home = _check_home()
    paths = area_paths()
    out: list[CacheItem] = []
    for area, collect in (
        ("store", lambda: _store_items(paths["store"])),
        ("models", lambda: _model_items(paths["models"])),
        ("downloads", lambda: _download_items(paths["downloads"], paths["segments"])),
        ("segments", lambda: _segment_items(paths["segments"])),
    ):
        if area not in wanted:
            continue
        link = _link_on_way(paths[area], home)
        if link is not None:
            # downloads live inside models: a linked models folder is the models area's item
            if not (area == "downloads" and _link_on_way(paths["models"], home) is not None):
                out.append(_link_item(area, link, home))
            continue
        for item in collect():
            base = paths[area] if Path(item.path).is_relative_to(paths[area]) else home
            inner = _link_on_way(Path(item.path), base)
            if inner is not None and inner != Path(item.path):
                item = _link_item(area, inner, base)  # e.g. store/<dataset> -> elsewhere
            if item not in out:
                out.append(item)
    return out


def cache_info() -> dict[str, Any]:
    """What ``$CUSA_HOME`` holds, per area, plus anything else found there.

    Returns:
        ``{"home": str, "areas": {area: {"path", "items", "bytes"}}, "other": [...],
        "total_bytes": int}``; each item as :meth:`CacheItem.to_dict`.
    """
    _check_home()
    paths = area_paths()
    items = cache_items()
    areas: dict[str, Any] = {}
    for area in AREAS:
        mine = sorted((i for i in items if i.area == area), key=lambda i: -i.last_used)
        areas[area] = {
            "path": str(paths[area]),
            "items": [i.to_dict() for i in mine],
            "bytes": sum(i.size for i in mine),
        }
    home = cusa_home()
    known = {paths["store"], paths["models"], home / "cache"}
    other = []
    if home.is_dir():
        for p in sorted(home.iterdir()):
            if p not in known:
                other.append(_item("other", p, home).to_dict())
    return {
        "home": str(home),
        "areas": areas,
        "other": other,
        "total_bytes": sum(a["bytes"] for a in areas.values()) + sum(o["size"] for o in other),
    }


def _check_areas(areas: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(areas))
    unknown = [a for a in chosen if a not in AREAS]
    if unknown or not chosen:
        raise ConfigError(
            f"unknown cache area(s) {unknown or chosen!r}; use {', '.join(AREAS)} or all"
        )
    return chosen


def _try_lock(path: Path) -> Any:
    """Hold ``path``'s assembly lock without waiting; None when another process holds it."""
    lock = lock_path(path)
    if not lock.exists():
        return contextlib.nullcontext()
    try:
        import fcntl
    except ImportError:  # no flock on this platform: nothing to honour
        return contextlib.nullcontext()
    fh = open(lock, "a+b")  # noqa: SIM115 - closed by the returned context
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    return held()


def _remove(item: CacheItem) -> bool:
    path = Path(item.path)
    guard = _try_lock(path) if item.area == "models" else contextlib.nullcontext()
    if guard is None:
        return False
    was_link = path.is_symlink()
    with guard:
        if was_link or not path.is_dir():
            path.unlink(missing_ok=True)  # a link goes, never what it points to
        else:
            shutil.rmtree(path)  # rmtree unlinks symlinks inside; it never follows them
    if (
        item.area == "store" and not was_link
    ):  # drop the split and dataset folders the group leaves empty
        for parent in (path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()
    return True


def clean_cache(
    areas: Iterable[str] = DEFAULT_CLEAN,
    *,
    max_bytes: int | None = None,
    older_than_s: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> CleanResult:
    """Remove items of ``areas``, least recently used first, until the bounds hold.

    Args:
        areas: which of :data:`AREAS` to clean (``store`` only when named).
        max_bytes: keep at most this many bytes in the chosen areas together.
        older_than_s: remove items not used for longer than this.
        dry_run: report what would go, remove nothing.
        now: the current time (for tests).

    With neither bound, every item of the chosen areas goes. Protected items (an unsealed or
    broken store group, a model whose lock another process holds) are never removed.

    Returns:
        A :class:`CleanResult`.
    """
    chosen = _check_areas(areas)
    if max_bytes is not None and max_bytes < 0:
        raise ConfigError(f"--max-size {max_bytes} is invalid; it must be >= 0")
    now = time.time() if now is None else now
    items = sorted(cache_items(chosen), key=lambda i: i.last_used)  # oldest first
    result = CleanResult(dry_run=dry_run)
    free = [i for i in items if not i.note]
    result.skipped = [i for i in items if i.note]
    if max_bytes is None and older_than_s is None:
        doomed = set(range(len(free)))
    else:
        doomed = set()
        if older_than_s is not None:
            doomed |= {k for k, i in enumerate(free) if now - i.last_used > older_than_s}
        if max_bytes is not None:
            total = sum(i.size for i in items) - sum(free[k].size for k in doomed)
            for k, i in enumerate(free):
                if total <= max_bytes:
                    break
                if k not in doomed:
                    doomed.add(k)
                    total -= i.size
    for k, item in enumerate(free):
        if k not in doomed:
            result.kept.append(item)
        elif dry_run or _remove(item):
            result.removed.append(item)
        else:
            result.skipped.append(CacheItem(**{**item.to_dict(), "note": "in use (locked)"}))
    return result
