"""The paper's uni-modal protocols exactly (issue 24, items 1 and 2).

1. ``cusa eval --task image-retrieval|sts`` scores what the official ``evaluation_img.py`` /
   ``evaluation_sts.py`` score, ``encode_*(cross_modal=False)``: the USA head, or for a model
   trained without USA heads (the paper's ``only_contrastive`` baseline) the backbone features.
2. ``--protocol official|strict`` for image rank-1: ``official`` is the official ``get_metric``
   (a query's exact duplicate, or the query itself, can be its hit), ``strict`` excludes the query
   and counts ties as misses; measured here on a fixture with duplicate images.

Fixtures: real images of the embedded COCO sample in the SOP layout (duplicates are byte copies),
a tiny real CusaModel (tests/cusa_train/tiny_student.py), SentEval files from
tests/cusa_train/benchmark_layouts.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_layouts import sample_images, write_senteval
from tiny_student import TinyDualEncoder
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig
from cusa_train.evaluation.evaluate import (
    EvalConfig,
    evaluate_image_benchmarks,
    evaluate_sts_benchmarks,
)
from cusa_train.evaluation.metrics import nearest_neighbour_rank1
from cusa_train.evaluation.sts_benchmarks import SENTEVAL_STS_TASKS, load_sts_task
from cusa_train.wrapper import CusaModel


def tiny_model(usa: bool) -> CusaModel:
    torch.manual_seed(0)
    loss = LossConfig() if usa else LossConfig.from_dict({"usa": {"enabled": False}})
    return CusaModel(TinyDualEncoder(), loss, embed_dim=20, gather=False).eval()


# ---- the official get_metric, transcribed with torch (evaluation_img.py) -------------------


def _euclidean_distance(x, y, topk=2):
    m, n = x.size(0), y.size(0)
    xx = torch.pow(x, 2).sum(1, keepdim=True).expand(m, n)
    yy = torch.pow(y, 2).sum(1, keepdim=True).expand(n, m).t()
    dist = xx + yy
    dist.addmm_(mat1=x, mat2=y.t(), beta=1, alpha=-2)
    dist = dist.clamp(min=1e-12).sqrt()
    return torch.topk(dist, topk, largest=False)


def _official_get_metric(query, query_label, gallery=None, gallery_label=None):
    query = torch.nn.functional.normalize(torch.as_tensor(query, dtype=torch.float32))
    num_feat, preds = query.size(0), []
    if gallery is None:
        for idx in range(0, num_feat, 128):
            _, index_pt = _euclidean_distance(query[idx : idx + 128], query)
            preds.append(index_pt.numpy()[:, 1])
        labels = np.asarray(query_label)
        return float(np.sum(labels == labels[np.concatenate(preds)]) / num_feat) * 100
    gallery = torch.nn.functional.normalize(torch.as_tensor(gallery, dtype=torch.float32))
    for idx in range(0, num_feat, 128):
        _, index_pt = _euclidean_distance(query[idx : idx + 128], gallery)
        preds.append(index_pt.numpy()[:, 0])
    pred = np.concatenate(preds)
    return (
        float(np.sum(np.asarray(query_label) == np.asarray(gallery_label)[pred]) / num_feat) * 100
    )


# ---- 2. the rank-1 protocols -----------------------------------------------------------------


def _duplicates() -> tuple[np.ndarray, list[int]]:
    """Rows 0/1, 2/3 and 4/5 are exact duplicates with different labels; 6..9 are distinct, and
    each has one positive among them."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(7, 8)).astype(np.float32)
    x = np.concatenate([base[[0, 0, 1, 1, 2, 2]], base[3:6], base[3:4] + 0.01])
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 6]
    return x, labels


def test_official_protocol_is_the_official_get_metric_and_differs_on_duplicates():
    x, labels = _duplicates()
    strict = nearest_neighbour_rank1(x, labels)
    official = nearest_neighbour_rank1(x, labels, protocol="official")
    assert official.r1 == pytest.approx(_official_get_metric(x, labels))
    # strict: each duplicate's nearest item is its twin of another class, a miss; 6 and 9 hit.
    assert (strict.num_hits, strict.num_queries) == (2, 10)
    # official: topk(2) puts the query and its twin at the same distance, so for some queries
    # the 2nd item is the query itself, a hit.
    assert official.num_hits > strict.num_hits
    # With a gallery (In-Shop) both agree when nothing ties.
    g, gl = x[6:], labels[6:]
    q, ql = x[:6] + 0.001, labels[:6]
    assert nearest_neighbour_rank1(q, ql, g, gl, protocol="official").r1 == pytest.approx(
        _official_get_metric(q, ql, g, gl)
    )
    with pytest.raises(ConfigError, match="protocol must be one of.*'loose'"):
        nearest_neighbour_rank1(x, labels, protocol="loose")


@pytest.mark.parametrize("seed", [0, 1])
def test_both_protocols_agree_without_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 40, size=300)
    official = nearest_neighbour_rank1(x, labels, protocol="official")
    assert official.r1 == pytest.approx(_official_get_metric(x, labels))
    assert official.r1 == pytest.approx(nearest_neighbour_rank1(x, labels).r1)


def _sop_with_duplicates(root: Path) -> tuple[list[Path], list[int]]:
    """SOP layout: 8 distinct real images in 4 classes, plus byte copies of 4 of them filed under
    another class (a duplicate photo listed for two products, as real SOP has)."""
    folder = root / "sop" / "Stanford_Online_Products"
    pics = sample_images()[:8]
    rows = ["image_id class_id super_class_id path"]
    entries = [(pics[i], 11319 + i // 2) for i in range(8)]
    entries += [(pics[i], 11330 + i) for i in (0, 2, 4, 6)]  # duplicates, other classes
    for n, (src, class_id) in enumerate(entries, 1):
        rel = f"class_1_final/{class_id}_{n}.JPG"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / rel)
        rows.append(f"{n} {class_id} 1 {rel}")
    (folder / "Ebay_test.txt").write_text("\n".join(rows) + "\n")
    return [folder / r.split()[3] for r in rows[1:]], [c - 1 for _, c in entries]


def test_image_retrieval_defaults_to_the_official_protocol_and_strict_differs(tmp_path):
    paths, labels = _sop_with_duplicates(tmp_path)
    model = tiny_model(usa=True)
    official = evaluate_image_benchmarks(model, "sop", tmp_path, batch_size=4)
    strict = evaluate_image_benchmarks(model, "sop", tmp_path, batch_size=4, protocol="strict")
    assert official.info["rank1_protocol"] == "official"
    assert strict.info["rank1_protocol"] == "strict"
    with torch.no_grad():
        pixels = torch.stack([model.student.preprocess_image(p.read_bytes()) for p in paths])
        usa = model.official_encode_image(pixels, cross_modal=False).numpy()
        cross = model.official_encode_image(pixels).numpy()
    assert official["sop_r1_usa"] == pytest.approx(_official_get_metric(usa, labels))
    assert official["sop_r1"] == pytest.approx(_official_get_metric(cross, labels))
    # The 8 images that have a byte-identical copy in another class: strict counts each as a
    # miss (its twin ties with itself); official lets topk pick the query itself for some.
    for sfx in ("", "_usa"):
        assert official[f"sop_r1{sfx}"] > strict[f"sop_r1{sfx}"]
        assert strict[f"sop_r1{sfx}"] == pytest.approx(
            nearest_neighbour_rank1(usa if sfx else cross, labels).r1
        )
    assert "official protocol" in official.to_table()
    assert "strict protocol" in strict.to_table()


def test_protocol_option_is_checked():
    assert EvalConfig(task="image-retrieval", checkpoint="c.pt", root=".", dataset="cub",
                      protocol="strict").protocol == "strict"  # fmt: skip
    with pytest.raises(ConfigError, match="--protocol must be one of official, strict"):
        EvalConfig(task="image-retrieval", checkpoint="c.pt", root=".", dataset="cub",
                   protocol="exact")  # fmt: skip
    with pytest.raises(ConfigError, match="--task sts has no such choice"):
        EvalConfig(task="sts", checkpoint="c.pt", root=".", protocol="official")


def test_cli_protocol_reaches_the_report(tmp_path, monkeypatch):
    from cusa_train.config import TrainConfig
    from cusa_train.students.registry import STUDENTS

    monkeypatch.setitem(STUDENTS._entries, "tiny-fidelity-test", TinyDualEncoder)
    config = TrainConfig.from_dict({"model": {"student": "tiny-fidelity-test", "embed_dim": 20}})
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"config": config.to_dict(), "model": tiny_model(usa=True).state_dict(),
                "step": 0}, ckpt)  # fmt: skip
    _sop_with_duplicates(tmp_path)
    base = ["eval", "--checkpoint", str(ckpt), "--task", "image-retrieval", "--dataset", "sop",
            "--root", str(tmp_path), "--device", "cpu", "--json"]  # fmt: skip
    runner = CliRunner()
    got = {}
    for extra in ([], ["--protocol", "strict"], ["--protocol", "official"]):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)
        got[tuple(extra)] = (report["info"]["rank1_protocol"], report["metrics"]["sop_r1_usa"])
    assert got[()] == got[("--protocol", "official")]  # official is the default
    assert got[("--protocol", "strict")][0] == "strict"
    assert got[("--protocol", "strict")][1] < got[()][1]
    res = runner.invoke(app, base + ["--protocol", "exact"])
    assert res.exit_code == 2 and "--protocol must be one of official, strict" in res.output


# ---- 1. the features the official scripts score --------------------------------------------


def test_image_retrieval_scores_the_backbone_of_a_model_without_usa_heads(tmp_path):
    paths, labels = _sop_with_duplicates(tmp_path)
    model = tiny_model(usa=False)
    report = evaluate_image_benchmarks(model, "sop", tmp_path, batch_size=5)
    with torch.no_grad():
        pixels = torch.stack([model.student.preprocess_image(p.read_bytes()) for p in paths])
        backbone = model.official_encode_image(pixels, cross_modal=False)
        cross = model.official_encode_image(pixels)
    # The official encode_image(cross_modal=False) of such a model is the backbone output.
    assert torch.equal(backbone, model.student.encode_image(pixels))
    assert backbone.shape[1] != cross.shape[1] or not torch.allclose(backbone, cross)
    assert report["sop_r1_backbone"] == pytest.approx(_official_get_metric(backbone, labels))
    assert report["sop_r1"] == pytest.approx(_official_get_metric(cross, labels))
    assert "sop_r1_usa" not in report.metrics
    assert report.info["uni_modal_features"] == "backbone"
    table = report.to_table()
    header = next(line for line in table.splitlines() if "backbone" in line and "cross" in line)
    assert header.index("backbone") < header.index("cross")  # official column first
    assert "no USA (uni-modal) heads" in report.info["heads"]


def test_image_retrieval_of_a_cusa_model_scores_the_usa_head(tmp_path):
    _sop_with_duplicates(tmp_path)
    report = evaluate_image_benchmarks(tiny_model(usa=True), "sop", tmp_path)
    assert report.info["uni_modal_features"] == "usa"
    assert {"sop_r1", "sop_r1_usa"} <= set(report.metrics)
    assert not any(k.endswith("_backbone") for k in report.metrics)


def test_sts_scores_the_backbone_of_a_model_without_usa_heads(tmp_path):
    from scipy.stats import spearmanr

    root = tmp_path / "data"
    write_senteval(root)
    model = tiny_model(usa=False)
    report = evaluate_sts_benchmarks(model, root, tasks="STSBenchmark,SICKRelatedness")
    assert set(report.metrics) == {
        "stsb", "stsb_backbone", "sickr", "sickr_backbone", "sts_avg", "sts_avg_backbone",
    }  # fmt: skip
    assert report.info["uni_modal_features"] == "backbone"
    for task in SENTEVAL_STS_TASKS:
        if task.key not in ("stsb", "sickr"):
            continue
        test = load_sts_task(root, task)["test"]
        for sfx, cross_modal in (("_backbone", False), ("", True)):
            with torch.no_grad():
                a = model.official_encode_text(list(test.sentence1), cross_modal=cross_modal)
                b = model.official_encode_text(list(test.sentence2), cross_modal=cross_modal)
            sim = torch.nn.functional.cosine_similarity(a, b).numpy()
            rho = 100 * spearmanr(sim, test.scores).statistic
            assert report[f"{task.key}{sfx}"] == pytest.approx(rho, abs=1e-4), (task.name, sfx)
    assert report["stsb_backbone"] != pytest.approx(report["stsb"])
    header = next(line for line in report.to_table().splitlines() if "backbone" in line)
    assert header.index("backbone") < header.index("cross")
