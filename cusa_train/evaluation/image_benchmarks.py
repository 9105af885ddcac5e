"""The image retrieval benchmarks of the CUSA paper (Table 3), read in their official layouts.

Each loader reads the same files as the official CUSA loaders (``dataset_evalimg/`` of
lerogo/aaai24_itr_cusa, themselves taken from hyp_metric / proxy-anchor and ROADMAP) and
returns the evaluation split with the official protocol:

=========  =========================================================  ======================
name       files read under ``<root>``                                eval split
=========  =========================================================  ======================
cub        ``cub/CUB_200_2011/images/<class>/<img>``                  classes 101-200 (by
                                                                      sorted folder name)
sop        ``sop/Stanford_Online_Products/Ebay_test.txt``             classes 11319-22634
inshop     ``inshop/Eval/list_eval_partition.txt`` + ``inshop/Img/``  query vs gallery
inat       ``inaturalist/Inat_dataset_splits/Inaturalist_test_set1``  test set 1
cars       ``cars/cars_annos.mat``                                    classes 99-196
=========  =========================================================  ======================

``<root>`` is the folder the official script's ``root`` points to (it holds ``cub/``, ``sop/``,
``inshop/``, ``inaturalist/`` and ``cars/``); the benchmark's own folder is accepted too.
Every problem with a file (missing, malformed line) is a one-line :class:`DatasetError` that
names the file.

:func:`evaluate_image_benchmarks` encodes each split through every head of a model and scores
rank-1 (:func:`cusa_train.evaluation.metrics.nearest_neighbour_rank1`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cusa.errors import ConfigError, DatasetError
from cusa.registry import Registry
from cusa.safe_files import (
    MAX_IMAGE_BYTES,
    MAX_INDEX_BYTES,
    outside_root_problem,
    path_text_problem,
    regular_file_problem,
    short_path,
    short_repr,
    walk_files,
)
from cusa_train.evaluation.data import read_lines
from cusa_train.evaluation.encoding import EvalEncoder, HeadEncoder
from cusa_train.evaluation.metrics import RANK1_PROTOCOLS, nearest_neighbour_rank1
from cusa_train.evaluation.report import BACKBONE, USA, EvalReport

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS, which the official CUB loader (ImageFolder) uses.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageRetrievalSet:
    """The evaluation split of one benchmark.

    Args:
        name: registry name, e.g. ``"cub"``.
        query_paths: images used as queries.
        query_labels: class label of each query.
        gallery_paths: separate gallery images (In-Shop); ``None`` when the queries are their
            own gallery (each query excluded from its own search).
        gallery_labels: labels of the gallery images.
        source: the index file the split was read from.
    """

    name: str
    query_paths: list[Path]
    query_labels: list[int]
    gallery_paths: list[Path] | None = None
    gallery_labels: list[int] | None = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(set(self.query_labels) | set(self.gallery_labels or []))

    @property
    def num_images(self) -> int:
        return len(self.query_paths) + len(self.gallery_paths or [])

    def all_paths(self) -> list[Path]:
        return [*self.query_paths, *(self.gallery_paths or [])]


@dataclass(frozen=True)
class ImageBenchmark:
    """One registered benchmark: where it lives under the root and how to read it.

    Args:
        name: registry name.
        title: the benchmark's usual name.
        folder: its folder relative to the root, as the official loader expects it.
        marker: a file or folder (relative to ``folder``) that must exist.
        load: ``folder path -> ImageRetrievalSet``.
        protocol: one line on the split and the rank-1 protocol.
    """

    name: str
    title: str
    folder: str
    marker: str
    load: Callable[[Path], ImageRetrievalSet]
    protocol: str

    def locate(self, root: str | os.PathLike) -> Path:
        """The benchmark folder: ``<root>/<folder>``, or ``root`` itself when it is that folder.

        Raises:
            DatasetError: neither holds the benchmark's marker file.
        """
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DatasetError(f"benchmark root {str(base)!r} is not a directory")
        for cand in (base / self.folder, base):
            if (cand / self.marker).exists():
                return cand
        raise DatasetError(
            f"{self.title}: {str(base / self.folder / self.marker)!r} does not exist; --root must "
            f"hold {self.folder}/ in the official layout (see docs/evaluation.md)"
        )

    def open(
        self,
        root: str | os.PathLike,
        *,
        check_files: bool = True,
        allow_outside_root: bool = False,
    ) -> ImageRetrievalSet:
        """Read the evaluation split; with ``check_files`` every image must be a regular file
        of at most ``MAX_IMAGE_BYTES`` inside ``root`` (the extraction rules, :mod:`cusa.safe_files`),
        so a ``../`` or absolute path, a symlink leading out, a FIFO or a huge file is refused
        before anything is encoded; ``allow_outside_root`` lifts the inside-``root`` rule only."""
        base = Path(root).expanduser()
        split = self.load(self.locate(root))
        if not split.query_paths:
            raise DatasetError(
                f"{self.title}: {short_path(split.source)} lists no evaluation image"
            )
        if check_files:
            first, bad = None, 0
            for p in split.all_paths():
                problem = (
                    None if allow_outside_root else outside_root_problem(p, base, what="image")
                ) or regular_file_problem(p, MAX_IMAGE_BYTES, what="image")
                if problem:
                    first, bad = first or problem, bad + 1
            if first:
                raise DatasetError(
                    f"{self.title}: {first} (listed in {Path(split.source).name!r}; {bad} of "
                    f"{split.num_images} images refused); each must be a regular file of at "
                    f"most {MAX_IMAGE_BYTES // 2**20} MiB inside --root"
                )
        return split


IMAGE_BENCHMARKS: Registry[ImageBenchmark] = Registry("image retrieval benchmark")


def register_image_benchmark(benchmark: ImageBenchmark, *, overwrite: bool = False) -> None:
    """Add a benchmark to the registry (``cusa eval --task image-retrieval --dataset NAME``)."""
    IMAGE_BENCHMARKS.register(benchmark.name, benchmark, overwrite=overwrite)


def get_image_benchmark(name: str) -> ImageBenchmark:
    """The registered benchmark ``name``; an unknown name lists the known ones."""
    return IMAGE_BENCHMARKS.get(name)


def list_image_benchmarks() -> list[str]:
    return IMAGE_BENCHMARKS.list()


# The four benchmarks of the paper's Table 3, in its column order (and the official script's).
PAPER_IMAGE_BENCHMARKS = ("cub", "sop", "inshop", "inat")


def parse_benchmark_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"cub,sop"`` or ``"all"`` (the paper's four) -> registered names, checked."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"]:
        return list(PAPER_IMAGE_BENCHMARKS)
    if not names:
        raise ConfigError("name at least one image retrieval benchmark (or 'all')")
    for n in names:
        get_image_benchmark(n)
    if len(set(names)) != len(names):
        raise ConfigError(f"benchmark named twice in {names!r}")
    return names


# ---- loaders ----------------------------------------------------------------------------------


def _check_path_text(rel: str, title: str, index: Path, lineno: int) -> None:
    """Refuse a listed path that can name no file (50 MB long, a NUL) before a Path is built."""
    problem = path_text_problem(rel, what="image path")
    if problem:
        raise DatasetError(f"{title}: {index.name!r} entry {lineno}: {problem}")


def _load_cub(folder: Path) -> ImageRetrievalSet:
    """``torchvision.datasets.ImageFolder(images)``: labels are sorted class-folder indices;
    the eval split is labels 100-199; files whose name starts with ``._`` are skipped."""
    images = folder / "images"
    with os.scandir(images) as entries:
        classes = sorted(e.name for e in entries if e.is_dir())
    if len(classes) != 200:
        raise DatasetError(
            f"CUB-200-2011: {str(images)!r} has {len(classes)} class folders, expected the 200 "
            "of CUB_200_2011/images (the split is by sorted folder index: 100-199 are evaluated)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        if label < 100:
            continue
        # ImageFolder walks with followlinks=True; walk_files follows links inside the folder
        # only, each folder once, so `ln -s . loop` cannot make the walk endless.
        try:
            walked = list(walk_files(images / cls, folder))
        except PermissionError as exc:
            raise DatasetError(
                f"CUB-200-2011: {exc}; move the class folder inside {short_path(folder)}"
            ) from None
        for dirpath, fnames in walked:
            for fname in fnames:
                if fname.lower().endswith(IMG_EXTENSIONS) and not fname.startswith("._"):
                    paths.append(Path(dirpath) / fname)
                    labels.append(label)
    return ImageRetrievalSet("cub", paths, labels, source=str(images))


def _load_sop(folder: Path) -> ImageRetrievalSet:
    """``Ebay_test.txt``: a header, then ``image_id class_id super_class_id path``; eval classes
    are ``class_id - 1`` in 11318..22633."""
    index = folder / "Ebay_test.txt"
    lines = read_lines(index, "Stanford Online Products file", root=folder)
    paths: list[Path] = []
    labels: list[int] = []
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields:
            continue
        try:
            _, class_id, _, rel = fields
            label = int(class_id) - 1
        except ValueError:
            raise DatasetError(
                f"Stanford Online Products: {str(index)!r} line {lineno}: expected "
                f"'image_id class_id super_class_id path', got {short_repr(line)}"
            ) from None
        if 11318 <= label < 22634:
            _check_path_text(rel, "Stanford Online Products", index, lineno)
            paths.append(folder / rel)
            labels.append(label)
    return ImageRetrievalSet("sop", paths, labels, source=str(index))


def _load_inshop(folder: Path) -> ImageRetrievalSet:
    """``Eval/list_eval_partition.txt``: a count line, a header line (``image_name item_id
    evaluation_status``), then one image per line; query and gallery labels are the item
    numbers (``id_00000001`` -> 1). Images live under ``Img/``."""
    index = folder / "Eval" / "list_eval_partition.txt"
    lines = read_lines(index, "In-Shop file", root=folder)
    header = lines[1].split() if len(lines) > 1 else []
    if header[:3] != ["image_name", "item_id", "evaluation_status"]:
        raise DatasetError(
            f"In-Shop: {str(index)!r} line 2 must be the header 'image_name item_id "
            f"evaluation_status', got {short_repr(lines[1] if len(lines) > 1 else '')}"
        )
    sides: dict[str, tuple[list[Path], list[int]]] = {"query": ([], []), "gallery": ([], [])}
    for lineno, line in enumerate(lines[2:], 3):
        if not line.strip():
            continue
        fields = line.split()
        try:
            name, item, status = fields
            label = int(item.split("_")[-1])
        except ValueError:
            raise DatasetError(
                f"In-Shop: {str(index)!r} line {lineno}: expected 'image_name item_id "
                f"evaluation_status' with item ids like id_00000001, got {short_repr(line)}"
            ) from None
        if status in sides:
            _check_path_text(name, "In-Shop", index, lineno)
            sides[status][0].append(folder / "Img" / name)
            sides[status][1].append(label)
        elif status != "train":
            raise DatasetError(
                f"In-Shop: {str(index)!r} line {lineno}: evaluation_status {short_repr(status)} is not "
                "train, query or gallery"
            )
    (qp, ql), (gp, gl) = sides["query"], sides["gallery"]
    if not gp:
        raise DatasetError(f"In-Shop: {str(index)!r} lists no gallery image")
    return ImageRetrievalSet("inshop", qp, ql, gp, gl, source=str(index))


def _load_inat(folder: Path) -> ImageRetrievalSet:
    """``Inat_dataset_splits/Inaturalist_test_set1.txt``: one image path per line, relative to
    the ``inaturalist`` folder; the label is the species folder (``.../<kingdom>/<id>/x.jpg``).

    The official loader also opens ``train2018.json``, for taxonomy labels rank-1 never uses,
    so it is not needed here.
    """
    index = folder / "Inat_dataset_splits" / "Inaturalist_test_set1.txt"
    paths: list[Path] = []
    labels: list[int] = []
    for lineno, line in enumerate(read_lines(index, "iNaturalist file", root=folder), 1):
        rel = line.strip()
        if not rel:
            continue
        _check_path_text(rel, "iNaturalist", index, lineno)
        parts = rel.split("/")
        try:
            label = int(parts[-2])
        except (ValueError, IndexError):
            raise DatasetError(
                f"iNaturalist: {str(index)!r} line {lineno}: expected a path like "
                f"train_val2018/<kingdom>/<species id>/<file>.jpg, got {short_repr(rel)}"
            ) from None
        paths.append(folder / rel)
        labels.append(label)
    return ImageRetrievalSet("inat", paths, labels, source=str(index))


def _load_cars(folder: Path) -> ImageRetrievalSet:
    """``cars_annos.mat`` (``annotations``: ``relative_im_path``, ..., ``class``); eval classes
    are ``class - 1`` in 98..195. Needs scipy to read the MATLAB file."""
    index = folder / "cars_annos.mat"
    try:
        import scipy.io
        from scipy.io.matlab import MatReadError
    except ImportError as exc:
        raise ConfigError("reading cars_annos.mat needs scipy: pip install scipy") from exc
    problem = regular_file_problem(index, MAX_INDEX_BYTES, what="Cars196 file")
    if problem is None:
        problem = outside_root_problem(index, folder, what="Cars196 file")
    if problem and "does not exist" not in problem:  # a FIFO or /dev/zero would block loadmat
        raise DatasetError(f"{problem}; --root must hold cars/cars_annos.mat")
    try:
        mat = scipy.io.loadmat(str(index))
        annos = mat["annotations"][0]
        names = annos.dtype.names or ()
        if "relative_im_path" not in names or "class" not in names:
            raise KeyError(f"fields {names!r}")
        rows = [(str(a["relative_im_path"].flat[0]), int(a["class"].flat[0]) - 1) for a in annos]
    except FileNotFoundError:
        raise DatasetError(f"Cars196: {str(index)!r} does not exist") from None
    except (
        MatReadError,
        NotImplementedError,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        OSError,
    ) as exc:
        raise DatasetError(
            f"Cars196: {str(index)!r} is not the Stanford Cars cars_annos.mat (an 'annotations' "
            f"struct with relative_im_path and class): {exc}"
        ) from exc
    for lineno, (rel, _) in enumerate(rows, 1):
        _check_path_text(rel, "Cars196", index, lineno)
    paths = [folder / rel for rel, y in rows if 98 <= y < 196]
    labels = [y for _, y in rows if 98 <= y < 196]
    return ImageRetrievalSet("cars", paths, labels, source=str(index))


for _bench in (
    ImageBenchmark(
        "cub", "CUB-200-2011", "cub/CUB_200_2011", "images", _load_cub,
        "classes 101-200 (5,924 images); each image queries all others",
    ),
    ImageBenchmark(
        "sop", "Stanford Online Products", "sop/Stanford_Online_Products", "Ebay_test.txt",
        _load_sop, "Ebay_test.txt (60,502 images, 11,316 products); each image queries all others",
    ),
    ImageBenchmark(
        "inshop", "In-Shop", "inshop", "Eval/list_eval_partition.txt", _load_inshop,
        "14,218 queries against a gallery of 12,612 images (3,985 items)",
    ),
    ImageBenchmark(
        "inat", "iNaturalist 2018", "inaturalist",
        "Inat_dataset_splits/Inaturalist_test_set1.txt", _load_inat,
        "ROADMAP test set 1 (136,093 images, 2,452 species); each image queries all others",
    ),
    ImageBenchmark(
        "cars", "Cars196", "cars", "cars_annos.mat", _load_cars,
        "classes 99-196 (8,131 images); each image queries all others",
    ),
):  # fmt: skip
    register_image_benchmark(_bench)


# ---- evaluation ----------------------------------------------------------------------------


def evaluate_image_benchmarks(
    model: EvalEncoder,
    names: str | Sequence[str],
    root: str | os.PathLike,
    *,
    batch_size: int = 128,
    workers: int | None = None,
    chunk_size: int = 1024,
    protocol: str = "official",
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Rank-1 image retrieval on the paper's benchmarks (Table 3), official layout and protocol.

    Each benchmark is read by its registered loader, encoded through every head
    of ``model`` and scored with :func:`cusa_train.evaluation.metrics.nearest_neighbour_rank1`
    (Euclidean nearest neighbour on L2-normalised features; In-Shop: queries against the
    gallery). The first column is what the official ``evaluation_img.py`` scores,
    ``encode_image(cross_modal=False)``: the USA head, or for a model without USA heads the
    student's backbone features (``_backbone``); the cross-modal head is the second.

    Args:
        model: the model (a CusaModel gives the official uni-modal column).
        names: benchmark names (``cub``, ``sop``, ``inshop``, ``inat``, ``cars``), a
            comma-separated string, or ``"all"`` (the paper's four).
        root: the folder holding ``cub/``, ``sop/``, ``inshop/``, ``inaturalist/``, ``cars/``
            (or, for a single benchmark, its own folder).
        batch_size: images encoded at once.
        workers: threads decoding images.
        chunk_size: queries scored at once (the ``strict`` protocol; ``official`` scores 128
            at a time as the official script does).
        protocol: ``official`` (default: reproduces the paper's Table 3, ties resolved as the
            official script's ``torch.topk``) or ``strict`` (the query never its own neighbour,
            ties count as misses); see :func:`~cusa_train.evaluation.metrics.nearest_neighbour_rank1`.
        info: extra metadata recorded in the report.

    Returns:
        Metrics ``{name}_r1`` (cross-modal head), ``{name}_r1_usa`` (USA head) or
        ``{name}_r1_backbone`` (backbone of a model without USA heads) and, for two or more
        benchmarks, ``image_avg_r1`` (+ the same suffix), the mean as the official script prints it.
    """
    if protocol not in RANK1_PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {RANK1_PROTOCOLS}, got {protocol!r}")
    benches = [get_image_benchmark(n) for n in parse_benchmark_names(names)]
    splits = [b.open(root) for b in benches]  # read every index before encoding anything
    enc = HeadEncoder(model, workers=workers, official_uni=True)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for bench, split in zip(benches, splits, strict=True):
        log.info("%s: encoding %d images", bench.title, split.num_images)
        feats = enc.encode_images(split.all_paths(), batch_size)
        nq = len(split.query_paths)
        for head, x in feats.items():
            sfx = {"usa": USA, "backbone": BACKBONE}.get(head, "")
            gallery = None if split.gallery_paths is None else x[nq:]
            res = nearest_neighbour_rank1(
                x[:nq], split.query_labels, gallery, split.gallery_labels,
                chunk_size=chunk_size, device=enc.device, protocol=protocol,
            )  # fmt: skip
            metrics[f"{bench.name}_r1{sfx}"] = res.r1
        counts[f"{bench.name}_queries"] = nq
        counts[f"{bench.name}_gallery"] = len(split.gallery_paths or split.query_paths) - (
            0 if split.gallery_paths else 1
        )
        counts[f"{bench.name}_classes"] = split.num_classes
    if len(benches) > 1:
        uni = {"usa": USA, "backbone": BACKBONE}.get(enc.uni_head or "")
        for sfx in ("", uni) if uni else ("",):
            metrics[f"image_avg_r1{sfx}"] = float(
                np.mean([metrics[f"{b.name}_r1{sfx}"] for b in benches])
            )
    return EvalReport(
        metrics,
        counts,
        {
            "task": "image-retrieval",
            "root": str(root),
            "heads": enc.note,
            "uni_modal_features": enc.uni_head,
            "rank1_protocol": protocol,
            "image_benchmarks": [b.name for b in benches],
            "image_benchmark_titles": {b.name: b.title for b in benches},
            "protocols": {b.name: b.protocol for b in benches},
            "sources": {s.name: s.source for s in splits},
            **dict(info or {}),
        },
    )
