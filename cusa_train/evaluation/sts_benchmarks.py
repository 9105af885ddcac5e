"""The STS benchmarks of the CUSA paper (Table 4), read from SentEval's data folder.

The official ``evaluation_sts.py`` runs SimCSE's copy of SentEval (``task_set='sts'``,
``mode='test'``) on STS12-16, STS-B and SICK-R and prints, per task, Spearman x 100:

- STS12-16: ``results[task]['all']['spearman']['all']``, the Spearman correlation over all
  pairs of that year's subsets **concatenated** (not SentEval's ``mean`` / ``wmean`` of the
  per-subset correlations, which are kept here as details);
- STS-B and SICK-R: ``results[task]['test']['spearman']``, the test split only, scored like the
  other tasks with the cosine of the two sentence embeddings (SimCSE's SentEval has no
  regression head for these two; that is its ``*-finetune`` variant);
- ``Avg.``: the mean of the seven numbers after rounding each to two decimals.

Sentences are whitespace-tokenised and re-joined with single spaces, as SentEval's batcher
does; pairs without a gold score (empty ``STS.gs`` lines) are dropped, as SentEval does.

Layout under ``<root>`` (SentEval's ``data`` folder; its ``downstream`` folder works too)::

    downstream/STS/STS12-en-test/STS.input.MSRpar.txt, STS.gs.MSRpar.txt, ...
    downstream/STS/STS13-en-test/ ... STS16-en-test/
    downstream/STS/STSBenchmark/sts-test.csv
    downstream/SICK/SICK_test_annotated.txt

:func:`evaluate_sts_benchmarks` encodes every distinct sentence once through every text head of
a model and scores each task as above.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError
from cusa.safe_files import short_path, short_repr
from cusa_train.evaluation.data import read_lines
from cusa_train.evaluation.encoding import EvalEncoder, HeadEncoder
from cusa_train.evaluation.metrics import StsPairs, l2_normalize, spearman
from cusa_train.evaluation.report import BACKBONE, USA, EvalReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SentEvalTask:
    """One SentEval STS task.

    Args:
        name: SentEval's task name (``STS12`` ... ``SICKRelatedness``).
        key: the report's metric key (``sts12`` ... ``sickr``).
        folder: its folder under ``downstream/``.
        subsets: the subsets read (STS12-16) or the single split that is reported.
        aggregate: ``"all"`` (Spearman over the concatenated subsets) or ``"test"``.
    """

    name: str
    key: str
    folder: str
    subsets: tuple[str, ...]
    aggregate: str


# SimCSE's SentEval/senteval/sts.py: the subsets of each year (STS13 without SMT, as there).
SENTEVAL_STS_TASKS: tuple[SentEvalTask, ...] = (
    SentEvalTask(
        "STS12", "sts12", "STS/STS12-en-test",
        ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"), "all",
    ),
    SentEvalTask("STS13", "sts13", "STS/STS13-en-test", ("FNWN", "headlines", "OnWN"), "all"),
    SentEvalTask(
        "STS14", "sts14", "STS/STS14-en-test",
        ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"), "all",
    ),
    SentEvalTask(
        "STS15", "sts15", "STS/STS15-en-test",
        ("answers-forums", "answers-students", "belief", "headlines", "images"), "all",
    ),
    SentEvalTask(
        "STS16", "sts16", "STS/STS16-en-test",
        ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"), "all",
    ),
    SentEvalTask("STSBenchmark", "stsb", "STS/STSBenchmark", ("test",), "test"),
    SentEvalTask("SICKRelatedness", "sickr", "SICK", ("test",), "test"),
)  # fmt: skip
_BY_NAME = {t.name.lower(): t for t in SENTEVAL_STS_TASKS} | {t.key: t for t in SENTEVAL_STS_TASKS}
_ALIASES = {"sts-b": "stsb", "sick-r": "sickr", "sick": "sickr"}


def parse_sts_tasks(spec: str | Sequence[str] | None) -> list[SentEvalTask]:
    """``None`` or ``"all"`` -> the seven tasks; else names like ``STS12,STSBenchmark,sickr``."""
    if spec is None:
        return list(SENTEVAL_STS_TASKS)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"] or not names:
        return list(SENTEVAL_STS_TASKS)
    out = []
    for n in names:
        task = _BY_NAME.get(_ALIASES.get(n.lower(), n.lower()))
        if task is None:
            known = ", ".join(t.name for t in SENTEVAL_STS_TASKS)
            raise ConfigError(f"unknown STS task {n!r}; known: {known} (or 'all')")
        if task in out:
            raise ConfigError(f"STS task {task.name!r} named twice")
        out.append(task)
    # Report in the paper's column order whatever order they were named in.
    return [t for t in SENTEVAL_STS_TASKS if t in out]


def senteval_downstream(root: str | os.PathLike) -> Path:
    """SentEval's ``downstream`` folder from ``root`` (``.../data`` or ``.../data/downstream``).

    Raises:
        DatasetError: neither ``root/downstream`` nor ``root`` holds ``STS/`` or ``SICK/``.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"STS root {str(base)!r} is not a directory")
    for cand in (base / "downstream", base):
        if (cand / "STS").is_dir() or (cand / "SICK").is_dir():
            return cand
    raise DatasetError(
        f"{str(base / 'downstream' / 'STS')!r} does not exist; --root must be SentEval's data "
        "folder (holding downstream/STS and downstream/SICK, see docs/evaluation.md)"
    )


def _tok(sentence: str) -> str:
    # SentEval splits on whitespace and the batcher joins the tokens back with one space.
    return " ".join(sentence.split())


def _score(text: str, path: Path, lineno: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(
            f"{short_path(path)} line {lineno}: gold score {short_repr(text)} is not a number"
        ) from None
    if not math.isfinite(value):  # a nan or inf gold makes Spearman nan, reported as a score
        raise DatasetError(
            f"{short_path(path)} line {lineno}: gold score {short_repr(text)} is not a finite "
            "number; fix the line (SentEval's gold scores are 0-5)"
        )
    return value


def _load_year_subset(folder: Path, subset: str) -> StsPairs:
    inp, gs = folder / f"STS.input.{subset}.txt", folder / f"STS.gs.{subset}.txt"
    inputs, golds = (
        read_lines(inp, "STS file", root=folder),
        read_lines(gs, "STS file", root=folder),
    )
    if len(inputs) != len(golds):
        raise DatasetError(
            f"{str(gs)!r} has {len(golds)} lines but {str(inp)!r} has {len(inputs)}; they must "
            "pair line by line"
        )
    s1, s2, scores = [], [], []
    for lineno, (line, gold) in enumerate(zip(inputs, golds, strict=True), 1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(
                f"{str(inp)!r} line {lineno}: expected two tab-separated sentences, got "
                f"{short_repr(line)}"
            )
        if gold == "":
            continue  # SentEval drops pairs without a gold score
        s1.append(_tok(fields[0]))
        s2.append(_tok(fields[1]))
        scores.append(_score(gold, gs, lineno))
    return StsPairs(s1, s2, np.asarray(scores, dtype=np.float64), source=str(inp))


def _load_columns(path: Path, cols: tuple[int, int, int], skip_header: bool) -> StsPairs:
    s1, s2, scores = [], [], []
    lines = read_lines(path, "STS file", root=path.parent)
    for lineno, line in enumerate(lines[1:] if skip_header else lines, 2 if skip_header else 1):
        fields = line.strip().split("\t")
        if len(fields) <= max(cols):
            raise DatasetError(
                f"{str(path)!r} line {lineno}: expected at least {max(cols) + 1} tab-separated "
                f"columns, got {len(fields)}"
            )
        s1.append(_tok(fields[cols[0]]))
        s2.append(_tok(fields[cols[1]]))
        scores.append(_score(fields[cols[2]], path, lineno))
    return StsPairs(s1, s2, np.asarray(scores, dtype=np.float64), source=str(path))


def load_sts_task(root: str | os.PathLike, task: SentEvalTask) -> dict[str, StsPairs]:
    """The pairs of each subset of ``task`` (STS-B and SICK-R: only the reported test split).

    Raises:
        DatasetError: a missing or malformed file (the message names it).
    """
    folder = senteval_downstream(root) / task.folder
    if task.aggregate == "all":
        out = {s: _load_year_subset(folder, s) for s in task.subsets}
    elif task.name == "STSBenchmark":
        # genre, file, year, id, score, sentence1, sentence2[, sources]
        out = {"test": _load_columns(folder / "sts-test.csv", (5, 6, 4), skip_header=False)}
    else:
        # pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment
        out = {"test": _load_columns(folder / "SICK_test_annotated.txt", (1, 2, 3), True)}
    for name, pairs in out.items():
        if len(pairs) < 2:
            raise DatasetError(
                f"{pairs.source!r} has {len(pairs)} scored pairs; {task.name}/{name} needs >= 2"
            )
    return out


@dataclass(frozen=True)
class StsTaskScore:
    """Spearman x 100 of one task, as the official script prints it, plus SentEval's details.

    Args:
        spearman: the reported number (``all`` for STS12-16, ``test`` for STS-B / SICK-R).
        subsets: Spearman x 100 of each subset.
        mean: SentEval's ``mean`` of the subset correlations (STS12-16).
        wmean: SentEval's ``wmean``, weighted by the number of pairs (STS12-16).
        num_pairs: scored pairs.
    """

    spearman: float
    subsets: dict[str, float] = field(default_factory=dict)
    mean: float | None = None
    wmean: float | None = None
    num_pairs: int = 0


def score_sts_task(
    task: SentEvalTask,
    data: dict[str, StsPairs],
    embed: Callable[[list[str]], np.ndarray],
) -> StsTaskScore:
    """Score one task with ``embed`` (sentences -> ``(N, D)`` embeddings), cosine similarity."""
    sys_all: list[np.ndarray] = []
    gold_all: list[np.ndarray] = []
    per: dict[str, float] = {}
    sizes: list[int] = []
    for name, pairs in data.items():
        e1 = l2_normalize(torch.as_tensor(np.asarray(embed(pairs.sentence1), dtype=np.float32)))
        e2 = l2_normalize(torch.as_tensor(np.asarray(embed(pairs.sentence2), dtype=np.float32)))
        cos = (e1 * e2).sum(dim=1).double().numpy()  # (N,) cosine per pair
        per[name] = 100.0 * spearman(cos, pairs.scores)
        sys_all.append(cos)
        gold_all.append(pairs.scores)
        sizes.append(len(pairs))
    if task.aggregate == "all":
        reported = 100.0 * spearman(np.concatenate(sys_all), np.concatenate(gold_all))
        vals = np.array(list(per.values()))
        return StsTaskScore(
            reported, per, float(vals.mean()), float(np.average(vals, weights=sizes)), sum(sizes)
        )
    return StsTaskScore(per["test"], per, num_pairs=sum(sizes))


def official_average(values: Sequence[float]) -> float:
    """The official ``Avg.``: each number formatted ``%.2f`` first, then the plain mean."""
    if not values:
        raise DatasetError("no STS task was scored, so there is no average")
    return float(np.mean([float(f"{v:.2f}") for v in values]))


# ---- evaluation ----------------------------------------------------------------------------


def evaluate_sts_benchmarks(
    model: EvalEncoder,
    root: str | os.PathLike,
    *,
    tasks: str | Sequence[str] | None = None,
    batch_size: int = 128,
    info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """SentEval STS12-16, STS-B and SICK-R (paper Table 4) through every text head of ``model``.

    Args:
        model: the model. A CusaModel gives the column the official ``evaluation_sts.py``
            scores, ``encode_text(cross_modal=False)``: the USA head (``_usa``), or for a model
            without USA heads the student's backbone features (``_backbone``); the cross-modal
            head is the second column.
        root: SentEval's data folder (holding ``downstream/STS`` and ``downstream/SICK``).
        tasks: a subset, e.g. ``"STS12,STSBenchmark"``; default all seven.
        batch_size: sentences encoded at once.
        info: extra metadata recorded in the report.

    Returns:
        Spearman x 100 per task (``sts12`` ... ``sickr``) and ``sts_avg``, as the official
        script prints them (see the module docstring), plus ``_usa`` or ``_backbone`` twins.
    """
    chosen = parse_sts_tasks(tasks)
    data = {t.name: load_sts_task(root, t) for t in chosen}  # every file before any encoding
    unique = sorted(
        {s for d in data.values() for p in d.values() for s in (*p.sentence1, *p.sentence2)}
    )
    enc = HeadEncoder(model, official_uni=True)
    feats = enc.encode_texts(unique, batch_size)  # each distinct sentence once
    row = {s: i for i, s in enumerate(unique)}
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    details: dict[str, Any] = {}
    for head, x in feats.items():
        sfx = {"usa": USA, "backbone": BACKBONE}.get(head, "")

        def embed(sentences: list[str], x: np.ndarray = x) -> np.ndarray:
            return x[[row[s] for s in sentences]]

        scores = {t.name: score_sts_task(t, data[t.name], embed) for t in chosen}
        for t in chosen:
            metrics[f"{t.key}{sfx}"] = scores[t.name].spearman
            counts[f"{t.key}_pairs"] = scores[t.name].num_pairs
        metrics[f"sts_avg{sfx}"] = official_average([scores[t.name].spearman for t in chosen])
        details[head] = {
            t.name: {"subsets": s.subsets, "mean": s.mean, "wmean": s.wmean}
            for t, s in ((t, scores[t.name]) for t in chosen)
        }
    return EvalReport(
        metrics,
        counts,
        {
            "task": "sts",
            "root": str(root),
            "heads": enc.note,
            "uni_modal_features": enc.uni_head,
            "sts_tasks": [(t.key, t.name) for t in chosen],
            "sts_aggregation": "STS12-16: Spearman over all pairs of the year's subsets "
            "('all'); STS-B, SICK-R: the test split; Avg.: mean of the %.2f-rounded values",
            "sts_details": details,
            **dict(info or {}),
        },
    )
