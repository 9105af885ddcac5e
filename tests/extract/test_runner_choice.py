"""`--runner auto` and `--name` through the real runner and the CLI.

`choose_runner` is tested with its probes overridden (GPUs, Ray installed), so every branch runs
on this CPU machine; one real CLI run checks that the choice and its reason are printed. Two
ALBEF folders then share a split in one store under their own names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import TEXT_T, extract_args
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError
from cusa.extract.runner import RAY_MIN_IMAGES, ExtractConfig, choose_runner
from cusa.readers import coco_sample_root


def _choice(gpus: int, images: int | None, ray: bool = True, **config):
    cfg = ExtractConfig(dataset="coco-sample", **config)
    return choose_runner(cfg, images, gpus=gpus, ray_installed=ray)


def test_auto_is_local_without_gpu_small_jobs_or_ray():
    no_gpu = _choice(0, 10**6)
    assert no_gpu.runner == "local" and "no GPU is visible" in no_gpu.reason
    cpu = _choice(4, 10**6, device="cpu")
    assert cpu.runner == "local" and "--device cpu was given" in cpu.reason
    small = _choice(1, 24)
    assert small.runner == "local" and "a small job (24 images" in small.reason
    no_ray = _choice(8, 10**6, ray=False)
    assert no_ray.runner == "local" and "Ray is not installed" in no_ray.reason


def test_auto_is_ray_for_a_cluster_or_gpus_and_a_large_job():
    cluster = _choice(0, 24, ray_address="ray://head:10001")
    assert cluster.runner == "ray" and "--ray-address ray://head:10001 was given" in cluster.reason
    big = _choice(2, RAY_MIN_IMAGES)
    assert big.runner == "ray" and "2 GPU(s) and 20,000 images" in big.reason
    unknown = _choice(1, None)
    assert unknown.runner == "ray" and "an unknown number of images" in unknown.reason
    assert _choice(0, 24, runner="ray").runner == "ray"
    assert _choice(8, 10**6, runner="local").runner == "local"


def test_a_cluster_without_ray_is_refused():
    with pytest.raises(ConfigError, match="needs Ray Data: pip install 'cusa\\[ray\\]'"):
        _choice(0, 24, ray=False, ray_address="auto")


def _albef_copy(dst: Path, n_images: int, offset: int) -> Path:
    """An ALBEF folder with ``n_images`` coco-sample images and their captions."""
    src = coco_sample_root()
    records = json.loads((src / "new_val.json").read_text())
    ids = list(dict.fromkeys(r["image_id"] for r in records))[offset : offset + n_images]
    keep = [r for r in records if r["image_id"] in ids]
    (dst / "pics").mkdir(parents=True)
    for iid in ids:
        shutil.copy(src / "pics" / iid, dst / "pics" / iid)
    (dst / "new_val.json").write_text(json.dumps(keep))
    return dst


def test_two_albef_folders_share_a_split_under_their_names(tmp_path):
    a = _albef_copy(tmp_path / "a", 2, 0)
    b = _albef_copy(tmp_path / "b", 3, 2)
    store = tmp_path / "store"
    opts = {"modalities": "text", "text_teacher": TEXT_T, "device": "cpu", "batch_size": 8}

    first = CliRunner().invoke(app, extract_args(str(a), str(store), split="val", **opts))
    assert first.exit_code == 0, first.output
    assert first.stderr.count("runner: local (") == 1  # the choice and why, once, on stderr
    # The same layout from another folder is another dataset: refused, with what can be done.
    clash = CliRunner().invoke(app, extract_args(str(b), str(store), split="val", **opts))
    assert clash.exit_code == 2
    assert "give this dataset its own name in the store with --name NAME" in clash.output

    # The JSON file in hand works as well as its folder.
    named = CliRunner().invoke(
        app, extract_args(str(b / "new_val.json"), str(store), name="lab-b", json=True, **opts)
    )
    assert named.exit_code == 0, named.output
    summary = json.loads(named.stdout)
    assert summary["dataset"] == "lab-b" and summary["split"] == "val"
    assert summary["runner"] == "local" and summary["runner_reason"]
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["albef", "lab-b"]
    (group,) = (store / "lab-b" / "val").iterdir()
    attrs = json.loads((group / "zarr.json").read_text())["attributes"]["cusa"]
    assert attrs["dataset_source"]["dataset"] == str((b / "new_val.json").resolve())
    assert attrs["dataset_source"]["split"] == "val"


def test_the_ray_runner_is_imported_only_when_ray_is_asked_for():
    """``extract`` with the local runner never imports the Ray runner (nor Ray); get_runner does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cusa.extract.runner import get_runner, run_local\n"
        "assert get_runner('local') is run_local\n"
        "print(sorted(m for m in ('ray', 'cusa.extract.ray_runner') if m in sys.modules))\n"
        "get_runner('ray')\n"
        "print('cusa.extract.ray_runner' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr
