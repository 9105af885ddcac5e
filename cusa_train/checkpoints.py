"""Reading and writing the trainer's files: atomic saves, ``weights_only`` loads.

Every torch file cusa_train reads goes through :func:`read_torch_file`, so no file runs code
when it is loaded and every failure names the file and what it was meant to be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cusa.errors import ConfigError


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU.

    Args:
        path: the file.
        what: how the error names it, e.g. ``"checkpoint"`` or ``"model.init_from"``.

    Raises:
        ConfigError: the file is missing or unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a bad file
        raise ConfigError(f"cannot read {what} {str(p)!r}: {exc}") from exc


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename (a crash never leaves half a file)."""
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a trainer checkpoint with ``weights_only=True`` (no code runs from the file).

    Raises:
        ConfigError: missing or unreadable file, or not a trainer checkpoint.
    """
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise ConfigError(
            f"{str(path)!r} is not a cusa trainer checkpoint (needs keys model, config, step)"
        )
    return ckpt
