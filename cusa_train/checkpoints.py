"""The trainer's files: their names, atomic saves, ``weights_only`` loads, and whether a
checkpoint may be resumed under the current config.

Every torch file cusa_train reads goes through :func:`read_torch_file`, so no file runs code
when it is loaded and every failure names the file and what it was meant to be.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cusa.errors import ConfigError
from cusa_train.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint-last.pt"
BEST_CHECKPOINT_NAME = "checkpoint-best.pt"
METRICS_NAME = "metrics.jsonl"


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


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` is, without writing its bytes again: a hard link under a
    temporary name, then rename (atomic). Where hard links are not supported, a copy.

    :func:`save_checkpoint` replaces ``src`` by a rename, so a later save leaves ``dst`` as it was.
    """
    tmp = dst.with_suffix(f".{os.getpid()}.partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # e.g. a file system without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


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


#: Config fields that may differ between a checkpoint and its resumed run (no effect on results).
RESUME_SAFE_FIELDS = frozenset(
    {
        "run.progress",
        "run.log_every",
        "run.log_to",
        "run.allow_non_finite",
        "run.checkpoint_every",
        "run.device",
        "run.resume",
        "run.on_config_change",
        "data.num_workers",
        "optim.max_steps",
        "eval.batch_size",
    }
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and key not in ("student_options", "image_spec", "text_spec")
        ):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict[str, Any], current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, current)}`` for the fields that differ and matter for the result."""
    try:
        before = _flatten(TrainConfig.from_dict(saved).to_dict())
    except ConfigError:  # a checkpoint of an older config layout: compare what it has
        before = _flatten(saved)
    now = _flatten(current.to_dict())
    return {
        k: (before.get(k), now.get(k))
        for k in sorted(set(before) | set(now))
        if k not in RESUME_SAFE_FIELDS and before.get(k) != now.get(k)
    }


def check_resume(config: TrainConfig, out_dir: Path, is_main: bool) -> dict[str, Any] | None:
    """Refuse to resume a checkpoint made with a different config, unless told what to do.

    Returns:
        The checkpoint it read, for the resume to restore (read once); None when there is
        nothing to resume or the old run was moved aside.
    """
    ckpt_path = out_dir / CHECKPOINT_NAME
    if not (config.run.resume and ckpt_path.is_file()):
        return None
    saved = load_checkpoint(ckpt_path)
    changes = config_changes(saved["config"], config)
    if not changes:
        return saved
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    mode = config.run.on_config_change
    if mode == "refuse":
        raise ConfigError(
            f"{str(out_dir)!r} holds a checkpoint made with another config ({listed}); "
            "use another --output-dir, or pass --resume-anyway to continue with the new config, "
            "or --overwrite to start again (the old run is moved aside)"
        )
    if not is_main:
        return saved
    step = int(saved["step"])
    if mode == "resume-anyway":
        old = out_dir / "config.json"
        if old.is_file():
            os.replace(old, out_dir / f"config-before-step-{step}.json")
        logger.warning("resuming %s at step %d with a changed config: %s", out_dir, step, listed)
        return saved
    # overwrite: move the old run aside, never delete it
    aside = out_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    aside.mkdir()
    for name in (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME, METRICS_NAME, "config.json"):
        if (out_dir / name).exists():
            os.replace(out_dir / name, aside / name)
    logger.warning("moved the previous run in %s to %s; starting again", out_dir, aside)
    return None
