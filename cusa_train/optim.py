"""The optimiser's schedule and parameter groups: the two lr schedules and AdamW's decay groups
(see :class:`cusa_train.config.OptimConfig`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from cusa.errors import ConfigError


def cosine_schedule(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps`` (LambdaLR factor)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def epoch_cosine_lr(
    epoch: int,
    lr: float,
    min_lr: float,
    epochs: int,
    warmup_epochs: int = 0,
    warmup_lr: float | None = None,
    warmup_prefix: bool = True,
) -> float:
    """The official per-epoch learning rate: ``_get_lr`` of the official code's copy of timm's
    ``CosineLRScheduler`` (lerogo/aaai24_itr_cusa ``scheduler/cosine_lr.py``) with
    ``t_initial=epochs``, one cycle, no noise, in the same floating-point expression so the values
    are exact.

    ``warmup_prefix=True`` (the official copy's default) starts the cosine after the warmup:
    epoch ``warmup_epochs`` has the peak ``lr``. ``False`` is stock timm: the cosine is counted
    from epoch 0, so the warmup epochs use up its start.
    """
    if epoch < warmup_epochs:
        start = lr if warmup_lr is None else warmup_lr
        return start + epoch * ((lr - start) / warmup_epochs)
    t = epoch - warmup_epochs if warmup_prefix else epoch
    if t >= epochs:  # past the single cycle (cycle_limit=1) the scheduler holds the minimum
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def param_groups(
    model: nn.Module, weight_decay: float, mode: str = "matrices"
) -> list[dict[str, Any]]:
    """AdamW parameter groups, each with its ``param_names``.

    ``"matrices"``: decay on tensors with 2+ dimensions; none on biases, norms and temperatures.
    ``"official"``: timm's ``add_weight_decay`` as the official CUSA code calls it: no decay on
    1-d tensors and names ending in ``.bias``, decay on everything else, 0-d temperatures included;
    groups in its order (no decay first).
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if mode == "official":
            skip = p.ndim == 1 or name.endswith(".bias")
        elif mode == "matrices":
            skip = p.ndim < 2
        else:
            raise ConfigError(f"optim.decay_groups={mode!r}; use 'matrices' or 'official'")
        (no_decay if skip else decay).append((name, p))

    def group(items: list[tuple[str, nn.Parameter]], wd: float) -> dict[str, Any]:
        return {
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "weight_decay": wd,
        }

    if mode == "official":
        return [group(no_decay, 0.0), group(decay, weight_decay)]
    return [group(decay, weight_decay), group(no_decay, 0.0)]
