"""OpenAI CLIP students: official layout, parity with the official CUSA run, tokenizer, weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cusa_train.students.clip_weights as clip_module
from cusa.errors import ConfigError, WeightsError
from cusa.image_transforms import clip_transform
from cusa.weights import sha256_file
from cusa_train.students.clip import CLIP_CONFIGS, ClipStudent
from cusa_train.students.clip_tokenizer import EOT_ID, SOT_ID, ClipTokenizer, default_tokenizer
from cusa_train.students.clip_weights import (
    CLIP_RELEASES,
    build_model_from_openai_state_dict,
    clip_config_from_state_dict,
    load_clip,
    load_openai_checkpoint,
    resolve_clip_weights,
)
from cusa_train.students.registry import CLIP_STUDENTS, build_student, list_students
from cusa_train.wrapper import CusaModel, convert_official_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PREFIX = "clip_model."


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(FIXTURES / "cusa_train_step_golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_shapes() -> dict:
    return json.loads((FIXTURES / "clip_state_dict_shapes.json").read_text())["models"]


def _tiny_state(golden: dict, which: str = "initial_state_dict") -> dict[str, torch.Tensor]:
    """The 61 ``clip_model.*`` tensors of the official run, prefix stripped (OpenAI layout)."""
    full = golden["cases"]["cusa"][which]
    return {k.removeprefix(PREFIX): v for k, v in full.items() if k.startswith(PREFIX)}


@pytest.fixture()
def tiny_weights(golden, tmp_path) -> Path:
    path = tmp_path / "tiny_clip.pt"
    torch.save(_tiny_state(golden), path)
    return path


def _meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


# ---- parity with the official training run ----------------------------------------------------


@pytest.mark.parametrize("which", ["initial_state_dict", "final_state_dict"])
def test_tiny_official_clip_rebuilds_bitwise(golden, tmp_path, which):
    state = _tiny_state(golden, which)
    assert len(state) == 61
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    student = build_student("clip-checkpoint", weights=path)
    assert isinstance(student, ClipStudent)
    cfg = golden["tiny_clip_config"]
    assert student.config.to_dict() == {**cfg, "vision_layers": cfg["vision_layers"]}
    rebuilt = student.state_dict()
    assert list(rebuilt) == list(state)  # same keys, same (official) order
    for key, value in state.items():
        assert rebuilt[key].dtype == torch.float32
        assert torch.equal(rebuilt[key], value), key
    assert student.weights_path == str(path)


def test_tiny_official_clip_features_match_step0(golden, tiny_weights):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was made with one thread
    try:
        student = build_student("clip-checkpoint", weights=tiny_weights)
        data, step = golden["data"], golden["cases"]["cusa"]["steps"][0]
        batch = data["permutations"][0][0:8]
        student.train()  # the official step ran in train mode; CLIP has no dropout or BatchNorm
        with torch.no_grad():
            image = student.encode_image(data["images"][batch])  # (8, 32)
            text = student.encode_text(data["tokens"][batch])  # (8, 32)
            text_int32 = student.encode_text(data["tokens"][batch].int())
    finally:
        torch.set_num_threads(threads)
    assert image.shape == text.shape == (8, student.image_dim) == (8, 32)
    # The fixture's README: expect agreement to about 1e-5, relative (float32 kernels differ by
    # machine; one element here lands 1.2e-6 away, absolute).
    torch.testing.assert_close(image, step["clip_image_features"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, step["clip_text_features"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_int32, text, rtol=0, atol=0)


def test_student_keys_are_what_convert_official_state_dict_produces(golden, tiny_weights):
    student = load_clip(None, tiny_weights)
    converted = convert_official_state_dict(golden["cases"]["cusa"]["initial_state_dict"])
    ours = CusaModel(student).state_dict()
    official_student = {k for k in converted if k.startswith("student.")}
    assert official_student == {k for k in ours if k.startswith("student.")}
    for key in official_student:
        assert torch.equal(ours[key], converted[key]), key


def test_extra_openai_keys_are_dropped_and_input_left_alone(golden):
    state = _tiny_state(golden)
    state["logit_scale"] = torch.tensor(4.6052)
    state["input_resolution"] = torch.tensor(32)
    state["context_length"] = torch.tensor(16)
    state["vocab_size"] = torch.tensor(64)
    model = build_model_from_openai_state_dict(state)
    assert "logit_scale" in state and len(state) == 65  # the caller's dict is untouched
    assert "logit_scale" not in model.state_dict() and len(model.state_dict()) == 61
    assert not model.training


def test_arch_student_refuses_a_checkpoint_of_another_architecture(tiny_weights):
    with pytest.raises(WeightsError, match=r"is not a CLIP ViT-B/32 checkpoint.*clip-checkpoint"):
        build_student("clip-vit-b32", weights=tiny_weights)


def test_not_a_clip_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="not an OpenAI-format CLIP state dict: key"):
        load_clip(None, path)


# ---- architectures ------------------------------------------------------------------------


def test_every_official_architecture_is_a_registered_student():
    assert set(CLIP_STUDENTS.values()) == set(CLIP_CONFIGS) == set(CLIP_RELEASES)
    for name in [*CLIP_STUDENTS, "clip-checkpoint", "hf-clip", "mobilenetv2-minilm"]:
        assert name in list_students()


@pytest.mark.parametrize("arch", list(CLIP_CONFIGS))
def test_state_dict_layout_is_the_official_one(arch, official_shapes):
    """Keys, order and shapes equal the official CUSA ``CLIP`` class's (fixture), on meta tensors."""
    official = official_shapes[arch]
    assert CLIP_CONFIGS[arch].to_dict() == official["config"]
    with torch.device("meta"):
        model = ClipStudent(CLIP_CONFIGS[arch])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official["state_dict"])
    assert ours == official["state_dict"]
    assert "logit_scale" not in ours
    # Inference from shapes (build_model's rules) gives the architecture back, with the keys
    # OpenAI's TorchScript checkpoints add.
    with_extras = _meta_state_dict(official["state_dict"])
    with_extras.update(
        {k: torch.tensor(1) for k in ("logit_scale", "input_resolution", "context_length")}
    )
    assert clip_config_from_state_dict(with_extras) == CLIP_CONFIGS[arch]


@pytest.mark.parametrize(
    ("name", "dim", "side"), [("clip-rn50", 1024, 224), ("clip-vit-b32", 512, 224)]
)
@pytest.mark.slow
def test_random_full_size_students_encode_real_data(name, dim, side, coco_example, official_shapes):
    student = build_student(name, pretrained=False, freeze="none")
    arch = CLIP_STUDENTS[name]
    assert {k: list(v.shape) for k, v in student.state_dict().items()} == official_shapes[arch][
        "state_dict"
    ]
    assert student.weights_path is None
    image = next((coco_example / "pics").glob("*.jpg")).read_bytes()
    pixels = student.preprocess_image(image)
    assert pixels.shape == (3, side, side) and pixels.dtype == torch.float32
    with torch.no_grad():
        img = student.encode_image(pixels[None])
        txt = student.encode_text(["a dog on a couch", "two trains"])
    assert img.shape == (1, dim) and txt.shape == (2, dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_freeze_and_modes(golden, tiny_weights):
    student = load_clip(None, tiny_weights, freeze="image")
    assert not any(p.requires_grad for p in student.visual.parameters())
    text_params = [n for n, p in student.named_parameters() if not n.startswith("visual.")]
    assert text_params and all(
        p.requires_grad for n, p in student.named_parameters() if n in text_params
    )
    student.train()
    assert student.training and not student.visual.training
    both = load_clip(None, tiny_weights, freeze="both")
    assert not any(p.requires_grad for p in both.parameters())
    with pytest.raises(ConfigError, match="freeze must be one of"):
        load_clip(None, tiny_weights, freeze="visual")  # type: ignore[arg-type]


def test_preprocess_is_the_clip_transform_at_the_model_size(tiny_weights, coco_example):
    student = load_clip(None, tiny_weights)
    data = next((coco_example / "pics").glob("*.jpg")).read_bytes()
    expected = torch.from_numpy(clip_transform(32).from_bytes(data))
    assert torch.equal(student.preprocess_image(data), expected)


def test_bad_inputs_are_clear_errors(tiny_weights):
    student = load_clip(None, tiny_weights)
    with pytest.raises(ConfigError, match="vocabulary of 64 tokens"):
        student.encode_text(["a cat"])
    with pytest.raises(ConfigError, match=r"encode_image expects \(B, 3, H, W\)"):
        student.encode_image(torch.zeros(3, 32, 32))
    with pytest.raises(ConfigError, match=r"encode_text expects \(B, L<=16\)"):
        student.encode_text(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="do not pass weights too"):
        build_student("clip-rn50", pretrained=False, weights=tiny_weights)
    with pytest.raises(ConfigError, match="unknown CLIP architecture 'ViT-H/14'"):
        load_clip("ViT-H/14")


# ---- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_reproduces_the_official_ids():
    golden = json.loads((FIXTURES / "clip_tokenizer_golden.json").read_text())
    texts = [case["text"] for case in golden["cases"]]
    ids = ClipTokenizer()(texts)
    assert ids.shape == (len(texts), 77) and ids.dtype == torch.long
    for case, row in zip(golden["cases"], ids.tolist(), strict=True):
        n = len(case["ids"])
        assert row[:n] == case["ids"], case["text"]
        assert all(v == 0 for v in row[n:])
    long = next(c for c in golden["cases"] if c["num_bpe_tokens_untruncated"] > 75)
    assert len(long["ids"]) == 77 and long["ids"][0] == SOT_ID and long["ids"][-1] == EOT_ID


def test_tokenizer_details():
    from cusa_train.students.clip_tokenizer import BPE_VOCAB_SHA256, bpe_vocab_path

    assert sha256_file(str(bpe_vocab_path())) == BPE_VOCAB_SHA256  # the openai/CLIP file
    tok = default_tokenizer()
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (SOT_ID, EOT_ID)
    assert tok.decode(tok.encode("A  Dog&amp;amp;cat")) == "a dog & cat "
    with pytest.raises(ConfigError, match="single str"):
        tok("a cat")
    with pytest.raises(ConfigError, match="over the context length 5"):
        tok(["a dog on a red couch"], context_length=5, truncate=False)
    short = tok(["a dog on a red couch"], context_length=5)
    assert short[0].tolist()[-1] == EOT_ID and short.shape == (1, 5)


# ---- weights -----------------------------------------------------------------------------


def test_release_urls_carry_their_sha256():
    for arch, rel in CLIP_RELEASES.items():
        assert (
            rel.url == f"https://openaipublic.azureedge.net/clip/models/{rel.sha256}/{rel.filename}"
        )
        assert len(rel.sha256) == 64, arch


@pytest.fixture()
def offline_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CUSA_OFFLINE", "1")
    return tmp_path


def test_offline_and_missing_names_file_hash_and_place(offline_home):
    rel = CLIP_RELEASES["ViT-B/32"]
    where = str(offline_home / ".cache" / "clip" / "ViT-B-32.pt")
    with pytest.raises(WeightsError, match="OpenAI CLIP ViT-B/32 weights not found") as info:
        build_student("clip-vit-b32")
    message = str(info.value)
    for part in (rel.filename, rel.sha256, rel.url, where, "weights: PATH", "pretrained: false"):
        assert part in message
    with pytest.raises(WeightsError, match=r"RN50x64\.pt \(SHA-256 be1cfb55"):
        resolve_clip_weights("RN50x64")


def test_cached_file_with_wrong_checksum_is_refused(offline_home):
    cached = offline_home / ".cache" / "clip" / "RN50.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the release")
    with pytest.raises(WeightsError, match="checksum mismatch.*RN50.pt.*cached OpenAI CLIP RN50"):
        build_student("clip-rn50")
    custom = offline_home / "elsewhere"
    (custom / "RN50.pt").parent.mkdir()
    (custom / "RN50.pt").write_bytes(b"nope")
    with pytest.raises(WeightsError, match="checksum mismatch"):
        build_student("clip-rn50", cache_dir=custom)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_is_loaded_only_for_official_hashes(
    golden, tiny_weights, tmp_path, monkeypatch
):
    student = load_clip(None, tiny_weights)
    data = golden["data"]
    traced = torch.jit.trace(student, (data["images"][:2], data["tokens"][:2]), check_trace=False)
    archive = tmp_path / "tiny_jit.pt"
    traced.save(str(archive))
    with pytest.raises(WeightsError, match="TorchScript archive whose SHA-256 .* refusing"):
        load_clip(None, archive)
    monkeypatch.setattr(clip_module, "_OFFICIAL_SHA256", {sha256_file(archive)})
    state = load_openai_checkpoint(archive)
    again = build_model_from_openai_state_dict(state)
    for key, value in student.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


# ---- the Hugging Face adapter through the registry ---------------------------------------------


@pytest.mark.slow
def test_hf_clip_student_from_a_local_folder(tmp_path, coco_example):
    """``hf-clip`` builds HFClipStudent from a tiny random CLIPModel saved offline."""
    import gzip

    transformers = pytest.importorskip("transformers")
    from cusa_train.students.clip_tokenizer import bpe_vocab_path

    tok = default_tokenizer()
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder))
    merges = gzip.decompress(bpe_vocab_path().read_bytes()).decode("utf-8").split("\n")[1:48895]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf_tokenizer = transformers.CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    )
    hf_tokenizer.save_pretrained(str(tmp_path))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = transformers.CLIPConfig(
        text_config={**small, "num_attention_heads": 2},
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(tmp_path))
    student = build_student("hf-clip", name_or_path=str(tmp_path))
    assert type(student).__name__ == "HFClipStudent" and student.image_dim == 16
    image = next((coco_example / "pics").glob("*.jpg")).read_bytes()
    with torch.no_grad():
        img = student.encode_image(student.preprocess_image(image)[None])
        txt = student.encode_text(["a dog on a couch", "two trains"])
    assert img.shape == (1, 16) and txt.shape == (2, 16)
    # The HF tokenizer made from the packaged vocabulary agrees with ours.
    hf_ids = student.tokenizer(["a dog on a couch"])["input_ids"][0]
    assert hf_ids == tok(["a dog on a couch"])[0, : len(hf_ids)].tolist()
