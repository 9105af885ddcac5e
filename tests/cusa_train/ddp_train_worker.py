"""Run by tests/cusa_train/test_ddp.py under ``torchrun --nproc_per_node 2``: the reference
trainer with DDP on gloo. Args: STORE OUTPUT_DIR. Each rank writes ``rank<r>.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import IMAGE_TEACHER, TEXT_TEACHER  # this script's folder, first on sys.path
from tiny_student import TinyDualEncoder  # tests/, on PYTHONPATH (test_ddp.py sets it)

from cusa_train.config import TrainConfig
from cusa_train.distributed import rank, world_size
from cusa_train.trainer import train


def main() -> None:
    store, out = sys.argv[1], Path(sys.argv[2])
    cfg = TrainConfig.from_dict(
        {
            "model": {"student": "tiny", "embed_dim": 16},
            "teachers": {"image": IMAGE_TEACHER, "text": TEXT_TEACHER},
            "data": {"dataset": "coco-sample", "store": store, "batch_size": 8},
            "optim": {"max_steps": 3, "warmup_steps": 1},
            "run": {"output_dir": str(out / "run"), "progress": False},
        }
    )
    torch.manual_seed(0)
    seen = {}

    class Probe(TinyDualEncoder):
        def encode_image(self, pixels):
            seen["world"], seen["rank"] = world_size(), rank()
            return super().encode_image(pixels)

    result = train(cfg, student=Probe())
    record = {"steps": result.steps, "loss": result.final["loss"], **seen}
    (out / f"rank{seen['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
