from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import IMAGE_TEACHER, TEXT_TEACHER
from tiny_student import TinyDualEncoder
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, StoreError
from cusa_train.checkpoints import CHECKPOINT_NAME, METRICS_NAME, load_checkpoint
from cusa_train.config import TrainConfig
from cusa_train.optim import cosine_schedule
from cusa_train.trainer import EpochSampler, train


def make_config(store, out, **optim) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"student": "tiny", "embed_dim": 16},
            "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER, "text_spec": {"dim": 384}},
            "data": {
                "dataset": "coco-sample",
                "split": "train",
                "store": str(store),
                "batch_size": 8,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 4, **optim},
            "run": {"output_dir": str(out), "seed": 3, "progress": False, "checkpoint_every": 2},
        }
    )


def read_metrics(out):
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def student(cls=TinyDualEncoder, **kw):
    torch.manual_seed(0)  # the same initial student in every run
    return cls(**kw)


class CrashingStudent(TinyDualEncoder):
    """A real student whose (n+1)-th image forward fails: a run killed mid-way."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.calls, self.n = 0, n

    def encode_image(self, pixels):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("simulated crash")
        return super().encode_image(pixels)


def test_train_logs_checkpoints_and_resumes_exactly(sample_store, tmp_path):
    # Straight through: 4 steps.
    straight = train(make_config(sample_store, tmp_path / "a"), student=student())
    assert straight.steps == 4 and straight.resumed_from is None
    records = read_metrics(tmp_path / "a")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]
    for key in (
        "loss",
        "itr",
        "csa",
        "usa",
        "lr",
        "tau/itr",
        "tau/csa",
        "tau/usa_image",
        "step_time_s",
    ):
        assert key in first, key
    assert first["csa"] > 0 and first["usa"] > 0
    assert records[0]["lr"] == pytest.approx(5e-4) and records[1]["lr"] == pytest.approx(
        1e-3
    )  # warmup
    assert records[3]["lr"] < records[2]["lr"]  # cosine decay
    ckpt = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    assert ckpt["step"] == 4 and TrainConfig.from_dict(ckpt["config"]) == make_config(
        sample_store, tmp_path / "a"
    )

    # Killed during step 3 (checkpoint at step 2), then resumed: the same losses as straight through.
    cfg = make_config(sample_store, tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, student=student(CrashingStudent, n=2))
    resumed = train(cfg, student=student())
    assert resumed.resumed_from == 2 and resumed.steps == 4
    again = read_metrics(tmp_path / "b")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(records, again, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]


def test_infonce_only_trains_without_a_store(tmp_path):
    cfg = TrainConfig.from_dict(
        {
            "loss": {"csa": {"enabled": False}, "usa": {"enabled": False}},
            "model": {"embed_dim": 16},
            "data": {
                "dataset": "coco-sample",
                "batch_size": 8,
                "store": str(tmp_path / "no-store"),
            },
            "optim": {"max_steps": 2, "warmup_steps": 0},
            "run": {"output_dir": str(tmp_path / "run"), "progress": False},
        }
    )
    result = train(cfg, student=student())
    assert result.steps == 2 and result.final["csa"] == 0.0 and result.final["itr"] > 0


def test_errors(sample_store, tmp_path):
    cfg = make_config(sample_store, tmp_path / "x")
    big = cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, "batch_size": 1000}))
    with pytest.raises(ConfigError, match="do not fill one batch of 1000; lower data.batch_size"):
        train(big, student=TinyDualEncoder())
    nostore = cfg.replace(
        data=cfg.data.__class__(**{**cfg.data.__dict__, "store": str(tmp_path / "none")})
    )
    with pytest.raises(StoreError, match="no cusa store"):
        train(nostore, student=TinyDualEncoder())
    with pytest.raises(ConfigError, match="is not a cusa trainer checkpoint"):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "bad.pt")
        load_checkpoint(tmp_path / "bad.pt")


def test_schedule_and_sampler():
    f = cosine_schedule(warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)
    full = EpochSampler(20, seed=1, epoch=0).indices()
    assert sorted(full) == list(range(20))
    assert list(EpochSampler(20, seed=1, epoch=0, skip=8)) == full[8:]
    r0, r1 = (
        EpochSampler(21, 1, 0, rank=0, world=2).indices(),
        EpochSampler(21, 1, 0, rank=1, world=2).indices(),
    )
    assert len(r0) == len(r1) == 10 and not set(r0) & set(r1)
    assert EpochSampler(20, seed=1, epoch=1).indices() != full


@pytest.mark.slow
def test_cli_train_with_the_builtin_student(sample_store, tmp_path):
    """`cusa train --config` end to end: real MobileNetV2 + MiniLM student, real teacher features."""
    cfg = {
        "model": {
            "student": "mobilenetv2-minilm",
            "student_options": {"image_size": 96, "max_length": 24},
            "embed_dim": 64,
        },
        "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER},
        "data": {"dataset": "coco-sample", "store": str(sample_store), "batch_size": 6},
        "optim": {"max_steps": 2, "warmup_steps": 1},
        "run": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(
        app, ["train", "--config", str(path), "--no-progress", "--set", "run.seed=5"]
    )
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2 and records[-1]["csa"] > 0
    from cusa_train.evaluation.evaluate import load_checkpoint_model

    model = load_checkpoint_model(tmp_path / "run" / CHECKPOINT_NAME)
    assert model.encode_text(["a horse"]).shape == (1, 64)


def test_cli_train_bad_input(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: -1}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "optim.lr=-1.0 is out of range" in result.output
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--set", "nonsense"])
    assert result.exit_code == 2 and "must look like section.key=value" in result.output


def test_every_epoch_is_evaluated_and_the_best_on_val_is_kept(sample_store, tmp_path):
    """Per-epoch evaluation on the real val split; checkpoint-best.pt holds the best val epoch."""
    base = make_config(sample_store, tmp_path / "run", max_steps=None, epochs=3)
    cfg = TrainConfig.from_dict(
        {
            **base.to_dict(),
            "data": {**base.to_dict()["data"], "max_samples": 8, "captions": "pre_caption"},
            "eval": {"splits": ["val"], "select_on": "val", "metric": "r_mean", "max_images": 8},
        }
    )
    result = train(cfg, student=student())
    assert [e["epoch"] for e in result.evaluations] == [0, 1, 2]
    for e in result.evaluations:
        assert 0.0 <= e["val/r_mean"] <= 100.0 and {"val/i2t_r1", "val/rsum"} <= set(e)
    values = [e["val/r_mean"] for e in result.evaluations]
    assert result.best is not None and result.best["value"] == max(values)
    assert result.best["epoch"] == values.index(max(values))
    best = load_checkpoint(tmp_path / "run" / "checkpoint-best.pt")
    assert best["best"]["epoch"] == result.best["epoch"]
    events = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "eval"]
    assert [e["epoch"] for e in events] == [0, 1, 2]
    # Rerunning the finished run evaluates nothing again and keeps the same best.
    again = train(cfg, student=student())
    assert again.steps == result.steps and again.best == result.best
    assert len([r for r in read_metrics(tmp_path / "run") if r.get("event") == "eval"]) == 3


def test_eval_metric_must_exist(sample_store, tmp_path):
    base = make_config(sample_store, tmp_path / "run", max_steps=None, epochs=1)
    cfg = TrainConfig.from_dict(
        {
            **base.to_dict(),
            "data": {**base.to_dict()["data"], "max_samples": 8},
            "eval": {"splits": ["val"], "metric": "accuracy", "max_images": 4},
        }
    )
    with pytest.raises(ConfigError, match="eval.metric='accuracy' is not in the report"):
        train(cfg, student=student())


def test_resuming_with_a_changed_config_is_refused_unless_told(sample_store, tmp_path):
    out = tmp_path / "run"
    first = make_config(sample_store, out)
    assert train(first, student=student()).steps == 4
    changed = make_config(sample_store, out, lr=2e-3, max_steps=6)
    with pytest.raises(
        ConfigError, match=r"optim.lr: 0.001 -> 0.002.*--resume-anyway.*--overwrite"
    ):
        train(changed, student=student())
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-3  # untouched
    # Settings that do not change the result may differ (here max_steps: the run goes on).
    longer = make_config(sample_store, out, max_steps=5)
    assert train(longer, student=student()).resumed_from == 4

    anyway = changed.replace(run=changed.run.__class__(
        **{**changed.run.__dict__, "on_config_change": "resume-anyway"}))  # fmt: skip
    result = train(anyway, student=student())
    assert result.resumed_from == 5 and result.steps == 6
    assert json.loads((out / "config-before-step-5.json").read_text())["optim"]["lr"] == 1e-3
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 2e-3

    fresh = make_config(sample_store, out, lr=5e-4)
    fresh = fresh.replace(run=fresh.run.__class__(
        **{**fresh.run.__dict__, "on_config_change": "overwrite"}))  # fmt: skip
    result = train(fresh, student=student())
    assert result.resumed_from is None and result.steps == 4
    (aside,) = out.glob("previous-*")
    assert load_checkpoint(aside / CHECKPOINT_NAME)["step"] == 6


def test_cli_resume_flags_exclude_each_other(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1.0e-4}\n")
    result = CliRunner().invoke(
        app, ["train", "--config", str(path), "--resume-anyway", "--overwrite"]
    )
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_a_store_made_from_other_data_is_refused(sample_store, tmp_path):
    """Captions added to the dataset after extraction: their ids are neither in the store nor in
    its failure ledger, so training refuses instead of silently skipping them."""
    import json as _json
    import shutil

    from cusa.errors import SampleNotFoundError
    from cusa.readers import coco_sample_root

    src = coco_sample_root()
    dest = tmp_path / "edited"
    shutil.copytree(src, dest)
    records = _json.loads((dest / "new_train.json").read_text())
    records.append({**records[0], "caption": "a caption added after extraction"})
    (dest / "new_train.json").write_text(_json.dumps(records))
    base = make_config(sample_store, tmp_path / "run")
    cfg = TrainConfig.from_dict(
        {
            **base.to_dict(),
            "data": {
                **base.to_dict()["data"],
                "dataset": str(dest),
                "store_dataset": "coco-sample",
            },
        }
    )
    with pytest.raises(SampleNotFoundError, match=r"not in its failure ledger.*run `cusa extract`"):
        train(cfg, student=student())
    # The store's own dataset trains: the one caption it ledgered is left out with a warning.
    assert train(base, student=student()).steps == 4
