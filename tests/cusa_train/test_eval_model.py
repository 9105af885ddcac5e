"""Evaluation of a model end to end: both heads (USA and cross-modal), the paper's benchmarks
through a checkpoint, `cusa eval` with typer's CliRunner (good and bad input), and the MTEB
encoder wrapper.

The model is a tiny CusaModel around the tiny test student; the benchmark fixtures are real
images and captions of the embedded COCO sample in each benchmark's layout, with labels and
gold scores assigned for the tests (tests/cusa_train/benchmark_layouts.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_layouts import write_all_image_benchmarks, write_senteval
from tiny_student import TinyDualEncoder
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, DatasetError
from cusa.readers import coco_sample_root
from cusa_train.config import TrainConfig
from cusa_train.config.loss import LossConfig
from cusa_train.evaluation.evaluate import (
    HeadEncoder,
    evaluate_image_benchmarks,
    evaluate_model,
    evaluate_sts_benchmarks,
    load_checkpoint_model,
)
from cusa_train.wrapper import CusaModel

NO_USA = {"usa": {"enabled": False}}


def tiny_model(usa: bool = True, seed: int = 0) -> CusaModel:
    torch.manual_seed(seed)
    loss = LossConfig() if usa else LossConfig.from_dict(NO_USA)
    return CusaModel(TinyDualEncoder(), loss, embed_dim=20, gather=False).eval()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("image_benchmarks")
    return root, write_all_image_benchmarks(root)


@pytest.fixture(scope="module")
def senteval_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("senteval") / "data"
    write_senteval(root)
    return root


def _official_rank1(x, labels, g=None, gl=None):
    """Transcription of the official get_metric (see test_eval_benchmarks.py)."""
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    q = norm(x)
    if g is None:
        d = 2 - 2 * q @ q.T
        np.fill_diagonal(d, -1)  # the query itself is the nearest
        pred = np.argsort(d, axis=1, kind="stable")[:, 1]
        return 100 * np.mean(np.asarray(labels) == np.asarray(labels)[pred])
    pred = np.argmin(2 - 2 * q @ norm(g).T, axis=1)
    return 100 * np.mean(np.asarray(labels) == np.asarray(gl)[pred])


@torch.no_grad()
def _heads_of_images(model: CusaModel, paths) -> dict[str, np.ndarray]:
    """Brute force: preprocess every file, run the student, apply each head by hand."""
    pixels = torch.stack([model.student.preprocess_image(Path(p).read_bytes()) for p in paths])
    return {
        "usa": model.encode_image(pixels, uni_modal=True).numpy(),
        "cross": model.encode_image(pixels).numpy(),
    }


def test_image_benchmarks_through_both_heads_equal_brute_force(image_root):
    root, expected = image_root
    model = tiny_model()
    report = evaluate_image_benchmarks(model, "cub,sop,inshop,inat,cars", root, batch_size=5)
    for name in ("cub", "sop", "inat", "cars"):
        paths, labels = expected[name]
        feats = _heads_of_images(model, paths)
        assert report[f"{name}_r1_usa"] == pytest.approx(_official_rank1(feats["usa"], labels))
        assert report[f"{name}_r1"] == pytest.approx(_official_rank1(feats["cross"], labels))
        assert report.counts[f"{name}_queries"] == len(paths)
    (qp, ql), (gp, gl) = expected["inshop"]["query"], expected["inshop"]["gallery"]
    q, g = _heads_of_images(model, qp), _heads_of_images(model, gp)
    assert report["inshop_r1_usa"] == pytest.approx(_official_rank1(q["usa"], ql, g["usa"], gl))
    assert report["inshop_r1"] == pytest.approx(_official_rank1(q["cross"], ql, g["cross"], gl))
    names = ("cub", "sop", "inshop", "inat", "cars")
    assert report["image_avg_r1_usa"] == pytest.approx(
        np.mean([report[f"{n}_r1_usa"] for n in names])
    )
    table = report.to_table()
    assert "CUB-200-2011" in table and "USA head" in table and "Avg." in table


def test_a_model_without_usa_heads_reports_the_cross_modal_column_and_says_so(image_root):
    root, _ = image_root
    report = evaluate_image_benchmarks(tiny_model(usa=False), "cub", root)
    assert "cub_r1" in report.metrics and "cub_r1_usa" not in report.metrics
    # the official evaluation_img.py scores such a model's backbone (issue 24, item 1)
    assert "cub_r1_backbone" in report.metrics
    assert "no USA (uni-modal) heads" in report.info["heads"]
    assert "no USA (uni-modal) heads" in report.to_table()
    assert "image_avg_r1" not in report.metrics  # one benchmark: no average


def test_sts_benchmarks_through_both_heads_equal_brute_force(senteval_root):
    from scipy.stats import spearmanr

    from cusa_train.evaluation.sts_benchmarks import SENTEVAL_STS_TASKS, load_sts_task

    model = tiny_model()
    report = evaluate_sts_benchmarks(model, senteval_root, batch_size=7)
    for head, sfx in (("usa", "_usa"), ("cross", "")):
        values = []
        for task in SENTEVAL_STS_TASKS:
            data = load_sts_task(senteval_root, task)
            keep = data if task.aggregate == "all" else {"test": data["test"]}
            sys, gold = [], []
            # One embedding per distinct sentence (repeated pairs must tie exactly).
            uniq = sorted({x for p in keep.values() for x in (*p.sentence1, *p.sentence2)})
            with torch.no_grad():
                emb = dict(zip(uniq, model.encode_text(uniq, uni_modal=head == "usa"), strict=True))
            for pairs in keep.values():
                a = torch.stack([emb[x] for x in pairs.sentence1])
                b = torch.stack([emb[x] for x in pairs.sentence2])
                sys.append(torch.nn.functional.cosine_similarity(a, b).numpy())
                gold.append(pairs.scores)
            rho = 100 * spearmanr(np.concatenate(sys), np.concatenate(gold)).statistic
            assert report[f"{task.key}{sfx}"] == pytest.approx(rho, abs=1e-4), (task.name, head)
            values.append(round(rho, 2))
        assert report[f"sts_avg{sfx}"] == pytest.approx(np.mean(values), abs=1e-3)
    assert "STS12" in report.to_table() and "SICKRelatedness" in report.to_table()
    only = evaluate_sts_benchmarks(model, senteval_root, tasks="STSBenchmark")
    assert set(only.metrics) == {"stsb", "stsb_usa", "sts_avg", "sts_avg_usa"}


def test_evaluate_model_reports_usa_and_cross_columns_and_no_eccv_off_coco_5k(tmp_path):
    from sts_data import write_sts

    model = tiny_model()
    data = coco_sample_root() / "new_val.json"
    report = evaluate_model(
        model, data, sts_pairs=write_sts(tmp_path, "tsv"), captions="pre_caption"
    )
    for key in ("t2t_r1", "t2t_r1_usa", "t2t_map_at_r_usa", "sts_spearman", "sts_spearman_usa"):
        assert key in report.metrics, key
    assert not any(k.startswith("eccv") for k in report.metrics)
    assert "not the COCO 5K test split" in report.info["eccv"]
    assert report.info["captions"] == "pre_caption"
    # The USA column is the USA head: recompute text->text R@1 from it by hand.
    from cusa.captions import pre_caption
    from cusa_train.evaluation.evaluate import load_caption_json
    from cusa_train.evaluation.metrics import label_retrieval_metrics

    d = load_caption_json(data)
    with torch.no_grad():
        usa = model.encode_text([pre_caption(c) for c in d.captions], uni_modal=True)
    ref = label_retrieval_metrics(usa, usa, d.image_ids_of_texts, d.image_ids_of_texts, ks=(1,),
                                  exclude_self=True)  # fmt: skip
    assert report["t2t_r1_usa"] == pytest.approx(ref.recall[1])
    table = report.to_table()
    assert "USA head" in table and "ECCV Caption: not computed" in table
    with pytest.raises(DatasetError, match="ECCV Caption requested but the eval set is not"):
        evaluate_model(model, data, eccv=True)
    plain = evaluate_model(tiny_model(usa=False), data, max_images=4)
    assert "t2t_r1_usa" not in plain.metrics and "no USA" in plain.info["heads"]


def test_evaluate_model_restores_training_mode_and_uses_the_model_device():
    model = tiny_model().train()
    evaluate_model(model, coco_sample_root() / "new_val.json", max_images=3)
    assert model.training
    assert HeadEncoder(model).device == torch.device("cpu")


def test_the_trainer_and_cusa_eval_score_a_reader_alike():
    """Per-epoch evaluation (cusa_train.evaluation.validation) and evaluate_model share one encoding path."""
    from cusa.readers import open_dataset
    from cusa_train.evaluation.validation import evaluate_split

    model = tiny_model()
    reader = open_dataset("coco-sample", split="val")
    per_epoch = evaluate_split(
        model, reader, preprocess_image=model.student.preprocess_image, batch_size=3
    )
    report = evaluate_model(model, reader, batch_size=5)
    assert "rsum" in per_epoch and per_epoch == pytest.approx({k: report[k] for k in per_epoch})


# ---- checkpoint + CLI ---------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path, monkeypatch) -> Path:
    """A `cusa train`-format checkpoint of a tiny model with a registered tiny student."""
    from cusa_train.students.registry import STUDENTS

    monkeypatch.setitem(STUDENTS._entries, "tiny-eval-test", TinyDualEncoder)
    config = TrainConfig.from_dict({"model": {"student": "tiny-eval-test", "embed_dim": 20}})
    model = tiny_model(seed=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"config": config.to_dict(), "model": model.state_dict(), "step": 0}, path)
    return path


def test_cli_image_retrieval_and_sts(checkpoint, image_root, senteval_root, tmp_path):
    root, _ = image_root
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--task", "image-retrieval",
                              "--dataset", "cub,inshop", "--root", str(root), "--device", "cpu",
                              "--out", str(tmp_path / "img.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "CUB-200-2011" in res.output and "In-Shop" in res.output and "USA head" in res.output
    saved = json.loads((tmp_path / "img.json").read_text())
    direct = evaluate_image_benchmarks(load_checkpoint_model(checkpoint), "cub,inshop", root)
    assert saved["metrics"] == pytest.approx(direct.metrics)

    res = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--task", "sts",
                              "--root", str(senteval_root), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)["metrics"]
    assert {"sts12_usa", "sickr", "sts_avg_usa"} <= set(metrics)

    res = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint),
                              "--data", str(coco_sample_root() / "new_val.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "RSUM" in res.output and "not the COCO 5K test split" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "image-retrieval", "--dataset", "nope", "--root", "{root}"],
         "unknown image retrieval benchmark 'nope'"),
        (["--task", "image-retrieval", "--dataset", "cub"], "needs --root"),
        (["--task", "image-retrieval", "--root", "{root}"], "needs --dataset"),
        (["--task", "image-retrieval", "--dataset", "cub", "--root", "{empty}"],
         "cub/CUB_200_2011/images' does not exist"),
        (["--task", "sts", "--root", "{empty}"], "downstream/STS' does not exist"),
        (["--task", "sts", "--root", "{root}", "--sts-tasks", "STS99"], "unknown STS task 'STS99'"),
        (["--task", "sts", "--root", "{root}", "--data", "x.json"], "--task sts takes no --data"),
        (["--task", "bogus"], "--task must be one of"),
        (["--data", "{val}", "--captions", "lower"], "--captions must be one of"),
        (["--data", "{val}", "--eccv"], "ECCV Caption requested but the eval set is not"),
        (["--data", "{val}", "--root", "{root}"], "--root is for --task image-retrieval"),
        (["--data", "{val}", "--device", "tpu:x"], "is not a torch device"),
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2_with_one_line(checkpoint, image_root, tmp_path, args, message):
    root, _ = image_root
    (tmp_path / "empty").mkdir(exist_ok=True)
    fill = {"root": str(root), "empty": str(tmp_path / "empty"),
            "val": str(coco_sample_root() / "new_val.json")}  # fmt: skip
    argv = ["eval", "--checkpoint", str(checkpoint), *[a.format(**fill) for a in args]]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1


def test_cli_evaluates_every_kind_of_dataset_extract_reads(checkpoint, tmp_path):
    """`cusa eval --data` takes what `cusa extract --dataset` takes: the same images and
    captions as webdataset tars (from `cusa shard`), a brace pattern, a plain folder or a
    registered name with --root score exactly as the caption file does."""
    from cusa.readers import open_dataset

    runner = CliRunner()

    def report(*data_args: str) -> dict:
        res = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--json", *data_args])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    want = report("--data", str(coco_sample_root() / "new_val.json"))
    assert want["counts"]["num_images"] >= 5 and "t2t_r1_usa" in want["metrics"]

    shards = tmp_path / "shards"
    res = runner.invoke(app, ["shard", "--dataset", "coco-sample", "--split", "val",
                              "--out", str(shards), "--max-count", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    tars = sorted(shards.glob("val-*.tar"))
    assert len(tars) >= 2
    pattern = str(shards / f"val-{{000000..{len(tars) - 1:06d}}}.tar")

    folder = tmp_path / "folder"  # images + captions_val.jsonl (some captions hold newlines)
    lines = []
    for shard in (reader := open_dataset("coco-sample", split="val")).shards():
        for sample in reader.read(shard):
            (folder / "pics").mkdir(parents=True, exist_ok=True)
            (folder / "pics" / sample.image_id).write_bytes(sample.image)
            lines.append(json.dumps({"image": f"pics/{sample.image_id}",
                                     "captions": sample.captions}))  # fmt: skip
    (folder / "captions_val.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    for args in (
        ["--data", str(shards), "--split", "val"],
        ["--data", pattern, "--split", "val"],
        ["--data", str(folder), "--split", "val"],
        ["--data", "albef", "--root", str(coco_sample_root()), "--split", "val"],
        ["--data", "coco-sample", "--split", "val"],
    ):
        got = report(*args)
        assert got["metrics"] == pytest.approx(want["metrics"]), args
        assert got["counts"] == want["counts"], args

    res = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(shards),
                              "--image-root", str(folder)])  # fmt: skip
    assert res.exit_code == 2 and "--image-root is for a .json caption file" in res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", "coco-sample"])
    assert res.exit_code == 2 and "new_test.json' (splits found there: train, val)" in res.output


def test_checkpoint_captions_default_to_how_the_student_was_trained(tmp_path):
    from cusa_train.evaluation.evaluate import evaluate_checkpoint

    config = TrainConfig.from_dict(
        {"model": {"embed_dim": 20}, "data": {"captions": "pre_caption"}}
    )
    torch.save({"config": config.to_dict(), "model": tiny_model().state_dict(), "step": 0},
               tmp_path / "pc.pt")  # fmt: skip
    data = coco_sample_root() / "new_val.json"
    report = evaluate_checkpoint(tmp_path / "pc.pt", data, max_images=3, student=TinyDualEncoder())
    assert report.info["captions"] == "pre_caption"
    raw = evaluate_checkpoint(tmp_path / "pc.pt", data, max_images=3, student=TinyDualEncoder(),
                              captions="raw")  # fmt: skip
    assert raw.info["captions"] == "raw"


def test_cli_benchmarks_need_a_checkpoint(tmp_path):
    res = CliRunner().invoke(app, ["eval", "--task", "sts", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "--task sts needs --checkpoint" in res.output


# ---- MTEB encoder -------------------------------------------------------------------------


def test_mteb_encoder_takes_mteb_batches_and_plain_lists():
    from torch.utils.data import DataLoader

    from cusa_train.evaluation.mteb_encoder import CusaMtebEncoder

    model = tiny_model()
    sentences = ["A dog runs on the grass.", "Two men ride horses.", "A plate of food.",
                 "A red bus on a street.", "A cat sleeps."]  # fmt: skip
    enc = CusaMtebEncoder(model, head="usa", batch_size=2)
    with torch.no_grad():
        want = model.encode_text(sentences, uni_modal=True).numpy()
    # mteb 2.x: a DataLoader of {"text": [...]} batches plus keyword arguments.
    loader = DataLoader([{"text": s} for s in sentences], batch_size=2)
    got = enc.encode(loader, task_metadata=None, hf_split="test", hf_subset="default",
                     prompt_type=None)  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # mteb 1.x / sentence-transformers style: a plain list.
    np.testing.assert_allclose(enc.encode(sentences, batch_size=3), want, rtol=1e-5, atol=1e-6)
    cross = CusaMtebEncoder(model, head="cross").encode(sentences)
    assert not np.allclose(cross, want)
    sims = enc.similarity_pairwise(got[:2], got[2:4])
    assert sims.shape == (2,) and enc.similarity(got, got).shape == (5, 5)
    assert enc.name == "cusa/checkpoint-usa"
    with pytest.raises(ConfigError, match="no USA .* text head"):
        CusaMtebEncoder(tiny_model(usa=False), head="usa")
    with pytest.raises(ConfigError, match="head must be one of"):
        CusaMtebEncoder(model, head="both")
    with pytest.raises(ConfigError, match="batches with a 'text' list"):
        enc.encode([{"sentence": "x"}])


def test_mteb_encoder_from_checkpoint(checkpoint):
    from cusa_train.evaluation.mteb_encoder import CusaMtebEncoder

    enc = CusaMtebEncoder.from_checkpoint(checkpoint, head="cross")
    assert enc.name == "cusa/ckpt-cross" and len(enc.revision) == 12
    assert enc.encode(["one sentence", "another"]).shape == (2, 20)
    try:
        import mteb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install mteb"):
            enc.mteb_model_meta  # noqa: B018
    else:
        assert enc.mteb_model_meta.name == "cusa/ckpt-cross"
