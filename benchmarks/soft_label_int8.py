"""What int8 storage (and the compact ``tokens-proj768``) changes in CUSA's soft labels.

For one official batch (B = 128) of real COCO images and captions from ``coco-example``, each
teacher's features are written through the public store writer as float32 and float16, sealed,
quantised to int8 with ``cusa.store.quant.quantize_group`` (the path ``cusa store quantize``
takes), and read back by sample id with ``FeatureLookup.gather`` (int8: dequantised on gather).
Against the float32-stored features it reports:

* bytes per row on disk (feature chunk, plus the int8 scale chunk) and the size ratio;
* the max cosine error of a stored row against its float32 row (``1 - cos(x_fp32, x_stored)``)
  and the max |dC| of the in-batch cosine matrix (off-diagonal);
* soft labels ``P = row softmax(C / tau)`` as ``cusa_train.losses`` computes them, at tau = 1
  (every official config) and tau = 0.5: max |dP| and ``KL(P_fp32 || P_stored)`` (batchmean,
  the loss's reduction), with the soft labels' own distance from uniform for scale.

Teachers: ``unicom-vit-b32-tokens`` (the paper's 37,632-d width) and ``-tokens-proj768`` with
**random** weights (the official checkpoint is unreachable here; ``--unicom-weights`` takes
it), both compared with the float32 *tokens* so the three choices (tokens, int8 tokens,
proj768) sit side by side; ``efficientnet-lite0`` (real ImageNet weights) and
``all-mpnet-base-v2`` (real weights, ``cusa teachers fetch all-mpnet-base-v2``; falls back to
all-MiniLM-L6-v2 when it cannot be had, and says so) on 128 captions.

Also the on-disk sizes of the paper's teachers for COCO and Flickr30K train, computed from the
shapes. Run: ``python benchmarks/soft_label_int8.py`` -> ``benchmarks/results/soft_label_int8.json``.
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

import cusa.extract.teachers.cnn  # noqa: F401 - imported up front: a long run keeps its code
import cusa.extract.teachers.text  # noqa: F401
from cusa.extract.teachers import get_teacher
from cusa.extract.teachers.registry import get_teacher_entry
from cusa.extract.teachers.unicom import UnicomImageTeacher, build_unicom
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.quant import quantize_group
from cusa_train.losses import cosine_similarity_matrix

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COCO = ROOT.parent / "shared" / "data" / "coco-example"
TAUS = (1.0, 0.5)

#: Train splits (docs/reproduce.md): images and captions.
SPLITS = {"coco": (113_287, 566_747), "flickr30k": (29_000, 145_000)}
#: The paper's teachers: Unicom ViT-B/32 tokens (image) and all-mpnet-base-v2 (text).
PAPER_DIMS = {"image": 37_632, "text": 768, "image_proj768": 768}


def load_batch(n: int) -> tuple[list[str], list[bytes], list[str], list[str]]:
    """``n`` distinct images of coco-example and the first caption of each."""
    rows = json.loads((COCO / "new_train.json").read_text())
    first: dict[str, str] = {}
    for r in rows:
        caption = r["caption"][0] if isinstance(r["caption"], list) else r["caption"]
        first.setdefault(r["image_path"], caption)
    paths = list(first)[:n]
    ids = [Path(p).name for p in paths]
    return (
        ids,
        [(COCO / p).read_bytes() for p in paths],
        [f"{i}#0" for i in ids],
        [first[p] for p in paths],
    )


def encode(teacher, inputs: list, batch_size: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(inputs), batch_size):
        out.append(teacher.encode([teacher.prepare(x) for x in inputs[i : i + batch_size]]))
    return np.concatenate(out).astype(np.float32)


def stored_variants(spec, ids: list[str], feats: np.ndarray, tmp: str) -> dict[str, dict]:
    """float32, float16 and int8 groups of ``feats``: rows read back by id and bytes per row."""
    store = FeatureStore.open(os.path.join(tmp, spec.name), create=True)
    out = {}
    groups = {}
    for dtype in ("float32", "float16"):
        group = store.group(
            "coco-example", "train", dataclasses.replace(spec, dtype=dtype), create=True
        )
        order = np.random.default_rng(0).permutation(len(ids))  # shuffled, read back by id
        group.write_shard("shard-0", [ids[i] for i in order], feats[order])
        group.seal()
        groups[dtype] = group
    groups["int8"] = quantize_group(store, groups["float32"])
    for dtype, group in groups.items():
        files = ["features/c/0/0"] + (["scale/c/0"] if dtype == "int8" else [])
        nbytes = sum(store.fs.size(f"{group.rel}/{f}") for f in files)
        rows = np.asarray(FeatureLookup(group).gather(ids), dtype=np.float32)
        out[dtype] = {"rows": rows, "bytes_per_row": nbytes / len(ids)}
    return out


def _distance_from_uniform(p: torch.Tensor) -> float:
    h = -(p * p.clamp_min(1e-300).log()).sum(1).mean()
    return float(np.log(p.shape[0]) - h)


def compare(ref_rows: np.ndarray, rows: np.ndarray, same_space: bool) -> dict:
    """Metrics of ``rows`` against the float32 reference rows (float64 arithmetic)."""
    ref = cosine_similarity_matrix(torch.from_numpy(ref_rows).double())
    other = cosine_similarity_matrix(torch.from_numpy(rows).double())
    off = ~torch.eye(len(ref), dtype=torch.bool)
    dc = (other - ref).abs()
    out: dict = {
        "cosine_matrix_abs_diff_max": float(dc[off].max()),
        "cosine_matrix_abs_diff_mean": float(dc[off].mean()),
        "soft_labels": {},
    }
    if same_space:
        a, b = ref_rows.astype(np.float64), rows.astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        out["row_cosine_error_max"] = float((1 - cos).max())
    for tau in TAUS:
        p = F.softmax(ref / tau, dim=1)
        q = F.softmax(other / tau, dim=1)
        kl = float(F.kl_div(q.log(), p, reduction="batchmean"))
        gap = _distance_from_uniform(p)
        out["soft_labels"][str(tau)] = {
            "softmax_abs_diff_max": float((q - p).abs().max()),
            "kl_batchmean": kl,
            "distance_from_uniform": gap,
            "kl_over_distance_from_uniform": kl / gap,
        }
    return out


def measure(
    name: str, weights: str, ref: dict, variants: dict[str, dict], same_space: bool
) -> dict:
    """One teacher: each variant against ``ref`` (the float32 rows of the reference teacher)."""
    ref_bytes = ref["bytes_per_row"]
    result = {"teacher": name, "weights": weights, "dim": int(ref["rows"].shape[1]), "variants": {}}
    for label, v in variants.items():
        result["variants"][label] = {
            "dim": int(v["rows"].shape[1]),
            "bytes_per_row": v["bytes_per_row"],
            "size_vs_float32": v["bytes_per_row"] / ref_bytes,
            **compare(ref["rows"], v["rows"], same_space and v["rows"].shape == ref["rows"].shape),
        }
    return result


def paper_sizes() -> dict:
    """Bytes of the paper's teachers' sealed features per dtype, from the shapes."""
    per_row = {
        "float32": lambda d: 4 * d,
        "float16": lambda d: 2 * d,
        "int8": lambda d: d + 4,  # int8 values + one float32 scale
    }
    out = {}
    for split, (images, captions) in SPLITS.items():
        out[split] = {"images": images, "captions": captions}
        for what, dim in PAPER_DIMS.items():
            n = captions if what == "text" else images
            out[split][what] = {dt: n * f(dim) for dt, f in per_row.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--unicom-weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "soft_label_int8.json"))
    args = ap.parse_args()

    image_ids, images, caption_ids, captions = load_batch(args.n)
    results = []
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        if get_teacher_entry("efficientnet-lite0").info.available():
            t = get_teacher("efficientnet-lite0", device=args.device)
            v = stored_variants(t.spec, image_ids, encode(t, images), tmp)
            results.append(
                measure(
                    "efficientnet-lite0",
                    "real ImageNet weights",
                    v["float32"],
                    {"float16": v["float16"], "int8": v["int8"]},
                    same_space=True,
                )  # fmt: skip
            )
        else:
            notes.append("efficientnet-lite0 is not installed (extra offline-teachers): skipped")
        text_name = "all-mpnet-base-v2"
        try:
            t = get_teacher(text_name, device=args.device)
        except Exception as exc:  # noqa: BLE001 - say why, use MiniLM
            notes.append(
                f"all-mpnet-base-v2 unavailable ({type(exc).__name__}: {exc}); used all-MiniLM-L6-v2"
            )
            text_name = "all-MiniLM-L6-v2"
            t = get_teacher(text_name, device=args.device)
        v = stored_variants(t.spec, caption_ids, encode(t, captions, batch_size=64), tmp)
        results.append(
            measure(
                text_name,
                "real weights (registry packages)",
                v["float32"],
                {"float16": v["float16"], "int8": v["int8"]},
                same_space=True,
            )  # fmt: skip
        )

        if args.unicom_weights:
            weights, label, unofficial = args.unicom_weights, "official checkpoint", False
        else:
            weights = str(Path(tmp) / "random-vit-b32.pt")
            torch.manual_seed(0)
            torch.save(build_unicom("ViT-B/32").eval().half().state_dict(), weights)
            label, unofficial = (
                "RANDOM weights (torch.manual_seed(0), official init, saved fp16 like the "
                "release): the official Unicom checkpoint is unreachable here",
                True,
            )
        tok = UnicomImageTeacher("ViT-B/32", "tokens", weights=weights, allow_unofficial=unofficial, device=args.device)  # fmt: skip
        tok_feats = encode(tok, images)
        tokens = stored_variants(tok.spec, image_ids, tok_feats, tmp)
        del tok
        proj = UnicomImageTeacher("ViT-B/32", "tokens-proj768", weights=weights, allow_unofficial=unofficial, device=args.device)  # fmt: skip
        proj_feats = encode(proj, images)
        projected = stored_variants(proj.spec, image_ids, proj_feats, tmp)
        del proj
        results.append(
            measure(
                "unicom-vit-b32-tokens (reference: tokens stored float32)",
                label,
                tokens["float32"],
                {
                    "tokens float16": tokens["float16"],
                    "tokens int8": tokens["int8"],
                    "tokens-proj768 float32": projected["float32"],
                    "tokens-proj768 float16": projected["float16"],
                    "tokens-proj768 int8": projected["int8"],
                },
                same_space=True,
            )
        )
        results.append(
            measure(
                "unicom-vit-b32-tokens-proj768 (reference: proj768 stored float32)",
                label,
                projected["float32"],
                {"float16": projected["float16"], "int8": projected["int8"]},
                same_space=True,
            )
        )
    out = {
        "benchmark": "soft_label_int8",
        "what": (
            "float16 / int8 (per-row absmax scale) / tokens-proj768 stored teacher features vs "
            "float32-stored ones, one batch: row cosine error, in-batch cosine matrix, soft "
            "labels P = row softmax(cos / tau), KL(P_fp32 || P_stored) batchmean; float64"
        ),
        "batch": f"{len(image_ids)} real COCO images of coco-example new_train.json and the first caption of each",
        "taus": list(TAUS),
        "store_path": "write_shard + seal (float32, float16), quantize_group (int8), FeatureLookup.gather",
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "notes": notes,
        "results": results,
        "paper_sizes_bytes": paper_sizes(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(r["teacher"])
        for name, v in r["variants"].items():
            s1, s5 = v["soft_labels"]["1.0"], v["soft_labels"]["0.5"]
            print(f"  {name:24s} {v['bytes_per_row']:>8.0f} B/row x{v['size_vs_float32']:.3f}  "
                  f"rowcos {v.get('row_cosine_error_max', float('nan')):.1e}  |dC| {v['cosine_matrix_abs_diff_max']:.1e}  "
                  f"t=1 |dP| {s1['softmax_abs_diff_max']:.1e} KL {s1['kl_batchmean']:.1e}  "
                  f"t=.5 |dP| {s5['softmax_abs_diff_max']:.1e} KL {s5['kl_batchmean']:.1e}")  # fmt: skip
    for n in notes:
        print("note:", n)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
