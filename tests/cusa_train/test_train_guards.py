"""Non-finite values stop a run (issue 21), and checkpoints are written once per epoch with the
best one a link to the last, not a second copy (issue 23)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import IMAGE_TEACHER, TEXT_TEACHER
from tiny_student import TinyDualEncoder
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import NonFiniteError
from cusa_train.checkpoints import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, load_checkpoint
from cusa_train.config import TrainConfig
from cusa_train.trainer import check_values, train

ROOT = Path(__file__).resolve().parents[2]


def config(store, out, *, run=None, optim=None, data=None, **sections) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"student": "tiny", "embed_dim": 16},
            "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER, "text_spec": {"dim": 384}},
            "data": {
                "dataset": "coco-sample",
                "store": str(store),
                "batch_size": 8,
                **(data or {}),
            },
            "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 2, **(optim or {})},
            "run": {"output_dir": str(out), "seed": 3, "progress": False, **(run or {})},
            **sections,
        }
    )


def student(cls=TinyDualEncoder):
    torch.manual_seed(0)
    return cls()


class NanGradientStudent(TinyDualEncoder):
    """A real student whose forward is finite but whose gradient is not: ``0 * sqrt(p)`` at
    ``p = 0`` adds nothing to the features, and its derivative is ``0 * inf = nan``."""

    def __init__(self) -> None:
        super().__init__()
        self.at_zero = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, pixels):
        return super().encode_image(pixels) + 0.0 * torch.sqrt(self.at_zero)


def nan_head(path: Path, dim: int) -> Path:
    torch.save({"cross_image_head.proj.bias": torch.full((dim,), float("nan"))}, path)
    return path


def test_a_non_finite_loss_stops_the_run_naming_step_term_and_value(sample_store, tmp_path):
    init = nan_head(tmp_path / "nan.pt", 16)
    model = {"student": "tiny", "embed_dim": 16, "init_from": str(init)}
    cfg = config(sample_store, tmp_path / "run", model=model)
    message = r"^non-finite loss term at step 1: \w+=nan; lower optim.lr"
    with pytest.raises(NonFiniteError, match=message) as caught:
        train(cfg, student=student())
    assert isinstance(caught.value, FloatingPointError) and "\n" not in str(caught.value)
    # The run stopped before the optimiser step: no checkpoint of poisoned weights.
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_a_non_finite_gradient_stops_before_the_step(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run")
    message = r"non-finite gradient at step 1: grad of \S*at_zero=nan"
    with pytest.raises(NonFiniteError, match=message):
        train(cfg, student=student(NanGradientStudent))


def test_opting_out_lets_the_run_go_on(sample_store, tmp_path, caplog):
    cfg = config(sample_store, tmp_path / "run", run={"allow_non_finite": True})
    with caplog.at_level("WARNING", logger="cusa_train.trainer"):
        result = train(cfg, student=student(NanGradientStudent))
    assert result.steps == 2 and math.isnan(result.final["loss"])  # step 2 saw the nan weight
    assert "non-finite loss term at step 2" in caplog.text


def test_check_values_names_the_value():
    check_values({"a": 1.0}, "eval metric", 3)
    with pytest.raises(NonFiniteError, match=r"non-finite eval metric at step 3: val/r_mean=inf"):
        check_values({"a": 1.0, "val/r_mean": math.inf}, "eval metric", 3)
    check_values({"tau/itr": math.nan}, "temperature", 3, allowed=True)  # warns only


def _write_cli_config(tmp_path, store, **run) -> Path:
    cfg = {
        "model": {
            "student": "mobilenetv2-minilm",
            "student_options": {"image_size": 96, "max_length": 24},
            "embed_dim": 64,
        },
        "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER},
        "data": {"dataset": "coco-sample", "store": str(store), "batch_size": 6},
        "optim": {"max_steps": 2, "warmup_steps": 1},
        "run": {"output_dir": str(tmp_path / "run"), **run},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_refuses_an_absurd_lr_before_building_anything(tmp_path):
    path = _write_cli_config(tmp_path, tmp_path / "no-store")
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--set", "optim.lr=1e308"])
    assert result.exit_code == 2, result.output
    assert "optim.lr=1e+308 is out of range" in result.output
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--set", "run.seed=1e23"])
    assert result.exit_code == 2 and "run.seed=1e+23 must be an integer" in result.output
    assert not (tmp_path / "run").exists()


def test_cli_exits_1_on_a_non_finite_loss(sample_store, tmp_path):
    path = _write_cli_config(tmp_path, sample_store)
    init = nan_head(tmp_path / "nan.pt", 64)
    result = CliRunner().invoke(
        app, ["train", "-c", str(path), "--no-progress", "--set", f"model.init_from={init}"]
    )
    assert result.exit_code == 1, result.output
    assert "non-finite loss term at step 1" in result.output


# ---- checkpoints -------------------------------------------------------------------------------


def test_checkpoints_at_epoch_ends_and_best_is_a_link_not_a_copy(sample_store, tmp_path):
    out = tmp_path / "run"
    cfg = config(
        sample_store,
        out,
        optim={"max_steps": None, "epochs": 2},
        data={"max_samples": 8},
        eval={"splits": ["val"], "select_on": "val", "max_images": 8},
    )
    result = train(cfg, student=student())
    last, best = out / CHECKPOINT_NAME, out / BEST_CHECKPOINT_NAME
    assert load_checkpoint(last)["step"] == result.steps
    assert best.is_file() and load_checkpoint(best)["best"] == result.best
    if result.best["epoch"] == 1:  # the best is the last: the same file on disk
        assert best.samefile(last)
    else:
        assert best.stat().st_ino != last.stat().st_ino
    # Only the two names remain: no partial files, no per-step copies.
    assert sorted(p.name for p in out.glob("*.pt")) == [BEST_CHECKPOINT_NAME, CHECKPOINT_NAME]
    assert not list(out.glob("*.partial"))


def test_sample_config_evaluates_on_val_every_epoch():
    cfg = TrainConfig.from_file(ROOT / "configs" / "coco-sample.yaml")
    assert cfg.eval.splits == ("val",) and cfg.eval.select_on == "val"
    assert cfg.run.checkpoint_every == 0  # epoch ends only
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
