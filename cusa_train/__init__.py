"""cusa_train: plug-and-play CSA/USA soft-label training that reads the cusa feature store.

The public API, importable from the package itself::

    from cusa_train import CusaModel, CusaLoss, LossConfig, TrainConfig, TeacherFeatures, train

- Losses (``nn.Module``\\ s that take tensors): :class:`CusaLoss`, :class:`MultiPositiveInfoNCELoss`,
  :class:`CrossModalSoftLabelLoss` (CSA), :class:`UniModalSoftLabelLoss` (USA).
- The wrapper that adds heads and temperatures to any student: :class:`CusaModel`.
- Configs: :class:`TrainConfig` (whole runs, ``from_file`` / ``from_official``),
  :class:`LossConfig`.
- Soft labels from the store: :class:`TeacherFeatures`, :class:`PairDataset`,
  :class:`SoftLabelCollate`, :class:`SoftLabelStage`.
- Students: :func:`build_student`, :func:`list_students`, :class:`ClipStudent`.
- Training and evaluation: :func:`train`, :class:`TrainResult`, :func:`evaluate_model`,
  :func:`evaluate_checkpoint`, :class:`EvalReport`.

Submodules hold the rest (``cusa_train.evaluation.metrics``, ``cusa_train.distributed``, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if __name__ != "cusa_train":
    # In an editable install the repository root is the ``cusa`` package, so this folder would
    # also be reachable as ``cusa.cusa_train``: a second module object for every file.
    raise ImportError(f"import cusa_train, not {__name__}: cusa_train is a top-level package")

# Public name -> the submodule that defines it. Loaded on first use (PEP 562), so importing one
# submodule, e.g. ``cusa_train.config`` in the CLI, does not import torch models and the rest.
_EXPORTS = {
    "ClipStudent": "cusa_train.students.clip",
    "LossConfig": "cusa_train.config.loss",
    "TrainConfig": "cusa_train.config",
    "PairDataset": "cusa_train.data",
    "SoftLabelCollate": "cusa_train.data",
    "SoftLabelStage": "cusa_train.data",
    "TeacherFeatures": "cusa_train.data",
    "EvalReport": "cusa_train.evaluation.report",
    "evaluate_checkpoint": "cusa_train.evaluation.evaluate",
    "evaluate_model": "cusa_train.evaluation.evaluate",
    "CrossModalSoftLabelLoss": "cusa_train.losses",
    "CusaLoss": "cusa_train.losses",
    "MultiPositiveInfoNCELoss": "cusa_train.losses",
    "UniModalSoftLabelLoss": "cusa_train.losses",
    "build_student": "cusa_train.students.registry",
    "list_students": "cusa_train.students.registry",
    "TrainResult": "cusa_train.trainer",
    "train": "cusa_train.trainer",
    "CusaModel": "cusa_train.wrapper",
}

if TYPE_CHECKING:
    from cusa_train.config import TrainConfig
    from cusa_train.config.loss import LossConfig
    from cusa_train.data import PairDataset, SoftLabelCollate, SoftLabelStage, TeacherFeatures
    from cusa_train.evaluation.evaluate import evaluate_checkpoint, evaluate_model
    from cusa_train.evaluation.report import EvalReport
    from cusa_train.losses import (
        CrossModalSoftLabelLoss,
        CusaLoss,
        MultiPositiveInfoNCELoss,
        UniModalSoftLabelLoss,
    )
    from cusa_train.students.clip import ClipStudent
    from cusa_train.students.registry import build_student, list_students
    from cusa_train.trainer import TrainResult, train
    from cusa_train.wrapper import CusaModel


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cusa_train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ClipStudent",
    "CrossModalSoftLabelLoss",
    "CusaLoss",
    "CusaModel",
    "EvalReport",
    "LossConfig",
    "MultiPositiveInfoNCELoss",
    "PairDataset",
    "SoftLabelCollate",
    "SoftLabelStage",
    "TeacherFeatures",
    "TrainConfig",
    "TrainResult",
    "UniModalSoftLabelLoss",
    "build_student",
    "evaluate_checkpoint",
    "evaluate_model",
    "list_students",
    "train",
]
