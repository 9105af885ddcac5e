from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cusa_train.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    ids_to_codes,
    is_distributed,
)

WORKER = Path(__file__).with_name("ddp_worker.py")
TESTS = Path(__file__).resolve().parents[1]


def test_gather_is_a_no_op_without_a_process_group():
    assert not is_distributed()
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert all_gather_no_grad(x) is x


def test_ids_to_codes_is_stable_and_keeps_numeric_ids():
    codes = ids_to_codes(["391895", "cat.jpg", "cat.jpg", 7])
    assert codes.dtype == torch.int64
    assert codes[0].item() == 391895 and codes[3].item() == 7
    assert codes[1] == codes[2] and codes[1] < 0
    # Same code in a fresh interpreter (Python's own hash() is salted per process).
    script = (
        "from cusa_train.distributed import ids_to_codes; print(ids_to_codes(['cat.jpg']).item())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert int(other.stdout) == codes[1].item()


def worker_env() -> dict[str, str]:
    """The workers run as scripts (their folder first on sys.path); tests/ holds tiny_student."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_rank_gloo_ddp_matches_the_single_process_full_batch(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(WORKER), str(tmp_path),
    ]  # fmt: skip
    env = worker_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["distributed"] and r1["distributed"]
    assert r0["ids_match"] and r1["ids_match"]
    for key in ("loss", "itr", "csa", "usa"):
        # Every rank computes the loss of the whole gathered batch ...
        assert r0["loss"][key] == pytest.approx(r0["ref_loss"][key], rel=1e-9, abs=1e-12), key
        assert r1["loss"][key] == pytest.approx(r0["ref_loss"][key], rel=1e-9, abs=1e-12), key
    # ... and DDP's averaged gradients equal the full-batch gradients, for every parameter.
    assert r0["n_params"] > 10
    assert r0["max_rel_grad_diff"] < 1e-8, r0["worst_param"]
    # run.all_gather=off (the official configs) and =official (the official AllGather backward).
    modes = json.loads((tmp_path / "modes.json").read_text())
    assert modes["off_max_rel_grad_diff"] < 1e-8
    assert modes["official_max_rel_grad_diff"] < 1e-8
    assert modes["n_temperatures"] >= 3
    assert modes["official_vs_scaled_backbone_ratio"] == pytest.approx(0.5)  # 1 / world size


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_reference_trainer_under_torchrun(sample_store, tmp_path):
    worker = Path(__file__).with_name("ddp_train_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    env = worker_env()
    proc = subprocess.run(
        [*cmd, str(worker), str(sample_store), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 3
    # Both ranks computed the loss of the same gathered global batch.
    assert r0["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # only rank 0 writes
    assert (tmp_path / "run" / "checkpoint-last.pt").is_file()
