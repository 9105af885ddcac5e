"""Byte counts as people write and read them: :func:`parse_size` reads ``256MB`` or ``1GiB``
(``cusa shard --max-size``, ``cusa cache clean --max-size``); :func:`human_bytes` prints
``1.5 MiB`` (``cusa store info``, ``cusa cache``, the HTML report)."""

from __future__ import annotations

import re

from .errors import ConfigError


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB`` (TiB at most)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str | int) -> int:
    """``"256MB"`` -> 256000000; also ``KB``/``GB`` (powers of 1000), ``KiB``/``MiB``/``GiB``.

    Raises:
        ConfigError: not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"invalid size {text!r}; use a number of bytes or e.g. '256MB', '1GiB'"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return value
