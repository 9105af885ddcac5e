"""Helpers shared by the extraction and reliability tests: snapshots, tiny real datasets, processes.

Import with ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` for its conftest).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cusa.store import FeatureLookup, FeatureStore

# Offline, fast, real teachers (weights ship in registry packages).
IMAGE_T, TEXT_T = "efficientnet-lite0", "all-MiniLM-L6-v2"


def store_snapshot(
    store: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> dict[str, tuple[list[str], bytes]]:
    """Ids and feature bytes of every group: what 'identical store' means."""
    out = {}
    for g in FeatureStore.open(store, storage_options=storage_options).groups():
        lk = FeatureLookup(g)
        out[g.rel] = (list(lk.ids), lk.gather(lk.ids).tobytes())
    return out


def rows_by_id(snapshot: dict[str, tuple[list[str], bytes]]) -> dict[tuple[str, str], bytes]:
    """``(group, sample id) -> row bytes`` of a :func:`store_snapshot`."""
    out = {}
    for rel, (ids, data) in snapshot.items():
        if not ids:
            continue
        width = len(data) // len(ids)
        for i, sid in enumerate(ids):
            out[(rel, sid)] = data[i * width : (i + 1) * width]
    return out


def lost_samples(
    got: dict[str, tuple[list[str], bytes]], reference: dict[str, tuple[list[str], bytes]]
) -> dict[str, list[str]]:
    """Reference rows that are missing, differ or are duplicated in ``got``, per group."""
    ref_rows, got_rows = rows_by_id(reference), rows_by_id(got)
    out: dict[str, list[str]] = {}
    for rel, (ids, _) in reference.items():
        got_ids = got.get(rel, ([], b""))[0]
        dup = (
            {i for i in got_ids if got_ids.count(i) > 1}
            if len(set(got_ids)) != len(got_ids)
            else set()
        )
        bad = [i for i in ids if got_rows.get((rel, i)) != ref_rows[(rel, i)] or i in dup]
        if bad:
            out[rel] = bad
    return out


def leftovers(store: str | os.PathLike) -> list[str]:
    """Temporary or orphaned files a reader could trip over in a local store.

    ``*.partial`` files anywhere, and in a sealed group any ``parts/`` left behind (sealing
    consolidates every committed part and removes them).
    """
    root = Path(store)
    found = [str(p.relative_to(root)) for p in root.rglob("*.partial")]
    for sealed in root.rglob("sealed.json"):
        parts = sealed.parent / "parts"
        if parts.exists():
            found.append(str(parts.relative_to(root)))
    return sorted(found)


def commit_files(store: str | os.PathLike) -> list[Path]:
    """Commit records of every group of a local store."""
    return sorted(Path(store).glob("*/*/*/commits/*.json"))


def make_albef_dataset(
    src: Path,
    dest: Path,
    *,
    images: int,
    captions: int = 2,
    split: str = "train",
    skip: int = 0,
) -> list[dict[str, Any]]:
    """Copy ``images`` real images (after ``skip``) from an ALBEF-layout folder into ``dest``.

    Returns the records written to ``dest/new_{split}.json`` (``captions`` per image).
    """
    records = json.loads((src / "new_train.json").read_text())
    by_image: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_image.setdefault(rec["image_id"], []).append(rec)
    chosen = list(by_image)[skip : skip + images]
    (dest / "pics").mkdir(parents=True, exist_ok=True)
    out = []
    for image_id in chosen:
        recs = by_image[image_id][:captions]
        shutil.copy(src / recs[0]["image_path"], dest / "pics" / Path(recs[0]["image_path"]).name)
        out.extend(recs)
    (dest / f"new_{split}.json").write_text(json.dumps(out))
    return out


def cusa_command(*args: str) -> list[str]:
    """``python -m cusa.cli ARGS`` with this interpreter (no reliance on the console script)."""
    return [sys.executable, "-m", "cusa.cli", *args]


def extract_args(dataset: str, store: str, **options: Any) -> list[str]:
    """``extract --dataset D --store S --key value ...`` (``key_name`` -> ``--key-name``)."""
    args = ["extract", "--dataset", dataset, "--store", store, "--no-progress"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def start(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, stdout+stderr to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env or os.environ.copy(),
            start_new_session=True,
        )


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by :func:`start` and everything in its group (cleanup only)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen | None = None,
    interval: float = 0.02,
) -> bool:
    """Poll ``predicate`` until it holds (True), ``proc`` exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False


def pids_matching(pattern: str) -> list[int]:
    """Pids whose command line contains ``pattern`` (Ray names actor processes ``ray::<Class>``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmdline:
            out.append(int(entry.name))
    return sorted(out)
