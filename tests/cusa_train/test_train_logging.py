"""``run.log_to``: TensorBoard and W&B get the scalars ``metrics.jsonl`` has (issue 23 item 5).

The event files are read back with TensorBoard's own reader (``EventAccumulator``).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_TEACHER, TEXT_TEACHER
from tiny_student import TinyDualEncoder

from cusa.errors import ConfigError, MissingExtraError
from cusa_train.checkpoints import METRICS_NAME
from cusa_train.config import TrainConfig
from cusa_train.run_log import check_sinks, scalars
from cusa_train.trainer import train


def config(store, out, log_to) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"student": "tiny", "embed_dim": 16},
            "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER, "text_spec": {"dim": 384}},
            "data": {
                "dataset": "coco-sample",
                "store": str(store),
                "batch_size": 8,
                "max_samples": 8,
            },
            "optim": {"lr": 1e-3, "warmup_steps": 1, "epochs": 2},
            "run": {"output_dir": str(out), "seed": 3, "progress": False, "log_to": log_to},
            "eval": {"splits": ["val"], "max_images": 8},
        }
    )


def jsonl_scalars(out) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every number in metrics.jsonl."""
    found: dict[str, dict[int, float]] = {}
    for line in (out / METRICS_NAME).read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            found.setdefault(tag, {})[record["step"]] = value
    return found


def test_tensorboard_event_files_hold_the_jsonl_scalars(sample_store, tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    out = tmp_path / "run"
    torch.manual_seed(0)
    result = train(config(sample_store, out, ["jsonl", "tensorboard"]), student=TinyDualEncoder())
    want = jsonl_scalars(out)
    assert {"loss", "itr", "csa", "usa", "lr", "tau/itr", "val/r_mean", "val/i2t_r1"} <= set(want)

    reader = event_accumulator.EventAccumulator(
        str(out / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert tags == set(want)
    for tag in tags:
        got = {e.step: e.value for e in reader.Scalars(tag)}
        assert got.keys() == want[tag].keys(), tag
        for step, value in want[tag].items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    # one eval per epoch, at the epoch's last step
    assert len(reader.Scalars("val/r_mean")) == 2 == len(result.evaluations)


@pytest.mark.slow  # wandb starts a service process (about 30 s here)
def test_wandb_offline_run_is_written_in_the_output_dir(sample_store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    torch.manual_seed(0)
    train(config(sample_store, out, ["jsonl", "wandb"]), student=TinyDualEncoder())
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_sink_without_its_package_is_refused_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install 'cusa\[wandb\]'"):
        check_sinks(("jsonl", "wandb"))


def test_log_to_refuses_an_unknown_sink():
    with pytest.raises(ConfigError, match=r"run.log_to\[1\]='mlflow' is not allowed"):
        TrainConfig.from_dict({"run": {"log_to": ["jsonl", "mlflow"]}})
