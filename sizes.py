"""Byte counts as people read them: ``1.5 MiB``. The one formatter of sizes that the CLI
(``cusa store info``, ``cusa cache``) and the HTML report print."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB`` (TiB at most)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
