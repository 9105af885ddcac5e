"""GPU check (issue 15): one command that exercises every GPU path of cusa on a one-GPU machine.

    python -m benchmarks.gpu_check                  # on a CUDA machine, under 5 minutes
    python -m benchmarks.gpu_check --cpu-smoke      # anywhere: every non-CUDA path, tiny sizes
    python -m benchmarks.gpu_kit                    # the wheels + the command for a bare GPU box

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
* ``text_mpnet``: all-mpnet-base-v2 captions/s through the registered teacher (normalisation,
  dedup, length sort) against a plain ``SentenceTransformer.encode``. Target: >= 10,000
  captions/s. The model is transformers' ``MPNetModel`` built from all-mpnet-base-v2's published
  config and tokenizer (shipped with cusa) with **random weights**, so it runs where the weights
  cannot go; ``text_minilm`` runs the same code with the real all-MiniLM-L6-v2 where its package
  is installed (no target), and skips with the reason where it is not.
* ``faiss_knn``: ``cusa.store.knn.build_index`` on a GPU (faiss-gpu) against the CPU, exact
  inner product over a sealed store, with the agreement of the neighbours. Skipped with the
  reason where faiss is not installed (a bare GPU machine).
* ``ddp_step``: one CusaModel (CSA + USA) train step inside a 1-process DDP group, NCCL on CUDA
  (gloo in ``--cpu-smoke``), with bf16 autocast on CUDA.

Writes ``benchmarks/results/gpu_check.json`` (``--out``): the machine, each part's figures, the
targets next to the measured values, and the list of skipped parts with their reasons; and a
short markdown summary beside it (``--summary``, default: the same name ending ``.md``). Exit code
0 when no part failed.

This file runs the parts in turn and writes the results; the parts are in
:mod:`benchmarks.gpu_check_parts`, what they share (sizes, targets, :class:`Context`) in
:mod:`benchmarks.gpu_check_context`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_json
from benchmarks.gpu_check_context import TARGETS, Context, SkipPart
from benchmarks.gpu_check_parts import PARTS

RESULTS = RESULTS_DIR / "gpu_check.json"


def _packages() -> dict[str, str]:
    """Versions of the packages the figures depend on (``-`` where one is not installed)."""
    import importlib.metadata as md

    names = ("torch", "torchvision", "transformers", "sentence-transformers", "numpy", "zarr",
             "numcodecs", "pillow", "pyarrow", "faiss-cpu", "faiss-gpu-cu12", "ray")  # fmt: skip
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def _headline(name: str, part: dict[str, Any]) -> str:
    """The figure that says most about a part, for the markdown summary."""
    keys = {
        "unicom_forward": ("fp16_autocast_channels_last_images_per_s", "images/s fp16 + CL"),
        "jpeg_decode": ("nvjpeg_images_per_s", "images/s nvJPEG"),
        "pipeline_local": ("images_per_s", "images/s JPEG -> sealed store"),
        "pipeline_ray": ("images_per_s", "images/s JPEG -> sealed store"),
        "text_mpnet": ("teacher_encode_captions_per_s", "captions/s"),
        "text_minilm": ("teacher_encode_captions_per_s", "captions/s"),
        "faiss_knn": ("gpu_queries_per_s", "queries/s GPU"),
        "ddp_step": ("step_s", "s per step"),
        "ray_num_gpus": ("num_gpus_per_actor", "GPU per actor"),
    }
    fallback = {
        "unicom_forward": ("bare_fp32_nchw_images_per_s", "images/s fp32"),
        "jpeg_decode": ("pil_images_per_s", "images/s PIL"),
        "faiss_knn": ("cpu_queries_per_s", "queries/s CPU"),
    }
    for key, label in (x for x in (keys.get(name), fallback.get(name)) if x):
        if key in part:
            target = part.get("target_images_per_s") or part.get("target_captions_per_s")
            met = part.get("target_met")
            vs = f" (target {target}: {'met' if met else 'not met' if met is False else 'not judged'})"
            return f"{part[key]} {label}" + (vs if target else "")
    return ""


def summary_markdown(result: dict[str, Any]) -> str:
    """A short markdown summary of a check's result: machine, one line per part, what was skipped."""
    m = result["machine"]
    gpu = m.get("gpu") or "no GPU"
    took = (
        f"{result['elapsed_s']} s" if "elapsed_s" in result else "unfinished (cut off or running)"
    )
    lines = [
        "# GPU check",
        "",
        f"{m['mode']} on {gpu} (torch {m['torch']}, CUDA {m.get('cuda') or '-'}, "
        f"{m['cpus']} CPUs, Python {m['python']}), {took}. "
        "Written by `python -m benchmarks.gpu_check`; figures in `gpu_check.json`.",
        "",
        "| part | status | s | figure | note |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for name, part in result["parts"].items():
        note = part.get("reason") or part.get("error") or part.get("skipped_here") or ""
        if name == "text_mpnet" and part.get("status") == "ok":
            note = f"{part.get('weights', 'random weights')}; {note}".rstrip("; ")
        note = note.replace("|", "/").replace("\n", " ")[:300]
        lines.append(
            f"| {name} | {part['status']} | {part.get('seconds', '')} | "
            f"{_headline(name, part)} | {note} |"
        )
    return "\n".join(lines) + "\n"


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
        "packages": _packages(),
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
            _write(args, result)  # a run cut off by its time limit keeps what it measured
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
    _write(args, result)
    return result


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The JSON (``--out``) and the markdown summary beside it (``--summary``)."""
    write_json(args.out, result)
    summary = args.summary or args.out.with_suffix(".md")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(summary_markdown(result), encoding="utf-8")


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
    ap.add_argument(
        "--summary", type=Path, default=None, help="markdown summary [default: --out with .md]"
    )
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
