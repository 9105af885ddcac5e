"""What every part of :mod:`benchmarks.gpu_check` needs: the targets, the sizes (full on a GPU,
tiny in ``--cpu-smoke``), the real COCO images and captions, :class:`Context` (mode, device, work
folder, the random Unicom weights, the webdataset tars), :class:`SkipPart` and the timing helpers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import SHARED_COCO
from cusa.readers import coco_sample_root

# The 801-image subset beside the repo when present, else the sample embedded in the package
# (a user's clone has no ../shared; the check then runs on those 32 real images).
COCO = SHARED_COCO if (SHARED_COCO / "pics").is_dir() else coco_sample_root()
TARGETS = {
    "unicom_b32_jpeg_to_sealed_store_images_per_s": 5000,
    "mpnet_captions_per_s": 10000,
    "hardware": "one H100/H200-class GPU",
}
IMAGE_TEACHER = "unicom-vit-b32-tokens"
SAMPLE_TEXT_TEACHER = "all-MiniLM-L6-v2"  # offline, so the Ray check runs on any machine


class SkipPart(Exception):
    """A part that cannot run (all of it) here; the message is the reason, ``figures`` what
    its CPU half measured before the skip."""

    def __init__(self, reason: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.figures = dict(figures or {})


# -- sizes ---------------------------------------------------------------------------------------

GPU_SIZES = {
    "forward_batch": 256,
    "forward_iters": 20,
    "decode_images": 1024,
    "pipeline_local_images": 4000,
    "pipeline_ray_images": 20000,
    "shard_size": 1000,
    "batch_size": 256,
    "captions": 20000,
    "caption_batch": 512,
    "knn_rows": 200_000,
    "knn_queries": 2000,
    "ddp_batch": 128,
}
SMOKE_SIZES = {
    "forward_batch": 4,
    "forward_iters": 2,
    "decode_images": 16,
    "pipeline_local_images": 32,
    "pipeline_ray_images": 32,
    "shard_size": 16,
    "batch_size": 8,
    "captions": 32,
    "caption_batch": 16,
    "knn_rows": 2000,
    "knn_queries": 50,
    "ddp_batch": 4,
}


class Context:
    """What every part needs: mode, device, sizes, a work folder, the random Unicom weights."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        import torch

        self.smoke = bool(args.cpu_smoke)
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.sizes = dict(SMOKE_SIZES if self.smoke else GPU_SIZES)
        self.workdir = workdir
        self.with_ray = not args.no_ray
        self._weights: Path | None = None
        self._tars: dict[int, str] = {}

    def need_cuda(self, what: str) -> None:
        if not self.cuda:
            why = "--cpu-smoke" if self.smoke else "no CUDA GPU is visible"
            raise SkipPart(f"{what} needs CUDA ({why})")

    def need_ray(self) -> None:
        if not self.with_ray:
            raise SkipPart("--no-ray was given")
        try:
            import ray.data  # noqa: F401
        except ImportError as exc:
            raise SkipPart(
                f"Ray Data is not installed ({exc}): its wheel is over the 64 MiB a run can "
                "bring; on a full GPU node with the registry, pip install 'cusa[ray]'"
            ) from exc

    def unicom_weights(self) -> Path:
        """Random weights of the official ViT-B/32 shape, fp16 like the release."""
        if self._weights is None:
            import torch

            from cusa.extract.teachers.unicom import build_unicom

            torch.manual_seed(0)
            model = build_unicom("ViT-B/32")
            path = self.workdir / "random-unicom-vit-b32.pt"
            torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
            self._weights = path
        return self._weights

    def tars(self, n: int) -> str:
        """A brace pattern of webdataset tars holding ``n`` real COCO JPEGs (distinct ids)."""
        if n not in self._tars:
            from benchmarks.scale_inputs import make_shards

            if not any(COCO.joinpath("pics").glob("*.jpg")):
                raise SkipPart(f"the real COCO images are not at {COCO / 'pics'}")
            out = self.workdir / f"tars-{n}"
            self._tars[n] = make_shards(COCO / "pics", out, n, self.sizes["shard_size"], crops=0)
        return self._tars[n]


def per_second(n: int, seconds: float) -> float:
    """``n / seconds`` to one decimal (infinite for no time at all)."""
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` calls after one warm-up."""
    fn()
    _sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def coco_jpegs(n: int) -> list[bytes]:
    """The bytes of ``n`` real COCO JPEGs, cycling through those there are."""
    files = sorted(COCO.joinpath("pics").glob("*.jpg"))
    if not files:
        raise SkipPart(f"the real COCO images are not at {COCO / 'pics'}")
    return [files[i % len(files)].read_bytes() for i in range(n)]


def coco_captions(n: int) -> list[str]:
    """``n`` real COCO captions of the train split, cycling through those there are."""
    path = COCO / "new_train.json"
    if not path.exists():
        raise SkipPart(f"the real COCO captions are not at {path}")
    caps = [r["caption"] for r in json.loads(path.read_text())]
    return [caps[i % len(caps)] for i in range(n)]
