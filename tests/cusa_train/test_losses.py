from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig
from cusa_train.losses import (
    LOSS_KEYS,
    CrossModalSoftLabelLoss,
    CusaLoss,
    CusaTemperatures,
    MultiPositiveInfoNCELoss,
    UniModalSoftLabelLoss,
    combine_teacher_similarities,
    cosine_similarity_matrix,
    losses,
    multi_positive_targets,
)
from cusa_train.wrapper import CusaModel, convert_official_state_dict

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "cusa_loss_golden.json"
CASES = [(cfg, mode) for cfg in ("cusa.yaml", "test.yaml") for mode in ("mean", "sum")]


class IdentityStudent(nn.Module):
    """The golden files replaced the CLIP backbone by the identity; so do we."""

    image_dim = text_dim = 32

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _tensor(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


@pytest.mark.parametrize(("cfg", "mode"), CASES)
def test_official_parity_through_cusa_model(golden, cfg, mode):
    case = golden[f"{cfg}:{mode}"]
    loss_config = LossConfig.from_official(case["config"])
    model = CusaModel(IdentityStudent(), loss_config)
    state = convert_official_state_dict({k: _tensor(v) for k, v in case["params"].items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    out = model(
        _tensor(case["image_features"]),
        _tensor(case["text_features"]),
        torch.tensor(case["idx"]),
        _tensor(case["teacher_image"]),
        _tensor(case["teacher_text"]),
    )
    assert set(out) == set(LOSS_KEYS)
    for ours, theirs in (
        ("itr", "contrastive_loss"),
        ("csa", "cross_modal_loss"),
        ("usa", "uni_modal_loss"),
    ):
        assert out[ours].item() == pytest.approx(case[theirs], rel=1e-5, abs=1e-6), ours
    assert out["loss"].item() == pytest.approx(
        case["contrastive_loss"] + case["cross_modal_loss"] + case["uni_modal_loss"], rel=1e-5
    )


@pytest.mark.parametrize(("cfg", "mode"), CASES)
def test_official_parity_of_bare_loss_modules(golden, cfg, mode):
    """The loss modules alone, fed by heads written out with plain torch ops."""
    case = golden[f"{cfg}:{mode}"]
    p = {k: _tensor(v) for k, v in case["params"].items()}
    c = case["config"]

    def head(x, name):
        x = F.layer_norm(
            x, (32,), p[f"ln_{name}_projection.weight"], p[f"ln_{name}_projection.bias"]
        )
        return F.linear(x, p[f"{name}_projection.weight"], p[f"{name}_projection.bias"])

    def tau(name, side, lo_hi):
        value = p.get(name, p.get(f"{name}_{side}"))
        return value.clamp(*lo_hi)

    img, txt = _tensor(case["image_features"]), _tensor(case["text_features"])
    t_img = cosine_similarity_matrix(_tensor(case["teacher_image"]))
    t_txt = cosine_similarity_matrix(_tensor(case["teacher_text"]))
    sim = cosine_similarity_matrix(head(img, "cross_image"), head(txt, "cross_text"))
    con = c["contrastive"]
    itr = MultiPositiveInfoNCELoss(mode)(
        sim, p["tau"].clamp(con["tau_min"], con["tau_max"]), torch.tensor(case["idx"])
    )
    assert itr.item() == pytest.approx(case["contrastive_loss"], rel=1e-5)

    cs = c["cross_softlabel"]
    shared = "cross_tau" in p
    rng = {
        side: (
            (
                (cs["image_tau_min"] + cs["text_tau_min"]) / 2,
                (cs["image_tau_max"] + cs["text_tau_max"]) / 2,
            )
            if shared
            else (cs[f"{side}_tau_min"], cs[f"{side}_tau_max"])
        )
        for side in ("image", "text")
    }
    srng = {
        side: (
            (
                (cs["the_softlabel_image_tau_min"] + cs["the_softlabel_text_tau_min"]) / 2,
                (cs["the_softlabel_image_tau_max"] + cs["the_softlabel_text_tau_max"]) / 2,
            )
            if "cross_the_softlabel_tau" in p
            else (cs[f"the_softlabel_{side}_tau_min"], cs[f"the_softlabel_{side}_tau_max"])
        )
        for side in ("image", "text")
    }
    csa = CrossModalSoftLabelLoss(cs["cross_softlabel_mode"])(
        sim,
        t_img,
        t_txt,
        tau_i2t=tau("cross_tau", "image", rng["image"]),
        tau_t2i=tau("cross_tau", "text", rng["text"]),
        teacher_tau_image=tau("cross_the_softlabel_tau", "image", srng["image"]),
        teacher_tau_text=tau("cross_the_softlabel_tau", "text", srng["text"]),
    )
    assert (csa * cs["rate"]).item() == pytest.approx(case["cross_modal_loss"], rel=1e-5)

    us = c["uni_softlabel"]
    uni_img = cosine_similarity_matrix(head(img, "uni_image"))
    uni_txt = cosine_similarity_matrix(head(txt, "uni_text"))
    if us["use_cross_softlabel_same_softlabel_tau"]:
        st_img = tau("cross_the_softlabel_tau", "image", srng["image"])
        st_txt = tau("cross_the_softlabel_tau", "text", srng["text"])
    else:
        st_img = tau(
            "uni_the_softlabel_tau",
            "image",
            (us["the_softlabel_image_tau_min"], us["the_softlabel_image_tau_max"]),
        )
        st_txt = tau(
            "uni_the_softlabel_tau",
            "text",
            (us["the_softlabel_text_tau_min"], us["the_softlabel_text_tau_max"]),
        )
    usa = UniModalSoftLabelLoss()(
        uni_img,
        uni_txt,
        t_img,
        t_txt,
        tau_image=tau("uni_tau", "image", (us["image_tau_min"], us["image_tau_max"])),
        tau_text=tau("uni_tau", "text", (us["text_tau_min"], us["text_tau_max"])),
        teacher_tau_image=st_img,
        teacher_tau_text=st_txt,
    )
    assert (usa * us["rate"]).item() == pytest.approx(case["uni_modal_loss"], rel=1e-5)


def test_official_cusa_yaml_maps_to_the_defaults(golden):
    assert LossConfig.from_official(golden["cusa.yaml:mean"]["config"]) == LossConfig()


def test_infonce_sum_mode_is_standard_cross_entropy():
    torch.manual_seed(0)
    sim = cosine_similarity_matrix(torch.randn(6, 16), torch.randn(6, 16))
    tau = 0.07
    labels = torch.arange(6)
    expected = (F.cross_entropy(sim / tau, labels) + F.cross_entropy(sim.t() / tau, labels)) / 2
    assert MultiPositiveInfoNCELoss("sum")(sim, tau).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    # The official "mean" mode also averages over the columns: the same loss divided by B.
    assert MultiPositiveInfoNCELoss("mean")(sim, tau).item() == pytest.approx(
        expected.item() / 6, rel=1e-6
    )


def test_multi_positive_targets_share_mass_between_captions_of_one_image():
    targets = multi_positive_targets(torch.tensor([7, 7, 3, 7]), 4)
    assert torch.allclose(targets[0], torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))
    assert torch.allclose(targets[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_multi_positive_infonce_by_hand():
    # Pairs 0 and 1 share image 5 (two augmentations, two captions).
    sim = torch.tensor(
        [
            [0.9, 0.5, -0.2, 0.0],
            [0.6, 0.8, -0.2, 0.1],
            [-0.1, -0.3, 0.8, 0.1],
            [0.0, 0.1, 0.2, 0.7],
        ]
    )
    targets = torch.tensor(
        [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    )  # half the target mass on each caption of image 5
    tau = 0.1
    i2t = -(F.log_softmax(sim / tau, 1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(sim.t() / tau, 1) * targets).sum(1).mean()
    loss = MultiPositiveInfoNCELoss("sum")(sim, tau, torch.tensor([5, 5, 1, 2]))
    assert loss.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)
    single = MultiPositiveInfoNCELoss("sum")(sim, tau, torch.tensor([5, 6, 1, 2]))
    assert single.item() != pytest.approx(loss.item(), rel=1e-3)


def test_soft_label_losses_vanish_when_student_matches_teacher():
    torch.manual_seed(2)
    t_img = cosine_similarity_matrix(torch.randn(5, 12))
    t_txt = cosine_similarity_matrix(torch.randn(5, 9))
    # Student i2t similarities equal to the image teacher's and t2i equal to the text teacher's
    # cannot both hold for one matrix unless the teachers agree; so use agreeing teachers.
    taus = {"teacher_tau_image": 0.5, "teacher_tau_text": 0.5}
    csa = CrossModalSoftLabelLoss("each")(t_img, t_img, t_img, tau_i2t=0.5, tau_t2i=0.5, **taus)
    assert csa.item() == pytest.approx(0.0, abs=1e-6)
    uni = {"tau_image": 0.3, "tau_text": 0.3, "teacher_tau_image": 0.3, "teacher_tau_text": 0.3}
    usa = UniModalSoftLabelLoss()(t_img, t_txt, t_img, t_txt, **uni)
    assert usa.item() == pytest.approx(0.0, abs=1e-6)
    assert UniModalSoftLabelLoss()(t_txt, t_img, t_img, t_txt, **uni).item() > 0.01


def test_csa_combine_modes():
    a = torch.tensor([[1.0, -0.5], [0.25, 1.0]])
    b = torch.tensor([[1.0, 0.5], [0.64, 1.0]])
    assert combine_teacher_similarities(a, b, "each") == (a, b)
    add_i, add_t = combine_teacher_similarities(a, b, "add")
    assert torch.allclose(add_i, (a + b) / 2) and add_i is add_t
    dot, _ = combine_teacher_similarities(a, b, "dot")
    assert torch.allclose(dot, torch.tensor([[1.0, 0.0], [0.4, 1.0]]))
    with pytest.raises(ConfigError, match="'max'.*each"):
        CrossModalSoftLabelLoss("max")  # type: ignore[arg-type]


def test_bad_mode_and_weights_are_rejected():
    with pytest.raises(ConfigError, match="InfoNCE mode 'avg'"):
        MultiPositiveInfoNCELoss("avg")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="csa_weight=-0.1 is negative"):
        CusaLoss(csa_weight=-0.1)


def test_cusa_loss_dict_keys_and_switched_off_terms():
    torch.manual_seed(3)
    img, txt = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    temps = CusaTemperatures(itr=torch.tensor(0.05))
    out = CusaLoss(csa_weight=0.0, usa_weight=0.0)(img, txt, None, None, temps)
    assert set(out) == set(LOSS_KEYS)
    assert out["csa"].item() == 0.0 and out["usa"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["itr"].item())
    out["loss"].backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="no teacher features"):
        CusaLoss()(img, txt, None, None, temps)


def test_teacher_features_get_no_gradient():
    torch.manual_seed(4)
    t_img = torch.randn(4, 6, requires_grad=True)
    t_txt = torch.randn(4, 5, requires_grad=True)
    emb = torch.randn(4, 8, requires_grad=True)
    one = torch.tensor(0.5)
    temps = CusaTemperatures(
        itr=one, csa_i2t=one, csa_t2i=one, csa_teacher_image=one, csa_teacher_text=one,
        usa_image=one, usa_text=one, usa_teacher_image=one, usa_teacher_text=one,
    )  # fmt: skip
    out = CusaLoss()(
        emb, emb * 2, t_img, t_txt, temps, uni_image_embeds=emb, uni_text_embeds=emb + 1
    )
    out["loss"].backward()
    assert t_img.grad is None and t_txt.grad is None
    assert emb.grad is not None


def test_loss_registry_lists_the_three_terms():
    assert losses.list() == ["csa", "infonce", "usa"]
    assert losses.get("csa") is CrossModalSoftLabelLoss
