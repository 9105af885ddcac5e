"""The Unicom ViT against the official golden outputs, state-dict layout and weight handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cusa.errors import ConfigError, WeightsError
from cusa.extract.teachers.unicom import (
    UNICOM_CONFIGS,
    UNICOM_RELEASES,
    UnicomConfig,
    UnicomImageTeacher,
    build_unicom,
    gaussian_projection,
    load_unicom,
    resolve_unicom_weights,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_CFG = UnicomConfig(**json.loads((FIXTURES / "unicom_tiny_config.json").read_text()))
TINY_PT = FIXTURES / "unicom_tiny_fp16.pt"
PREPROCESS_IMAGES = FIXTURES / "unicom_preprocess_images"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "unicom_tiny_golden.npz", allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def tiny_model():
    return load_unicom(TINY_CFG, TINY_PT)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tiny_golden_forward_features(tiny_model, golden):
    with torch.no_grad():
        out = tiny_model.forward_features(torch.from_numpy(golden["input"])).numpy()
    assert out.shape == golden["forward_features"].shape == (3, 49 * 64)
    assert _rel_err(out, golden["forward_features"]) < 1e-5


def test_tiny_golden_embedding(tiny_model, golden):
    with torch.no_grad():
        out = tiny_model(torch.from_numpy(golden["input"])).numpy()
    assert out.shape == golden["embedding"].shape == (3, 32)
    assert _rel_err(out, golden["embedding"]) < 1e-5


@pytest.mark.parametrize("arch", list(UNICOM_CONFIGS))
def test_state_dict_keys_and_shapes_match_official(arch):
    official = json.loads((FIXTURES / "unicom_state_dict_shapes.json").read_text())[arch]
    model = build_unicom(arch, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    # torch's own strict check against a state dict of exactly the official keys/shapes
    fake = {
        k: torch.empty(
            shape,
            device="meta",
            dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float16,
        )
        for k, shape in official.items()
    }
    result = model.load_state_dict(fake, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_tokens_dim_of_b32_is_the_released_size():
    assert UNICOM_CONFIGS["ViT-B/32"].tokens_dim == 37_632
    assert UNICOM_CONFIGS["ViT-B/32"].embedding_size == 512


def test_unknown_arch_lists_known():
    with pytest.raises(ConfigError, match=r"unknown Unicom architecture 'ViT-H/14'.*ViT-B/32"):
        build_unicom("ViT-H/14")


def test_strict_load_rejects_wrong_layout(tmp_path):
    sd = torch.load(TINY_PT, weights_only=True)
    sd.pop("norm.weight")
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match="does not match the Unicom"):
        load_unicom(TINY_CFG, bad)


def test_offline_missing_weights_message(tmp_path):
    with pytest.raises(WeightsError) as info:
        resolve_unicom_weights("ViT-B/32", cache_dir=tmp_path, download=False)
    msg = str(info.value)
    rel = UNICOM_RELEASES["ViT-B/32"]
    for needle in (
        rel.filename,
        rel.sha256,
        rel.url,
        str(tmp_path / rel.filename),
        "efficientnet-lite0",
        "mobilenetv2",
    ):
        assert needle in msg


def test_offline_env_disables_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSA_OFFLINE", "1")
    with pytest.raises(WeightsError, match="downloads are disabled"):
        resolve_unicom_weights("ViT-B/32", cache_dir=tmp_path)


def test_cached_checkpoint_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / "FP16-ViT-B-32.pt").write_bytes(TINY_PT.read_bytes())
    with pytest.raises(WeightsError, match="checksum mismatch.*cached"):
        resolve_unicom_weights("ViT-B/32", cache_dir=tmp_path, download=False)


def test_explicit_checkpoint_with_wrong_hash_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="expected the official SHA-256 f9d5696a"):
        resolve_unicom_weights("ViT-B/32", TINY_PT)


def test_explicit_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_unicom_weights("ViT-B/32", tmp_path / "nope.pt")


@pytest.fixture(scope="module")
def tiny_teacher_images() -> list[bytes]:
    return [p.read_bytes() for p in sorted(PREPROCESS_IMAGES.glob("*.jpg"))]


def _tiny_teacher(kind: str) -> UnicomImageTeacher:
    return UnicomImageTeacher(
        "tiny",
        kind,
        weights=TINY_PT,
        config=TINY_CFG,
        allow_unofficial=True,
        device="cpu",
        name="unicom-tiny",
    )


def test_teacher_embedding_matches_model_on_real_images(tiny_teacher_images, tiny_model):
    teacher = _tiny_teacher("embedding")
    batch = [teacher.prepare(b) for b in tiny_teacher_images]
    feats = teacher.encode(batch)
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            tiny_model(torch.from_numpy(np.stack(batch))), dim=-1
        ).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    spec = teacher.spec
    assert spec.output_kind == "embedding" and spec.normalized and spec.dim == 32
    assert spec.preprocessing["name"] == "clip" and spec.preprocessing["interpolation"] == "bicubic"


def test_teacher_tokens_are_raw_forward_features(tiny_teacher_images, golden, tiny_model):
    teacher = _tiny_teacher("tokens")
    assert teacher.spec.dim == 49 * 64 and not teacher.spec.normalized
    out = teacher.encode(list(golden["input"]))
    assert _rel_err(out, golden["forward_features"]) < 1e-5


def test_teacher_projection_is_fixed_and_recorded(tiny_teacher_images):
    a, b = _tiny_teacher("tokens-proj128"), _tiny_teacher("tokens-proj128")
    batch = [a.prepare(x) for x in tiny_teacher_images]
    fa, fb = a.encode(batch), b.encode(batch)
    np.testing.assert_array_equal(fa, fb)
    assert fa.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(fa, axis=1), 1.0, rtol=1e-5)
    proj = a.spec.preprocessing["projection"]
    assert proj["seed"] == 0 and proj["out_dim"] == 128 and len(proj["matrix_sha256"]) == 64
    # the projection, not another kind, changes the fingerprint
    assert a.spec.fingerprint != _tiny_teacher("tokens").spec.fingerprint


def test_projection_preserves_cosines_roughly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 37632, generator=g)
    p = gaussian_projection(37632, 768)
    cos_full = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
    y = x @ p
    cos_proj = torch.nn.functional.cosine_similarity(y[:, None], y[None], dim=-1)
    assert float((cos_full - cos_proj).abs().max()) < 0.2  # JL: error ~ 1/sqrt(768) per pair


def test_bad_output_kind():
    with pytest.raises(ConfigError, match="unknown Unicom output kind 'logits'"):
        UnicomImageTeacher("ViT-B/32", "logits")


def test_custom_config_needs_explicit_weights():
    with pytest.raises(ConfigError, match="allow_unofficial"):
        UnicomImageTeacher("tiny", config=TINY_CFG)
