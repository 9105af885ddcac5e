"""The parts of :mod:`benchmarks.gpu_check`, one function each (``PARTS``): every one returns its
figures, raises :class:`~benchmarks.gpu_check_context.SkipPart` with the reason (and what its CPU
half measured) when it cannot run here, and lets any other error through to be reported as failed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from benchmarks.gpu_check_context import (
    IMAGE_TEACHER,
    SAMPLE_TEXT_TEACHER,
    TARGETS,
    Context,
    SkipPart,
    coco_captions,
    coco_jpegs,
    per_second,
    timed,
)


def part_unicom_forward(ctx: Context) -> dict[str, Any]:
    import numpy as np
    import torch

    from cusa.extract.teachers import get_teacher
    from cusa.extract.teachers.unicom import build_unicom

    b, iters = ctx.sizes["forward_batch"], ctx.sizes["forward_iters"]
    teacher = get_teacher(
        IMAGE_TEACHER, weights=str(ctx.unicom_weights()), allow_unofficial=True, device=ctx.device
    )
    prepared = np.stack([teacher.prepare(j) for j in coco_jpegs(b)])  # (B, 3, 224, 224) float32
    bare = build_unicom("ViT-B/32").to(ctx.device).eval()
    bare.load_state_dict(teacher.model.state_dict())
    bare.autocast_dtype = None  # fp32 throughout, NCHW: the plain forward
    x = torch.from_numpy(prepared).to(ctx.device)
    with torch.inference_mode():
        t_bare = timed(lambda: bare.forward_features(x), iters)
    out: dict[str, Any] = {
        "model": "Unicom ViT-B/32 (official shape), random weights",
        "batch": b,
        "bare_fp32_nchw_images_per_s": per_second(b, t_bare),
        "teacher_encode_from_host_images_per_s": per_second(
            b, timed(lambda: teacher.encode(prepared), iters)
        ),
    }
    if ctx.cuda:
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            t_amp = timed(lambda: teacher.model.forward_features(xc), iters)
            ref = bare.forward_features(x).float()
            got = teacher.model.forward_features(xc).float()
        out["fp16_autocast_channels_last_images_per_s"] = per_second(b, t_amp)
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

    data = coco_jpegs(ctx.sizes["decode_images"])

    def pil() -> None:
        for d in data:
            with Image.open(io.BytesIO(d)) as img:
                np.asarray(img.convert("RGB"))

    out: dict[str, Any] = {
        "images": len(data),
        "pil_images_per_s": per_second(len(data), timed(pil, 1)),
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
    out["nvjpeg_images_per_s"] = per_second(len(data), timed(gpu, 2))
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
    rate = per_second(summary.rows["image"], wall)
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

    from cusa.extract.ray_runner import init_ray, plan_resources
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
            init_ray(None)
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


def _text(
    ctx: Context, name: str, target: int | None, weights: str | None = None
) -> dict[str, Any]:
    """Captions/s of the registered text teacher ``name`` (its own weights, or the folder
    ``weights``) against a plain ``SentenceTransformer.encode`` of the same model."""
    from cusa.extract.teachers import get_teacher
    from cusa.extract.teachers.registry import get_teacher_entry

    entry = get_teacher_entry(name)
    if weights is None and not entry.info.available():
        raise SkipPart(
            f"needs real weights: {name} is not on this machine (source: "
            f"{entry.info.weights_source}); on a full GPU node with the registry, run "
            f"`cusa teachers fetch {name}` first"
        )
    bs = ctx.sizes["caption_batch"]
    options = {"weights": weights} if weights is not None else {}
    teacher = get_teacher(name, device=ctx.device, batch_size=bs, **options)
    captions = coco_captions(ctx.sizes["captions"])
    prepared = [teacher.prepare(c) for c in captions]

    def plain() -> None:
        teacher.model.encode(captions, batch_size=bs, show_progress_bar=False)

    def ours() -> None:
        for i in range(0, len(prepared), bs):
            teacher.encode(prepared[i : i + bs])

    t_plain, t_ours = timed(plain, 1), timed(ours, 1)
    out: dict[str, Any] = {
        "captions": len(captions),
        "unique_after_normalisation": len(set(prepared)),
        "batch": bs,
        "sentence_transformers_encode_captions_per_s": per_second(len(captions), t_plain),
        "teacher_encode_captions_per_s": per_second(len(captions), t_ours),
        "ratio": round(t_plain / t_ours, 3),
    }
    if target is not None:
        out["target_captions_per_s"] = target
        out["target_met"] = (out["teacher_encode_captions_per_s"] >= target) if ctx.cuda else None
        if not ctx.cuda:
            out["target_note"] = "not evaluated: no GPU in this run"
    return out


def part_text_mpnet(ctx: Context) -> dict[str, Any]:
    """all-mpnet-base-v2's published architecture and tokenizer (shipped with cusa) with random
    weights, through the registered teacher: the weights (438 MB) cannot reach a bare GPU machine,
    and captions/s do not depend on their values."""
    from cusa.extract.teachers.text import random_weights_folder

    model = random_weights_folder(ctx.workdir / "all-mpnet-base-v2-random")
    return {
        "model": "all-mpnet-base-v2 (MPNetModel, published config and tokenizer), random weights",
        "weights": model.how,
        **_text(ctx, "all-mpnet-base-v2", TARGETS["mpnet_captions_per_s"], model.source),
    }


def part_text_minilm(ctx: Context) -> dict[str, Any]:
    return _text(ctx, "all-MiniLM-L6-v2", None)


def part_faiss_knn(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from benchmarks.store_gather import write_store
    from cusa.store.knn import build_index, gpu_available

    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        raise SkipPart(
            f"faiss is not installed ({exc}): the GPU image has none and faiss-gpu's wheels are "
            "over the 64 MiB a run can bring; on a full GPU node with the registry, "
            "pip install 'cusa[gpu]'"
        ) from exc
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
        "cpu_queries_per_s": per_second(nq, search_cpu),
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
    out["gpu_queries_per_s"] = per_second(nq, time.perf_counter() - t0)
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
        t = timed(step, 3)
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
