"""The paper's uni-modal benchmarks: loaders in their official layouts, protocols against
brute force, one-line errors naming the file, and the ECCV Caption split detection.

Fixtures are generated in tmp_path from real images and captions of the embedded COCO
sample (tests/cusa_train/benchmark_layouts.py); their class labels and STS gold scores are
assigned for the tests. No real benchmark data and no network is needed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmark_layouts import (
    write_all_image_benchmarks,
    write_cub,
    write_inat,
    write_inshop,
    write_senteval,
    write_sop,
)

from cusa.errors import ConfigError, DatasetError, UnknownNameError
from cusa_train.evaluation.image_benchmarks import (
    get_image_benchmark,
    list_image_benchmarks,
    parse_benchmark_names,
)
from cusa_train.evaluation.metrics import nearest_neighbour_rank1
from cusa_train.evaluation.sts_benchmarks import (
    SENTEVAL_STS_TASKS,
    load_sts_task,
    official_average,
    parse_sts_tasks,
    score_sts_task,
)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ---- image benchmark loaders --------------------------------------------------------------


def test_every_loader_reads_its_official_layout(tmp_path):
    expected = write_all_image_benchmarks(tmp_path)
    assert list_image_benchmarks() == ["cars", "cub", "inat", "inshop", "sop"]
    for name in ("cub", "sop", "inat", "cars"):
        split = get_image_benchmark(name).open(tmp_path)
        paths, labels = expected[name]
        assert split.query_paths == paths, name
        assert split.query_labels == labels, name
        assert split.gallery_paths is None
    inshop = get_image_benchmark("inshop").open(tmp_path)
    assert (inshop.query_paths, inshop.query_labels) == expected["inshop"]["query"]
    assert (inshop.gallery_paths, inshop.gallery_labels) == expected["inshop"]["gallery"]
    assert inshop.num_classes == 4 and inshop.num_images == 8


def test_cub_split_is_by_sorted_folder_index_and_skips_non_images(tmp_path):
    paths, labels = write_cub(tmp_path)
    split = get_image_benchmark("cub").open(tmp_path)
    assert sorted(set(split.query_labels)) == [100, 101, 102, 150, 199]
    assert all(p.suffix == ".jpg" and not p.name.startswith("._") for p in split.query_paths)
    assert "train_only.jpg" not in {p.name for p in split.query_paths}
    # The benchmark's own folder works as --root too.
    own = get_image_benchmark("cub").open(tmp_path / "cub" / "CUB_200_2011")
    assert own.query_paths == paths


def test_benchmark_names():
    assert parse_benchmark_names("all") == ["cub", "sop", "inshop", "inat"]
    assert parse_benchmark_names("sop, cub") == ["sop", "cub"]
    with pytest.raises(UnknownNameError, match="unknown image retrieval benchmark 'cub200'.*cars"):
        parse_benchmark_names("cub200")
    with pytest.raises(ConfigError, match="named twice"):
        parse_benchmark_names("cub,cub")


def test_missing_files_give_one_line_errors_naming_the_file(tmp_path):
    for name, marker in [
        ("cub", "cub/CUB_200_2011/images"), ("sop", "Ebay_test.txt"),
        ("inshop", "list_eval_partition.txt"), ("inat", "Inaturalist_test_set1.txt"),
        ("cars", "cars_annos.mat"),
    ]:  # fmt: skip
        with pytest.raises(DatasetError, match="does not exist") as exc:
            get_image_benchmark(name).open(tmp_path)
        assert marker in _one_line(exc)
    # A listed image that is not on disk.
    paths, _ = write_sop(tmp_path)
    paths[2].unlink()
    with pytest.raises(
        DatasetError, match=r"image '.*11320_3\.JPG' does not exist \(listed in .*Ebay_test\.txt"
    ):
        get_image_benchmark("sop").open(tmp_path)


def test_malformed_files_give_one_line_errors_naming_file_and_line(tmp_path):
    write_sop(tmp_path)
    index = tmp_path / "sop" / "Stanford_Online_Products" / "Ebay_test.txt"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([*lines[:2], "3 not-a-number 1 x.jpg", *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match=r"Ebay_test\.txt' line 3") as exc:
        get_image_benchmark("sop").open(tmp_path)
    _one_line(exc)

    write_inshop(tmp_path)
    part = tmp_path / "inshop" / "Eval" / "list_eval_partition.txt"
    text = part.read_text()
    part.write_text(text.replace("evaluation_status", "status"))
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt' line 2 must be the header"):
        get_image_benchmark("inshop").open(tmp_path)
    part.write_text(text.replace("   query", "   probe", 1))
    with pytest.raises(DatasetError, match=r"line 4: evaluation_status 'probe'"):
        get_image_benchmark("inshop").open(tmp_path)

    write_inat(tmp_path)
    idx = tmp_path / "inaturalist" / "Inat_dataset_splits" / "Inaturalist_test_set1.txt"
    idx.write_text(idx.read_text() + "train_val2018/Aves/not-an-id/x.jpg\n")
    with pytest.raises(DatasetError, match=r"Inaturalist_test_set1\.txt' line 8"):
        get_image_benchmark("inat").open(tmp_path)

    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "cars_annos.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(DatasetError, match=r"cars_annos\.mat' is not the Stanford Cars") as exc:
        get_image_benchmark("cars").open(tmp_path)
    _one_line(exc)

    images = tmp_path / "cub" / "CUB_200_2011" / "images"
    for i in range(199):
        (images / f"{i:03d}").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has 199 class folders, expected the 200"):
        get_image_benchmark("cub").open(tmp_path)


# ---- rank-1 protocol ----------------------------------------------------------------------


def _official_rank1(query, query_label, gallery=None, gallery_label=None):
    """A numpy transcription of get_metric in the official evaluation_img.py: L2-normalise,
    Euclidean distances (clamped, sqrt), take the 2nd nearest without a gallery (the 1st is the
    query itself) or the nearest with one; hits / all queries * 100."""

    def norm(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def dist(x, y):
        d = (x**2).sum(1)[:, None] + (y**2).sum(1)[None, :] - 2 * x @ y.T
        return np.sqrt(np.clip(d, 1e-12, None))

    q = norm(query)
    if gallery is None:
        pred = np.argsort(dist(q, q), axis=1, kind="stable")[:, 1]
        return 100.0 * np.mean(np.asarray(query_label) == np.asarray(query_label)[pred])
    g = norm(gallery)
    pred = np.argmin(dist(q, g), axis=1)
    return 100.0 * np.mean(np.asarray(query_label) == np.asarray(gallery_label)[pred])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank1_equals_the_official_computation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 16)).astype(np.float64) * rng.uniform(0.5, 3, size=(300, 1))
    labels = rng.integers(0, 40, size=300)  # some classes have a single image: always a miss
    ours = nearest_neighbour_rank1(x, labels, chunk_size=37)
    assert ours.r1 == pytest.approx(_official_rank1(x, labels))
    assert ours.num_queries == 300
    g, gl = rng.normal(size=(120, 16)), rng.integers(0, 40, size=120)
    ours = nearest_neighbour_rank1(x, labels, g, gl, chunk_size=50)
    assert ours.r1 == pytest.approx(_official_rank1(x, labels, g, gl))


def test_rank1_by_hand_and_ties_count_against_the_query():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0.05]], dtype=np.float32)
    # Cosines: 0-4 .999, 1-4 .998, 0-1 .994, 2-3 .994. Nearest: 0 -> 4 (a vs c: miss),
    # 1 -> 4 (miss), 2 -> 3 (hit), 3 -> 2 (hit), 4 -> 0 (miss). Class c has one image.
    labels = ["a", "a", "b", "b", "c"]
    res = nearest_neighbour_rank1(x, labels)
    assert (res.num_hits, res.num_queries) == (2, 5) and res.r1 == pytest.approx(40.0)
    relabel = nearest_neighbour_rank1(x, ["a", "a", "b", "b", "a"])  # now 0, 1, 4 hit too
    assert relabel.r1 == 100.0
    collapsed = nearest_neighbour_rank1(np.ones((4, 3)), [0, 0, 1, 1])
    assert collapsed.r1 == 0.0
    with pytest.raises(DatasetError, match="dimension 2 but the gallery has 3"):
        nearest_neighbour_rank1(x, labels, np.ones((2, 3)), [0, 1])
    with pytest.raises(ConfigError, match="both gallery and gallery_labels"):
        nearest_neighbour_rank1(x, labels, x)


# ---- SentEval STS -------------------------------------------------------------------------


def test_senteval_loaders_read_the_layout_and_drop_unscored_pairs(tmp_path):
    expected = write_senteval(tmp_path)
    for task in SENTEVAL_STS_TASKS:
        data = load_sts_task(tmp_path, task)
        assert list(data) == list(expected[task.name])
        for subset, pairs in data.items():
            want = expected[task.name][subset]
            assert (
                list(zip(pairs.sentence1, pairs.sentence2, pairs.scores.tolist(), strict=True))
                == want
            )
    # The downstream folder itself is accepted as the root too.
    assert len(load_sts_task(tmp_path / "downstream", SENTEVAL_STS_TASKS[0])) == 5


def test_sts_aggregation_matches_senteval(tmp_path):
    """STS12-16 report Spearman over the concatenated subsets ('all'), not 'mean'/'wmean';
    STS-B and SICK-R report the test split. Reference: scipy on the same cosines."""
    from scipy.stats import spearmanr

    write_senteval(tmp_path)
    rng = np.random.default_rng(0)
    table: dict[str, np.ndarray] = {}

    def embed(sentences):
        for s in sentences:
            table.setdefault(s, rng.normal(size=8))
        return np.stack([table[s] for s in sentences])

    def cos(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    for task in SENTEVAL_STS_TASKS:
        data = load_sts_task(tmp_path, task)
        got = score_sts_task(task, data, embed)
        sys = {k: cos(embed(p.sentence1), embed(p.sentence2)) for k, p in data.items()}
        per = {k: 100 * spearmanr(sys[k], p.scores).statistic for k, p in data.items()}
        assert got.subsets == pytest.approx(per)
        if task.aggregate == "all":
            allr = spearmanr(np.concatenate(list(sys.values())),
                             np.concatenate([p.scores for p in data.values()])).statistic  # fmt: skip
            assert got.spearman == pytest.approx(100 * allr)
            assert got.mean == pytest.approx(np.mean(list(per.values())))
            sizes = [len(p) for p in data.values()]
            assert got.wmean == pytest.approx(np.average(list(per.values()), weights=sizes))
        else:
            assert got.spearman == pytest.approx(per["test"])
    # The official Avg. averages the numbers as printed with %.2f.
    assert official_average([10.004, 20.006]) == pytest.approx((10.00 + 20.01) / 2)


def test_sts_task_names():
    assert [t.key for t in parse_sts_tasks(None)] == [
        "sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr",
    ]  # fmt: skip
    assert [t.name for t in parse_sts_tasks("SICK-R,sts12")] == ["STS12", "SICKRelatedness"]
    with pytest.raises(ConfigError, match="unknown STS task 'STS17'"):
        parse_sts_tasks("STS17")


def test_sts_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"downstream/STS' does not exist"):
        load_sts_task(tmp_path, SENTEVAL_STS_TASKS[0])
    write_senteval(tmp_path)
    sts12, stsb, sick = SENTEVAL_STS_TASKS[0], SENTEVAL_STS_TASKS[5], SENTEVAL_STS_TASKS[6]
    folder = tmp_path / "downstream" / "STS" / "STS12-en-test"
    gs = folder / "STS.gs.MSRvid.txt"
    good = gs.read_text()
    gs.write_text(good.replace("\n", "\nhigh\n", 1))
    with pytest.raises(
        DatasetError,
        match=r"STS\.gs\.MSRvid\.txt' has 7 lines but .*STS\.input\.MSRvid\.txt' has 6",
    ):
        load_sts_task(tmp_path, sts12)
    gs.write_text("high\n" + good.split("\n", 1)[1])
    with pytest.raises(
        DatasetError, match=r"STS\.gs\.MSRvid\.txt' line 1: gold score 'high'"
    ) as exc:
        load_sts_task(tmp_path, sts12)
    _one_line(exc)
    gs.unlink()
    with pytest.raises(DatasetError, match=r"STS\.gs\.MSRvid\.txt' does not exist"):
        load_sts_task(tmp_path, sts12)
    csv = tmp_path / "downstream" / "STS" / "STSBenchmark" / "sts-test.csv"
    csv.write_text(csv.read_text() + "main-captions\tMSRvid\t2012test\t0099\t3.0\tonly one\n")
    with pytest.raises(DatasetError, match=r"sts-test\.csv' line 10: expected at least 7"):
        load_sts_task(tmp_path, stsb)
    sick_file = tmp_path / "downstream" / "SICK" / "SICK_test_annotated.txt"
    sick_file.write_text(sick_file.read_text().splitlines()[0] + "\n1\ta\tb\t4.0\tNEUTRAL\n")
    with pytest.raises(DatasetError, match=r"SICK_test_annotated\.txt' has 1 scored pairs"):
        load_sts_task(tmp_path, sick)


# ---- ECCV Caption: the COCO 5K test split is recognised by its ids ------------------------


def _karpathy_coco_test(tmp_path, extra_caption: bool = True):
    """A Karpathy dataset_coco.json whose test split is the real COCO 5K ids (from the
    eccv-caption package); captions are placeholders, images are not needed to detect it."""
    from cusa_train.evaluation.eccv import _eccv_json

    i2t = _eccv_json("original_image_to_caption.json")
    images = []
    for n, (iid, cids) in enumerate(sorted(i2t.items())):
        sents = [{"raw": f"caption {c}", "sentid": c} for c in cids]
        if extra_caption and n == 0:
            sents.append({"raw": "a sixth caption", "sentid": 999_999_999})  # Karpathy has 10 such
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{iid:012d}.jpg",
                       "cocoid": iid, "split": "test", "sentences": sents})  # fmt: skip
    images.append({"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg",
                   "cocoid": 9, "split": "train", "sentences": [{"raw": "x", "sentid": 1}]})  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


@pytest.mark.slow
def test_eccv_is_detected_on_the_coco_5k_test_split_only(tmp_path):
    pytest.importorskip(
        "eccv_caption", reason="eccv-caption not installed (pip install eccv-caption)"
    )
    from cusa_train.evaluation.evaluate import detect_eccv, evaluate_features, load_caption_json

    data = load_caption_json(_karpathy_coco_test(tmp_path), split="test")
    assert data.benchmark == "COCO 5K test (Karpathy)"
    assert len(data.image_ids) == 5000 and len(data.captions) == 25001
    assert data.image_paths[0].parts[-2] == "val2014"
    gt, why = detect_eccv(data.image_ids, data.image_paths, data.caption_ann_ids)
    assert gt is not None and gt.name == "eccv" and why == ""
    # Image queries search the 25,000 ECCV caption ids only, as the official ECCV evaluation.
    assert gt.text_gallery is not None and len(gt.text_gallery) == 25000
    assert data.captions.index("a sixth caption") not in gt.text_gallery

    rng = np.random.default_rng(0)
    img = rng.normal(size=(5000, 8)).astype(np.float32)
    txt = rng.normal(size=(25001, 8)).astype(np.float32)
    r = evaluate_features(img, txt, data.image_ids_of_texts, image_ids=data.image_ids,
                          eccv_gt=gt, unimodal=False)  # fmt: skip
    assert {"eccv_i2t_map_at_r", "eccv_t2i_r_precision", "eccv_t2i_r1"} <= set(r.metrics)
    assert r.counts["eccv_i2t_queries"] > 1000 and "ECCV Caption (COCO 5K test" in r.to_table()

    # One image fewer is not the COCO 5K test split: no ECCV, and the reason says so.
    gt, why = detect_eccv(data.image_ids[1:], data.image_paths[1:], data.caption_ann_ids)
    assert gt is None and "not the COCO 5K test split (4999 images" in why
    # ALBEF/CUSA files have no caption annotation ids.
    gt, why = detect_eccv(data.image_ids, data.image_paths, None)
    assert gt is None and "no COCO annotation ids" in why
    # File-name ids (the CUSA JSON layout) are recognised as COCO ids too.
    names = [p.name for p in data.image_paths]
    gt, _ = detect_eccv(names, data.image_paths, data.caption_ann_ids)
    assert gt is not None


def test_karpathy_files_and_albef_list_captions(tmp_path):
    from cusa_train.evaluation.evaluate import load_caption_json

    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [
        {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two men.", "sentid": 0}]},
        {"filename": "10002456.jpg", "split": "train", "sentences": [{"raw": "A dog.", "sentid": 5}]},
    ]}))  # fmt: skip
    data = load_caption_json(path, image_root=tmp_path / "flickr30k-images")
    assert data.image_ids == ["1000092795.jpg"] and data.caption_ann_ids is None
    assert data.image_paths == [tmp_path / "flickr30k-images" / "1000092795.jpg"]
    with pytest.raises(DatasetError, match=r"has no 'val' images \(splits there: test, train\)"):
        load_caption_json(path, split="val")
    albef = tmp_path / "coco_test.json"
    albef.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000391895.jpg",
                                  "caption": ["A man.", "A moped."]}]))  # fmt: skip
    data = load_caption_json(albef)
    assert data.image_ids == ["COCO_val2014_000000391895.jpg"] and data.captions == [
        "A man.",
        "A moped.",
    ]
    assert data.image_ids_of_texts == [data.image_ids[0]] * 2
