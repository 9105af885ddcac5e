"""What several benchmark scripts share: the record of package versions, mean ± std over seeds,
timings of several paths taking turns, results files written whole, a feature store that is temporary unless one is named, the logging
of a long run, and matplotlib set up to draw into files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"  # the committed results files
IMG_DIR = REPO / "docs" / "img"  # the plots of the docs
#: The 801-image COCO subset beside the checkout (``pics/``, ``new_train.json``, ``new_val.json``).
SHARED_COCO = REPO.parent / "shared" / "data" / "coco-example"


def versions() -> dict[str, str]:
    """Python, platform, the packages a result depends on, the git commit and torch's threads."""
    import importlib.metadata as md
    import subprocess

    import torch

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "numpy", "zarr", "sentence-transformers", "transformers", "cusa"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        out["git_commit"] = "unknown"
    out["torch_threads"] = str(torch.get_num_threads())
    out["cpu_count"] = str(os.cpu_count())
    return out


def mean_std(values: Sequence[float], ndigits: int | None = None) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value), rounded to ``ndigits`` if given."""
    v = [float(x) for x in values]
    mean = statistics.fmean(v)
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    if ndigits is not None:
        mean, std = round(mean, ndigits), round(std, ndigits)
    return {"mean": mean, "std": std, "n": len(v)}


def take_turns(paths: dict[str, Any], turns: int, seed: int) -> dict[str, list[int]]:
    """Nanoseconds of each call of each ``name: fn(i)``, the paths taking ``turns`` turns.

    Each path gets its own inputs (path j at turn k gets ``i = k + j * step``): a path that read
    the rows another path had just read would find them in the CPU's caches. The order of the
    paths is shuffled at every turn: a path that always followed one that churns the caches (a
    binary search of 100M hashes) would pay for it. What a call returns is freed outside its
    timing (a lookup's maps are closed then).
    """
    times: dict[str, list[int]] = {name: [] for name in paths}
    step = turns // len(paths)
    named = list(paths.items())
    rng = random.Random(seed)
    for k in range(turns):
        for j in rng.sample(range(len(named)), len(named)):
            name, fn = named[j]
            t0 = time.perf_counter_ns()
            result = fn((k + j * step) % turns)
            times[name].append(time.perf_counter_ns() - t0)
            del result
    return times


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """Write ``data`` as JSON (with a final newline) through ``<name>.partial``, so an interrupted
    run never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=indent) + "\n")
    partial.replace(path)


@contextlib.contextmanager
def store_or_temporary(store: str | None, prefix: str) -> Iterator[str]:
    """``store`` itself, or a ``store`` folder in a temporary directory removed afterwards."""
    if store is not None:
        yield store
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield os.path.join(tmp, "store")


def log_to_stderr(quiet: Sequence[str]) -> None:
    """INFO logging with timestamps; the loggers in ``quiet`` only warn."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` (making its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
