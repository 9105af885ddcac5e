"""The teacher registry, entry points, the Teacher contract for offline teachers, and the CLI."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint

import numpy as np
import pytest
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, UnknownNameError
from cusa.extract.teachers import (
    TEACHERS,
    Teacher,
    TeacherEntry,
    TeacherInfo,
    get_teacher,
    list_teachers,
    register_teacher,
)
from cusa.extract.teachers import registry as registry_mod

PAPER = {"unicom-vit-b32", "all-mpnet-base-v2"}
OFFLINE = ["efficientnet-lite0", "mobilenetv2", "all-MiniLM-L6-v2"]


def test_builtin_teachers_listed():
    infos = {i.name: i for i in list_teachers()}
    assert PAPER | set(OFFLINE) <= set(infos)
    for arch in ("vit-b32", "vit-b16", "vit-l14", "vit-l14-336px"):
        for suffix in ("", "-tokens", "-tokens-proj768"):
            assert f"unicom-{arch}{suffix}" in infos
    b32 = infos["unicom-vit-b32"]
    assert (b32.modality, b32.dim, b32.default_dtype, b32.output_kind) == (
        "image",
        512,
        "float16",
        "embedding",
    )
    assert infos["unicom-vit-b32-tokens"].dim == 37_632
    assert "FP16-ViT-B-32.pt" in b32.weights_source and "f9d5696a" in b32.weights_source
    assert infos["all-mpnet-base-v2"].dim == 768 and infos["all-MiniLM-L6-v2"].dim == 384
    assert infos["efficientnet-lite0"].stand_in and not b32.stand_in
    assert isinstance(infos["efficientnet-lite0"].available(), bool)


def test_unknown_teacher_lists_known_names():
    with pytest.raises(
        UnknownNameError, match=r"unknown teacher 'unicom-b32'; known teachers: .*unicom-vit-b32"
    ):
        get_teacher("unicom-b32")


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"does not take options \['colour'\].*it takes: weights"):
        get_teacher("unicom-vit-b32", colour="red")


class _ConstTeacher:
    """A trivial third-party teacher used to exercise registration."""

    modality = "text"

    def __init__(self, dim: int = 3) -> None:
        from cusa.store.spec import TeacherSpec

        self._spec = TeacherSpec("const", "text", "const", "0" * 64, {}, "sentence", dim)

    @property
    def spec(self):
        return self._spec

    def prepare(self, item):
        return str(item)

    def preparer(self):
        return self

    def encode(self, batch):
        return np.ones((len(batch), self._spec.dim), dtype=np.float32) / np.sqrt(self._spec.dim)


def test_register_get_and_refuse_duplicate():
    info = TeacherInfo("const-test", "text", 3, "float32", "none (constant)", check=lambda: True)
    try:
        register_teacher("const-test", _ConstTeacher, info)
        t = get_teacher("const-test", dim=3)
        assert isinstance(t, Teacher) and t.encode(["a", "b"]).shape == (2, 3)
        assert any(i.name == "const-test" and i.available() for i in list_teachers())
        with pytest.raises(ConfigError, match="already registered"):
            register_teacher("const-test", _ConstTeacher, info)
        with pytest.raises(ConfigError, match="differs from its info name"):
            register_teacher("other-name", _ConstTeacher, info)
    finally:
        TEACHERS._entries.pop("const-test", None)


CONST_ENTRY = TeacherEntry(
    _ConstTeacher, TeacherInfo("ep-const", "text", 3, "float32", "entry point")
)


def test_entry_point_teacher_is_registered(monkeypatch):
    ep = EntryPoint(
        name="ep-const", value=f"{__name__}:CONST_ENTRY", group=registry_mod.ENTRY_POINT_GROUP
    )
    import importlib.metadata

    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points",
        lambda group=None, **kw: [ep] if group == registry_mod.ENTRY_POINT_GROUP else real(group=group, **kw),
    )  # fmt: skip
    monkeypatch.setattr(registry_mod, "_loaded", False)
    try:
        assert "ep-const" in [i.name for i in list_teachers()]
        assert get_teacher("ep-const").spec.dim == 3
    finally:
        TEACHERS._entries.pop("ep-const", None)


# ---- contract: every offline teacher honours the Teacher protocol ---------------------------


@pytest.fixture(scope="module")
def offline_teachers():
    out = {}
    for name in OFFLINE:
        info = registry_mod.get_teacher_entry(name).info
        if name == "mobilenetv2" or info.available():  # mobilenetv2 fetches from the registry once
            out[name] = get_teacher(name, device="cpu")
    return out


@pytest.mark.parametrize("name", OFFLINE)
def test_teacher_contract(name, offline_teachers, coco_example):
    if name not in offline_teachers:
        pytest.skip(f"{name} weights are not installed")
    t = offline_teachers[name]
    assert isinstance(t, Teacher)
    info = registry_mod.get_teacher_entry(name).info
    assert (t.spec.name, t.spec.modality, t.spec.dim) == (name, info.modality, info.dim)
    assert t.modality == info.modality and len(t.spec.weights_sha256) == 64
    # What the registry declares without loading (a finished re-run checks a group by it).
    known = info.known_spec()
    assert "normalized" in known and {k: t.spec.to_dict()[k] for k in known} == known
    json.dumps(t.spec.to_dict())  # serialisable for the store
    if t.modality == "image":
        items = [p.read_bytes() for p in sorted((coco_example / "pics").glob("*.jpg"))[:3]]
    else:
        items = ["A man riding a horse.", b"two cats", "a red bus"]
    import pickle

    prep = pickle.loads(pickle.dumps(t.preparer()))  # ships to read workers without weights
    batch = [prep.prepare(x) for x in items]
    feats = t.encode(batch)
    assert feats.shape == (3, t.spec.dim) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-4)


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_list_json():
    result = CliRunner().invoke(app, ["teachers", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["unicom-vit-b32"]["dim"] == 512 and rows["unicom-vit-b32"]["modality"] == "image"
    assert set(rows["all-mpnet-base-v2"]) >= {
        "name",
        "modality",
        "dim",
        "default_dtype",
        "weights_source",
        "available",
    }


def test_cli_list_table():
    result = CliRunner().invoke(app, ["teachers", "list"])
    assert result.exit_code == 0
    assert "unicom-vit-b32-tokens" in result.output and "[stand-in]" in result.output


def test_cli_fetch_unknown_name():
    result = CliRunner().invoke(app, ["teachers", "fetch", "nope"])
    assert result.exit_code == 2
    assert "unknown teacher 'nope'" in result.output


def test_cli_fetch_unicom_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv("CUSA_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/unicom
    result = CliRunner().invoke(app, ["teachers", "fetch", "unicom-vit-b32"])
    assert result.exit_code == 2
    assert "FP16-ViT-B-32.pt" in result.output and "efficientnet-lite0" in result.output


def test_cli_fetch_mobilenet():
    result = CliRunner().invoke(app, ["teachers", "fetch", "mobilenetv2"])
    assert result.exit_code == 0, result.output
    assert "mobilenet_v2-b0353104.pth" in result.output


# ---- the paper's teachers are the defaults (issue 11) ----------------------------------------


def test_default_image_teacher_is_the_papers_unicom_tokens():
    from cusa.extract.runner import ExtractConfig
    from cusa.teacher_defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
    from cusa_train.config import TeachersConfig

    config, teachers = ExtractConfig(dataset="coco"), TeachersConfig()
    assert (
        config.image_teacher == teachers.image == DEFAULT_IMAGE_TEACHER == "unicom-vit-b32-tokens"
    )
    assert config.text_teacher == teachers.text == DEFAULT_TEXT_TEACHER == "all-mpnet-base-v2"
    assert config.dtype == "float16"
    infos = {i.name: i for i in list_teachers()}
    tokens = infos[DEFAULT_IMAGE_TEACHER]
    assert (tokens.modality, tokens.dim, tokens.output_kind, tokens.default_dtype) == (
        "image",
        37_632,
        "tokens",
        "float16",
    )
    assert "[paper default: forward_features, 49x768]" in tokens.description
    embedding = infos["unicom-vit-b32"]
    assert embedding.dim == 512 and "paper default" not in embedding.description
    assert "retrieval embedding (not what the paper used)" in embedding.description
    assert "our compact option" in infos["unicom-vit-b32-tokens-proj768"].description
    paper = [i.name for i in infos.values() if "paper default" in i.description]
    assert sorted(paper) == ["all-mpnet-base-v2", "unicom-vit-b32-tokens"]


def test_proj768_label_quotes_the_measured_fidelity():
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "benchmarks/results/teacher_fidelity.json"
    measured = json.loads(results.read_text())["results"]["vit_b32_random_init"]
    kl = measured["projections"]["768"]["kl_batchmean"]["1.0"]
    info = registry_mod.get_teacher_entry("unicom-vit-b32-tokens-proj768").info
    quoted = re.search(r"soft-label KL ([0-9.e+-]+) at tau=1", info.description)
    assert quoted and float(quoted.group(1)) == float(f"{kl:.1e}")


def test_cli_extract_without_teacher_options_uses_the_papers(monkeypatch):
    import cusa.extract.runner as runner_mod

    seen = {}

    def fake_extract(config, progress=None, **_):
        seen["config"] = config
        raise ConfigError("stopped before any work")

    monkeypatch.setattr(runner_mod, "extract", fake_extract)
    result = CliRunner().invoke(app, ["extract", "--dataset", "coco", "--root", "/nowhere"])
    assert result.exit_code == 2 and "stopped before any work" in result.output
    config = seen["config"]
    assert (config.image_teacher, config.text_teacher, config.dtype) == (
        "unicom-vit-b32-tokens",
        "all-mpnet-base-v2",
        "float16",
    )
