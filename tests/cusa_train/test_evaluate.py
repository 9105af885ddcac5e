"""Metrics on hand-computable cases, the ECCV Caption cross-check, STS and stored features."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sts_data import STS_PAIRS, write_sts

from cusa.errors import ConfigError, DatasetError
from cusa_train.evaluation.evaluate import (
    CaptionGroundTruth,
    EvalReport,
    evaluate_features,
    evaluate_store,
    ground_truth_metrics,
    image_id_of_caption,
    load_caption_json,
    load_features,
)
from cusa_train.evaluation.metrics import (
    cross_modal_recall,
    label_retrieval_metrics,
    load_sts_pairs,
    rankdata,
    rsum,
    similarity_metrics,
    spearman,
)

# ---- cross-modal recall -------------------------------------------------------------------


def _perfect(captions_per_image: list[int], dim: int = 16):
    """One-hot images; each caption is its image's vector plus a small in-image perturbation."""
    rng = np.random.default_rng(0)
    img = np.eye(len(captions_per_image), dim, dtype=np.float32)
    of_text = np.repeat(np.arange(len(captions_per_image)), captions_per_image)
    txt = img[of_text] + 0.01 * rng.random((len(of_text), dim), dtype=np.float32)
    return img, txt, of_text


@pytest.mark.parametrize("caps", [[5, 5, 5], [2, 3, 6, 5], [6], [1, 1]])
def test_perfect_retrieval_is_600_for_any_captions_per_image(caps):
    img, txt, of_text = _perfect(caps)
    i2t, t2i = cross_modal_recall(img, txt, of_text)
    assert i2t.recall == {1: 100.0, 5: 100.0, 10: 100.0}
    assert t2i.recall == {1: 100.0, 5: 100.0, 10: 100.0}
    assert rsum(i2t, t2i) == 600.0
    assert i2t.map_at_r == 100.0 and i2t.r_precision == 100.0
    assert (i2t.num_queries, t2i.num_queries) == (len(caps), sum(caps))


def _two_images():
    """Image A has 3 captions (the third looks like B), image B has 2 (the second looks like A).

    Cosines (hand-computed): i2t A: A1 .995, A2 .981, B2 .958, B1 .196, A3 .100;
    i2t B: A3 .995, B1 .981, B2 .287, A2 .196, A1 .100. t2i: A1->A, A2->A, A3->B, B1->B, B2->A.
    """
    img = np.array([[1, 0], [0, 1]], dtype=np.float32)
    txt = np.array([[1, 0.1], [1, 0.2], [0.1, 1], [0.2, 1], [1, 0.3]], dtype=np.float32)
    of_text = ["A", "A", "A", "B", "B"]
    return img, txt, of_text


def test_known_case_recall_rsum_and_eccv_by_hand():
    img, txt, of_text = _two_images()
    r = evaluate_features(img, txt, of_text, image_ids=["A", "B"])
    # i2t: A's best caption is first; B's best caption (B1) is second, after A3.
    assert (r["i2t_r1"], r["i2t_r5"], r["i2t_r10"]) == (50.0, 100.0, 100.0)
    # t2i: A3 and B2 go to the wrong image first.
    assert (r["t2i_r1"], r["t2i_r5"]) == (pytest.approx(60.0), 100.0)
    assert r["rsum"] == pytest.approx(510.0)
    assert r["r_mean"] == pytest.approx(85.0)
    # mAP@R / R-P on the dataset's own pairs. A: R=3, hits 1,1,0 -> RP 2/3, mAP@R (1+1+0)/3.
    # B: R=2, hits 0,1 -> RP 1/2, mAP@R (0 + 1/2)/2.
    assert r["i2t_r_precision"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert r["i2t_map_at_r"] == pytest.approx(100 * (2 / 3 + 1 / 4) / 2)
    # One positive per caption: mAP@R = R-P = R@1.
    assert r["t2i_map_at_r"] == r["t2i_r_precision"] == pytest.approx(60.0)
    # Not the ECCV Caption ground truth, so nothing is labelled ECCV.
    assert not any(k.startswith("eccv") for k in r.metrics)
    assert "ECCV Caption (COCO 5K" not in r.to_table()
    assert r.counts == {
        "num_images": 2, "num_texts": 5, "t2t_queries": 5, "t2t_skipped": 0,
    }  # fmt: skip


def test_similarity_metrics_by_hand():
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.9, 0.3, 0.2, 0.0]])
    pos = np.array([[1, 0, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=bool)
    s = similarity_metrics(sim, pos, ks=(1, 3, 4))
    # q0: hits 1,0,1 in the top R=3 -> RP 2/3, mAP@R (1 + 2/3)/3 = 5/9. q1: positive 4th -> 0, 0.
    assert s.r_precision == pytest.approx(100 * (2 / 3) / 2)
    assert s.map_at_r == pytest.approx(100 * (5 / 9) / 2)
    assert s.recall == {1: 50.0, 3: 50.0, 4: 100.0}


def test_ties_count_against_the_query():
    # A collapsed model (all features equal) must score at chance, not 100.
    img = np.ones((4, 8), dtype=np.float32)
    txt = np.ones((8, 8), dtype=np.float32)
    i2t, t2i = cross_modal_recall(img, txt, np.repeat(np.arange(4), 2))
    assert i2t.recall[1] == 0.0 and t2i.recall[1] == 0.0
    assert t2i.recall[5] == 100.0  # only 4 images: every image is within the top 5


def _brute_force(sim, pos, ks):
    """Full sort per query; ties put negatives first (the documented convention)."""
    out = {"recall": {k: [] for k in ks}, "ap": [], "rp": []}
    for q in range(sim.shape[0]):
        r = int(pos[q].sum())
        if r == 0:
            continue
        order = np.lexsort((pos[q], -sim[q]))  # primary: score desc; ties: negatives first
        hits = pos[q][order]
        first = int(np.argmax(hits))
        for k in ks:
            out["recall"][k].append(first < k)
        prec = np.cumsum(hits[:r]) / np.arange(1, r + 1)
        out["ap"].append(float((prec * hits[:r]).sum() / r))
        out["rp"].append(float(hits[:r].sum() / r))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_ranking_matches_a_full_sort_even_with_ties(seed):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 6, size=(40, 70)).astype(np.float64)  # many ties
    pos = rng.random((40, 70)) < rng.uniform(0.01, 0.4)
    ks = (1, 3, 10)
    ours = similarity_metrics(sim, pos, ks=ks)
    ref = _brute_force(sim, pos, ks)
    assert ours.num_queries == len(ref["ap"])
    for k in ks:
        assert ours.recall[k] == pytest.approx(100 * np.mean(ref["recall"][k]))
    assert ours.map_at_r == pytest.approx(100 * np.mean(ref["ap"]))
    assert ours.r_precision == pytest.approx(100 * np.mean(ref["rp"]))


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(30, 12)), rng.normal(size=(90, 12))
    of_text = rng.permutation(np.repeat(np.arange(30), 3))
    a = evaluate_features(img, txt, of_text, chunk_size=7)
    b = evaluate_features(img, txt, of_text, chunk_size=1000)
    assert a.metrics == pytest.approx(b.metrics)


# ---- uni-modal ----------------------------------------------------------------------------


def test_text_to_text_positives_are_other_captions_of_the_image():
    # a1, a2 of image A; b1, b2 of image B; c1 alone (skipped: no other caption).
    txt = np.array(
        [[1, 0, 0], [0.9, 0.1, 0], [0.8, 0.3, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32
    )
    labels = ["A", "A", "B", "B", "C"]
    s = label_retrieval_metrics(txt, txt, labels, labels, ks=(1,), exclude_self=True)
    # a1 -> a2 (hit), a2 -> a1 (hit), b1 -> a2 (.958 vs b2 .351: miss), b2 -> b1 (.351 > a2 .110: hit)
    assert s.num_queries == 4 and s.num_skipped == 1
    assert s.recall[1] == 75.0
    assert s.map_at_r == 75.0  # R = 1 for every query


def test_image_to_image_with_class_labels():
    img = np.array([[1, 0], [0.9, 0.2], [0, 1], [0.1, 1], [0.7, 0.7]], dtype=np.float32)
    img_ids = ["i0", "i1", "i2", "i3", "i4"]
    labels = ["dog", "dog", "cat", "cat", "dog"]
    txt = img.copy()
    r = evaluate_features(img, txt, img_ids, image_ids=img_ids, image_labels=labels)
    # i0 -> i1 (dog, hit); i1 -> i0 (hit); i2 -> i3 (hit); i3 -> i2 (hit); i4 -> i1 (dog, hit).
    assert r["i2i_r1"] == 100.0
    # i4 (R=2: i0, i1): ranked i1 (.89), i3 (.78), i0 (.71) -> hits 1,0 -> mAP@R 1/2.
    # i0 (R=2: i1, i4): i1 .976, i4 .707 -> 1,1. i1: i0 .976, i4 .87 -> 1,1. cats: R=1, hit.
    assert r["i2i_map_at_r"] == pytest.approx(100 * (1 + 1 + 1 + 1 + 0.5) / 5)
    assert "t2t_r1" not in r.metrics  # one caption per image: no text->text positives
    assert "not computed" in r.info["t2t_positives"]


# ---- ECCV Caption cross-check -------------------------------------------------------------


def test_eccv_definitions_match_the_eccv_caption_package():
    metrics_mod = pytest.importorskip(
        "eccv_caption._metrics", reason="eccv-caption not installed (pip install eccv-caption)"
    )
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(60, 200))
    pos = rng.random((60, 200)) < 0.05
    pos[np.arange(60), rng.integers(0, 200, 60)] = True  # at least one positive per query
    ours = similarity_metrics(sim, pos, ks=(1,))
    order = np.argsort(-sim, axis=1)
    ranked = {q: [int(x) for x in order[q]] for q in range(60)}
    gts = {q: [int(x) for x in np.flatnonzero(pos[q])] for q in range(60)}
    ref = metrics_mod.compute_eccv_metrics(ranked, gts)
    assert ours.map_at_r == pytest.approx(100 * ref["eccv_map_at_r"], abs=1e-9)
    assert ours.r_precision == pytest.approx(100 * ref["eccv_rprecision"], abs=1e-9)
    assert ours.recall[1] == pytest.approx(100 * ref["eccv_r1"], abs=1e-9)


def test_eccv_ground_truth_on_coco_5k_ids_matches_the_package():
    """Random embeddings of the real COCO 5k test ids, scored by the package's Metrics class."""
    eccv = pytest.importorskip(
        "eccv_caption", reason="eccv-caption not installed (pip install eccv-caption)"
    )
    from importlib.resources import files

    from cusa_train.evaluation.evaluate import eccv_ground_truth

    coco_i2t = json.loads(
        (files("eccv_caption") / "data" / "original_image_to_caption.json").read_text()
    )
    image_ids = sorted(int(k) for k in coco_i2t)
    caption_ids = sorted(int(c) for v in coco_i2t.values() for c in v)
    gt = eccv_ground_truth(image_ids, caption_ids)
    assert gt.name == "eccv" and len(gt.i2t) > 1000 and len(gt.t2i) > 1000
    rng = np.random.default_rng(0)
    img = rng.normal(size=(len(image_ids), 24)).astype(np.float32)
    txt = rng.normal(size=(len(caption_ids), 24)).astype(np.float32)
    i2t, t2i = ground_truth_metrics(img, txt, gt)

    def normed(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n_img, n_txt = normed(img), normed(txt)
    top = 200  # deeper than any query's R, so the package sees every rank it reads
    retrieved = {}
    for side, (q_ids, q, g_ids, g, queries) in {
        "i2t": (image_ids, n_img, caption_ids, n_txt, gt.i2t),
        "t2i": (caption_ids, n_txt, image_ids, n_img, gt.t2i),
    }.items():
        rows = sorted(queries)
        order = np.argsort(-(q[rows] @ g.T), axis=1)[:, :top]
        retrieved[side] = {q_ids[r]: [g_ids[j] for j in order[i]] for i, r in enumerate(rows)}
    ref = eccv.Metrics().eccv_metrics(retrieved, "all")
    assert i2t.map_at_r == pytest.approx(100 * ref["eccv_map_at_r"]["i2t"], abs=1e-6)
    assert t2i.map_at_r == pytest.approx(100 * ref["eccv_map_at_r"]["t2i"], abs=1e-6)
    assert i2t.r_precision == pytest.approx(100 * ref["eccv_rprecision"]["i2t"], abs=1e-6)
    assert t2i.recall[1] == pytest.approx(100 * ref["eccv_r1"]["t2i"], abs=1e-6)


def test_explicit_ground_truth_in_evaluate_features():
    img, txt, of_text = _two_images()
    # Declare A3 a positive of B as well (a plausible match, as ECCV Caption does).
    gt = CaptionGroundTruth(i2t={0: [0, 1, 2], 1: [2, 3, 4]}, t2i={2: [0, 1]}, name="mine")
    r = evaluate_features(img, txt, of_text, image_ids=["A", "B"], eccv_gt=gt)
    assert r.info["gt"] == "mine"
    # B: R=3, ranked A3, B1, B2 -> all hits.
    assert r["gt_i2t_r_precision"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert r["gt_t2i_r1"] == 100.0
    assert r.counts["gt_t2i_queries"] == 1
    assert not any(k.startswith("eccv") for k in r.metrics)
    assert "Explicit ground truth 'mine'" in r.to_table()
    # A gallery restriction drops the other captions from the search (and from the positives):
    # A searches A1 .995, B2 .958, A3 .100 -> R=2 (A1, A3), one hit in the top 2.
    narrow = CaptionGroundTruth(i2t={0: [0, 1, 2]}, t2i={2: [0, 1]}, text_gallery=[0, 2, 4])
    r_i2t, _ = ground_truth_metrics(img, txt, narrow)
    assert r_i2t.r_precision == pytest.approx(50.0)


# ---- errors -------------------------------------------------------------------------------


def test_errors_name_the_problem():
    img, txt, of_text = _two_images()
    with pytest.raises(DatasetError, match="dimension 2 but text features have 3"):
        evaluate_features(img, np.ones((5, 3)), of_text, image_ids=["A", "B"])
    with pytest.raises(DatasetError, match="image_features is empty"):
        evaluate_features(np.zeros((0, 2)), txt, of_text, image_ids=[])
    with pytest.raises(DatasetError, match="got 4 image ids of texts for 5 text rows"):
        evaluate_features(img, txt, of_text[:4], image_ids=["A", "B"])
    with pytest.raises(DatasetError, match="image 'B' has no captions"):
        evaluate_features(img, txt[:3], of_text[:3], image_ids=["A", "B"])
    with pytest.raises(DatasetError, match="image id 'Z', which is not among"):
        evaluate_features(img, txt, ["A", "A", "A", "B", "Z"], image_ids=["A", "B"])
    with pytest.raises(DatasetError, match="image id 'A' appears twice"):
        evaluate_features(img, txt, of_text, image_ids=["A", "A"])
    with pytest.raises(DatasetError, match="must be integer image row indices"):
        evaluate_features(img, txt, of_text)
    with pytest.raises(DatasetError, match="row 1 has non-finite"):
        evaluate_features(
            img, np.where(np.arange(5)[:, None] == 1, np.nan, txt), of_text, image_ids=["A", "B"]
        )
    with pytest.raises(ConfigError, match="recall cut-offs must be positive"):
        evaluate_features(img, txt, of_text, image_ids=["A", "B"], ks=(0, 5))
    with pytest.raises(DatasetError, match="no query has a positive"):
        similarity_metrics(np.ones((2, 2)), np.zeros((2, 2), dtype=bool))


# ---- report -------------------------------------------------------------------------------


def test_report_round_trips_json_and_prints_a_table(tmp_path):
    img, txt, of_text = _two_images()
    r = evaluate_features(img, txt, of_text, image_ids=["A", "B"], info={"model": "toy"})
    r.to_json(tmp_path / "r.json")
    back = EvalReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.metrics == pytest.approx(r.metrics) and back.info["model"] == "toy"
    table = r.to_table()
    assert "RSUM 510.00" in table and "mAP@R" in table and "t2t" in table
    assert "on the dataset's own pairs (not ECCV Caption)" in table
    with pytest.raises(KeyError, match="no metric 'nope'"):
        r["nope"]


# ---- STS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
def test_load_sts_pairs_formats(tmp_path, fmt):
    pairs = load_sts_pairs(write_sts(tmp_path, fmt))
    assert len(pairs) == 6
    assert pairs.sentence1[0] == "A man is playing a guitar."
    assert pairs.sentence2[-1] == "Stock markets fell sharply today."
    assert pairs.scores.tolist() == [s for *_, s in STS_PAIRS]


def test_load_sts_pairs_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_sts_pairs(tmp_path / "nope.tsv")
    (tmp_path / "p.txt").write_text("a\tb\t1\n")
    with pytest.raises(DatasetError, match=r"must end in \.tsv, \.csv or \.jsonl"):
        load_sts_pairs(tmp_path / "p.txt")
    (tmp_path / "p.tsv").write_text("a\tb\t1\nc\td\n")
    with pytest.raises(DatasetError, match="row 2: expected columns"):
        load_sts_pairs(tmp_path / "p.tsv")
    (tmp_path / "q.tsv").write_text("a\tb\t1\nc\td\thigh\n")
    with pytest.raises(DatasetError, match="not a number"):
        load_sts_pairs(tmp_path / "q.tsv")
    (tmp_path / "r.jsonl").write_text('{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(DatasetError, match="line 1: expected a JSON object with keys"):
        load_sts_pairs(tmp_path / "r.jsonl")


def test_spearman_own_ranks_match_scipy_and_hand_values():
    assert rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    stats = pytest.importorskip("scipy.stats", reason="scipy not installed")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)  # ties in a
    ra, rb = rankdata(a), rankdata(b)
    own = np.corrcoef(ra, rb)[0, 1]
    assert own == pytest.approx(stats.spearmanr(a, b).statistic)
    with pytest.raises(DatasetError, match="gold scores are all equal"):
        spearman([1, 2, 3], [1, 1, 1])


# ---- stored features ----------------------------------------------------------------------


def test_evaluate_store_from_npz_npy_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img, txt, of_text = _two_images()
    img_ids = ["A.jpg", "B.jpg"]
    cap_ids = ["A.jpg#0", "A.jpg#1", "A.jpg#2", "B.jpg#0", "B.jpg#1"]
    np.savez(tmp_path / "img.npz", features=img, ids=np.array(img_ids))
    np.save(tmp_path / "txt.npy", txt)
    (tmp_path / "txt.ids.txt").write_text("\n".join(cap_ids) + "\n")
    r = evaluate_store(tmp_path / "img.npz", tmp_path / "txt.npy")
    assert r["rsum"] == pytest.approx(510.0)
    # parquet, shuffled rows: the join is by id, not by row order.
    perm = [3, 0, 4, 2, 1]
    pq.write_table(
        pa.table({"id": [cap_ids[i] for i in perm], "features": [txt[i].tolist() for i in perm]}),
        tmp_path / "txt.parquet",
    )
    r2 = evaluate_store(tmp_path / "img.npz", tmp_path / "txt.parquet")
    assert r2.metrics == pytest.approx(r.metrics)
    assert r2.info["text_source"].endswith("txt.parquet")


def test_load_features_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 4), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"holds no sample ids; write them to x\.ids\.txt"):
        load_features(tmp_path / "x.npy")
    (tmp_path / "x.ids.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match=r"shape \(3, 4\) but 2 ids"):
        load_features(tmp_path / "x.npy")
    with pytest.raises(DatasetError, match="does not exist"):
        load_features(tmp_path / "missing.npz")
    with pytest.raises(DatasetError, match="not of the form '<image_id>#<k>'"):
        image_id_of_caption("A.jpg")
    assert image_id_of_caption("COCO_1.jpg#12") == "COCO_1.jpg"


def test_load_caption_json_keeps_variable_captions(coco_example):
    data = load_caption_json(coco_example / "new_val.json")
    assert len(data.image_ids) == 8 and len(data.captions) == 37  # the embedded val split
    counts = np.bincount([data.image_ids.index(i) for i in data.image_ids_of_texts])
    assert sorted(set(counts.tolist())) == [2, 5]
    assert all(p.is_file() for p in data.image_paths[:5])
    few = load_caption_json(coco_example / "new_val.json", max_images=3)
    assert len(few.image_ids) == 3 and set(few.image_ids_of_texts) == set(few.image_ids)


def _spec(name: str, dim: int):
    from cusa.store.spec import TeacherSpec

    return TeacherSpec(
        name=name, modality="image" if "image" in name else "text", model=f"student-{name}",
        weights_sha256="0" * 64, preprocessing={}, output_kind="embedding", dim=dim, dtype="float32",
    )  # fmt: skip


def test_evaluate_store_group_joins_by_id(tmp_path):
    """Student features written to a real cusa store in shuffled shards, read back by id."""
    from cusa.store.feature_store import FeatureStore

    img, txt, _ = _two_images()
    store = FeatureStore.open(tmp_path / "store", create=True)
    ig = store.group("toy", "val", _spec("student-image", 2), create=True)
    tg = store.group("toy", "val", _spec("student-text", 2), create=True)
    ig.write_shard("s1", ["B.jpg"], img[1:])
    ig.write_shard("s0", ["A.jpg"], img[:1])
    tg.write_shard("s1", ["B.jpg#1", "A.jpg#2", "B.jpg#0"], txt[[4, 2, 3]])
    tg.write_shard("s0", ["A.jpg#0", "A.jpg#1"], txt[:2])
    r = evaluate_store(
        "student-image", "student-text", store=tmp_path / "store", dataset="toy", split="val"
    )
    assert r["rsum"] == pytest.approx(510.0)
    assert r.counts["num_texts"] == 5


def test_cli_eval_on_stored_features(tmp_path):
    from typer.testing import CliRunner

    from cusa.cli import app

    img, txt, _ = _two_images()
    np.savez(tmp_path / "img.npz", features=img, ids=np.array(["A", "B"]))
    np.savez(tmp_path / "txt.npz", features=txt, ids=np.array(["A#0", "A#1", "A#2", "B#0", "B#1"]))
    runner = CliRunner()
    args = ["eval", "--image-features", str(tmp_path / "img.npz"),
            "--text-features", str(tmp_path / "txt.npz")]  # fmt: skip
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "out" / "report.json")])
    assert res.exit_code == 0, res.output
    assert "RSUM 510.00" in res.output
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["metrics"]["i2t_r1"] == 50.0 and saved["counts"]["num_images"] == 2
    res = runner.invoke(app, [*args, "--json", "--ks", "1,2"])
    assert res.exit_code == 0 and json.loads(res.output)["metrics"]["rsum"] == pytest.approx(
        50 + 100 + 60 + 100
    )

    bad = runner.invoke(app, ["eval", "--image-features", str(tmp_path / "img.npz")])
    assert bad.exit_code == 2 and "both --image-features and --text-features" in bad.output
    bad = runner.invoke(app, [*args, "--sts", "pairs.tsv"])
    assert bad.exit_code == 2 and "--sts needs --checkpoint" in bad.output
    bad = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "none.pt")])
    assert bad.exit_code == 2 and "--checkpoint needs --data" in bad.output
    bad = runner.invoke(
        app, ["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", "x.json"]
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = runner.invoke(app, ["eval", "--image-features", str(tmp_path / "img.npz"),
                              "--text-features", str(tmp_path / "img.npz")])  # fmt: skip
    assert bad.exit_code == 2 and "caption id 'A' is not of the form" in bad.output
    bad = runner.invoke(app, [*args, "--ks", "1,x"])
    assert bad.exit_code != 0 and "--ks must be comma-separated integers" in bad.output


def test_checkpoint_errors(tmp_path):
    import torch

    from cusa_train.evaluation.evaluate import load_checkpoint_model

    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_checkpoint_model(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "nocfg.pt")
    with pytest.raises(ConfigError, match="is not a cusa trainer checkpoint"):
        load_checkpoint_model(tmp_path / "nocfg.pt")


def test_feature_file_needing_pickle_is_refused_with_a_clear_message(tmp_path):
    import numpy as np
    import pytest

    from cusa.errors import DatasetError
    from cusa_train.evaluation.evaluate import load_features

    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="never unpickles"):
        load_features(path)
