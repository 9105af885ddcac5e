"""Gathering features, teacher features and ids across DDP ranks.

In-batch losses see every rank's samples when the embeddings are all-gathered first. Every rank
then computes the same global loss; the gradient flows back only into the local shard, as in the
official CUSA ``AllGather``. Unlike the official function, the local gradient is multiplied by
the world size, so after DDP averages the gradients over ranks they equal the gradient of the
global-batch loss exactly (the official one ends up ``world_size`` times smaller for the
backbone and heads but not for the temperatures).

All functions are no-ops when ``torch.distributed`` is not initialised or has one rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_padded(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """All-gather along dim 0, allowing a different number of rows per rank."""
    n = world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0), counts


class _AllGatherLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        out, counts = _gather_padded(tensor)
        r = rank()
        ctx.start = sum(counts[:r])
        ctx.stop = ctx.start + counts[r]
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output[ctx.start : ctx.stop] * ctx.scale, None


def all_gather_with_grad(tensor: Tensor, scale_grad: bool = True) -> Tensor:
    """Concatenate ``tensor`` (N_r, ...) from every rank in rank order, (sum N_r, ...).

    The gradient of the result flows back into this rank's rows only.

    Args:
        tensor: this rank's rows; ranks may hold different numbers of rows.
        scale_grad: multiply the local gradient by the world size so that DDP's gradient averaging
            yields the gradient of the global-batch loss (``False`` reproduces the official code).
    """
    if not is_distributed():
        return tensor
    return _AllGatherLocalGrad.apply(tensor, float(world_size()) if scale_grad else 1.0)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Like :func:`all_gather_with_grad` for tensors that need no gradient (teacher features, ids)."""
    if not is_distributed():
        return tensor
    return _gather_padded(tensor)[0]


def ids_to_codes(ids: Sequence[str | int] | Tensor) -> Tensor:
    """Map sample or image ids to int64 codes that are equal across ranks and processes.

    Integers (and strings of decimal digits) map to themselves; other strings to a 63-bit
    BLAKE2b hash, so two captions of the same image get the same code on every rank and
    multi-positives are found after gathering. (Python's ``hash`` is salted per process.)

    Returns:
        (N,) int64 tensor.
    """
    if isinstance(ids, Tensor):
        return ids.to(torch.long)
    codes = []
    for value in ids:
        if (
            isinstance(value, (int,))
            and not isinstance(value, bool)
            or isinstance(value, str)
            and value.isdigit()
            and len(value) < 19
        ):
            codes.append(int(value))
        else:
            digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
            # Negative codes never collide with the digit ids above.
            codes.append(-(int.from_bytes(digest, "little") >> 1) - 1)
    return torch.tensor(codes, dtype=torch.long)
