"""Typed, frozen, validated training configuration.

- :mod:`cusa_train.config.train`: the run (:class:`TrainConfig` and its sections, the official
  CUSA config loader);
- :mod:`cusa_train.config.loss`: the loss section (:class:`LossConfig`: ITR, CSA and USA terms);
- :mod:`cusa_train.config.parsing`: YAML/JSON files, ``--set`` overrides, validation into the
  dataclasses.

Importing this package imports neither torch nor the models.
"""

from __future__ import annotations

from cusa_train.config.loss import LossConfig
from cusa_train.config.parsing import apply_overrides, load_mapping
from cusa_train.config.train import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TeachersConfig,
    TrainConfig,
    ValidationConfig,
)

__all__ = [
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TeachersConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_mapping",
]
