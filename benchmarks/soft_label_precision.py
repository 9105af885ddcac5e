"""What fp16 storage changes in CUSA's soft labels, compared with fp32 storage.

``cusa extract`` stores features as fp16 by default (``--dtype float32`` on request). Training
turns one batch of stored teacher features into soft labels exactly as
``cusa_train.losses`` does: upcast to fp32, L2-normalise, the in-batch cosine matrix
``C = cos(f_i, f_j)`` (B x B), then ``P = softmax(C / tau)`` per row (``tau = 1.0`` in every
official config, ``the_softlabel_*_tau: 1.00``; ``tau = 0.1`` shown for a sharper case).

For one official batch of B = 128 real COCO images this script:

1. computes the features with a teacher's real extraction path (``prepare`` + ``encode``);
2. writes them through the public store writer twice, once with ``dtype=float16`` and once with
   ``float32``, and reads them back by sample id with ``FeatureLookup.gather``;
3. reports, fp16-stored vs fp32-stored: max/mean |dC| (off-diagonal), max |dP| and
   ``KL(P_fp32 || P_fp16)`` (batchmean, the official loss's reduction) at each tau, with the
   soft labels' own distance from uniform (``log B - H(P)``) for scale.

The differences are computed in float64 so that they measure storage only. The fp32 arithmetic
the loss itself uses has its own rounding; the ``fp32_arithmetic_noise_floor`` entry gives the
same metrics for fp32-stored features, fp32 arithmetic vs float64, for comparison.

Teachers:

* ``unicom-vit-b32-tokens``, the paper's (Unicom ViT-B/32 ``forward_features``, 37,632-d, raw).
  **Random weights**: the official checkpoint cannot be downloaded here, so the official
  architecture is built with ``torch.manual_seed(0)`` and the official init, saved in fp16 like
  the release, and loaded through ``UnicomImageTeacher``. Trained features will spread
  differently; rerun with ``--unicom-weights FP16-ViT-B-32.pt`` where you have it.
* ``efficientnet-lite0``, real ImageNet weights (1280-d, L2-normalised), when installed.

Run: ``python benchmarks/soft_label_precision.py [--n 128] [--unicom-weights PATH]``.
Writes ``benchmarks/results/soft_label_precision.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cusa.extract.teachers import get_teacher
from cusa.extract.teachers.registry import get_teacher_entry
from cusa.extract.teachers.unicom import UnicomImageTeacher, build_unicom
from cusa.store import FeatureLookup, FeatureStore
from cusa_train.losses import cosine_similarity_matrix

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COCO = ROOT.parent / "shared" / "data" / "coco-example"
TAUS = (1.0, 0.1)


def load_images(n: int) -> tuple[list[str], list[bytes]]:
    """The first ``n`` distinct images of coco-example ``new_train.json`` (real COCO photos)."""
    rows = json.loads((COCO / "new_train.json").read_text())
    paths = list(dict.fromkeys(r["image_path"] for r in rows))[:n]
    return [Path(p).name for p in paths], [(COCO / p).read_bytes() for p in paths]


def encode(teacher, images: list[bytes], batch_size: int = 32) -> np.ndarray:
    """``(B, dim)`` float32 features through the teacher's extraction path."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = [teacher.prepare(b) for b in images[i : i + batch_size]]
        out.append(teacher.encode(batch))
    return np.concatenate(out)


def stored(spec, ids: list[str], feats: np.ndarray, dtype: str, tmp: str) -> np.ndarray:
    """Write ``feats`` through the store writer with ``dtype``; read them back by id."""
    spec = dataclasses.replace(spec, dtype=dtype)
    store = FeatureStore.open(os.path.join(tmp, dtype), create=True)
    group = store.group("coco-example", "train", spec, create=True)
    order = np.random.default_rng(0).permutation(len(ids))  # shuffled, read back by id
    group.write_shard("shard-0", [ids[i] for i in order], feats[order])
    group.seal()
    return np.asarray(FeatureLookup(group).gather(ids))


def _distance_from_uniform(p: torch.Tensor) -> float:
    h = -(p * p.clamp_min(1e-300).log()).sum(1).mean()
    return float(np.log(p.shape[0]) - h)


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Metrics between two (B, B) cosine matrices, float64; ``ref`` is the reference."""
    ref, other = ref.double(), other.double()
    off = ~torch.eye(len(ref), dtype=torch.bool)
    dc = (other - ref).abs()
    out = {
        "cosine_abs_diff_max": float(dc[off].max()),
        "cosine_abs_diff_mean": float(dc[off].mean()),
        "cosine_abs_diff_max_incl_diagonal": float(dc.max()),
        "soft_labels": {},
    }
    for tau in TAUS:
        p = F.softmax(ref / tau, dim=1)  # (B, B) reference soft labels
        q = F.softmax(other / tau, dim=1)
        kl = float(F.kl_div(q.log(), p, reduction="batchmean"))  # KL(P_ref || Q), as the loss
        gap = _distance_from_uniform(p)
        out["soft_labels"][str(tau)] = {
            "softmax_abs_diff_max": float((q - p).abs().max()),
            "softmax_rel_diff_max": float(((q - p).abs() / p).max()),
            "kl_batchmean": kl,
            "distance_from_uniform": gap,
            "kl_over_distance_from_uniform": kl / gap,
        }
    return out


def measure(name: str, spec, ids: list[str], feats: np.ndarray, weights: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        f32 = stored(spec, ids, feats, "float32", tmp)
        f16 = stored(spec, ids, feats, "float16", tmp)
    assert f32.dtype == np.float32 and f16.dtype == np.float16
    norms = np.linalg.norm(f32, axis=1, keepdims=True)
    err = np.abs(f16.astype(np.float32) - f32)
    # As training computes them: fp32 tensors, cusa_train.losses.cosine_similarity_matrix.
    c32 = cosine_similarity_matrix(torch.from_numpy(f32).float())
    c16 = cosine_similarity_matrix(torch.from_numpy(f16).float())
    c32_exact = cosine_similarity_matrix(torch.from_numpy(f32).double())
    off = ~torch.eye(len(ids), dtype=torch.bool)
    return {
        "teacher": name,
        "weights": weights,
        "dim": int(f32.shape[1]),
        "spec_normalized": bool(spec.normalized),
        "bytes_per_row": {"float16": f16[0].nbytes, "float32": f32[0].nbytes},
        "feature_abs_diff_max": float(err.max()),
        "feature_abs_max": float(np.abs(f32).max()),
        "feature_diff_over_row_norm_max": float((err / norms).max()),
        "cosine_offdiag_mean": float(c32[off].mean()),
        "cosine_offdiag_std": float(c32[off].std()),
        "fp16_vs_fp32_storage": compare(c32, c16),
        "fp32_arithmetic_noise_floor": compare(c32_exact, c32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128, help="images in the batch (official B = 128)")
    ap.add_argument("--unicom-weights", default=None, help="an official FP16-ViT-B-32.pt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "soft_label_precision.json"))
    args = ap.parse_args()

    ids, images = load_images(args.n)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.unicom_weights:
            weights, label, allow_unofficial = args.unicom_weights, "official checkpoint", False
        else:
            weights = str(Path(tmp) / "random-vit-b32.pt")
            torch.manual_seed(0)
            torch.save(build_unicom("ViT-B/32").eval().half().state_dict(), weights)
            label, allow_unofficial = (
                "RANDOM weights (torch.manual_seed(0), official init, saved fp16 like the "
                "release): the official Unicom checkpoint is unreachable here, so these are "
                "not trained Unicom features",
                True,
            )
        teacher = UnicomImageTeacher(
            "ViT-B/32",
            "tokens",
            weights=weights,
            allow_unofficial=allow_unofficial,
            device=args.device,
        )
        feats = encode(teacher, images)
        results.append(measure(teacher.spec.name, teacher.spec, ids, feats, label))
        del teacher

    if get_teacher_entry("efficientnet-lite0").info.available():
        teacher = get_teacher("efficientnet-lite0", device=args.device)
        feats = encode(teacher, images)
        results.append(
            measure("efficientnet-lite0", teacher.spec, ids, feats, "real ImageNet weights")
        )
    else:
        print("efficientnet-lite0 is not installed (extra offline-teachers); skipped")

    out = {
        "benchmark": "soft_label_precision",
        "what": (
            "fp16-stored vs fp32-stored teacher features of one batch: in-batch cosine matrix "
            "and soft labels P = row softmax(cos / tau), KL(P_fp32 || P_fp16) batchmean; "
            "differences in float64"
        ),
        "images": f"{len(ids)} real COCO images from coco-example new_train.json (one batch)",
        "official_tau": 1.0,
        "taus": list(TAUS),
        "store_path": "FeatureGroup.write_shard (shuffled) + seal, read with FeatureLookup.gather",
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        s = r["fp16_vs_fp32_storage"]
        print(f"{r['teacher']:24s} dim={r['dim']:>6d}  |dC| max={s['cosine_abs_diff_max']:.2e} "
              f"mean={s['cosine_abs_diff_mean']:.2e}")  # fmt: skip
        for tau, v in s["soft_labels"].items():
            print(f"    tau={tau:<4s} |dP| max={v['softmax_abs_diff_max']:.2e}  "
                  f"KL={v['kl_batchmean']:.2e}  (distance from uniform {v['distance_from_uniform']:.3g})")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
