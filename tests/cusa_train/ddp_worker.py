"""Run by tests/cusa_train/test_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank takes an uneven slice of one global batch, runs CusaModel inside real DDP with
all-gathering, and rank 0 compares loss and DDP-averaged gradients with a single-process run
on the whole batch. Results go to ``<out>/rank<r>.json``.

Then the two other ``gather`` modes run in the same process group, and rank 0 compares their
DDP-averaged gradients with what each mode promises (``<out>/modes.json``):
- ``off``: each rank's loss over its own slice; the gradient is the mean of the per-slice
  gradients of single-process runs;
- ``official``: the official unscaled ``AllGather``; student and head gradients are the
  global-batch gradient divided by the world size, temperature gradients are the global ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_student import TinyDualEncoder  # tests/, on PYTHONPATH (test_ddp.py sets it)
from torch.nn.parallel import DistributedDataParallel

from cusa_train.distributed import all_gather_no_grad, ids_to_codes, is_distributed
from cusa_train.wrapper import CusaModel

# Captions of image "a" sit on both ranks, so multi-positives must be found after gathering.
IMAGE_IDS = ["a", "b", "a", "c", "d", "a", "e", "e"]
SPLIT = 5  # rank 0 gets 5 pairs, rank 1 gets 3


def make_model() -> CusaModel:
    torch.manual_seed(0)
    return CusaModel(TinyDualEncoder(), embed_dim=20)


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # float64 so that the comparison tests the math, not fp32 summation order on tiny gradients.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(123)
    images = torch.rand(8, 3, 32, 32)
    texts = [f"caption number {i} of image {x}" for i, x in enumerate(IMAGE_IDS)]
    t_img, t_txt = torch.randn(8, 40), torch.randn(8, 12)
    sl = slice(0, SPLIT) if rank == 0 else slice(SPLIT, 8)

    model = make_model()
    ddp = DistributedDataParallel(model)
    out = ddp(images[sl], texts[sl], IMAGE_IDS[sl], t_img[sl], t_txt[sl])
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gathered_ids = all_gather_no_grad(ids_to_codes(IMAGE_IDS[sl]))

    result = {
        "rank": rank,
        "distributed": is_distributed(),
        "loss": {k: v.item() for k, v in out.items()},
    }
    result["ids_match"] = bool(torch.equal(gathered_ids, ids_to_codes(IMAGE_IDS)))
    if rank == 0:
        ref = make_model()
        ref.gather = False
        ref_out = ref(images, texts, IMAGE_IDS, t_img, t_txt)
        ref_out["loss"].backward()
        result["ref_loss"] = {k: v.item() for k, v in ref_out.items()}
        diffs = {}
        for n, p in ref.named_parameters():
            diffs[n] = float((grads[n] - p.grad).abs().max() / (p.grad.abs().max() + 1e-12))
        result["max_rel_grad_diff"] = max(diffs.values())
        result["worst_param"] = max(diffs, key=diffs.get)
        result["n_params"] = len(diffs)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    check_other_modes(out_dir, rank, images, texts, t_img, t_txt, sl)
    # Rank 0 works longer (the reference); tearing gloo down on one rank while the other is
    # still busy can abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def _ddp_grads(mode, images, texts, t_img, t_txt, sl):
    model = make_model()
    model.gather = mode
    ddp = DistributedDataParallel(model)
    ddp(images[sl], texts[sl], IMAGE_IDS[sl], t_img[sl], t_txt[sl])["loss"].backward()
    return model, {n: p.grad.clone() for n, p in model.named_parameters()}


def _single_grads(images, texts, t_img, t_txt, sl):
    ref = make_model()
    ref.gather = "off"
    ref(images[sl], texts[sl], IMAGE_IDS[sl], t_img[sl], t_txt[sl])["loss"].backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def _max_rel(a, b):
    return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)


def check_other_modes(out_dir, rank, images, texts, t_img, t_txt, sl):
    world = dist.get_world_size()
    _, off = _ddp_grads("off", images, texts, t_img, t_txt, sl)
    model, official = _ddp_grads("official", images, texts, t_img, t_txt, sl)
    if rank != 0:
        return
    slices = (slice(0, SPLIT), slice(SPLIT, 8))
    parts = [_single_grads(images, texts, t_img, t_txt, s) for s in slices]
    want_off = {n: sum(p[n] for p in parts) / world for n in parts[0]}
    full = _single_grads(images, texts, t_img, t_txt, slice(0, 8))
    temps = {n for n, _ in model.named_parameters() if n.startswith("temperatures.")}
    want_official = {n: g if n in temps else g / world for n, g in full.items()}
    result = {
        "off_max_rel_grad_diff": _max_rel(off, want_off),
        "official_max_rel_grad_diff": _max_rel(official, want_official),
        "official_vs_scaled_backbone_ratio": float(
            official["student.text_proj.weight"].norm() / full["student.text_proj.weight"].norm()
        )
        if "student.text_proj.weight" in full
        else None,
        "n_temperatures": len(temps),
    }
    (out_dir / "modes.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
