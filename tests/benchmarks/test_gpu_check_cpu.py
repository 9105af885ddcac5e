"""``benchmarks/gpu_check.py`` without a GPU: ``--cpu-smoke`` runs every non-CUDA path at tiny
sizes and says which parts (or halves of parts) it skipped and why. CI needs no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Parts that need CUDA for all of their GPU half: skipped in the smoke run, with the reason.
CUDA_PARTS = {"jpeg_decode", "faiss_knn"}
RAY_PARTS = {"pipeline_ray", "ray_num_gpus"}


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out),
           "--workdir", str(tmp_path / "wd"), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_cpu_smoke_runs_every_non_cuda_path(coco_example, tmp_path):
    proc, res = _check(tmp_path, "--cpu-smoke", "--no-ray")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = res["parts"]
    assert res["machine"]["mode"] == "cpu-smoke" and res["machine"]["device"] == "cpu"
    assert res["failed"] == []
    assert res["targets"]["unicom_b32_jpeg_to_sealed_store_images_per_s"] == 5000
    assert res["targets"]["mpnet_captions_per_s"] == 10000
    # What needs CUDA is skipped with a reason that says so; its CPU half still measured.
    for name in CUDA_PARTS:
        assert parts[name]["status"] == "skipped" and "needs CUDA" in parts[name]["reason"]
    assert parts["jpeg_decode"]["pil_images_per_s"] > 0
    assert parts["faiss_knn"]["cpu_queries_per_s"] > 0
    for name in RAY_PARTS:
        assert parts[name] == {**parts[name], "status": "skipped", "reason": "--no-ray was given"}
    assert set(res["skipped"]) >= CUDA_PARTS | RAY_PARTS
    # Everything else ran: the Unicom ViT-B/32 forward and teacher, JPEG -> sealed store with
    # the paper's image teacher (random weights), the text teacher path, a DDP train step.
    forward = parts["unicom_forward"]
    assert forward["status"] == "ok" and forward["bare_fp32_nchw_images_per_s"] > 0
    assert "needs CUDA" in forward["skipped_here"]
    local = parts["pipeline_local"]
    assert (
        local["status"] == "ok" and local["images"] == 32 and local["target_images_per_s"] == 5000
    )
    assert local["target_met"] is None  # never judged on CPU
    assert parts["text_minilm"]["status"] == "ok"
    assert parts["text_minilm"]["teacher_encode_captions_per_s"] > 0
    # The paper's text teacher: its published architecture and tokenizer, random weights.
    mpnet = parts["text_mpnet"]
    assert mpnet["status"] == "ok" and "random weights" in mpnet["model"], mpnet
    assert mpnet["teacher_encode_captions_per_s"] > 0 and mpnet["target_met"] is None
    ddp = parts["ddp_step"]
    assert ddp["status"] == "ok" and ddp["backend"] == "gloo" and "NCCL" in ddp["skipped_here"]
    assert {"itr", "csa", "usa"} <= set(ddp["loss_terms"])  # InfoNCE, CSA and USA all ran
    assert set(res["skipped_within_ok_parts"]) == {"unicom_forward", "ddp_step"}
    assert "skipped:" in proc.stdout
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| text_mpnet | ok |" in summary and "random weights" in summary
    assert "| jpeg_decode | skipped |" in summary and "needs CUDA" in summary


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_cpu_smoke_ray_parts(coco_example, tmp_path):
    """The Ray runner end to end (JPEG tars, and the sample compared with the local runner)."""
    proc, res = _check(tmp_path, "--cpu-smoke", "--parts", "pipeline_ray,ray_num_gpus")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ray_run = res["parts"]["ray_num_gpus"]
    assert ray_run["status"] == "ok" and ray_run["identical_to_local_runner"] is True
    assert ray_run["num_gpus_per_actor"] == 0.0 and "no GPU" in ray_run["note"]
    assert res["parts"]["pipeline_ray"]["status"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_gpu_the_full_check_refuses_and_says_how(tmp_path):
    proc, res = _check(tmp_path)
    assert proc.returncode == 2 and not res
    assert "no CUDA GPU is visible" in proc.stderr and "--cpu-smoke" in proc.stderr


def test_unknown_part_is_refused(tmp_path):
    proc, _ = _check(tmp_path, "--cpu-smoke", "--parts", "warp_drive")
    assert proc.returncode != 0 and "unknown part(s) ['warp_drive']" in proc.stderr
