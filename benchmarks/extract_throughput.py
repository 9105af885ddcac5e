"""Extraction throughput: the pipeline (JPEG -> committed store) against the bare teacher.

Every number is a ratio against a baseline measured in the same process, because these
machines are noisy:

* image pipeline: images/s of the local and Ray runners from JPEG files to a sealed store,
  against the same teacher's ``encode`` on pre-decoded tensors at the same batch size;
* text pipeline: captions/s against a plain ``SentenceTransformer.encode`` over the same
  captions, with the deduplication gain reported separately;
* scaling: Ray images/s with 1 vs 2 teacher actors on this machine.

Run:  python -m benchmarks.extract_throughput [--data ../shared/data/coco-example] [--quick]
Writes benchmarks/results/extract_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cusa.extract.batches import RunnerJob
from cusa.extract.progress import NullProgress
from cusa.extract.runner import (
    ExtractConfig,
    ExtractSummary,
    extract,
    load_teachers,
    open_groups,
    run_local,
)
from cusa.extract.writer import ShardWriter
from cusa.readers import open_dataset

RESULTS = Path(__file__).parent / "results" / "extract_throughput.json"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-example"


def _random_unicom_weights(path: Path) -> Path:
    """Random weights of the official ViT-B/32 shape: the real compute, no real semantics."""
    from cusa.extract.teachers.unicom import build_unicom

    model = build_unicom("ViT-B/32")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def _bare_image_rate(config: ExtractConfig, reader, teacher) -> float:
    prepared = []
    for shard in reader.shards():
        for sample in reader.read(shard):
            prepared.append(teacher.prepare(sample.image))
    bs = config.batch_size
    teacher.encode(prepared[:bs])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(prepared), bs):
        teacher.encode(prepared[i : i + bs])
    return len(prepared) / (time.perf_counter() - t0)


def _local_pipeline(config: ExtractConfig, reader, teachers) -> tuple[float, ExtractSummary]:
    """Images (or captions) per second from the dataset files to a sealed store."""
    store, groups = open_groups(config, reader, {k: t.spec for k, t in teachers.items()})
    shards = reader.shards()
    summary = ExtractSummary(reader.name, reader.split, "local", store.url, {})
    writer = ShardWriter(groups, on_commit=summary.record)
    t0 = time.perf_counter()
    run_local(RunnerJob(config, reader, shards, teachers, writer, summary, NullProgress()))
    for g in groups.values():
        g.seal([s.key for s in shards])
    elapsed = time.perf_counter() - t0
    n = sum(summary.rows.values())
    return n / elapsed, summary


def _local_job(
    data: Path, store: Path, modality: str, teacher: str, batch_size: int, **options: Any
) -> tuple[ExtractConfig, Any, dict[str, Any]]:
    """A local CPU extraction of one modality of ``data``'s val split (shards of 64) into
    ``store``, its dataset reader and its loaded teacher."""
    cfg = ExtractConfig(
        dataset=str(data),
        split="val",
        store=str(store),
        modalities=(modality,),
        batch_size=batch_size,
        device="cpu",
        runner="local",
        shard_size=64,
        **{f"{modality}_teacher": teacher},
        **options,
    )
    reader = open_dataset(cfg.dataset, split=cfg.split, shard_size=cfg.shard_size)
    return cfg, reader, load_teachers(cfg)


def bench_image(
    data: Path, teacher_name: str, weights: str | None, batch_size: int, tmp: Path, ray_too: bool
) -> dict:
    weight_options = {
        "image_teacher_weights": weights,
        "allow_unofficial_weights": weights is not None,
    }
    cfg, reader, teachers = _local_job(
        data, tmp / f"img-{teacher_name}", "image", teacher_name, batch_size, **weight_options
    )
    bare = _bare_image_rate(cfg, reader, teachers["image"])
    local, summary = _local_pipeline(cfg, reader, teachers)
    out = {
        "teacher": teacher_name,
        "images": summary.rows["image"],
        "batch_size": batch_size,
        "bare_forward_images_per_s": round(bare, 2),
        "local_pipeline_images_per_s": round(local, 2),
        "local_ratio": round(local / bare, 3),
    }
    if ray_too:
        for actors in (1, 2):
            ray_cfg = replace(
                cfg,
                runner="ray",
                store=str(tmp / f"ray{actors}-{teacher_name}"),
                actors_per_teacher=actors,
            )
            t0 = time.perf_counter()
            s = extract(ray_cfg)
            total = time.perf_counter() - t0
            busy = s.stage_seconds.get("image teacher", 0.0)
            out[f"ray_{actors}_actor_images_per_s_end_to_end"] = round(s.rows["image"] / total, 2)
            out[f"ray_{actors}_actor_wall_s_incl_startup"] = round(total, 1)
            out[f"ray_{actors}_actor_teacher_busy_images_per_s"] = (
                round(s.rows["image"] / busy, 2) if busy else None
            )
        out["ray_ratio_1_actor"] = round(out["ray_1_actor_images_per_s_end_to_end"] / bare, 3)
        out["ray_scaling_2_vs_1"] = round(
            out["ray_2_actor_images_per_s_end_to_end"] / out["ray_1_actor_images_per_s_end_to_end"],
            3,
        )
    return out


def bench_text(data: Path, teacher_name: str, batch_size: int, tmp: Path) -> dict:
    cfg, reader, teachers = _local_job(
        data, tmp / f"txt-{teacher_name}", "text", teacher_name, batch_size
    )
    teacher = teachers["text"]
    captions = [c for s in reader.shards() for smp in reader.read(s) for c in smp.captions]
    normalised = [teacher.prepare(c) for c in captions]
    teacher.encode_bare(normalised[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(captions), batch_size):
        teacher.model.encode(
            captions[i : i + batch_size], batch_size=batch_size, show_progress_bar=False
        )
    bare = len(captions) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(normalised), batch_size):
        teacher.encode(normalised[i : i + batch_size])
    ours_encode_only = len(captions) / (time.perf_counter() - t0)
    local, summary = _local_pipeline(cfg, reader, teachers)
    unique = len(set(normalised))
    return {
        "teacher": teacher_name,
        "captions": len(captions),
        "unique_after_normalisation": unique,
        "batch_size": batch_size,
        "plain_encode_captions_per_s": round(bare, 1),
        "teacher_encode_captions_per_s": round(ours_encode_only, 1),
        "local_pipeline_captions_per_s": round(local, 1),
        "local_ratio": round(local / bare, 3),
        "dedup_saving_fraction": round(1 - unique / len(captions), 4),
        "length_sort_and_dedup_gain": round(ours_encode_only / bare, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="An ALBEF/CUSA-layout dataset (val split is used).",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="Skip the Ray runs and the ViT.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.is_available(),
        },
        "data": str(args.data),
        "image": [],
        "text": [],
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.quick:
            weights = str(_random_unicom_weights(tmp / "random-vit-b32.pt"))
            results["image"].append(
                bench_image(
                    args.data, "unicom-vit-b32", weights, args.batch_size, tmp, ray_too=True
                )
                | {
                    "note": "official ViT-B/32 shape with random weights (real weights are not reachable here): same compute"
                }
            )
        _save(args.out, results)
        results["image"].append(
            bench_image(
                args.data, "efficientnet-lite0", None, args.batch_size, tmp, ray_too=not args.quick
            )
        )
        _save(args.out, results)
        results["text"].append(bench_text(args.data, "all-MiniLM-L6-v2", args.batch_size, tmp))
        from cusa.extract.teachers.registry import get_teacher_entry

        if get_teacher_entry("all-mpnet-base-v2").info.available():
            results["text"].append(bench_text(args.data, "all-mpnet-base-v2", args.batch_size, tmp))
    _save(args.out, results)
    print(json.dumps(results, indent=2))


def _save(path: Path, results: dict) -> None:
    """Write after each part, so a long run keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
