"""Round 3 (issue 21): evaluation inputs held to the extraction rules (cusa.safe_files).

Benchmark index files and images, SentEval files: regular files only, inside --root, size-capped,
never a hang (FIFO), never an unbounded read (/dev/zero, a 3 GB sparse image), never a walk into
a symlink loop; messages bounded even for a 50 MB path. Benchmark files are split into lines as
their official readers' ``for line in f`` does (newlines only).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_common import MAX_MESSAGE, deadline

from cusa.errors import DatasetError
from cusa.readers import coco_sample_root
from cusa_train.evaluation.image_benchmarks import get_image_benchmark
from cusa_train.evaluation.sts_benchmarks import SENTEVAL_STS_TASKS, load_sts_task


def _pics() -> list[Path]:
    return sorted((coco_sample_root() / "pics").glob("*.jpg"))


def _sop(root: Path, extra_rows: list[str] = ()) -> Path:
    folder = root / "sop" / "Stanford_Online_Products"
    rows = ["image_id class_id super_class_id path"]
    for n, pic in enumerate(_pics()[:4], 1):
        rel = f"class_1_final/{11319 + n % 2}_{n}.JPG"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pic, folder / rel)
        rows.append(f"{n} {11319 + n % 2} 1 {rel}")
    (folder / "Ebay_test.txt").write_text("\n".join([*rows, *extra_rows]) + "\n")
    return folder


def _cub(root: Path) -> Path:
    images = root / "cub" / "CUB_200_2011" / "images"
    folders = [images / f"{i + 1:03d}.Bird_{i + 1:03d}" for i in range(200)]
    for f in folders:
        f.mkdir(parents=True)
    for k, pic in enumerate(_pics()[:4]):
        shutil.copyfile(pic, folders[100 + k % 2] / f"b{k}.jpg")
    return images


def _outside(root: Path) -> Path:
    out = root.parent / "outside"
    out.mkdir(exist_ok=True)
    shutil.copyfile(_pics()[5], out / "x.jpg")
    return out


def _fifo_index(root: Path) -> None:
    index = _sop(root) / "Ebay_test.txt"
    index.unlink()
    os.mkfifo(index)


def _dev_zero_index(root: Path) -> None:
    index = _sop(root) / "Ebay_test.txt"
    index.unlink()
    index.symlink_to("/dev/zero")


def _sparse_image(root: Path) -> None:
    folder = _sop(root, ["9 11319 1 class_1_final/huge.JPG"])
    with open(folder / "class_1_final" / "huge.JPG", "wb") as fh:
        fh.truncate(3 * 2**30)  # 3 GB, sparse: nothing is written


def _cub_link_out(root: Path) -> None:
    images = _cub(root)
    out = _outside(root)
    shutil.rmtree(images / "150.Bird_150")
    (images / "150.Bird_150").symlink_to(out, target_is_directory=True)


def _cub_loop(root: Path) -> None:
    images = _cub(root)
    (images / "101.Bird_101" / "l1").symlink_to(".", target_is_directory=True)
    (images / "101.Bird_101" / "l2").symlink_to(".", target_is_directory=True)


# name: (make the hostile benchmark under root, benchmark, what the message must say; None: the
# benchmark must open and list each image once)
_IMAGE_CASES: dict[str, tuple[Callable[[Path], object], str, str | None]] = {
    "eval: SOP Ebay_test.txt line with a ../ path outside --root": (
        lambda r: (_outside(r), _sop(r, ["9 11319 1 ../../../outside/x.jpg"])),
        "sop", "outside its root"),
    "eval: SOP Ebay_test.txt line with an absolute path": (
        lambda r: _sop(r, [f"9 11319 1 {_outside(r) / 'x.jpg'}"]), "sop", "outside its root"),
    "eval: SOP Ebay_test.txt line with a 50 MB path": (
        lambda r: _sop(r, ["9 11319 1 " + "a/" * 25_000_000 + "x.jpg"]), "sop",
        "longer than any file name"),
    "eval: SOP Ebay_test.txt is a FIFO": (_fifo_index, "sop", "FIFO"),
    "eval: SOP Ebay_test.txt is /dev/zero (a symlink)": (
        _dev_zero_index, "sop", "outside its root"),
    "eval: a 3 GB sparse .jpg listed by SOP": (_sparse_image, "sop", "over the limit"),
    "eval: CUB class folder symlinked outside --root": (_cub_link_out, "cub", "outside its root"),
    "eval: CUB class folder with `ln -s . l1; ln -s . l2`": (_cub_loop, "cub", None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_IMAGE_CASES))
def test_hostile_benchmark_inputs_are_refused_without_hanging(tmp_path, case, reliability_log):
    make, bench, expected = _IMAGE_CASES[case]
    root = tmp_path / "bench"
    root.mkdir()
    make(root)
    message = ""
    with deadline(60):
        try:
            split = get_image_benchmark(bench).open(root)
        except DatasetError as exc:
            message = str(exc)
    if expected is None:  # the loop: walked once, each image listed once
        ok = not message and len(split.query_paths) == len(set(split.query_paths)) == 4
        outcome = "walked once (symlinked folders inside --root visited once): no hang"
    else:
        ok = expected in message and len(message) <= MAX_MESSAGE and "\n" not in message
        outcome = "refused in one bounded line naming the file, before anything is read/encoded"
    reliability_log.bad_input(case, "eval", caught=ok, outcome=outcome, message=message)
    assert ok, message[:2000]


# -- SentEval files ------------------------------------------------------------------------------


def _task(name: str):
    return next(t for t in SENTEVAL_STS_TASKS if t.name == name)


def _stsb(root: Path, rows: list[str], *, end: str = "\n", newline: str = "\n") -> Path:
    folder = root / "downstream" / _task("STSBenchmark").folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sts-test.csv").write_bytes((newline.join(rows) + end).encode())
    return folder / "sts-test.csv"


_ROWS = [
    f"main-captions\tMSRvid\t2012test\t{k:04d}\t{k}.5\tA man {k} .\tA dog {k} ." for k in range(4)
]


@pytest.mark.parametrize(
    "case",
    ["U+2028 in a sentence", "U+0085 in a sentence", "\\r\\n line ends", "no final newline"],
)
def test_senteval_lines_split_at_newlines_only(tmp_path, case):
    """As SentEval's ``for line in f``: U+2028/U+0085 stay inside their sentence."""
    rows = list(_ROWS)
    if case.startswith("U+"):
        char = "\u2028" if "2028" in case else "\u0085"
        rows[1] = rows[1].replace("A dog 1", f"A dog{char}1")
    _stsb(
        tmp_path,
        rows,
        end="" if case == "no final newline" else "\n",
        newline="\r\n" if "\\r\\n" in case else "\n",
    )
    pairs = load_sts_task(tmp_path, _task("STSBenchmark"))["test"]
    assert len(pairs) == 4
    assert list(pairs.scores) == [0.5, 1.5, 2.5, 3.5]
    assert pairs.sentence2[3] == "A dog 3 ."  # the last line, with or without its newline


def _fifo_sts(root: Path) -> None:
    path = _stsb(root, _ROWS)
    path.unlink()
    os.mkfifo(path)


_STS_CASES = {
    "eval: sts-test.csv is a FIFO": (_fifo_sts, "FIFO"),
    "eval: STS gold score nan": (
        lambda r: _stsb(r, [*_ROWS, "g\tf\ty\t9\tnan\tA b .\tC d ."]), "not a finite number"),
    "eval: STS gold score inf": (
        lambda r: _stsb(r, [*_ROWS, "g\tf\ty\t9\tinf\tA b .\tC d ."]), "not a finite number"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_STS_CASES))
def test_hostile_senteval_files_are_refused(tmp_path, case, reliability_log):
    make, expected = _STS_CASES[case]
    make(tmp_path)
    message = ""
    with deadline(60):
        try:
            load_sts_task(tmp_path, _task("STSBenchmark"))
        except DatasetError as exc:
            message = str(exc)
    ok = expected in message and len(message) <= MAX_MESSAGE
    reliability_log.bad_input(
        case,
        "eval",
        caught=ok,
        outcome="refused in one line naming the file and line (no hang, no nan score)",
        message=message,
    )
    assert ok, message
