"""The open_clip adapter, checked against the official training-step fixture.

open_clip needs torchvision, which does not import beside this project's default torch 2.13
(``operator torchvision::nms does not exist``), so these tests skip in the default environment
and run where ``torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0`` are installed
(the pair of torch and torchvision versions that import together). They show that:

- open_clip's ``build_model_from_openai_state_dict`` and our native ``cusa_train.students.clip`` compute
  the same features from the same OpenAI-format weights (the fixture's tiny CLIP), and that
  those are the official run's features;
- a ``CusaModel`` around ``OpenClipStudent`` trains the official six steps with the official
  losses (the same check as ``test_official_parity.py``, with open_clip as the backbone).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip needs torchvision; install torch==2.14.1 torchvision==0.29.1 open_clip_torch",
    exc_type=ImportError,
)

from test_official_parity import (  # noqa: E402
    GOLDEN,
    GoldenPairs,
    _config,
    _fill_store,
)

from cusa_train.students.adapters import OpenClipStudent  # noqa: E402
from cusa_train.students.clip_weights import build_model_from_openai_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


def _open_clip_model(golden: dict) -> torch.nn.Module:
    """The fixture's tiny CLIP through open_clip's OpenAI loader (the README's two extra steps)."""
    sd = golden["cases"]["cusa"]["initial_state_dict"]
    openai = {
        k.removeprefix("clip_model."): v for k, v in sd.items() if k.startswith("clip_model.")
    }
    openai["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # open_clip requires the key
    model = open_clip.model.build_model_from_openai_state_dict(dict(openai))
    model = model.float()
    model.load_state_dict(openai)  # .float() alone keeps the fp16 rounding of the build
    return model.eval()


def test_open_clip_and_native_clip_compute_the_official_features(golden):
    step0 = golden["cases"]["cusa"]["steps"][0]
    batch = step0["batch_index"]
    images, tokens = golden["data"]["images"][batch], golden["data"]["tokens"][batch]
    sd = golden["cases"]["cusa"]["initial_state_dict"]
    native = build_model_from_openai_state_dict(
        {k.removeprefix("clip_model."): v for k, v in sd.items() if k.startswith("clip_model.")}
    ).eval()
    student = OpenClipStudent(_open_clip_model(golden))
    with torch.no_grad():
        for ours, theirs, want in (
            (
                native.encode_image(images),
                student.encode_image(images),
                step0["clip_image_features"],
            ),
            (native.encode_text(tokens), student.encode_text(tokens), step0["clip_text_features"]),
        ):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            torch.testing.assert_close(theirs, want, rtol=0, atol=1e-6)


def test_cusa_model_around_open_clip_trains_the_official_steps(golden, tmp_path):
    from cusa_train.checkpoints import METRICS_NAME
    from cusa_train.trainer import train

    torch.set_num_threads(1)
    data, want = golden["data"], golden["cases"]["cusa"]
    _fill_store(tmp_path / "store", data)
    config = _config("cusa", golden, tmp_path)
    student = OpenClipStudent(_open_clip_model(golden))
    student.model.train()
    # The official heads and temperatures come from model.init_from; the student is open_clip's.
    result = train(
        config.replace(
            model=config.model.__class__(**{**config.model.__dict__, "student": "unused"})
        ),
        student=student,
        dataset=GoldenPairs(data),
    )
    records = [
        json.loads(line) for line in (result.output_dir / METRICS_NAME).read_text().splitlines()
    ]
    for ours, theirs in zip(records, want["steps"], strict=True):
        assert ours["lr"] == theirs["lr"][0]
        for key, name in (("itr", "contrastive_loss"), ("csa", "cross_modal_loss"),
                          ("usa", "uni_modal_loss")):  # fmt: skip
            assert ours[key] == pytest.approx(theirs[name], rel=1e-5), (theirs["step"], key)
