"""Soft-label fidelity of the compact Unicom variant (``tokens-proj<k>``) vs the full ``tokens``.

CUSA turns teacher features into in-batch soft labels ``P = softmax(cos(f_i, f_j) / tau)`` (rows;
``tau = 1`` in the official configs: ``the_softlabel_*_tau: 1.00``). We compute P from the full
flattened patch tokens and Q from the same tokens through the fixed seeded Gaussian projection,
and report ``KL(P || Q)`` (``batchmean``, as the official loss), plus the cosine errors, for one
batch of B real COCO images (B = 128, the official training batch).

Honest caveat: the official Unicom weights cannot be downloaded here, so this uses
(a) the tiny golden model from the official code (random weights, 49 x 64 = 3,136-d tokens) and
(b) the full ViT-B/32 architecture with random initialisation (37,632-d tokens). Random-weight
features are not trained features; the JL bound on cosine error depends only on the projection
dimension, not on the weights, but the KL also depends on how spread the cosines are. Rerun with
``--weights FP16-ViT-B-32.pt`` where the checkpoint is available.

Run: ``python benchmarks/teacher_fidelity.py [--n 128] [--weights PATH]``.
Writes ``benchmarks/results/teacher_fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cusa.extract.teachers.unicom import (
    PROJECTION_SEED,
    UnicomConfig,
    build_unicom,
    gaussian_projection,
    load_unicom,
)
from cusa.image_transforms import clip_transform

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIXTURES = ROOT / "tests" / "fixtures"
COCO = ROOT.parent / "shared" / "data" / "coco-example"
TAUS = (1.0, 0.1, 0.05)


def soft_label_kl(full: torch.Tensor, compact: torch.Tensor, tau: float) -> float:
    """``KL(softmax(cos_full/tau) || softmax(cos_compact/tau))``, batchmean over rows."""
    a, b = F.normalize(full, dim=-1), F.normalize(compact, dim=-1)
    p = F.softmax(a @ a.T / tau, dim=1)  # (B, B) teacher soft labels from full tokens
    log_q = F.log_softmax(b @ b.T / tau, dim=1)  # (B, B) from the compact features
    return float(F.kl_div(log_q, p, reduction="batchmean"))


def entropy_gap(full: torch.Tensor, tau: float) -> float:
    """``log B - H(P)``: how far the soft labels are from uniform (0 = uniform), for scale."""
    a = F.normalize(full, dim=-1)
    p = F.softmax(a @ a.T / tau, dim=1)
    h = -(p * p.clamp_min(1e-30).log()).sum(1).mean()
    return float(np.log(p.shape[0]) - h)


def evaluate(tokens: torch.Tensor, dims: list[int]) -> dict:
    a = F.normalize(tokens, dim=-1)
    cos_full = a @ a.T
    off = ~torch.eye(len(a), dtype=torch.bool)
    out = {
        "tokens_dim": tokens.shape[1],
        "cosine_offdiag_mean": float(cos_full[off].mean()),
        "cosine_offdiag_std": float(cos_full[off].std()),
        "softlabel_distance_from_uniform": {str(t): entropy_gap(tokens, t) for t in TAUS},
        "projections": {},
    }
    for k in dims:
        if k >= tokens.shape[1]:
            continue
        z = tokens @ gaussian_projection(tokens.shape[1], k, PROJECTION_SEED)  # (B, k)
        b = F.normalize(z, dim=-1)
        err = (b @ b.T - cos_full)[off].abs()
        kl = {str(t): soft_label_kl(tokens, z, t) for t in TAUS}
        out["projections"][str(k)] = {
            "kl_batchmean": kl,
            # KL as a fraction of the soft labels' own distance from uniform (their "signal")
            "kl_over_distance_from_uniform": {
                t: kl[t] / out["softlabel_distance_from_uniform"][t] for t in kl
            },
            "cosine_abs_error_mean": float(err.mean()),
            "cosine_abs_error_max": float(err.max()),
        }
    return out


@torch.inference_mode()
def tokens_of(model, images: list[np.ndarray], bs: int = 32) -> torch.Tensor:
    return torch.cat(
        [
            model.forward_features(torch.from_numpy(np.stack(images[i : i + bs])))
            for i in range(0, len(images), bs)
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128, help="images in the batch (official B = 128)")
    ap.add_argument("--weights", default=None, help="an official FP16-ViT-B-32.pt, if you have it")
    ap.add_argument("--out", default=str(RESULTS / "teacher_fidelity.json"))
    args = ap.parse_args()

    rows = json.loads((COCO / "new_train.json").read_text())
    paths = list(dict.fromkeys(r["image_path"] for r in rows))[: args.n]
    images = [clip_transform(224).from_bytes((COCO / p).read_bytes()) for p in paths]

    results = {}
    tiny_cfg = UnicomConfig(**json.loads((FIXTURES / "unicom_tiny_config.json").read_text()))
    tiny = load_unicom(tiny_cfg, FIXTURES / "unicom_tiny_fp16.pt")
    results["tiny_golden_model"] = evaluate(tokens_of(tiny, images), [64, 128, 256, 512, 768])
    results["tiny_golden_model"]["weights"] = (
        "tests/fixtures/unicom_tiny_fp16.pt (official class, random weights)"
    )

    torch.manual_seed(0)
    if args.weights:
        b32, label, desc = load_unicom("ViT-B/32", args.weights), "vit_b32_official", args.weights
    else:
        b32, label, desc = (
            build_unicom("ViT-B/32").eval(),
            "vit_b32_random_init",
            "random init (seed 0), official init scheme",
        )
    results[label] = evaluate(tokens_of(b32, images), [256, 512, 768, 1024])
    results[label]["weights"] = desc

    out = {
        "benchmark": "teacher_fidelity",
        "what": "KL(P_full || Q_compact), P/Q = row softmax of in-batch cosine / tau; batchmean",
        "images": f"{len(paths)} real COCO images from coco-example new_train.json (one batch)",
        "projection": f"Gaussian N(0, 1/k), torch CPU generator seed {PROJECTION_SEED}",
        "official_tau": 1.0,
        "caveat": "No official Unicom weights here: tiny golden model and random-init ViT-B/32 only.",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        for k, v in r["projections"].items():
            print(f"{name:22s} k={k:>5s}  KL(tau=1)={v['kl_batchmean']['1.0']:.2e}  "
                  f"KL(tau=0.05)={v['kl_batchmean']['0.05']:.2e}  |dcos| mean={v['cosine_abs_error_mean']:.4f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
