from __future__ import annotations

import pytest
import torch
from tiny_student import TinyDualEncoder
from torch import nn

from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig
from cusa_train.losses import LOSS_KEYS
from cusa_train.wrapper import CusaModel, ProjectionHead, convert_official_state_dict

CAPTIONS = ["a dog on a couch", "the same dog, asleep", "a pizza", "a red bus", "a cat", "two cats"]
IMAGE_IDS = ["img1", "img1", "img2", "img3", "img4", "img5"]


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return {
        "images": torch.rand(6, 3, 32, 32),
        "texts": CAPTIONS,
        "image_ids": IMAGE_IDS,
        "teacher_image": torch.randn(6, 40),
        "teacher_text": torch.randn(6, 12),
    }


def test_forward_returns_all_terms_and_trains_everything_learnable(batch):
    torch.manual_seed(0)
    model = CusaModel(TinyDualEncoder(), embed_dim=20)
    out = model(**batch)
    assert set(out) == set(LOSS_KEYS)
    assert all(out[k].ndim == 0 and torch.isfinite(out[k]) for k in LOSS_KEYS)
    assert out["loss"].item() == pytest.approx(
        (out["itr"] + out["csa"] + out["usa"]).item(), rel=1e-6
    )
    assert out["csa"] > 0 and out["usa"] > 0
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.student.image_tower[0].weight.grad.abs().sum() > 0
    # The official defaults: learnable itr, csa (shared) and usa image/text taus; fixed teacher tau.
    assert sorted(dict(model.temperatures.named_parameters())) == [
        "temps.csa.value",
        "temps.itr.value",
        "temps.usa_image.value",
        "temps.usa_text.value",
    ]
    assert sorted(model.temperature_values()) == [
        "csa",
        "csa_teacher",
        "itr",
        "usa_image",
        "usa_text",
    ]
    assert len(model.cusa_parameters()) == len(list(model.parameters())) - len(
        list(model.student.parameters())
    )


def test_temperatures_are_clamped_before_use(batch):
    model = CusaModel(TinyDualEncoder(), embed_dim=20)
    with torch.no_grad():
        model.temperatures.temps["itr"].value.fill_(5.0)
        model.temperatures.temps["csa"].value.fill_(1e-4)
    model(**batch)
    values = model.temperature_values()
    assert values["itr"] == pytest.approx(0.1)  # official max
    assert values["csa"] == pytest.approx(0.1)  # official min
    assert values["csa_teacher"] == pytest.approx(1.0)


def test_usa_can_reuse_csa_temperatures_and_the_heads_are_separate(batch):
    loss = LossConfig.from_dict({"usa": {"tau": "csa"}})
    model = CusaModel(TinyDualEncoder(), loss, embed_dim=20)
    assert sorted(model.temperature_values()) == ["csa", "csa_teacher", "itr"]
    assert model.temperatures.roles["usa_image"] == "csa"
    assert isinstance(model.uni_image_head, ProjectionHead)
    assert model.uni_image_head is not model.cross_image_head
    img = model.encode_image(batch["images"])
    uni = model.encode_image(batch["images"], uni_modal=True)
    assert img.shape == uni.shape == (6, 20) and not torch.allclose(img, uni)
    assert model.encode_text(CAPTIONS, uni_modal=True).shape == (6, 20)


def test_infonce_only_needs_no_teacher(batch):
    loss = LossConfig.from_dict({"csa": {"enabled": False}, "usa": {"enabled": False}})
    model = CusaModel(TinyDualEncoder(), loss, embed_dim=20)
    assert model.uni_image_head is None and not model.needs_teachers
    out = model(batch["images"], batch["texts"], batch["image_ids"])
    assert out["csa"].item() == 0.0 and out["usa"].item() == 0.0 and out["itr"] > 0
    with pytest.raises(ConfigError, match="no uni-modal heads"):
        model.encode_image(batch["images"], uni_modal=True)


def test_string_ids_make_multi_positives(batch):
    torch.manual_seed(0)
    model = CusaModel(TinyDualEncoder(), embed_dim=20)
    same = model(**batch)["itr"]
    distinct = model(**{**batch, "image_ids": [f"x{i}" for i in range(6)]})["itr"]
    as_ints = model(**{**batch, "image_ids": torch.tensor([1, 1, 2, 3, 4, 5])})["itr"]
    assert same.item() != pytest.approx(distinct.item(), rel=1e-4)
    assert same.item() == pytest.approx(as_ints.item(), rel=1e-6)


def test_errors_name_the_fix(batch):
    with pytest.raises(ConfigError, match="set embed_dim"):
        CusaModel(TinyDualEncoder())
    with pytest.raises(ConfigError, match="has no encode_image/encode_text"):
        CusaModel(nn.Linear(3, 3))  # type: ignore[arg-type]

    class NoDims(nn.Module):
        def encode_image(self, x):
            return x

        def encode_text(self, x):
            return x

    with pytest.raises(ConfigError, match="pass image_dim=..., text_dim="):
        CusaModel(NoDims())
    assert CusaModel(NoDims(), image_dim=8, text_dim=8).embed_dim == 8
    model = CusaModel(TinyDualEncoder(), embed_dim=20)
    with pytest.raises(ConfigError, match="no teacher features"):
        model(batch["images"], batch["texts"], batch["image_ids"])
    with pytest.raises(ConfigError, match="unknown official CUSA parameter 'logit_scale'"):
        convert_official_state_dict({"logit_scale": torch.tensor(1.0)})


def test_state_dict_round_trip_keeps_fixed_temperatures(batch):
    torch.manual_seed(0)
    model = CusaModel(TinyDualEncoder(), embed_dim=20)
    with torch.no_grad():
        model.temperatures.temps["csa_teacher"].value.fill_(0.5)
    state = model.state_dict()
    assert "temperatures.temps.csa_teacher.value" in state  # a buffer, saved but not trained
    other = CusaModel(TinyDualEncoder(), embed_dim=20)
    other.load_state_dict(state)
    assert other.temperature_values() == model.temperature_values()
    assert other(**batch)["loss"].item() == pytest.approx(model(**batch)["loss"].item(), rel=1e-6)


def _tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))


def test_hf_clip_adapter_trains_with_cusa_on_real_images():
    """A randomly initialised tiny transformers CLIPModel (no torchvision needed) as the student."""
    from cusa.readers.registry import open_dataset
    from cusa_train.students.adapters import HFClipStudent

    student = HFClipStudent(_tiny_hf_clip())
    assert (student.image_dim, student.text_dim, student.image_size) == (24, 24, 32)
    reader = open_dataset("coco-sample", split="train")
    samples = list(reader.read(reader.shards()[0]))[:4]
    pixels = torch.stack([student.preprocess_image(s.image) for s in samples])  # real COCO images
    assert pixels.shape == (4, 3, 32, 32)
    tokens = {
        "input_ids": torch.randint(2, 100, (4, 9)),
        "attention_mask": torch.ones(4, 9, dtype=torch.long),
    }
    tokens["input_ids"][:, -1] = 1  # eos, which CLIP pools at
    model = CusaModel(student)
    out = model(
        pixels, tokens, [s.image_id for s in samples], torch.randn(4, 10), torch.randn(4, 6)
    )
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert student.model.vision_model.embeddings.patch_embedding.weight.grad is not None
    with pytest.raises(ConfigError, match="no tokenizer"):
        student.encode_text(["a caption"])


def test_open_clip_adapter_says_what_to_install():
    try:
        import open_clip  # noqa: F401
    except (ImportError, RuntimeError):
        from cusa_train.students.adapters import OpenClipStudent

        with pytest.raises(ConfigError, match="pip install open_clip_torch torchvision"):
            OpenClipStudent.from_pretrained("ViT-B-32")
    else:  # pragma: no cover - only where open_clip and torchvision import
        pytest.skip("open_clip is importable here; the adapter's network download is not tested")
