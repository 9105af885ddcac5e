"""The inputs of :mod:`benchmarks.scale`: webdataset tars of real COCO JPEGs (the originals, then
seeded crops, so every id is distinct and every sample a real decode) and the benchmark's image
teacher, the tiny Unicom config with random weights (``unicom-tiny-random-tokens``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from benchmarks.common import REPO, SHARED_COCO

DEFAULT_PICS = SHARED_COCO / "pics"
TINY_CONFIG = REPO / "tests" / "fixtures" / "unicom_tiny_config.json"
BENCH_TEACHER = "unicom-tiny-random-tokens"
WEIGHTS_ENV = "CUSA_SCALE_TINY_WEIGHTS"
CROPS_PER_IMAGE = 3  # variants after the original: sample i cycles through 801 x 4 images
TEACHER_LABEL = (
    "tiny Unicom config (tests/fixtures/unicom_tiny_config.json: dim 64, depth 2, 4 heads, "
    "patch 32, 224 px) with random weights, output tokens (49 x 64 = 3,136-d): measures the "
    "pipeline, not a real teacher"
)


# -- the dataset ---------------------------------------------------------------------------------


def _captions() -> dict[str, str]:
    out: dict[str, str] = {}
    for split in ("new_train.json", "new_val.json"):
        path = DEFAULT_PICS.parent / split
        if path.exists():
            for rec in json.loads(path.read_text()):
                out.setdefault(Path(rec["image_path"]).name, rec["caption"])
    return out


def _variant(pics: list[Path], p: int, pool: Path) -> bytes:
    """Pool image ``p``: image ``p % len(pics)`` as it is (variant 0) or a seeded crop."""
    base, variant = pics[p % len(pics)], p // len(pics)
    if variant == 0:
        return base.read_bytes()
    target = pool / f"{p:06d}.jpg"
    if target.exists():
        return target.read_bytes()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(p)
    with Image.open(base) as img:
        img = img.convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.55, 0.95)), int(h * rng.uniform(0.55, 0.95))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        img.crop((x0, y0, x0 + cw, y0 + ch)).save(buf, format="JPEG", quality=90)
    pool.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.partial")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    return buf.getvalue()


def make_shards(
    pics_dir: Path, out: Path, n: int, shard_size: int, crops: int = CROPS_PER_IMAGE
) -> str:
    """Write (or reuse) the tars holding samples ``0..n-1``; returns their brace pattern.

    Shard ``k`` always holds samples ``k*shard_size ...``, so a smaller N reads a prefix of the
    same tars. ``crops=0`` cycles the original JPEGs only (no re-encoding, fast to write).
    """
    pics = sorted(pics_dir.glob("*.jpg"))
    if not pics:
        raise SystemExit(f"no JPEG images in {pics_dir}; pass --pics")
    captions = _captions()
    pool_size = len(pics) * (1 + crops)
    shards = -(-n // shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        path = out / f"train-{k:06d}.tar"
        done = out / f"train-{k:06d}.count"
        if path.exists() and done.exists() and int(done.read_text()) == hi - lo:
            continue
        tmp = path.with_suffix(".tar.partial")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(lo, hi):
                p = i % pool_size
                caption = captions.get(pics[p % len(pics)].name, "a photo").encode()
                for ext, data in (("jpg", _variant(pics, p, out / "pool")), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        done.write_text(str(hi - lo))
    return str(out / f"train-{{000000..{shards - 1:06d}}}.tar")


# -- the benchmark teacher ---------------------------------------------------------------------


def write_tiny_weights(path: Path) -> Path:
    """Random weights (seed 0) of the tiny Unicom config, in the official fp16 format."""
    import torch

    from cusa.extract.teachers.unicom import UnicomConfig, build_unicom

    torch.manual_seed(0)
    model = build_unicom(UnicomConfig(**json.loads(TINY_CONFIG.read_text())))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def register_bench_teacher() -> None:
    """Register ``unicom-tiny-random-tokens`` (weights from ``$CUSA_SCALE_TINY_WEIGHTS``).

    Also the Ray ``worker_process_setup_hook`` of the benchmark, so teacher actors find it.
    """
    from cusa.extract.teachers.registry import (
        TEACHERS,
        TeacherInfo,
        load_plugin_teachers,
        register_teacher,
    )
    from cusa.extract.teachers.unicom import UnicomConfig, UnicomImageTeacher

    load_plugin_teachers()
    if BENCH_TEACHER in TEACHERS.list():
        return

    def factory(*, device: str | None = None, dtype: str = "float16") -> UnicomImageTeacher:
        weights = os.environ.get(WEIGHTS_ENV)
        if not weights:
            raise RuntimeError(f"{WEIGHTS_ENV} is not set: run through benchmarks/scale.py")
        return UnicomImageTeacher(
            "ViT-B/32",
            "tokens",
            weights=weights,
            allow_unofficial=True,
            config=UnicomConfig(**json.loads(TINY_CONFIG.read_text())),
            name=BENCH_TEACHER,
            device=device,
            dtype=dtype,
        )

    register_teacher(
        BENCH_TEACHER,
        factory,
        TeacherInfo(
            name=BENCH_TEACHER,
            modality="image",
            dim=3136,
            default_dtype="float16",
            weights_source=f"${WEIGHTS_ENV} (random, seed 0)",
            output_kind="tokens",
            stand_in=True,
            description=TEACHER_LABEL,
        ),
    )
