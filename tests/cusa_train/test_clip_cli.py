"""`cusa train` and `cusa eval` with a CLIP student, end to end through the CLI.

A small CLIP of the official class (random weights: no CLIP weights are reachable offline) is
saved as an OpenAI-format state dict and used through ``clip-checkpoint``, the path a real
checkpoint takes; the soft labels are real teacher features of the embedded COCO sample.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import IMAGE_TEACHER, TEXT_TEACHER
from typer.testing import CliRunner

from cusa.cli import app
from cusa.readers import coco_sample_root
from cusa_train.students.clip import ClipConfig, ClipStudent

SMALL_CLIP = ClipConfig(
    embed_dim=32,
    image_resolution=32,
    vision_layers=1,
    vision_width=64,
    vision_patch_size=16,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=1,
)


@pytest.mark.slow
def test_train_and_eval_a_clip_student_from_the_cli(sample_store, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "small-clip.pt"
    torch.save(ClipStudent(SMALL_CLIP).state_dict(), weights)
    cfg = {
        "model": {"student": "clip-checkpoint", "student_options": {"weights": str(weights)}},
        "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER},
        "data": {
            "dataset": "coco-sample",
            "store": str(sample_store),
            "batch_size": 8,
            "max_samples": 8,
            "captions": "pre_caption",
        },
        "optim": {
            "schedule": "epoch-cosine",
            "epochs": 2,
            "lr": 1e-4,
            "min_lr": 1e-5,
            "decay_groups": "official",
        },  # fmt: skip
        "eval": {"splits": ["val"], "select_on": "val", "max_images": 4},
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
    }
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint-best.pt").is_file()
    result = runner.invoke(
        app,
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "run" / "checkpoint-best.pt"),
            "--data",
            str(coco_sample_root() / "new_val.json"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.output[result.output.index("{") :])
    assert 0 <= report["metrics"]["rsum"] <= 600 and report["counts"]["num_images"] == 8
