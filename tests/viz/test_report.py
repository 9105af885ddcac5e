"""``cusa report``: the page built from real stores, degenerate stores, runs and bad input."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, NotAStoreError
from cusa.store import FeatureLookup, FeatureStore
from cusa.viz import ReportOptions, build_report, soft_labels
from cusa.viz.runs import is_loss_key, is_temperature_key, read_eval, read_run

SECTIONS = ("summary", "soft-labels", "false-negatives", "neighbours", "training")
IMAGE_TEACHER = "efficientnet-lite0"
TEXT_TEACHER = "all-MiniLM-L6-v2"


class _Page(HTMLParser):
    """Sections (by id), their text, and every <img> with the section it is in."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[tuple[str | None, dict[str, str]]] = []
        self.links: list[str] = []
        self._current: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._current = a.get("id")
            self.sections[self._current] = ""
        elif tag == "img":
            self.images.append((self._current, a))
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])

    def handle_endtag(self, tag):
        if tag == "section":
            self._current = None

    def handle_data(self, data):
        if self._current:
            self.sections[self._current] += data

    def images_in(self, section: str, mime: str | None = None) -> list[dict[str, str]]:
        return [
            a
            for s, a in self.images
            if s == section and (mime is None or a["src"].startswith(f"data:{mime}"))
        ]


def _decode(uri: str) -> Image.Image:
    head, b64 = uri.split(",", 1)
    assert head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _self_contained(page: _Page) -> None:
    for link in page.links:
        assert link.startswith(("data:", "#")), (
            f"page refers to something outside itself: {link[:80]}"
        )


def test_full_report_on_real_store(coco_store, tmp_path):
    from cusa.readers import coco_sample_root

    out = build_report(
        coco_store, tmp_path / "r" / "report.html", dataset="coco-sample", split="train"
    )
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    assert list(page.sections) == list(SECTIONS)
    _self_contained(page)

    summary = page.sections["summary"]
    for expected in (
        "coco-sample/train",
        IMAGE_TEACHER,
        TEXT_TEACHER,
        "No failures",
        "Size on disk",
        "sealed",
    ):
        assert expected in summary
    assert (
        '<td class="num">120</td>' in text and '<td class="num">24</td>' in text
    )  # caption, image rows

    # Soft labels: two similarity heatmaps, the label heatmaps and the bar charts, plus 16 thumbnails.
    assert len(page.images_in("soft-labels", "image/png")) == 3
    assert len(page.images_in("soft-labels", "image/jpeg")) == 16
    assert "softmax(cos / τ)" in page.sections["soft-labels"]

    # False negatives: 8 ranked cards, each a pair of different images with two teacher scores.
    fns = page.sections["false-negatives"]
    assert [int(x) for x in re.findall(r"#(\d+)", fns)] == list(range(1, 9))
    assert fns.count("image teacher") >= 8 and fns.count("text teacher") >= 8

    # Neighbours: a block per teacher; image queries show 1 + 5 thumbnails each.
    nn = page.sections["neighbours"]
    assert f"image teacher {IMAGE_TEACHER}" in nn and f"text teacher {TEXT_TEACHER}" in nn
    assert len(page.images_in("neighbours", "image/jpeg")) >= 3 * 6
    assert "same image" in nn  # captions of one image are each other's nearest neighbours

    # Thumbnails are made from the dataset, small, and never the original files.
    originals = {len(p.read_bytes()) for p in (coco_sample_root() / "pics").glob("*.jpg")}
    thumbs = [a["src"] for _, a in page.images if a["src"].startswith("data:image/jpeg")]
    assert 16 <= len(set(thumbs)) <= 24  # the batch, plus gallery and neighbour images
    for uri in set(thumbs):
        im = _decode(uri)
        assert max(im.size) <= ReportOptions().thumb_side
        assert len(base64.b64decode(uri.split(",", 1)[1])) not in originals
    assert "No training run given" in page.sections["training"]


def test_report_without_dataset_says_why(coco_store, tmp_path):
    out = build_report(
        coco_store, tmp_path / "report.html", options=ReportOptions(find_dataset=False)
    )
    page = _Page(out.read_text(encoding="utf-8"))
    assert list(page.sections) == list(SECTIONS)
    assert "No dataset was given" in out.read_text(encoding="utf-8")
    assert not [a for _, a in page.images if a["src"].startswith("data:image/jpeg")]
    # The features-only sections still work and name samples by id.
    assert ".jpg" in page.sections["false-negatives"] and "#1" in page.sections["false-negatives"]
    assert len(page.images_in("soft-labels", "image/png")) == 3
    assert f"text teacher {TEXT_TEACHER}" in page.sections["neighbours"]


def _thumbnails(page: _Page) -> set[str]:
    return {a["src"] for _, a in page.images if a["src"].startswith("data:image/jpeg")}


def test_report_finds_the_dataset_the_store_records(coco_store, tmp_path):
    """Without --dataset, the store's recorded dataset and split give the same pictures."""
    auto = _Page(build_report(coco_store, tmp_path / "auto.html").read_text(encoding="utf-8"))
    named = build_report(coco_store, tmp_path / "named.html", dataset="coco-sample", split="train")
    named_page = _Page(named.read_text(encoding="utf-8"))
    assert 16 <= len(_thumbnails(auto)) <= 24
    assert _thumbnails(auto) == _thumbnails(named_page)
    assert len(auto.images_in("soft-labels", "image/jpeg")) == 16
    assert "No dataset was given" not in auto.sections["soft-labels"]


def _set_source(store: Path, source: dict | None) -> None:
    for meta_path in (store / "coco-sample" / "train").glob("*@*/zarr.json"):
        meta = json.loads(meta_path.read_text())
        if source is None:
            meta["attributes"]["cusa"].pop("dataset_source", None)
        else:
            meta["attributes"]["cusa"]["dataset_source"] = source
        meta_path.write_text(json.dumps(meta))


def test_report_finds_a_recorded_folder_and_says_when_it_is_gone(copy_store, tmp_path):
    import shutil

    from cusa.readers import coco_sample_root

    data = tmp_path / "moved"
    shutil.copytree(coco_sample_root(), data)
    store = copy_store()
    _set_source(store, {"dataset": str(data), "root": None, "split": "train"})
    page = _Page(build_report(store, tmp_path / "a.html").read_text(encoding="utf-8"))
    assert len(page.images_in("soft-labels", "image/jpeg")) == 16

    shutil.rmtree(data)
    text = build_report(store, tmp_path / "b.html").read_text(encoding="utf-8")
    assert f"records the dataset as <code>{data}</code>, but it cannot be opened here" in text
    assert "dataset path" in text and "does not exist" in text
    assert not _thumbnails(_Page(text))


def test_report_never_runs_a_recorded_pipe_command(copy_store, tmp_path):
    marker = tmp_path / "ran"
    store = copy_store()
    _set_source(
        store, {"dataset": f"pipe:touch {marker}; cat x.tar", "root": None, "split": "train"}
    )
    text = build_report(store, tmp_path / "r.html").read_text(encoding="utf-8")
    assert not marker.exists()
    assert "which a report does not run by itself" in text and not _thumbnails(_Page(text))


def test_report_of_an_older_store_opens_an_embedded_dataset_by_name(copy_store, tmp_path):
    store = copy_store()
    _set_source(store, None)  # groups written before the source was recorded
    page = _Page(build_report(store, tmp_path / "r.html").read_text(encoding="utf-8"))
    assert len(page.images_in("soft-labels", "image/jpeg")) == 16


def test_cli_report_needs_no_dataset_flag(coco_store, tmp_path):
    out = tmp_path / "cli.html"
    res = CliRunner().invoke(app, ["report", "--store", str(coco_store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(_Page(out.read_text(encoding="utf-8")).images_in("soft-labels", "image/jpeg")) == 16
    old = CliRunner().invoke(app, ["report", str(coco_store), "--out", str(out)])
    assert old.exit_code == 0 and "positional STORE is deprecated; use --store" in old.output


def test_text_only_store(copy_store, tmp_path):
    store = copy_store(drop=(IMAGE_TEACHER,))
    out = build_report(store, tmp_path / "report.html", dataset="coco-sample")
    page = _Page(out.read_text(encoding="utf-8"))
    assert list(page.sections) == list(SECTIONS)
    assert IMAGE_TEACHER not in page.sections["summary"]
    soft = page.sections["soft-labels"]
    assert "No image teacher" in soft and f"{TEXT_TEACHER}: off-diagonal cosine" in soft
    assert f"{IMAGE_TEACHER}: off-diagonal cosine" not in soft
    assert "ranked by one teacher only" in page.sections["false-negatives"]
    assert "#8" in page.sections["false-negatives"]
    nn = page.sections["neighbours"]
    assert "image teacher" not in nn and f"text teacher {TEXT_TEACHER}" in nn
    assert (
        len(page.images_in("soft-labels", "image/jpeg")) == 16
    )  # thumbnails come from the dataset


def test_image_only_store(copy_store, tmp_path):
    store = copy_store(drop=(TEXT_TEACHER,))
    out = build_report(store, tmp_path / "report.html", dataset="coco-sample", batch_size=8)
    page = _Page(out.read_text(encoding="utf-8"))
    assert "No text teacher" in page.sections["soft-labels"]
    assert len(page.images_in("soft-labels", "image/jpeg")) == 8
    fns = page.sections["false-negatives"]
    assert "ranked by one teacher only" in fns and "#1" in fns
    assert "scores: image teacher" in fns and "· text teacher" not in fns
    assert f"image teacher {IMAGE_TEACHER}" in page.sections["neighbours"]


def test_image_only_store_without_dataset_has_no_captions(copy_store, tmp_path):
    out = build_report(
        copy_store(drop=(TEXT_TEACHER,)),
        tmp_path / "report.html",
        options=ReportOptions(find_dataset=False),
    )
    page = _Page(out.read_text(encoding="utf-8"))
    assert "no captions to pair with" in page.sections["false-negatives"]
    assert len(page.images_in("soft-labels", "image/png")) == 3


def test_failure_ledger_and_undecodable_images(failing_dataset_store, tmp_path):
    data, store = failing_dataset_store
    out = build_report(store, tmp_path / "report.html", dataset=str(data), batch_size=4)
    text = out.read_text(encoding="utf-8")
    page = _Page(text)
    summary = page.sections["summary"]
    assert "2 sample(s) without features" in summary
    assert "image file not found" in summary and "not a recognised image file" in summary
    assert "No failures" not in summary
    # The batch draws only from images with features; the 4 good ones all have thumbnails.
    assert len(page.images_in("soft-labels", "image/jpeg")) == 4
    assert "could not be decoded" in text  # the page says the bad file had no thumbnail


def test_empty_store(tmp_path):
    FeatureStore.open(tmp_path / "empty", create=True)
    out = build_report(tmp_path / "empty", tmp_path / "report.html")
    page = _Page(out.read_text(encoding="utf-8"))
    assert list(page.sections) == list(SECTIONS)
    assert "holds no features yet" in page.sections["summary"]
    for sid in ("soft-labels", "false-negatives", "neighbours"):
        assert "No features for this dataset split" in page.sections[sid]


def _write_run(path: Path, usa: bool, steps: int = 40) -> Path:
    """A metrics log with the keys ``cusa_train.trainer`` writes (see test_real_training_runs)."""
    rng = np.random.default_rng(1 if usa else 2)
    path.mkdir(parents=True)
    with (path / "metrics.jsonl").open("w") as fh:
        for s in range(steps):
            decay = np.exp(-s / 15)
            rec = {
                "step": s,
                "epoch": s // 20,
                "loss": 4 * decay + 0.5,
                "itr": 3 * decay + 0.3,
                "csa": 0.5 * decay + 0.1 + 0.01 * rng.random(),
                "lr": 1e-4,
                "usa": 0.4 * decay + 0.1 if usa else 0.0,
                "tau/itr": 0.05 + 0.001 * s,
                "tau/csa": 1.0,
                "tau/csa_teacher": 1.0,
                "step_time_s": 0.1,
                "data_time_s": 0.01,
                "pairs_per_s": 80.0,
            }
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
        fh.write('{"step": 41, "loss": 0.')  # a line cut short by a crash is skipped
    return path


def test_training_section(coco_store, tmp_path):
    from cusa_train.evaluation.evaluate import EvalReport

    runs = {
        "with USA": _write_run(tmp_path / "usa", True),
        "without USA": _write_run(tmp_path / "base", False),
    }
    evals = {}
    for label, r1 in (("with USA", 44.1), ("without USA", 41.7)):
        p = tmp_path / f"{label}.json"
        EvalReport(
            {"i2t_r1": r1, "t2i_r1": r1 - 10, "rsum": 400.0 + r1}, {"num_images": 24}
        ).to_json(p)
        evals[label] = p
    # Student features: real caption features (all-MiniLM-L6-v2) of the 24 images, and the same
    # pulled towards each image's caption mean, as USA does.
    lookup = FeatureLookup.open(
        coco_store, dataset="coco-sample", split="train", teacher=TEXT_TEACHER
    )
    ids = list(lookup.ids)
    feats = lookup.gather(ids).astype(np.float32)
    owner = np.array([i.rsplit("#", 1)[0] for i in ids])
    means = np.stack([feats[owner == o].mean(0) for o in owner])
    np.savez(tmp_path / "base.npz", features=feats, ids=np.array(ids))
    np.savez(tmp_path / "usa.npz", features=0.3 * feats + 0.7 * means, ids=np.array(ids))

    out = build_report(
        coco_store,
        tmp_path / "report.html",
        run=runs,
        eval_json=evals,
        embeddings={"with USA": tmp_path / "usa.npz", "without USA": tmp_path / "base.npz"},
    )
    page = _Page(out.read_text(encoding="utf-8"))
    training = page.sections["training"]
    for heading in ("Loss terms", "Temperatures", "Evaluation", "t-SNE", "(40 lines)"):
        assert heading in training
    # losses, temperatures, other values (lr) and the t-SNE are four plots
    plots = page.images_in("training", "image/png")
    assert len(plots) == 4
    w, h = _decode(plots[-1]["src"]).size
    assert w > 1.6 * h  # the t-SNE shows the two runs side by side
    assert "44.10" in training and "41.70" in training and "i2t_r1" in training


def test_run_log_parsing(tmp_path):
    run = read_run(_write_run(tmp_path / "r", True))
    assert run.lines == 40 and run.skipped_lines == 1
    assert set(run.loss_keys()) == {"loss", "itr", "csa", "usa"}
    assert set(run.temperature_keys()) == {"tau/itr", "tau/csa", "tau/csa_teacher"}
    # step and epoch are axes, not series
    assert set(run.other_keys()) == {"lr", "step_time_s", "data_time_s", "pairs_per_s"}
    steps, values = run.series["tau/itr"]
    np.testing.assert_allclose(steps, np.arange(40))
    np.testing.assert_allclose(values, 0.05 + 0.001 * np.arange(40))
    assert (
        is_loss_key("train/csa") and not is_loss_key("eval/loss") and is_temperature_key("temp_csa")
    )


def test_read_eval_flat_and_report(tmp_path):
    (tmp_path / "flat.json").write_text(json.dumps({"rsum": 410.5, "name": "x"}))
    assert read_eval(tmp_path / "flat.json") == {"rsum": 410.5}
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read eval JSON"):
        read_eval(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"metrics": {"note": "x"}}))
    with pytest.raises(ConfigError, match="holds no numeric metrics"):
        read_eval(tmp_path / "empty.json")


def test_soft_labels_match_the_formula():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 32)).astype(np.float32)
    for tau in (1.0, 0.05):
        cos, lab = soft_labels(f, tau)
        n = f / np.linalg.norm(f, axis=1, keepdims=True)
        expect = np.exp(n @ n.T / tau)
        expect /= expect.sum(1, keepdims=True)
        np.testing.assert_allclose(lab, expect, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lab.sum(1), 1.0, rtol=1e-6)
        assert np.all(lab.argmax(1) == np.arange(6))  # each feature is closest to itself
    # A colder temperature concentrates the mass on the positive.
    assert soft_labels(f, 0.05)[1].diagonal().min() > soft_labels(f, 1.0)[1].diagonal().max()


def test_bad_input(coco_store, tmp_path):
    with pytest.raises(ConfigError, match="no features for dataset 'coco-sample' split 'val'"):
        build_report(coco_store, tmp_path / "r.html", dataset="coco-sample", split="val")
    with pytest.raises(ConfigError, match="run .*does not exist"):
        build_report(coco_store, tmp_path / "r.html", run=tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        build_report(coco_store, tmp_path / "r.html", run=tmp_path)
    with pytest.raises(ConfigError, match="tau=0.0 must be > 0"):
        build_report(coco_store, tmp_path / "r.html", tau=0.0)
    with pytest.raises(ConfigError, match="batch_size=1"):
        build_report(coco_store, tmp_path / "r.html", batch_size=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(NotAStoreError, match="is not a cusa store"):
        build_report(tmp_path / "junk", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_report(coco_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.html"
    result = runner.invoke(
        app,
        [
            "report",
            "--store",
            str(coco_store),
            "--out",
            str(out),
            "--dataset",
            "coco-sample",
            "--batch-size",
            "8",
            "--tau",
            "0.1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    page = _Page(out.read_text(encoding="utf-8"))
    assert len(page.images_in("soft-labels", "image/jpeg")) == 8
    assert "seed 0, τ 0.1." in out.read_text(encoding="utf-8")

    bad = runner.invoke(app, ["report", "--store", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code == 2
    assert "no cusa store" in bad.output
    bad = runner.invoke(
        app, ["report", "--store", str(coco_store), "--out", str(out), "--split", "test"]
    )
    assert bad.exit_code == 2 and "has no split 'test'" in bad.output


@pytest.mark.slow
def test_real_training_runs(coco_store, tmp_path):
    """End to end: two real (tiny) CUSA runs with and without USA, evaluated, in one report."""

    import torch
    from tiny_student import TinyDualEncoder

    from cusa.readers import coco_sample_root
    from cusa_train.config import TrainConfig
    from cusa_train.evaluation.evaluate import encode_dataset, evaluate_model, load_caption_json
    from cusa_train.trainer import train

    data = load_caption_json(coco_sample_root() / "new_train.json")
    runs, evals, embeds = {}, {}, {}
    for label, usa in (("with USA", True), ("without USA", False)):
        cfg = TrainConfig.from_dict(
            {
                "model": {"student": "tiny", "embed_dim": 16},
                "loss": {"usa": {"enabled": usa}},
                "teachers": {
                    "image": IMAGE_TEACHER,
                    "text": TEXT_TEACHER,
                    "text_spec": {"dim": 384},
                },
                "data": {
                    "dataset": "coco-sample",
                    "split": "train",
                    "store": str(coco_store),
                    "batch_size": 8,
                },
                "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 6},
                "run": {"output_dir": str(tmp_path / label), "seed": 3, "progress": False},
            }
        )
        torch.manual_seed(0)
        result = train(cfg, student=TinyDualEncoder())
        runs[label] = result.output_dir
        evals[label] = tmp_path / f"{label}.json"
        evaluate_model(result.model, data).to_json(evals[label])
        img, txt = encode_dataset(result.model, data)
        counts: dict[str, int] = {}
        cap_ids = []
        for iid in data.image_ids_of_texts:
            cap_ids.append(f"{iid}#{counts.setdefault(iid, 0)}")
            counts[iid] += 1
        embeds[label] = tmp_path / f"{label}.npz"
        np.savez(
            embeds[label],
            features=np.concatenate([img, txt]),
            ids=np.array([*data.image_ids, *cap_ids]),
        )

    out = build_report(
        coco_store,
        tmp_path / "report.html",
        dataset="coco-sample",
        run=runs,
        eval_json=evals,
        embeddings=embeds,
    )
    page = _Page(out.read_text(encoding="utf-8"))
    training = page.sections["training"]
    assert (
        "(6 lines)" in training
        and "rsum" in training
        and "24 images and their captions" in training
    )
    assert len(page.images_in("training", "image/png")) == 4  # losses, temperatures, other, t-SNE


def test_dataset_view_pools_and_fetches_more_thumbnails():
    from cusa.readers import open_dataset
    from cusa.viz.thumbnails import DatasetView

    reader = open_dataset("coco-sample", split="train", shard_size=6)  # 4 shards of 6 images
    all_ids = [s.image_id for shard in reader.shards() for s in reader.read(shard)]
    view = DatasetView.from_reader(reader, pool_size=4, seed=0, keep=all_ids[::2], max_side=64)
    assert len(view.pool) == 4 and set(view.pool) <= set(all_ids[::2])
    assert set(view.thumbs) == set(view.pool)  # only pooled images were thumbnailed
    assert view.scanned <= 12
    others = [i for i in all_ids if i not in view.pool][:5]
    view.ensure(others, max_scan=1000)
    assert set(others) <= set(view.thumbs)
    assert all(
        max(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size) <= 64
        for u in view.thumbs.values()
    )
    # Captions of every image read come along, keyed by caption id.
    assert all(view.caption_image[c] == i for i in view.pool for c in view.image_captions[i])
