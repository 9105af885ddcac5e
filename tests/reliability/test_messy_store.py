"""A messy shared store: stray files, one broken group, edited metadata, a seal racing verify.

Each case starts from a copy of a real store (the embedded sample extracted with real teachers)
and breaks one thing. What must hold: stray files are ignored; the broken group is reported,
per group, in one line that names the file and the fix (``store info``, ``verify``, readers),
while the healthy group stays readable; ``verify`` checks each array's own metadata; ``export``
checks chunk hashes; nothing ends in a traceback.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import IMAGE_T, TEXT_T, store_snapshot
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, NotAStoreError, StoreError
from cusa.store import FeatureLookup, FeatureStore
from cusa.store.spec import TeacherSpec
from cusa.store.verify import verify_group, verify_store


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def store(sample_reference, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(sample_reference[0], copy)
    return copy


def _group_dir(store: Path, modality: str) -> Path:
    g = next(g for g in FeatureStore.open(store).groups() if g.spec["modality"] == modality)
    return store / g.rel


def _healthy_still_readable(store: Path, reference: dict) -> bool:
    """The image group (never touched) opens, gathers and equals the reference."""
    lk = FeatureLookup.open(store, dataset="coco-sample", split="val", teacher=IMAGE_T)
    rel = lk.group.rel
    return (lk.ids, lk.gather(lk.ids).tobytes()) == reference[rel]


def _no_traceback(*results: Any) -> bool:
    return all(
        "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
        for r in results
    )


BREAKS = {
    # name -> (how to break the text group, what the per-group error must say)
    "truncated zarr.json of a group": (
        lambda g: (g / "zarr.json").write_bytes((g / "zarr.json").read_bytes()[:40]),
        "zarr.json is not valid JSON",
    ),
    "group attributes that are not an object": (
        lambda g: (g / "zarr.json").write_text('{"zarr_format": 3, "attributes": []}'),
        "zarr.json holds no cusa attributes",
    ),
    "teacher spec set to null": (
        lambda g: _edit_attrs(g, lambda a: a.update(spec=None)),
        "the teacher spec in zarr.json is NoneType, not an object",
    ),
    "sealed.json = []": (
        lambda g: (g / "sealed.json").write_text("[]"),
        "sealed.json is not a seal record",
    ),
    "garbage commit record": (
        lambda g: (g / "commits" / "000001.json").write_bytes(b"\x00garbage{"),
        "commit record commits/000001.json is not valid JSON",
    ),
    "sealed sample_id array deleted": (
        lambda g: shutil.rmtree(g / "sample_id"),
        "sample_id",
    ),
    "garbage manifest.parquet": (
        lambda g: (g / "manifest.parquet").write_bytes(b"PAR1 not parquet PAR1"),
        "manifest.parquet is missing or unreadable",
    ),
}


def _edit_attrs(group_dir: Path, edit) -> None:
    meta = json.loads((group_dir / "zarr.json").read_text())
    edit(meta["attributes"]["cusa"])
    (group_dir / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_one_broken_group_is_reported_and_the_others_stay_readable(
    case, store, sample_reference, reliability_log
):
    _, reference = sample_reference
    breaker, reason = BREAKS[case]
    text_dir = _group_dir(store, "text")
    breaker(text_dir)
    info = _cli("store", "info", str(store))
    verify = _cli("store", "verify", str(store))
    healthy = _healthy_still_readable(store, reference)
    with pytest.raises(StoreError) as refused:  # features, ledger or records: one refuses
        g = FeatureStore.open(store).find_group("coco-sample", "val", TEXT_T)
        lk = FeatureLookup(g)
        lk.gather(lk.ids)
        g.failures()
        g.commit_records()
    reports = {r.group: r for r in verify_store(FeatureStore.open(store))}
    text_report = next(r for rel, r in reports.items() if "all-MiniLM" in rel)
    image_report = next(r for rel, r in reports.items() if IMAGE_T in rel)
    message = " | ".join(text_report.errors)
    ok = (
        verify.exit_code == 1
        and info.exit_code == 0
        and healthy
        and image_report.ok
        and not text_report.ok
        and reason in message
        and _no_traceback(info, verify)
    )
    reliability_log.bad_input(
        f"store: {case}",
        "store",
        caught=ok,
        outcome="that group reported broken (verify exits 1, info lists it); other groups readable",
        message=message,
    )
    assert verify.exit_code == 1, verify.output
    assert info.exit_code == 0, info.output
    assert healthy and image_report.ok, image_report.summary()
    assert reason in message, message
    assert "\n" not in str(refused.value)
    assert _no_traceback(info, verify), (info.output, verify.output)


def test_stray_files_in_the_store_are_ignored(store, sample_reference, reliability_log):
    _, reference = sample_reference
    for junk in (store / ".DS_Store", store / "coco-sample" / ".DS_Store", store / "notes.txt"):
        junk.write_bytes(b"\x00\x00\x00\x01Bud1 junk")
    (store / "coco-sample" / "val" / "Thumbs.db").write_bytes(b"junk")
    info = _cli("store", "info", str(store))
    verify = _cli("store", "verify", str(store))
    snap = store_snapshot(store)
    ok = info.exit_code == 0 and verify.exit_code == 0 and snap == reference
    reliability_log.bad_input(
        "store: stray .DS_Store (and other files) in the store",
        "store",
        caught=ok,
        outcome="ignored: info, verify and readers see the groups as before",
        message=info.output[-300:],
    )
    assert ok, (info.output, verify.output)
    fresh = store.parent / "fresh"
    fresh.mkdir()
    (fresh / ".DS_Store").write_bytes(b"junk")
    assert FeatureStore.open(fresh, create=True).groups() == []  # junk is not foreign content


def test_garbage_store_marker_is_refused_with_the_fix(store, reliability_log):
    (store / "cusa_store.json").write_bytes(b"\xff\xfe garbage")
    res = _cli("store", "info", str(store))
    line = res.output.strip().splitlines()[-1]
    ok = res.exit_code == 2 and "cusa_store.json" in line and '"format": "cusa-store"' in line
    reliability_log.bad_input(
        "store: garbage cusa_store.json",
        "store",
        caught=ok,
        outcome="refused in one line that gives the marker's content to restore",
        message=line,
    )
    assert ok, res.output
    with pytest.raises(NotAStoreError, match="restore the file"):
        FeatureStore.open(store)


def test_array_metadata_edited_to_another_dtype_is_caught(store, reliability_log):
    text_dir = _group_dir(store, "text")
    meta_path = text_dir / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = "float32"
    meta_path.write_text(json.dumps(meta))
    verify = _cli("store", "verify", str(store))
    ok = verify.exit_code == 1 and "data_type 'float32' != 'float16'" in verify.output
    reliability_log.bad_input(
        "store: array zarr.json dtype edited to float32",
        "store",
        caught=ok,
        outcome="verify exits 1 naming features/zarr.json and the field",
        message=verify.output[:300],
    )
    assert ok, verify.output
    meta["data_type"], meta["codecs"] = "float16", [{"name": "bytes"}, {"name": "zstd"}]
    meta_path.write_text(json.dumps(meta))
    verify = _cli("store", "verify", str(store))
    assert verify.exit_code == 1 and "not raw little-endian bytes" in verify.output


def test_export_checks_chunk_hashes(store, tmp_path, reliability_log):
    chunk = _group_dir(store, "image") / "features" / "c" / "0" / "0"
    chunk.write_bytes(bytes(chunk.stat().st_size))  # same size, all zeros
    out = tmp_path / "export"
    res = _cli("store", "export", str(store), "--teacher", IMAGE_T, "--to", str(out))
    line = res.output.strip().splitlines()[-1]
    ok = res.exit_code == 2 and "does not match the SHA-256" in line and not (out / "emb").exists()
    reliability_log.bad_input(
        "store: zeroed chunk file, then export",
        "store",
        caught=ok,
        outcome="export refuses (exit 2) naming the chunk; nothing exported",
        message=line,
    )
    assert ok, res.output


def test_gather_of_a_single_string_is_refused(sample_reference, reliability_log):
    lk = FeatureLookup.open(
        sample_reference[0], dataset="coco-sample", split="val", teacher=IMAGE_T
    )
    with pytest.raises(ConfigError, match=r"got the single string 'aaa'; pass \['aaa'\]") as info:
        lk.gather("aaa")
    reliability_log.bad_input(
        "store: FeatureLookup.gather('aaa') (a string, not a list)",
        "store",
        caught=True,
        outcome="refused: names the value and says to pass a list",
        message=str(info.value),
    )


# -- verify while another process seals ----------------------------------------------------------

SEAL_RACES = 24


def _toy_group(root: Path, shards: int = 6, rows: int = 40):
    spec = TeacherSpec(
        name="toy-text",
        modality="text",
        model="tests/toy",
        weights_sha256="ab" * 32,
        preprocessing={},
        output_kind="sentence",
        dim=16,
        dtype="float16",
        normalized=True,
    )
    group = FeatureStore.open(root, create=True).group("toy", "train", spec, "m", create=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        group.write_shard(f"{s:03d}", [f"id{s:03d}_{r:03d}" for r in range(rows)], x)
    return group


def test_verify_during_a_concurrent_seal_gives_no_false_alarm(tmp_path, reliability_log):
    """Deterministic: the group is sealed right after verify listed its commits (the window in
    which the sealer removes the parts verify is about to read)."""
    from cusa.store import verify as verify_mod

    group = _toy_group(tmp_path / "det")
    real = verify_mod._part_units
    calls = {"n": 0}

    def sealing_first(g, records, report):
        calls["n"] += 1
        if calls["n"] == 1:
            g.seal()
        return real(g, records, report)

    mp = pytest.MonkeyPatch()
    mp.setattr(verify_mod, "_part_units", sealing_first)
    try:
        report = verify_group(group)
    finally:
        mp.undo()
    assert calls["n"] == 1 and report.ok and report.sealed, report.summary()

    false_alarms = []
    for trial in range(SEAL_RACES):
        g = _toy_group(tmp_path / f"race{trial}")
        start = threading.Barrier(2)
        sealer = threading.Thread(target=lambda g=g, b=start: (b.wait(), g.seal()))
        sealer.start()
        start.wait()
        report = verify_group(g)
        sealer.join()
        if not report.ok:
            false_alarms.append(report.summary())
    reliability_log.fault(
        "verify during a concurrent seal",
        f"{SEAL_RACES} threaded races + 1 injected",
        survived=not false_alarms,
        samples_lost=0,
        false_alarms=len(false_alarms),
    )
    assert not false_alarms, false_alarms[:2]
