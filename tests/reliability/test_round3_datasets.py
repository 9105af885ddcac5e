"""Round 3 (issue 21): datasets that used to be served wrongly or found too late.

- a sample id that two webdataset tars both hold is ledgered when the second tar's shard is
  committed (it was found only at seal, after the whole run, leaving both groups unsealed).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from helpers import IMAGE_T, TEXT_T, extract_args, store_snapshot
from typer.testing import CliRunner

from cusa.cli import app
from cusa.readers import coco_sample_root
from cusa.store import FeatureLookup, FeatureStore

RUN = dict(image_teacher=IMAGE_T, text_teacher=TEXT_T, runner="local", device="cpu", batch_size=4)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _extract(dataset: Path | str, store: Path, **options: Any) -> Any:
    return _cli(*extract_args(str(dataset), str(store), **{**RUN, **options}))


def _pics() -> list[Path]:
    return sorted((coco_sample_root() / "pics").iterdir())


def _tar(path: Path, samples: dict[str, tuple[bytes, str]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, (jpeg, caption) in samples.items():
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_an_id_in_two_tars_is_ledgered_when_the_second_shard_commits(tmp_path, reliability_log):
    pics = [p.read_bytes() for p in _pics()[:4]]
    ds = tmp_path / "tars"
    ds.mkdir()
    _tar(ds / "shard-000000.tar", {"a": (pics[0], "a dog"), "b": (pics[1], "a bus")})
    _tar(ds / "shard-000001.tar", {"c": (pics[2], "a cat"), "a": (pics[3], "not the same dog")})
    store = tmp_path / "store"
    res = _extract(ds, store)
    groups = {g.spec["modality"]: g for g in FeatureStore.open(store).groups()}
    ledgers = {m: {f["sample_id"]: f["error"] for f in g.failures()} for m, g in groups.items()}
    sealed = all(g.sealed for g in groups.values())
    ok = (
        res.exit_code == 1
        and sealed
        and "duplicate sample id 'a'" in ledgers["image"].get("a", "")
        and "shard-000000" in ledgers["image"].get("a", "")
        and sorted(FeatureLookup(groups["image"]).ids) == ["a", "b", "c"]
    )
    reliability_log.bad_input(
        "dataset: the same sample id in two webdataset tars",
        "dataset",
        caught=ok,
        outcome="the second copy ledgered when its shard commits (naming the first shard); "
        "the first copy's features kept; both groups seal",
        message=ledgers["image"].get("a", res.output),
    )
    assert res.exit_code == 1, res.output
    assert sealed, res.output
    assert "duplicate sample id 'a'" in ledgers["image"]["a"], ledgers
    assert "shard-000000" in ledgers["image"]["a"]
    assert any(k.startswith("a#") for k in ledgers["text"]), ledgers["text"]
    assert sorted(FeatureLookup(groups["image"]).ids) == ["a", "b", "c"]
    assert _cli("store", "verify", str(store)).exit_code == 0


# -- same --name, same file names and index, other image bytes -------------------------------------


def _albef(root: Path, pics: list[Path]) -> Path:
    import json
    import shutil

    (root / "pics").mkdir(parents=True)
    recs = []
    for k, pic in enumerate(pics):
        shutil.copyfile(pic, root / "pics" / f"im{k}.jpg")
        recs.append({"image_path": f"pics/im{k}.jpg", "caption": f"photo {k}", "image_id": f"{k}"})
    (root / "new_train.json").write_text(json.dumps(recs))
    return root


def test_same_name_other_image_bytes_is_refused(tmp_path, reliability_log):
    """Folder B has A's file names, index and captions but other pixels: re-extracting it under
    A's --name must not serve A's features (it did: exit 0, 0 rows written)."""
    pics = _pics()
    a = _albef(tmp_path / "A", pics[:3])
    b = _albef(tmp_path / "B", pics[3:6])
    store = tmp_path / "store"
    first = _extract(a, store, name="lab", shard_size=2)
    assert first.exit_code == 0, first.output
    before = store_snapshot(store)
    res = _extract(b, store, name="lab", shard_size=2)
    after = store_snapshot(store)
    line = next((ln for ln in res.output.splitlines() if ln.startswith("error: ")), "")
    ok = (
        res.exit_code == 2
        and "image files (size, sampled bytes)" in line
        and "delete the group folder" in line
        and after == before
    )
    reliability_log.bad_input(
        "dataset: same --name, same file names, other image bytes",
        "dataset",
        caught=ok,
        outcome="refused in one line (image sizes and sampled bytes are in the manifest hash); "
        "store unchanged",
        message=line,
    )
    assert ok, res.output
    # Captions did not change, so the text group alone still resumes (its features are valid).
    text_only = _extract(b, store, name="lab", shard_size=2, modalities="text")
    assert text_only.exit_code == 0, text_only.output
