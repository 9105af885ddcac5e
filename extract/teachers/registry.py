"""The teacher registry: ``register_teacher`` / ``get_teacher`` / ``list_teachers``.

Every teacher is a :class:`TeacherEntry`: a factory (``**options -> Teacher``), a
:class:`TeacherInfo` that can be listed without loading anything, and optionally a ``fetch``
function that puts the weights on disk. Names are exact: no substring dispatch and no fallback,
so asking for ``unicom-vit-b32`` never silently yields a stand-in.

Other packages add teachers without editing this one, through the entry-point group
``cusa.teachers``; the entry point names a :class:`TeacherEntry` (or a zero-argument callable
returning one)::

    [project.entry-points."cusa.teachers"]
    my-teacher = "my_pkg.teachers:MY_TEACHER_ENTRY"
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError
from ...registry import Registry, load_entry_points
from ...store.spec import Modality
from .base import Teacher

ENTRY_POINT_GROUP = "cusa.teachers"


def _always_false() -> bool:
    return False


@dataclass(frozen=True)
class TeacherInfo:
    """What ``cusa teachers list`` shows, known without loading the model.

    Args:
        name: registry name.
        modality: ``"image"`` or ``"text"``.
        dim: feature dimension.
        default_dtype: on-disk dtype by default.
        weights_source: where the weights come from, in words.
        output_kind: ``"embedding"``, ``"tokens"``, ``"pooled"``, ``"sentence"``...
        stand_in: True for offline stand-ins that are not the paper's teachers.
        description: one line.
        check: cheap "are the weights on this machine now" test (no hashing, no loading).
        normalized: whether the features are L2-normalised (the spec's ``normalized``), when the
            teacher declares it; ``None``: known only once the teacher is built.
    """

    name: str
    modality: Modality
    dim: int
    default_dtype: str
    weights_source: str
    output_kind: str = ""
    stand_in: bool = False
    description: str = ""
    check: Callable[[], bool] = field(default=_always_false, repr=False, compare=False)
    normalized: bool | None = None

    def known_spec(self) -> dict[str, Any]:
        """The fields of this teacher's :class:`~cusa.store.spec.TeacherSpec` known without
        loading it: name and modality, and output kind and ``normalized`` where declared."""
        known: dict[str, Any] = {"name": self.name, "modality": self.modality}
        if self.output_kind:
            known["output_kind"] = self.output_kind
        if self.normalized is not None:
            known["normalized"] = self.normalized
        return known

    def available(self) -> bool:
        """Are the weights on this machine now (cheap: file/package presence only)?"""
        try:
            return bool(self.check())
        except OSError:
            return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "dim": self.dim,
            "default_dtype": self.default_dtype,
            "output_kind": self.output_kind,
            "weights_source": self.weights_source,
            "available": self.available(),
            "stand_in": self.stand_in,
            "description": self.description,
        }


@dataclass(frozen=True)
class TeacherEntry:
    """A registered teacher: factory + info (+ optional weight fetcher). Calling it builds the teacher."""

    factory: Callable[..., Teacher]
    info: TeacherInfo
    fetch: Callable[[], Any] | None = None

    def __call__(self, **options: Any) -> Teacher:
        return self.factory(**options)


TEACHERS: Registry[TeacherEntry] = Registry("teacher")
_loaded = False


def register_teacher(
    name: str,
    factory: Callable[..., Teacher],
    info: TeacherInfo,
    *,
    fetch: Callable[[], Any] | None = None,
    overwrite: bool = False,
) -> TeacherEntry:
    """Add a teacher under ``name``.

    Args:
        name: registry name; must equal ``info.name``.
        factory: ``**options -> Teacher``.
        info: the listing information.
        fetch: puts the weights on disk (used by ``cusa teachers fetch``).
        overwrite: replace an existing entry of that name.

    Raises:
        ConfigError: the name is taken (without ``overwrite``) or differs from ``info.name``.
    """
    if info.name != name:
        raise ConfigError(f"teacher name {name!r} differs from its info name {info.name!r}")
    entry = TeacherEntry(factory, info, fetch)
    TEACHERS.register(name, entry, overwrite=overwrite)
    return entry


def _from_entry_point(obj: Any) -> TeacherEntry:
    entry = obj if isinstance(obj, TeacherEntry) else obj()
    if not isinstance(entry, TeacherEntry):
        raise ConfigError(
            f"entry point in group {ENTRY_POINT_GROUP!r} gave {type(entry).__name__}, expected a TeacherEntry"
        )
    return entry


def load_plugin_teachers() -> None:
    """Register the teachers of installed plug-ins (entry points of :data:`ENTRY_POINT_GROUP`), once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_entry_points(ENTRY_POINT_GROUP, TEACHERS, loader=_from_entry_point)


def get_teacher_entry(name: str) -> TeacherEntry:
    """The registered entry for ``name``.

    Raises:
        UnknownNameError: no such teacher; the message lists the known names.
    """
    load_plugin_teachers()
    return TEACHERS.get(name)


def get_teacher(name: str, **options: Any) -> Teacher:
    """Build the teacher registered as ``name`` (loads weights; may fetch them).

    Args:
        name: e.g. ``"unicom-vit-b32"``, ``"all-mpnet-base-v2"``.
        **options: passed to the factory (``weights=``, ``device=``...).

    Raises:
        UnknownNameError: unknown name (lists the known ones).
        ConfigError: an option the teacher does not take.
        WeightsError: the weights are missing and cannot be fetched, or fail their checksum.
    """
    entry = get_teacher_entry(name)
    try:
        inspect.signature(entry.factory).bind(**options)
    except TypeError as exc:
        params = [
            p for p in inspect.signature(entry.factory).parameters if p not in ("args", "kwargs")
        ]
        raise ConfigError(
            f"teacher {name!r} does not take options {sorted(options)!r} ({exc}); it takes: {', '.join(params)}"
        ) from None
    return entry.factory(**options)


def list_teachers() -> list[TeacherInfo]:
    """Infos of all registered teachers (built-in and entry points), sorted by name."""
    load_plugin_teachers()
    return [TEACHERS.get(n).info for n in TEACHERS.list()]


def fetch_teacher(name: str) -> Any:
    """Put ``name``'s weights on disk now (download / registry assembly), return where they are.

    Raises:
        UnknownNameError: unknown name.
        ConfigError: that teacher has nothing to fetch.
        WeightsError: the fetch failed.
    """
    entry = get_teacher_entry(name)
    if entry.fetch is None:
        raise ConfigError(
            f"teacher {name!r} has no fetch step; its weights come from: {entry.info.weights_source}"
        )
    return entry.fetch()
