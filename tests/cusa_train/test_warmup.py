"""The epoch-cosine warmup against the official scheduler (issue 24 item 3).

``official_get_lr`` is ``CosineLRScheduler._get_lr`` of the official code's copy of timm
(lerogo/aaai24_itr_cusa ``scheduler/cosine_lr.py``, commit 58e8721), transcribed line for line
for one parameter group, ``t_mul=1``, ``decay_rate=1`` and the ``cycle_limit=1`` that
``scheduler_factory.create_scheduler`` passes. Its ``warmup_prefix`` defaults to ``True``.
"""

from __future__ import annotations

import math

import pytest

from cusa_train.config import TrainConfig
from cusa_train.optim import epoch_cosine_lr


def official_get_lr(t, *, base, lr_min, t_initial, warmup_t, warmup_lr_init, warmup_prefix=True):
    warmup_step = (base - warmup_lr_init) / warmup_t if warmup_t else 1
    if t < warmup_t:
        return warmup_lr_init + t * warmup_step
    if warmup_prefix:
        t = t - warmup_t
    i = t // t_initial
    t_i = t_initial
    t_curr = t - (t_initial * i)
    gamma = 1.0**i
    lr_min = lr_min * gamma
    lr_max = base * gamma
    cycle_limit = 1
    if cycle_limit == 0 or (cycle_limit > 0 and i < cycle_limit):
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr / t_i))
    return lr_min


@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("prefix", [True, False])
def test_epoch_cosine_equals_the_official_scheduler(warmup, prefix):
    lr, min_lr, warmup_lr, epochs = 1e-5, 1e-6, 1e-7, 10
    ours = [
        epoch_cosine_lr(e, lr, min_lr, epochs, warmup, warmup_lr, warmup_prefix=prefix)
        for e in range(epochs + warmup + 2)
    ]
    theirs = [
        official_get_lr(
            e,
            base=lr,
            lr_min=min_lr,
            t_initial=epochs,
            warmup_t=warmup,
            warmup_lr_init=warmup_lr,
            warmup_prefix=prefix,
        )
        for e in range(epochs + warmup + 2)
    ]
    assert ours == theirs  # exact: the same floating-point expression


def test_official_warmup_reaches_the_peak_after_the_warmup():
    # issue 24: 30 epochs, 3 warmup: stock timm gave 9.78e-6 at epoch 3, the official 1.0e-5.
    official = epoch_cosine_lr(3, 1e-5, 1e-6, 30, 3, 1e-7)
    stock = epoch_cosine_lr(3, 1e-5, 1e-6, 30, 3, 1e-7, warmup_prefix=False)
    assert official == 1e-5
    assert stock == pytest.approx(9.78e-6, rel=1e-3)
    # the official cosine is shifted by the warmup, so the last epoch has not reached min_lr
    assert epoch_cosine_lr(29, 1e-5, 1e-6, 30, 3, 1e-7) > 1.3e-6


def _official_config(warmup_epochs: int) -> dict:
    loss_sections = {
        "contrastive": {"is_on": True, "is_block_tau": False, "tau": 0.05, "tau_min": 0.01,
                        "tau_max": 0.1, "rate": 1.0, "contrastive_loss_mode": "mean"},
        "cross_softlabel": {"is_on": False, "use_same_tau": True, "is_block_tau": False,
                            "image_tau": 0.45, "image_tau_min": 0.1, "image_tau_max": 0.99,
                            "text_tau": 0.45, "text_tau_min": 0.1, "text_tau_max": 0.99,
                            "rate": 0.1, "cross_softlabel_mode": "each",
                            "use_same_softlabel_tau": True, "is_block_softlabel_tau": True,
                            "the_softlabel_image_tau": 1.0, "the_softlabel_image_tau_min": 0.1,
                            "the_softlabel_image_tau_max": 1.0, "the_softlabel_text_tau": 1.0,
                            "the_softlabel_text_tau_min": 0.1, "the_softlabel_text_tau_max": 1.0},
        "uni_softlabel": {"is_on": False, "use_cross_softlabel_same_tau": True, "rate": 0.5,
                          "use_cross_softlabel_same_softlabel_tau": True},
    }  # fmt: skip
    return {
        "clip_model": "ViT-B/32",
        "dataset_name": "cross_coco",
        "batch_size_train": 128,
        "optimizer": {"opt": "adamW", "lr": 1e-5, "weight_decay": 1e-4},
        "schedular": {
            "sched": "cosine",
            "lr": 1e-5,
            "epochs": 10,
            "min_lr": 1e-6,
            "decay_rate": 1,
            "warmup_lr": 1e-7,
            "warmup_epochs": warmup_epochs,
            "cooldown_epochs": 0,
        },
        "loss_config": loss_sections,
    }


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_from_official_carries_the_official_warmup(warmup):
    cfg = TrainConfig.from_official(_official_config(warmup))
    o = cfg.optim
    assert o.schedule == "epoch-cosine" and o.warmup_prefix is True
    assert o.warmup_epochs == warmup
    got = [
        epoch_cosine_lr(
            e, o.lr, o.final_lr, o.epochs, o.warmup_epochs, o.warmup_lr, o.warmup_prefix
        )
        for e in range(o.epochs)
    ]
    want = [
        official_get_lr(
            e, base=1e-5, lr_min=1e-6, t_initial=10, warmup_t=warmup, warmup_lr_init=1e-7
        )
        for e in range(10)
    ]
    assert got == want


def test_warmup_prefix_is_an_explicit_option():
    assert TrainConfig().optim.warmup_prefix is True
    cfg = TrainConfig.from_dict({"optim": {"schedule": "epoch-cosine", "warmup_prefix": False}})
    assert cfg.optim.warmup_prefix is False
