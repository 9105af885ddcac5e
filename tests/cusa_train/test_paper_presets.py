"""The presets in ``configs/paper/`` are the official CUSA configs, value for value.

The official YAML files (lerogo/aaai24_itr_cusa, commit 58e8721) are rebuilt here from the
fixture ``tests/fixtures/cusa_train_step_golden.pt``, which records the parsed
``configs/vitb32/coco/{cusa,only_contrastive}.yaml`` (with its run overrides and the original
values beside them), plus the few keys in which the other six files differ from those two
(``DIFFERENCES``, read off the official files: save path, CLIP model, batch sizes, epochs).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from cusa.errors import ConfigError
from cusa_train.config import TrainConfig
from cusa_train.config.loss import LossConfig
from cusa_train.optim import epoch_cosine_lr

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "cusa_train_step_golden.pt"
PAPER = ROOT / "configs" / "paper"

# (arch folder, dataset folder) -> keys that differ from configs/vitb32/coco/*.yaml
DIFFERENCES = {
    ("vitb32", "coco"): {},
    ("vitb32", "flickr"): {"epochs": 40},
    ("vitl14_336", "coco"): {
        "clip_model": "ViT-L/14@336px",
        "batch_size_train": 16,
        "batch_size_test": 32,
        "batch_size_testall": 32,
    },
    ("vitl14_336", "flickr"): {
        "clip_model": "ViT-L/14@336px",
        "batch_size_train": 16,
        "batch_size_test": 32,
        "batch_size_testall": 32,
        "epochs": 40,
    },
}
PRESET_NAMES = {"vitb32": "vitb32", "vitl14_336": "vitl14-336"}
DATASETS = {"coco": "coco", "flickr": "flickr30k"}


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


def official_config(golden: dict, arch: str, dataset: str, case: str) -> dict:
    """The parsed official YAML ``configs/<arch>/<dataset>/<case>.yaml``."""
    recorded = golden["cases"][case]
    cfg = copy.deepcopy(recorded["config"])
    cfg["optimizer"] = copy.deepcopy(recorded["original_optimizer"])
    cfg["schedular"] = copy.deepcopy(recorded["original_schedular"])
    cfg["batch_size_train"] = recorded["original_batch_size_train"]
    cfg.update(
        save_path=f"output/{arch}/{dataset}/{case}",
        dataset_name="cross_coco",  # every official file says cross_coco, Flickr30K ones too
        data_path="",
        batch_size_test=128,
        batch_size_testall=128,
    )
    for key, value in DIFFERENCES[(arch, dataset)].items():
        if key == "epochs":
            cfg["schedular"]["epochs"] = value
        else:
            cfg[key] = value
    return cfg


CASES = [
    (arch, dataset, case) for arch, dataset in DIFFERENCES for case in ("cusa", "only_contrastive")
]


@pytest.mark.parametrize(("arch", "dataset", "case"), CASES)
def test_preset_equals_the_official_config(golden, arch, dataset, case):
    official = official_config(golden, arch, dataset, case)
    preset_path = PAPER / f"{PRESET_NAMES[arch]}-{DATASETS[dataset]}-{case.replace('_', '-')}.yaml"
    preset = TrainConfig.from_file(preset_path)
    assert preset == TrainConfig.from_official(official, dataset=DATASETS[dataset])
    assert preset.loss == LossConfig.from_official(official["loss_config"])
    # The values a reader checks first, spelled out.
    assert preset.optim.lr == 1e-5 and preset.optim.min_lr == 1e-6
    assert preset.optim.weight_decay == 1e-4 and preset.optim.decay_groups == "official"
    assert preset.optim.betas == (0.9, 0.999) and preset.optim.eps == 1e-8
    assert preset.optim.schedule == "epoch-cosine" and preset.optim.warmup_epochs == 0
    assert preset.optim.grad_clip_norm is None
    assert preset.run.all_gather == "off" and preset.run.seed == 23
    assert preset.data.captions == "pre_caption" and preset.data.shuffle_seed == 0
    assert preset.data.batch_size == official["batch_size_train"]
    assert preset.eval.splits == ("val", "test") and preset.eval.select_on == "val"
    assert preset.teachers.image == "unicom-vit-b32-tokens"
    assert preset.teachers.text == "all-mpnet-base-v2"
    assert (preset.loss.csa.enabled, preset.loss.usa.enabled) == ((case == "cusa"),) * 2


def test_official_30_epoch_schedule_is_reproduced_exactly(golden):
    want = golden["cases"]["cusa"]["scheduler"]["official_config_lr_per_epoch"]
    o = TrainConfig.from_file(PAPER / "vitb32-coco-cusa.yaml").optim
    got = [
        epoch_cosine_lr(e, o.lr, o.final_lr, o.epochs, o.warmup_epochs, o.warmup_lr)
        for e in range(30)
    ]
    assert got == want


def test_epoch_cosine_warmup_and_tail():
    assert epoch_cosine_lr(0, 1.0, 0.1, 10, warmup_epochs=2, warmup_lr=0.0) == 0.0
    assert epoch_cosine_lr(1, 1.0, 0.1, 10, warmup_epochs=2, warmup_lr=0.0) == 0.5
    assert epoch_cosine_lr(2, 1.0, 0.1, 10, 2, 0.0, warmup_prefix=False) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 0.2))
    )
    assert epoch_cosine_lr(12, 1.0, 0.1, 10) == 0.1  # past the cycle: the minimum, as timm


def test_official_loader_refuses_what_it_does_not_reproduce(golden, tmp_path):
    official = official_config(golden, "vitb32", "coco", "cusa")
    for path, value, match in (
        (("optimizer", "opt"), "sgd", "only adamW"),
        (("schedular", "sched"), "step", "only cosine"),
        (("schedular", "decay_rate"), 0.5, "decay_rate=0.5"),
        (("clip_model",), "ViT-H/14", "ViT-H/14"),
    ):
        bad = copy.deepcopy(official)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_official(bad)
    del official["optimizer"]
    with pytest.raises(ConfigError, match="missing key 'optimizer'"):
        TrainConfig.from_official(official)


def test_official_yaml_file_is_read(golden, tmp_path):
    """The loader reads an official YAML file from disk (here rewritten from the fixture)."""
    import yaml

    official = official_config(golden, "vitb32", "coco", "only_contrastive")
    path = tmp_path / "only_contrastive.yaml"
    path.write_text(yaml.safe_dump(official))
    assert TrainConfig.from_official(path) == TrainConfig.from_file(
        PAPER / "vitb32-coco-only-contrastive.yaml"
    )


def test_all_gather_modes_and_float_overrides():
    from cusa_train.config.parsing import apply_overrides

    cfg = TrainConfig.from_dict(apply_overrides({}, ["optim.lr=3e-4", "run.all_gather=official"]))
    assert cfg.optim.lr == 3e-4 and cfg.run.all_gather == "official"
    with pytest.raises(ConfigError, match="all_gather"):
        TrainConfig.from_dict({"run": {"all_gather": "sometimes"}})
    with pytest.raises(ConfigError, match="select_on='test' is not one of"):
        TrainConfig.from_dict({"eval": {"splits": ["val"], "select_on": "test"}})
