"""Run by tests/cusa_train/test_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank takes an uneven slice of one global batch, runs CusaModel inside real DDP with
all-gathering, and rank 0 compares loss and DDP-averaged gradients with a single-process run
on the whole batch. Results go to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_student import TinyDualEncoder  # noqa: E402

from cusa_train.distributed import all_gather_no_grad, ids_to_codes, is_distributed  # noqa: E402
from cusa_train.wrapper import CusaModel  # noqa: E402

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
    # Rank 0 works longer (the reference); tearing gloo down on one rank while the other is
    # still busy can abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
