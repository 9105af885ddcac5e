from __future__ import annotations

import json

import pytest

from cusa.errors import ConfigError
from cusa_train.config import TrainConfig
from cusa_train.config.loss import LossConfig, TemperatureConfig, TemperaturePairConfig
from cusa_train.config.parsing import apply_overrides, load_mapping

YAML = """
model:
  student: mobilenetv2-minilm
  embed_dim: 256
loss:
  itr: {mode: sum}
  csa:
    weight: 0.2
    combine: add
    tau: {image: {init: 0.4, min: 0.1, max: 0.9}, text: {init: 0.5, min: 0.1, max: 0.9}}
  usa:
    tau: csa
    teacher_tau: {init: 0.8, min: 0.1, max: 1.0, learnable: false}
data: {batch_size: 16, max_samples: 40}
optim: {lr: 3.0e-4, warmup_steps: 2, max_steps: 10, betas: [0.9, 0.99]}
run: {output_dir: out, seed: 7}
"""


def test_defaults_are_the_official_cusa_settings():
    cfg = TrainConfig()
    assert (cfg.loss.itr.weight, cfg.loss.csa.weight, cfg.loss.usa.weight) == (1.0, 0.1, 0.5)
    assert cfg.loss.itr.mode == "mean" and cfg.loss.csa.combine == "each"
    assert cfg.loss.itr.tau == TemperatureConfig(0.05, 0.01, 0.1, learnable=True)
    assert cfg.loss.csa.tau.shared and cfg.loss.csa.tau.merged.init == pytest.approx(0.45)
    assert cfg.loss.csa.teacher_tau.merged == TemperatureConfig(1.0, 0.1, 1.0, learnable=False)
    assert cfg.loss.usa.teacher_tau == "csa"


def test_yaml_file_round_trips_through_json_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML)
    cfg = TrainConfig.from_file(tmp_path / "c.yaml")
    assert cfg.model.embed_dim == 256
    assert cfg.loss.itr.mode == "sum"
    assert cfg.loss.csa.combine == "add" and cfg.loss.csa.weight == 0.2
    assert not cfg.loss.csa.tau.shared and cfg.loss.csa.tau.text.init == 0.5
    assert cfg.loss.usa.tau == "csa"
    # A plain {init, min, max} mapping is a shared pair.
    assert cfg.loss.usa.teacher_tau == TemperaturePairConfig.single(0.8, 0.1, 1.0, learnable=False)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.lr == 3e-4
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    toml = "[data]\nbatch_size = 8\n[loss.csa]\nweight = 0.3\n[run]\nseed = 3\n"
    (tmp_path / "c.toml").write_text(toml)
    t = TrainConfig.from_file(tmp_path / "c.toml")
    assert (t.data.batch_size, t.loss.csa.weight, t.run.seed) == (8, 0.3, 3)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'loss.csa.alpha'; allowed keys here: enabled, weight",
    ):
        TrainConfig.from_dict({"loss": {"csa": {"alpha": 0.1}}})
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'optimizer'.*model, loss, teachers, data, optim, run",
    ):
        TrainConfig.from_dict({"optimizer": {}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"loss": {"itr": {"tau": {"init": 0.05, "min": 0.0, "max": 0.1}}}},
            r"temperature min=0.0 is out of range",
        ),
        (
            {"loss": {"itr": {"tau": {"init": 0.05, "min": 0.2, "max": 0.1}}}},
            r"min=0.2 > max=0.1; swap",
        ),
        (
            {"loss": {"itr": {"tau": {"init": 0.5, "min": 0.01, "max": 0.1}}}},
            r"init=0.5 is outside \[min=0.01, max=0.1\]",
        ),
        (
            {"loss": {"csa": {"weight": -1}}},
            r"loss.csa.weight=-1.0 is out of range; use alpha >= 0",
        ),
        (
            {"loss": {"itr": {"mode": "avg"}}},
            r"loss.itr.mode='avg' is not allowed; use one of \['mean', 'sum'\]",
        ),
        ({"loss": {"csa": {"combine": "max"}}}, r"loss.csa.combine='max' is not allowed"),
        ({"data": {"batch_size": 1}}, r"data.batch_size=1; in-batch losses need at least 2"),
        ({"optim": {"lr": -1e-3}}, r"optim.lr=-0.001 is out of range"),
        ({"optim": {"lr": "fast"}}, r"optim.lr='fast' must be a number"),
        ({"optim": {"lr": True}}, r"optim.lr=True must be a number"),
        ({"data": {"batch_size": "32"}}, r"data.batch_size='32' must be an integer"),
        ({"run": {"resume": "yes"}}, r"run.resume='yes' must be true or false"),
        ({"run": {"device": 3}}, r"run.device=3 must be a string"),
        ({"optim": {"betas": [0.9]}}, r"optim.betas=\[0.9\] must have 2 items"),
        ({"optim": {"betas": [0.9, "x"]}}, r"optim.betas\[1\]='x' must be a number"),
        ({"loss": "x"}, r"loss must be a mapping of \['itr', 'csa', 'usa'\]"),
        ({"loss": {"itr": {"tau": {"init": 0.05}}}}, r"loss.itr.tau: missing required key 'min'"),
        ({"loss": {"usa": {"tau": "itr"}}}, r"loss.usa.tau='itr' fits none of its forms"),
        ({"run": {"device": "tpu"}}, r"run.device='tpu'"),
        ({"loss": {"usa": {"tau": "itr"}}}, r"loss.usa.tau"),
    ],
)
def test_out_of_range_values_are_rejected_with_the_value_and_a_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_inconsistent_loss_settings_are_rejected():
    with pytest.raises(ConfigError, match="reuses CSA temperatures"):
        LossConfig.from_dict({"csa": {"enabled": False}})
    with pytest.raises(ConfigError, match="both disabled"):
        LossConfig.from_dict(
            {"itr": {"enabled": False}, "csa": {"enabled": False}, "usa": {"enabled": False}}
        )
    with pytest.raises(ConfigError, match="learnable=True on one side and False"):
        TemperaturePairConfig(
            TemperatureConfig(1, 0.1, 1), TemperatureConfig(1, 0.1, 1, False), shared=True
        )


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.loss = LossConfig()  # type: ignore[misc]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "nope.yaml")
    (tmp_path / "c.ini").write_text("[x]")
    with pytest.raises(ConfigError, match="suffix '.ini'; use .yaml"):
        load_mapping(tmp_path / "c.ini")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_mapping(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_mapping(tmp_path / "list.yaml")


def test_official_mapping_clamps_init_and_maps_every_official_objective():
    official = {
        "contrastive": {"is_on": True, "is_block_tau": True, "tau": 0.5, "tau_min": 0.01, "tau_max": 0.1,
                        "rate": 1.0, "contrastive_loss_mode": "sum"},
        "cross_softlabel": {"is_on": True, "use_same_tau": False, "is_block_tau": False, "image_tau": 0.45,
                            "image_tau_min": 0.1, "image_tau_max": 0.99, "text_tau": 0.45, "text_tau_min": 0.1,
                            "text_tau_max": 0.99, "rate": 0.1, "use_loss": "kl", "cross_softlabel_mode": "dot",
                            "use_same_softlabel_tau": True, "is_block_softlabel_tau": True,
                            "the_softlabel_image_tau": 1.0, "the_softlabel_image_tau_min": 0.1,
                            "the_softlabel_image_tau_max": 1.0, "the_softlabel_text_tau": 1.0,
                            "the_softlabel_text_tau_min": 0.1, "the_softlabel_text_tau_max": 1.0},
        "uni_softlabel": {"is_on": False, "use_cross_softlabel_same_tau": True, "rate": 0.5,
                          "use_cross_softlabel_same_softlabel_tau": True},
    }  # fmt: skip
    cfg = LossConfig.from_official(official)
    assert cfg.itr.tau == TemperatureConfig(0.1, 0.01, 0.1, learnable=False)
    assert cfg.csa.combine == "dot" and not cfg.csa.tau.shared and not cfg.usa.enabled
    assert cfg.csa.objective == "kl"
    # The official soft-label option ``use_loss: contrastive`` is InfoNCE against soft labels.
    official["cross_softlabel"]["use_loss"] = "contrastive"
    official["cross_softlabel"]["contrastive_loss_mode"] = "sum"
    cfg = LossConfig.from_official(official)
    assert (cfg.csa.objective, cfg.csa.mode) == ("cross-entropy", "sum")
    official["cross_softlabel"]["use_loss"] = "l2"
    with pytest.raises(ConfigError, match="use_loss='l2' is not known"):
        LossConfig.from_official(official)
    official["cross_softlabel"]["use_loss"] = "kl"
    del official["contrastive"]
    with pytest.raises(ConfigError, match="missing key 'contrastive'"):
        LossConfig.from_official(official)


def test_a_key_given_twice_is_refused(tmp_path):
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 1.0e-4\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' at line 3"):
        load_mapping(tmp_path / "dup.yaml")
    (tmp_path / "dup.json").write_text('{"run": {"seed": 1, "seed": 2}}')
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_mapping(tmp_path / "dup.json")
    (tmp_path / "ok.yaml").write_text("optim: {lr: 3e-4}\nrun: {seed: 1}\n")
    assert TrainConfig.from_file(tmp_path / "ok.yaml").optim.lr == 3e-4  # YAML 1.1 string
    (tmp_path / "exp.yaml").write_text("optim: {eps: 1.0e5, weight_decay: '2e-1'}\n")
    with pytest.raises(ConfigError, match=r"optim.weight_decay='2e-1' must be a number"):
        TrainConfig.from_file(tmp_path / "exp.yaml")  # a quoted number stays a string
    overridden = apply_overrides({}, ["optim.lr=3e-4", "optim.min_lr=1e-6", "run.device=cpu"])
    assert overridden == {"optim": {"lr": 3e-4, "min_lr": 1e-6}, "run": {"device": "cpu"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.seed=1e23", r"^run.seed=1e\+23 must be an integer$"),
        (
            "run.seed=100000000000000000000000",
            r"^run.seed=100000000000000000000000 is out of range",
        ),
        ("run.seed=-1", r"^run.seed=-1 is out of range; use an integer in \[0, "),
        ("data.shuffle_seed=-1", r"^data.shuffle_seed=-1 is out of range"),
        ("optim.lr=1e308", r"^optim.lr=1e\+308 is out of range; use e.g. 1e-4"),
        ("optim.lr=.nan", r"^optim.lr=nan is out of range"),
        ("optim.betas=[0.9, 1.0]", r"^optim.betas\[1\]=1.0 is out of range; each beta must be in"),
        ("eval.max_images=0", r"^eval.max_images=0 is out of range; use >= 1, or null$"),
    ],
)
def test_input_numbers_are_range_checked_in_one_line_naming_the_key(override, message):
    """issue 21: lr and seeds are checked before anything is built, in one line naming the key."""
    with pytest.raises(ConfigError, match=message) as caught:
        TrainConfig.from_dict(apply_overrides({}, [override]))
    assert "\n" not in str(caught.value) and len(str(caught.value)) <= 500


def test_ranges_declared_on_fields_apply_to_sections_built_in_python():
    from cusa_train.config import OptimConfig

    with pytest.raises(ConfigError, match=r"^optim.lr=-1.0 is out of range"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]=1.0 is out of range"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match=r"temperature min=0.0 is out of range"):
        TemperatureConfig(0.05, 0.0, 0.1)
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.5 must be in \[0, lr=0.1\]"):
        OptimConfig(lr=0.1, min_lr=0.5)  # a check across fields stays in __post_init__
