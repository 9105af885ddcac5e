"""Tiny copies of the paper's uni-modal benchmarks in their official file layouts.

The images are real COCO images of the embedded sample and the sentences are its real
captions, but every class label and every STS gold score is assigned here for the tests: they
mean nothing about the images or sentences. Each writer returns what a correct loader must read
back, so the tests can compare against it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cusa.readers import coco_sample_root


def sample_images() -> list[Path]:
    """The 32 real COCO images of the embedded sample, sorted."""
    return sorted((coco_sample_root() / "pics").glob("*.jpg"))


def sample_captions() -> dict[str, list[str]]:
    """``{image file name: its real captions}`` from the sample's train and val JSON."""
    out: dict[str, list[str]] = {}
    for split in ("train", "val"):
        for rec in json.loads((coco_sample_root() / f"new_{split}.json").read_text()):
            out.setdefault(Path(rec["image_path"]).name, []).append(rec["caption"])
    return out


def _put(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


# CUB: 200 class folders; labels are sorted folder indices, 100-199 are evaluated.
CUB_EVAL = {100: 3, 101: 2, 102: 3, 150: 2, 199: 2}  # folder index -> images (labels for the test)


def write_cub(root: Path) -> tuple[list[Path], list[int]]:
    images = root / "cub" / "CUB_200_2011" / "images"
    folders = [f"{i + 1:03d}.Bird_{i + 1:03d}" for i in range(200)]
    for name in folders:
        (images / name).mkdir(parents=True, exist_ok=True)
    pics = iter(sample_images())
    _put(next(pics), images / folders[0] / "train_only.jpg")  # a training class: not evaluated
    paths, labels = [], []
    for idx, n in CUB_EVAL.items():
        for k in range(n):
            paths.append(_put(next(pics), images / folders[idx] / f"Bird_{idx:03d}_{k}.jpg"))
            labels.append(idx)
    # ImageFolder skips non-images; the official loader also skips macOS "._" files.
    (images / folders[100] / "notes.txt").write_text("not an image")
    _put(sample_images()[0], images / folders[100] / "._Bird_100_0.jpg")
    return paths, labels


def write_sop(root: Path) -> tuple[list[Path], list[int]]:
    folder = root / "sop" / "Stanford_Online_Products"
    pics = iter(sample_images())
    rows = ["image_id class_id super_class_id path"]
    paths, labels = [], []
    # (class_id as in the file, super class); 12 is a training class id and is skipped.
    for n, (class_id, sup) in enumerate(
        [
            (11319, 1),
            (11319, 1),
            (11320, 2),
            (11320, 2),
            (11320, 2),
            (22634, 3),
            (22634, 3),
            (12, 1),
        ],
        1,
    ):
        rel = f"class_{sup}_final/{class_id}_{n}.JPG"
        _put(next(pics), folder / rel)
        rows.append(f"{n} {class_id} {sup} {rel}")
        if class_id != 12:
            paths.append(folder / rel)
            labels.append(class_id - 1)
    (folder / "Ebay_test.txt").write_text("\n".join(rows) + "\n")
    return paths, labels


def write_inshop(root: Path) -> dict[str, tuple[list[Path], list[int]]]:
    folder = root / "inshop"
    pics = iter(sample_images())
    entries = [
        ("id_00000002", "train"), ("id_00000007", "query"), ("id_00000007", "gallery"),
        ("id_00000007", "gallery"), ("id_00000011", "query"), ("id_00000011", "gallery"),
        ("id_00000012", "query"), ("id_00000012", "gallery"), ("id_00000015", "gallery"),
    ]  # fmt: skip
    rows = [str(len(entries)), "image_name item_id evaluation_status"]
    out: dict[str, tuple[list[Path], list[int]]] = {"query": ([], []), "gallery": ([], [])}
    for n, (item, status) in enumerate(entries):
        name = f"img/WOMEN/Dresses/{item}/{n:02d}_1_front.jpg"
        _put(next(pics), folder / "Img" / name)
        rows.append(f"{name}   {item}   {status}")
        if status != "train":
            out[status][0].append(folder / "Img" / name)
            out[status][1].append(int(item.split("_")[-1]))
    (folder / "Eval").mkdir(parents=True)
    (folder / "Eval" / "list_eval_partition.txt").write_text("\n".join(rows) + "\n")
    return out


def write_inat(root: Path) -> tuple[list[Path], list[int]]:
    folder = root / "inaturalist"
    pics = iter(sample_images())
    species = [("Plantae", 7477), ("Plantae", 7477), ("Aves", 3012), ("Aves", 3012), ("Aves", 3012),
               ("Fungi", 5001), ("Fungi", 5001)]  # fmt: skip
    lines, paths, labels = [], [], []
    for n, (kingdom, sid) in enumerate(species):
        rel = f"train_val2018/{kingdom}/{sid}/{n:032x}.jpg"
        _put(next(pics), folder / rel)
        lines.append(rel)
        paths.append(folder / rel)
        labels.append(sid)
    (folder / "Inat_dataset_splits").mkdir(parents=True)
    (folder / "Inat_dataset_splits" / "Inaturalist_test_set1.txt").write_text(
        "\n".join(lines) + "\n"
    )
    return paths, labels


def write_cars(root: Path) -> tuple[list[Path], list[int]]:
    import scipy.io

    folder = root / "cars"
    pics = iter(sample_images())
    classes = [1, 98, 99, 99, 150, 150, 196, 196]  # 1-based as in the file; 1 and 98 are train
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annos = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    paths, labels = [], []
    for n, cls in enumerate(classes):
        rel = f"car_ims/{n + 1:06d}.jpg"
        _put(next(pics), folder / rel)
        annos[0, n] = (np.array([rel]), *(np.array([[v]]) for v in (10, 20, 300, 200)),
                       np.array([[cls]], dtype=np.uint8), np.array([[n % 2]], dtype=np.uint8))  # fmt: skip
        if cls - 1 >= 98:
            paths.append(folder / rel)
            labels.append(cls - 1)
    scipy.io.savemat(folder / "cars_annos.mat", {"annotations": annos})
    return paths, labels


def write_all_image_benchmarks(root: Path) -> dict[str, object]:
    return {
        "cub": write_cub(root),
        "sop": write_sop(root),
        "inshop": write_inshop(root),
        "inat": write_inat(root),
        "cars": write_cars(root),
    }


# ---- SentEval STS --------------------------------------------------------------------------


def _clean(caption: str) -> str:
    # One line, single spaces: a caption must not break the one-pair-per-line files.
    return " ".join(caption.split())


def _pairs(seed: int, n: int) -> list[tuple[str, str, float]]:
    """``n`` pairs of real captions: two captions of one image (score 4-5) or of two images
    (score 0-2). The scores are assigned here; they are not human judgements."""
    caps = [c for c in sample_captions().values() if len(c) >= 2]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = caps[int(rng.integers(len(caps)))]
        if k % 2 == 0:
            out.append((_clean(a[0]), _clean(a[1]), round(float(rng.uniform(4, 5)), 2)))
        else:
            b = caps[int(rng.integers(len(caps)))]
            out.append((_clean(a[0]), _clean(b[-1]), round(float(rng.uniform(0, 2)), 2)))
    return out


def write_senteval(root: Path) -> dict[str, dict[str, list[tuple[str, str, float]]]]:
    """SentEval's ``data/downstream`` layout for the seven STS tasks; returns the scored pairs
    a loader must read (unscored pairs are written but dropped, as SentEval does)."""
    from cusa_train.evaluation.sts_benchmarks import SENTEVAL_STS_TASKS

    down = root / "downstream"
    expected: dict[str, dict[str, list[tuple[str, str, float]]]] = {}
    for t_i, task in enumerate(SENTEVAL_STS_TASKS):
        folder = down / task.folder
        folder.mkdir(parents=True, exist_ok=True)
        expected[task.name] = {}
        if task.aggregate == "all":
            for s_i, subset in enumerate(task.subsets):
                pairs = _pairs(100 * t_i + s_i, 4 + s_i)
                inputs = [f"{a}\t{b}" for a, b, _ in pairs] + [
                    "An unscored pair .\tStill unscored ."
                ]
                golds = [f"{s}" for *_, s in pairs] + [""]
                (folder / f"STS.input.{subset}.txt").write_text("\n".join(inputs) + "\n")
                (folder / f"STS.gs.{subset}.txt").write_text("\n".join(golds) + "\n")
                expected[task.name][subset] = [
                    (" ".join(a.split()), " ".join(b.split()), s) for a, b, s in pairs
                ]
        elif task.name == "STSBenchmark":
            pairs = _pairs(900, 9)
            rows = [
                f"main-captions\tMSRvid\t2012test\t{k:04d}\t{s}\t{a}\t{b}"
                for k, (a, b, s) in enumerate(pairs)
            ]
            rows[0] += "\tsource-a\tsource-b"  # some STS-B lines carry extra columns
            (folder / "sts-test.csv").write_text("\n".join(rows) + "\n")
            expected[task.name]["test"] = [
                (" ".join(a.split()), " ".join(b.split()), s) for a, b, s in pairs
            ]
        else:
            pairs = _pairs(901, 8)
            rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
            rows += [f"{k}\t{a}\t{b}\t{s}\tNEUTRAL" for k, (a, b, s) in enumerate(pairs)]
            (folder / "SICK_test_annotated.txt").write_text("\n".join(rows) + "\n")
            expected[task.name]["test"] = [
                (" ".join(a.split()), " ".join(b.split()), s) for a, b, s in pairs
            ]
    return expected
