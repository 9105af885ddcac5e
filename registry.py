"""A tiny named registry, one per kind of thing (teachers, dataset readers, losses)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. ``get`` on an unknown name lists the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False):
        """Register ``entry`` under ``name``; usable as a decorator when ``entry`` is None."""

        def _add(obj: T) -> T:
            if name in self._entries and not overwrite:
                raise ConfigError(
                    f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._entries[name] = obj
            return obj

        return _add if entry is None else _add(entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {known}"
            ) from None

    def list(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())


def load_entry_points(group: str, registry: Registry, loader: Callable | None = None) -> None:
    """Let other packages add entries through ``[project.entry-points."<group>"]``."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if ep.name not in registry:
            obj = ep.load()
            registry.register(ep.name, loader(obj) if loader else obj)
