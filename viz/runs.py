"""Reading what a training run leaves behind: the metrics log, eval reports and feature files.

Inputs:
    - a run directory holding ``metrics.jsonl`` (what ``cusa_train`` writes), or a ``.jsonl`` file:
      one JSON object per line with a step counter (``step``; else the line number) and numeric
      values. Loss terms are ``loss``, ``itr``, ``csa``, ``usa`` (optionally prefixed, e.g.
      ``train/csa``); temperatures are keys starting with ``tau`` or ``temp`` (``tau/csa``).
    - an eval JSON: ``{"metrics": {...}, "counts": {...}, "info": {...}}`` as written by
      :meth:`cusa_train.evaluation.evaluate.EvalReport.to_json`, or a flat ``{name: number}`` mapping.
    - student features for the 2-D embedding plot: ``.npz`` (``features`` + ``ids``), ``.npy`` with
      a sibling ``<name>.ids.txt``, or ``.parquet`` (see :func:`cusa_train.evaluation.evaluate.load_features`).
      Ids of captions are ``<image_id>#<k>``; every other id is an image.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cusa_train.evaluation.stored_features import load_features

from ..errors import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_TERMS = ("loss", "itr", "csa", "usa", "infonce")
STEP_KEYS = ("step", "global_step", "iteration", "iter")
_NOT_PLOTTED = (*STEP_KEYS, "epoch", "time", "timestamp", "elapsed", "elapsed_s", "rank")

PathLike = str | os.PathLike


@dataclass
class RunLog:
    """The metric series of one run: ``series[key] = (steps, values)``."""

    label: str
    source: str
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    lines: int = 0
    skipped_lines: int = 0

    def loss_keys(self) -> list[str]:
        return [k for k in self.series if is_loss_key(k)]

    def temperature_keys(self) -> list[str]:
        return [k for k in self.series if is_temperature_key(k)]

    def other_keys(self) -> list[str]:
        return [k for k in self.series if not (is_loss_key(k) or is_temperature_key(k))]


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[-1].lower()


def is_loss_key(key: str) -> bool:
    """A loss term: ``loss``, ``itr``, ``csa``, ``usa`` (any ``prefix/``), or ``loss*``."""
    if is_temperature_key(key) or key.lower().startswith(("eval", "val")):
        return False
    leaf = _leaf(key)
    return leaf in LOSS_TERMS or leaf.startswith("loss") or key.lower().startswith("loss/")


def is_temperature_key(key: str) -> bool:
    low = key.lower()
    return low.startswith(("tau", "temp")) or "/tau" in low or low.endswith("_tau")


def as_labelled(
    value: PathLike | Sequence[PathLike] | Mapping[str, PathLike] | None, what: str
) -> dict[str, Path]:
    """Normalise one path, a list of paths or ``{label: path}`` to ``{label: Path}``.

    Labels default to the file or directory name; ``LABEL=PATH`` strings carry their own label.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = [(str(k), Path(v)) for k, v in value.items()]
    else:
        seq = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        items = []
        for v in seq:
            text = os.fspath(v)
            label, sep, path = text.partition("=")
            if sep and label and not Path(text).exists():
                items.append((label, Path(path)))
            else:
                p = Path(text)
                items.append((p.stem if p.suffix else p.name, p))
    out: dict[str, Path] = {}
    for label, path in items:
        if not path.exists():
            raise ConfigError(f"{what} {str(path)!r} does not exist; check the path")
        while label in out:
            label += "'"
        out[label] = path
    return out


def read_run(path: PathLike, label: str | None = None) -> RunLog:
    """Read a run directory (its ``metrics.jsonl``) or a JSONL file into per-key series.

    Raises:
        ConfigError: the path has no metrics log, or no line holds a number.
    """
    p = Path(path)
    f = p / METRICS_FILE if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(
            f"run {str(p)!r} has no {METRICS_FILE}; pass the run's output_dir or its JSONL file"
        )
    run = RunLog(label or (p.name if p.is_dir() else p.stem), str(f))
    raw: dict[str, tuple[list[float], list[float]]] = {}
    with f.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1  # e.g. a line cut short by a crash
                continue
            if not isinstance(rec, dict):
                run.skipped_lines += 1
                continue
            run.lines += 1
            step = next((rec[k] for k in STEP_KEYS if _is_number(rec.get(k))), lineno)
            for key, value in _flatten(rec).items():
                if key in _NOT_PLOTTED or not _is_number(value):
                    continue
                xs, ys = raw.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    if not raw:
        raise ConfigError(
            f"metrics log {str(f)!r} holds no numeric values ({run.lines} lines read)"
        )
    if run.skipped_lines:
        log.warning("skipped %d unreadable line(s) of %s", run.skipped_lines, f)
    run.series = {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in raw.items()}
    return run


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_eval(path: PathLike) -> dict[str, float]:
    """The metrics of an eval JSON (``EvalReport`` layout or a flat mapping).

    Raises:
        ConfigError: unreadable JSON or no numeric metric in it.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read eval JSON {str(p)!r}: {exc}") from exc
    metrics = data.get("metrics", data) if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise ConfigError(f"eval JSON {str(p)!r} is not an object with a 'metrics' mapping")
    out = {str(k): float(v) for k, v in _flatten(metrics).items() if _is_number(v)}
    if not out:
        raise ConfigError(f"eval JSON {str(p)!r} holds no numeric metrics")
    return out


@dataclass
class Embeddings:
    """Student features to project to 2-D."""

    label: str
    ids: list[str]
    features: np.ndarray  # (N, D) float32

    @property
    def groups(self) -> list[str]:
        """The image each row belongs to (captions ``<image>#<k>`` map to ``<image>``)."""
        return [i.rsplit("#", 1)[0] for i in self.ids]

    @property
    def is_caption(self) -> list[bool]:
        return ["#" in i for i in self.ids]


def read_embeddings(path: PathLike, label: str) -> Embeddings:
    """Read a feature file (``.npz``/``.npy``+ids/``.parquet``) for the embedding plot."""
    table = load_features(path)
    return Embeddings(label, list(table.ids), np.asarray(table.features, dtype=np.float32))
