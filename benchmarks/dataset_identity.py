"""Dataset identity: what each way of covering image content costs and what it detects.

Issue 21 (must 3): re-extracting or resuming under an existing ``--name`` with other image
bytes must be refused. The image manifest hash covered ids and paths only. Options measured here,
on the embedded sample (32 images) and ``../shared/data/coco-example`` (801 images):

- ``ids+paths``: before (no content);
- ``size``: each image's size (one ``stat`` per image, no read);
- ``size+mtime``: size and modification time;
- ``size+sampled-sha256/1000`` (**what cusa does**, ``AlbefReader.manifest_info``): each size,
  plus the SHA-256 of one image in 1000 (read under the dataset-root rules);
- ``full-sha256``: every image read and hashed up front, on every run;
- ``sha256-as-decoded``: each image's SHA-256 recorded in the manifest while it is extracted
  (hashing bytes already in memory); checking it on resume means reading every image again,
  i.e. ``full-sha256``'s read cost at each resume.

Detection is measured on copies of the embedded sample: other images under the same names, a
same-size in-place edit of an image that is not sampled and of one that is, and two harmless
changes that must not cause a refusal (a ``cp -r`` copy with new mtimes, a ``touch``).

Run: ``python -m benchmarks.dataset_identity`` -> ``benchmarks/results/dataset_identity.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import RESULTS_DIR, SHARED_COCO, write_json

OUT = RESULTS_DIR / "dataset_identity.json"
COCO_IMAGES = 123_287  # COCO 2014 train + val images, for the extrapolation
REPEATS = 5


def _paths(root: Path) -> list[Path]:
    seen, out = set(), []
    for index in sorted(root.glob("new_*.json")):
        for rec in json.loads(index.read_text()):
            p = (root / rec["image_path"]).resolve()
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _h(parts: list[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def opt_ids_paths(root: Path) -> str:
    return _h([str(p.relative_to(root.resolve())) for p in _paths(root)])


def opt_size(root: Path) -> str:
    return _h([f"{p.name}:{os.stat(p).st_size}" for p in _paths(root)])


def opt_size_mtime(root: Path) -> str:
    return _h([f"{p.name}:{(s := os.stat(p)).st_size}:{s.st_mtime_ns}" for p in _paths(root)])


def opt_cusa(root: Path) -> str:
    """What cusa records: AlbefReader.manifest_info(modality='image')['content_hash']."""
    from cusa.readers import AlbefReader

    reader = AlbefReader(str(root), "train")
    return reader.manifest_info(modality="image")["content_hash"]


def opt_full(root: Path) -> str:
    return _h([f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in _paths(root)])


OPTIONS: dict[str, Callable[[Path], str]] = {
    "ids+paths (before)": opt_ids_paths,
    "size": opt_size,
    "size+mtime": opt_size_mtime,
    "size+sampled-sha256/1000 (cusa)": opt_cusa,
    "full-sha256 up front": opt_full,
}


def _median_s(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def costs(root: Path) -> dict:
    """Seconds each option adds to the manifest (the content part only; the index is parsed
    and the paths resolved once, outside the timing), per image, and extrapolated to COCO."""
    from cusa.readers import AlbefReader
    from cusa.readers.indexed import CONTENT_SAMPLE_STRIDE, image_fingerprint

    paths = _paths(root)
    base = root.resolve()
    rels = [str(p.relative_to(base)) for p in paths]
    n, nbytes = len(paths), sum(os.stat(p).st_size for p in paths)
    blobs = [p.read_bytes() for p in paths]
    content: dict[str, Callable[[], object]] = {
        "ids+paths (before)": lambda: None,
        "size": lambda: [os.stat(p).st_size for p in paths],
        "size+mtime": lambda: [(s.st_size, s.st_mtime_ns) for s in map(os.stat, paths)],
        "size+sampled-sha256/1000 (cusa)": lambda: [
            image_fingerprint(base, r, sample=i % CONTENT_SAMPLE_STRIDE == 0)
            for i, r in enumerate(rels)
        ],
        "full-sha256 up front": lambda: [hashlib.sha256(p.read_bytes()).digest() for p in paths],
        "sha256-as-decoded (extraction time)": lambda: [hashlib.sha256(b).digest() for b in blobs],
    }
    out = {"images": n, "bytes": nbytes, "options": {}}
    for name, fn in content.items():
        t = _median_s(fn)
        out["options"][name] = {
            "seconds": round(t, 5),
            "us_per_image": round(1e6 * t / n, 2),
            "coco_extrapolated_s": round(t / n * COCO_IMAGES, 1),
        }
    out["options"]["sha256-as-decoded (extraction time)"]["note"] = (
        "added to extraction (bytes already in memory); checking it on resume costs a full read "
        "of every image, as full-sha256 up front"
    )
    split = sorted(root.glob("new_*.json"))[0].stem.removeprefix("new_")
    out["cusa_manifest_info_image_s"] = round(
        _median_s(lambda: AlbefReader(str(root), split).manifest_info(modality="image")), 4
    )
    return out


# -- detection ---------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # keeps mtimes, as cp -a / rsync -a
    return dst


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    st = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # an edit moves mtime


def scenarios(sample: Path, tmp: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (changed copy, whether the features would change, i.e. must be detected)."""
    out: dict[str, tuple[Path, bool]] = {}
    paths = _paths(sample)
    d = _copy(sample, tmp / "other")  # other pixels under the same names
    rels = [p.relative_to(sample.resolve()) for p in paths]
    for a, b in zip(rels, rels[1:] + rels[:1], strict=True):
        shutil.copyfile(sample / b, d / a)
    out["other images, same file names"] = (d, True)
    d = _copy(sample, tmp / "edit_unsampled")
    _flip_byte(d / rels[5])
    out["same-size edit of an unsampled image"] = (d, True)
    d = _copy(sample, tmp / "edit_sampled")
    _flip_byte(d / rels[0])
    out["same-size edit of the sampled image"] = (d, True)
    d = tmp / "cp_r"
    shutil.copytree(sample, d)  # plain cp -r: new mtimes, same bytes
    for p in d.rglob("*"):
        os.utime(p, None)
    out["copied with cp -r (new mtimes, same bytes)"] = (d, False)
    d = _copy(sample, tmp / "touched")
    os.utime(d / rels[3], None)
    out["an image touched (mtime only)"] = (d, False)
    return out


def detection(sample: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = _copy(sample, Path(tmp) / "base")
        ref = {name: fn(base) for name, fn in OPTIONS.items()}
        table: dict[str, dict[str, str]] = {}
        for scen, (root, must_detect) in scenarios(base, Path(tmp)).items():
            row = {}
            for name, fn in OPTIONS.items():
                changed = fn(root) != ref[name]
                if must_detect:
                    row[name] = "detected" if changed else "missed"
                else:
                    row[name] = "false refusal" if changed else "ok"
            table[scen] = row
    return table


def main() -> None:
    from cusa.readers import coco_sample_root

    sample = coco_sample_root()
    result = {
        "generated_by": "python -m benchmarks.dataset_identity",
        "repeats": REPEATS,
        "note": "warm page cache; median of repeats; content part of the manifest only (index parsed once, untimed); extrapolation = per image x 123,287 COCO images",
        "costs": {"embedded sample": costs(sample)},
        "detection (embedded sample copies)": detection(sample),
    }
    if (SHARED_COCO / "new_train.json").is_file():
        result["costs"]["coco-example"] = costs(SHARED_COCO)
    write_json(OUT, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
