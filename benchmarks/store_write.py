"""Write-throughput benchmark: rows/s and MB/s of ``write_shard`` + ``seal`` to local disk.

Writes ``--rows`` unit vectors of ``--dim`` (fp16 on disk) in ``--shards`` shards in shuffled
order through the real API, then seals. Reports the commit phase, the seal phase and the two
together. MB counts the fp16 feature bytes (rows x dim x 2), not ids or manifests.

Run: ``python benchmarks/store_write.py [--rows 200000] [--dim 768] [--shards 50]``.
Writes ``benchmarks/results/store_write.json``.
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

from cusa.store import FeatureStore
from cusa.store.spec import TeacherSpec

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shards", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--workdir", default=None, help="where the store is written (default: a temp dir)"
    )
    args = ap.parse_args()

    spec = TeacherSpec(
        name="bench-teacher",
        modality="text",
        model="bench/random-unit-vectors",
        weights_sha256="0" * 64,
        preprocessing={"kind": "none"},
        output_kind="sentence",
        dim=args.dim,
        dtype="float16",
        normalized=True,
    )
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, args.rows, args.shards + 1).astype(int)
    # Features are made before timing so the numbers measure the store, not the generator.
    shards = []
    for s in rng.permutation(args.shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        feats = rng.standard_normal((hi - lo, args.dim), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        shards.append((f"shard-{s:05d}", [f"img{i:07d}#{i % 5}" for i in range(lo, hi)], feats))

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store = FeatureStore.open(os.path.join(tmp, "store"), create=True)
        group = store.group("bench", "train", spec, create=True)
        t0 = time.perf_counter()
        for shard, ids, feats in shards:
            group.write_shard(shard, ids, feats)
        t_commit = time.perf_counter() - t0
        t0 = time.perf_counter()
        group.seal()
        t_seal = time.perf_counter() - t0
        on_disk = group.nbytes_on_disk()

    mb = args.rows * args.dim * 2 / 1e6
    total = t_commit + t_seal
    result = {
        "config": {
            "rows": args.rows,
            "dim": args.dim,
            "dtype": "float16",
            "shards": args.shards,
            "feature_mb": round(mb, 1),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "write_shard": {
            "seconds": round(t_commit, 3),
            "rows_per_s": round(args.rows / t_commit),
            "mb_per_s": round(mb / t_commit, 1),
        },
        "seal": {
            "seconds": round(t_seal, 3),
            "rows_per_s": round(args.rows / t_seal),
            "mb_per_s": round(mb / t_seal, 1),
        },
        "write_and_seal": {
            "seconds": round(total, 3),
            "rows_per_s": round(args.rows / total),
            "mb_per_s": round(mb / total, 1),
        },
        "group_bytes_on_disk_after_seal": on_disk,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_write.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
