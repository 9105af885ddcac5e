"""Teacher throughput on real COCO images and captions: the teacher path vs the bare model forward.

For each teacher, at the same batch size:

* ``teacher``: ``prepare`` (decode + transform, or caption normalisation) on every item, then
  ``encode`` per batch (+ dedup, sort, L2 normalisation for text) -- what extraction runs.
* ``bare``: the model forward alone on already-prepared inputs (image tensors; raw captions through
  ``SentenceTransformer.encode``).

Teachers: the offline ones (efficientnet-lite0, mobilenetv2, all-MiniLM-L6-v2, all-mpnet-base-v2
when assembled) and the Unicom ViT-B/32 *architecture with random weights* (the real checkpoint
cannot be downloaded here; speed does not depend on weight values).

Run: ``python benchmarks/teacher_throughput.py [--n 64] [--batch-size 32] [--device cpu]``.
Writes ``benchmarks/results/teacher_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cusa.extract.teachers import get_teacher
from cusa.extract.teachers.registry import get_teacher_entry
from cusa.extract.teachers.unicom import UnicomImageTeacher, build_unicom

RESULTS = Path(__file__).resolve().parent / "results"
COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-example"


def _load_coco(n: int) -> tuple[list[bytes], list[str]]:
    rows = json.loads((COCO / "new_val.json").read_text())
    paths = list(dict.fromkeys(r["image_path"] for r in rows))[:n]
    images = [(COCO / p).read_bytes() for p in paths]
    captions = [r["caption"] for r in rows][:n]
    return images, captions


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_image(teacher, images: list[bytes], bs: int, repeats: int) -> dict:
    prepared = [teacher.prepare(b) for b in images]
    tensors = [torch.from_numpy(np.stack(b)) for b in _batches(prepared, bs)]
    teacher.encode(prepared[:bs])  # warm-up
    teacher.forward_bare(tensors[0])

    def full():
        for batch in _batches(images, bs):
            teacher.encode([teacher.prepare(b) for b in batch])

    def bare():
        for x in tensors:
            teacher.forward_bare(x)

    t_full, t_bare = _timed(full, repeats), _timed(bare, repeats)
    t_prep = _timed(lambda: [teacher.prepare(b) for b in images], repeats)
    n = len(images)
    return {
        "items": n,
        "teacher_items_per_s": n / t_full,
        "bare_forward_items_per_s": n / t_bare,
        "prepare_only_items_per_s": n / t_prep,
        "teacher_over_bare_time": t_full / t_bare,
    }


def bench_text(teacher, captions: list[str], bs: int, repeats: int) -> dict:
    teacher.encode([teacher.prepare(c) for c in captions[:bs]])  # warm-up

    def full():
        for batch in _batches(captions, bs):
            teacher.encode([teacher.prepare(c) for c in batch])

    def bare():
        for batch in _batches(captions, bs):
            teacher.encode_bare(batch)

    t_full, t_bare = _timed(full, repeats), _timed(bare, repeats)
    n = len(captions)
    return {
        "items": n,
        "teacher_items_per_s": n / t_full,
        "bare_forward_items_per_s": n / t_bare,
        "teacher_over_bare_time": t_full / t_bare,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="images and captions")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "teacher_throughput.json"))
    args = ap.parse_args()

    images, captions = _load_coco(args.n)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        random_b32 = Path(tmp) / "random-vit-b32.pt"
        torch.manual_seed(0)
        torch.save(build_unicom("ViT-B/32").eval().half().state_dict(), random_b32)
        teachers = {
            "unicom-vit-b32 (random weights)": lambda: UnicomImageTeacher(
                "ViT-B/32",
                "embedding",
                weights=random_b32,
                allow_unofficial=True,
                device=args.device,
            ),
            "unicom-vit-b32-tokens-proj768 (random weights)": lambda: UnicomImageTeacher(
                "ViT-B/32",
                "tokens-proj768",
                weights=random_b32,
                allow_unofficial=True,
                device=args.device,
            ),
            "efficientnet-lite0": lambda: get_teacher("efficientnet-lite0", device=args.device),
            "mobilenetv2": lambda: get_teacher("mobilenetv2", device=args.device),
            "all-MiniLM-L6-v2": lambda: get_teacher(
                "all-MiniLM-L6-v2", device=args.device, batch_size=args.batch_size
            ),
            "all-mpnet-base-v2": lambda: get_teacher(
                "all-mpnet-base-v2", device=args.device, batch_size=args.batch_size
            ),
        }
        for label, make in teachers.items():
            registry_name = label.split(" ")[0]
            if (
                not label.startswith("unicom")
                and not get_teacher_entry(registry_name).info.available()
            ):
                results[label] = {"skipped": "weights not on this machine"}
                continue
            teacher = make()
            bench = bench_image if teacher.modality == "image" else bench_text
            items = images if teacher.modality == "image" else captions
            r = bench(teacher, items, args.batch_size, args.repeats)
            r.update(modality=teacher.modality, dim=teacher.spec.dim)
            results[label] = r
            print(
                f"{label:48s} {r['teacher_items_per_s']:8.1f}/s  (bare {r['bare_forward_items_per_s']:8.1f}/s)"
            )
            del teacher

    out = {
        "benchmark": "teacher_throughput",
        "device": args.device,
        "batch_size": args.batch_size,
        "items": args.n,
        "data": "coco-example new_val.json: first N images and first N captions (real COCO)",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "note": "Unicom rows use random weights (the official checkpoint is unreachable here); "
        "throughput does not depend on weight values. bare = model forward on prepared inputs.",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
