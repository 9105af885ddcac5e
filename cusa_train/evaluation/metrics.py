"""Retrieval and STS metrics, in pure numpy/torch, with no model in sight.

Every retrieval metric here is computed from one ranking per query under one convention:
gallery items are sorted by descending similarity and **ties are broken against the query**
(a negative that scores exactly as high as a positive is ranked before it), so a collapsed
model that maps everything to one vector scores at chance, never at 100.

Definitions (all returned in percent, 0-100):

- ``R@K``: the share of queries with at least one positive in the top K. For image->text on
  COCO/Flickr the positives of an image are all of its captions; for text->image the single
  positive of a caption is its image.
- ``R-Precision`` (ECCV Caption): with R the number of positives of the query, the share of
  the top R items that are positives.
- ``mAP@R`` (ECCV Caption, Musgrave et al. 2020): ``(1/R) * sum_{r<=R} P@r * rel(r)`` where
  ``P@r`` is the precision of the top r items and ``rel(r)`` is 1 when the r-th item is a
  positive. These match ``eccv_caption._metrics.compute_eccv_metrics``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cusa.errors import ConfigError, DatasetError
from cusa.safe_files import MAX_INDEX_BYTES, regular_file_problem

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalScores:
    """Ranking metrics of one retrieval direction, in percent.

    Args:
        recall: ``{K: R@K}``.
        map_at_r: mean over queries of mAP@R.
        r_precision: mean over queries of R-Precision.
        num_queries: queries that had at least one positive and were scored.
        num_skipped: queries skipped because no positive was in the gallery.
    """

    recall: dict[int, float]
    map_at_r: float
    r_precision: float
    num_queries: int
    num_skipped: int = 0

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}r{k}": v for k, v in sorted(self.recall.items())}
        out[f"{prefix}map_at_r"] = self.map_at_r
        out[f"{prefix}r_precision"] = self.r_precision
        return out


@dataclass
class _Accumulator:
    ks: tuple[int, ...]
    hits: dict[int, float] = field(default_factory=dict)
    ap: float = 0.0
    rp: float = 0.0
    n: int = 0
    skipped: int = 0

    def result(self) -> RetrievalScores:
        if self.n == 0:
            raise DatasetError(
                "no query has a positive in the gallery, so no retrieval metric is defined; "
                "check that the ids of the two sides match"
            )
        return RetrievalScores(
            recall={k: 100.0 * self.hits.get(k, 0.0) / self.n for k in self.ks},
            map_at_r=100.0 * self.ap / self.n,
            r_precision=100.0 * self.rp / self.n,
            num_queries=self.n,
            num_skipped=self.skipped,
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"recall cut-offs must be positive integers, got {ks!r}")
    return ks


def _accumulate(
    acc: _Accumulator, sim: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None
) -> None:
    """Score one chunk of queries.

    Args:
        sim: ``(q, G)`` similarities of q queries to the whole gallery.
        pos: ``(q, G)`` bool, True where the gallery item is a positive of the query.
        valid: ``(q, G)`` bool or None; False removes an item from the gallery (e.g. the query).
    """
    if valid is not None:
        pos = pos & valid
    num_pos = pos.sum(dim=1)  # (q,) R per query
    keep = num_pos > 0
    acc.skipped += int((~keep).sum())
    if not bool(keep.any()):
        return
    sim, pos, num_pos = sim[keep], pos[keep], num_pos[keep]
    if valid is not None:
        valid = valid[keep]
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype)
    neg = ~pos if valid is None else (~pos & valid)
    max_r = int(num_pos.max())
    # Only ranks below max(R, K) matter, so only the best `cap` negatives are needed: a positive
    # with `cap` negatives above it is past every cut-off either way. topk is far cheaper than a
    # full sort of the gallery.
    cap = min(max(max_r, max(acc.ks)), sim.shape[1])
    # (q, cap) best negatives' scores, ascending; non-negatives are -inf so they are never counted.
    neg_top = torch.where(neg, sim, neg_inf).topk(cap, dim=1).values.flip(1).contiguous()
    # (q, max_r) positives' scores, best first; slots beyond a query's R hold -inf.
    pos_sorted = torch.where(pos, sim, neg_inf).topk(max_r, dim=1).values
    # Negatives at or above each positive's score rank before it (ties go against the query).
    n_neg_before = cap - torch.searchsorted(neg_top, pos_sorted.contiguous(), side="left")
    k_idx = torch.arange(max_r, dtype=torch.long).unsqueeze(0)  # (1, max_r) 0-based positive index
    position = k_idx + n_neg_before  # (q, max_r) 0-based rank of the k-th positive
    real = k_idx < num_pos.unsqueeze(1)  # (q, max_r) slot holds a real positive
    within_r = real & (position < num_pos.unsqueeze(1))
    precision = (k_idx + 1).to(torch.float64) / (position + 1).to(torch.float64)
    r = num_pos.to(torch.float64)
    acc.ap += float(((precision * within_r).sum(dim=1) / r).sum())
    acc.rp += float((within_r.sum(dim=1).to(torch.float64) / r).sum())
    first = position[:, 0]  # (q,) rank of the best positive
    for k in acc.ks:
        acc.hits[k] = acc.hits.get(k, 0.0) + float((first < k).sum())
    acc.n += int(keep.sum())


def as_features(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Check a ``(rows, dim)`` feature (or similarity) matrix and return it as float32 on CPU.

    The one validation every evaluation input goes through.

    Raises:
        DatasetError: not 2-D, no rows or no columns, or a non-finite value (the row is named).
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    if t.ndim != 2:
        raise DatasetError(f"{name} must be a 2-D (rows, dim) array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise DatasetError(
            f"{name} is empty (shape {tuple(t.shape)}); there is nothing to evaluate"
        )
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t).all(dim=1)).nonzero()[0])
        raise DatasetError(f"{name} row {bad} has non-finite values; re-encode that sample")
    return t


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def similarity_metrics(
    sim: np.ndarray | torch.Tensor,
    positive_mask: np.ndarray | torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    valid_mask: np.ndarray | torch.Tensor | None = None,
) -> RetrievalScores:
    """R@K, mAP@R and R-Precision from an explicit similarity matrix and positive mask.

    Args:
        sim: ``(Q, G)`` similarity of every query to every gallery item.
        positive_mask: ``(Q, G)`` bool, the ground-truth positives (any number per query).
        ks: recall cut-offs.
        valid_mask: optional ``(Q, G)`` bool; False removes the item from that query's gallery.

    Returns:
        The scores; queries without any positive are skipped and counted.
    """
    ks = _check_ks(ks)
    s = as_features(sim, "sim")
    p = torch.as_tensor(np.asarray(positive_mask)).to(torch.bool)
    if p.shape != s.shape:
        raise DatasetError(f"positive_mask has shape {tuple(p.shape)} but sim has {tuple(s.shape)}")
    v = None
    if valid_mask is not None:
        v = torch.as_tensor(np.asarray(valid_mask)).to(torch.bool)
        if v.shape != s.shape:
            raise DatasetError(
                f"valid_mask has shape {tuple(v.shape)} but sim has {tuple(s.shape)}"
            )
    acc = _Accumulator(ks)
    _accumulate(acc, s, p, v)
    return acc.result()


def label_retrieval_metrics(
    queries: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    query_labels: Sequence | np.ndarray,
    gallery_labels: Sequence | np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    exclude_self: bool = False,
    normalize: bool = True,
    chunk_size: int = 512,
) -> RetrievalScores:
    """Retrieval where a gallery item is a positive of a query when their labels are equal.

    Covers image->text and text->image (label = image id), image->image with class labels and
    text->text with image ids (the other captions of the same image are the positives).

    Args:
        queries: ``(Q, D)`` query features.
        gallery: ``(G, D)`` gallery features.
        query_labels: ``Q`` labels (ints or strings).
        gallery_labels: ``G`` labels.
        ks: recall cut-offs.
        exclude_self: queries and gallery are the same rows; row i is removed from query i's gallery.
        normalize: L2-normalise both sides first (cosine similarity).
        chunk_size: queries scored at once; bounds memory to ``chunk_size * G`` floats.

    Returns:
        The scores; queries without any positive (e.g. a class seen once) are skipped and counted.
    """
    ks = _check_ks(ks)
    q = as_features(queries, "queries")
    g = as_features(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise DatasetError(
            f"queries have dimension {q.shape[1]} but the gallery has {g.shape[1]}; "
            "both sides must be in the same embedding space"
        )
    ql, gl = _encode_labels(query_labels, gallery_labels, q.shape[0], g.shape[0])
    if exclude_self and q.shape[0] != g.shape[0]:
        raise DatasetError(
            f"exclude_self needs the same rows on both sides, got {q.shape[0]} queries "
            f"and {g.shape[0]} gallery items"
        )
    if normalize:
        q, g = l2_normalize(q), l2_normalize(g)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size!r}")
    acc = _Accumulator(ks)
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        sim = q[start:stop] @ g.T  # (q, G) cosine similarities
        pos = ql[start:stop, None] == gl[None, :]  # (q, G)
        valid = None
        if exclude_self:
            valid = torch.ones_like(pos)
            rows = torch.arange(stop - start)
            valid[rows, rows + start] = False
        _accumulate(acc, sim, pos, valid)
    return acc.result()


def _encode_labels(
    query_labels: Sequence | np.ndarray, gallery_labels: Sequence | np.ndarray, nq: int, ng: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary hashable labels of both sides to shared integer codes."""
    ql, gl = list(np.asarray(query_labels).tolist()), list(np.asarray(gallery_labels).tolist())
    if len(ql) != nq:
        raise DatasetError(f"got {len(ql)} query labels for {nq} query rows; give one per row")
    if len(gl) != ng:
        raise DatasetError(f"got {len(gl)} gallery labels for {ng} gallery rows; give one per row")
    codes: dict = {}
    qc = [codes.setdefault(x, len(codes)) for x in ql]
    gc = [codes.setdefault(x, len(codes)) for x in gl]
    return torch.tensor(qc, dtype=torch.long), torch.tensor(gc, dtype=torch.long)


def cross_modal_recall(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    normalize: bool = True,
    chunk_size: int = 512,
) -> tuple[RetrievalScores, RetrievalScores]:
    """Image->text and text->image retrieval with any number of captions per image.

    Args:
        image_features: ``(N_img, D)``.
        text_features: ``(N_txt, D)``.
        text_to_image: ``N_txt`` row indices into ``image_features``: the image of each caption.
        ks: recall cut-offs.
        normalize: cosine similarity (L2-normalise first).
        chunk_size: queries scored at once.

    Returns:
        ``(i2t, t2i)``. An i2t hit at K means any caption of the image is in the top K.
    """
    t2i_idx = np.asarray(text_to_image)
    n_img = int(as_features(image_features, "image_features").shape[0])
    if t2i_idx.ndim != 1 or not np.issubdtype(t2i_idx.dtype, np.integer):
        raise DatasetError("text_to_image must be a 1-D array of integer image row indices")
    if t2i_idx.size and (t2i_idx.min() < 0 or t2i_idx.max() >= n_img):
        raise DatasetError(
            f"text_to_image holds indices outside 0..{n_img - 1} (min {int(t2i_idx.min())}, "
            f"max {int(t2i_idx.max())}); every caption must point to an image row"
        )
    missing = np.setdiff1d(np.arange(n_img), t2i_idx)
    if missing.size:
        raise DatasetError(
            f"image row {int(missing[0])} has no caption ({missing.size} such images); every image "
            "needs at least one caption for image->text retrieval - drop those images"
        )
    img_labels = np.arange(n_img)
    i2t = label_retrieval_metrics(
        image_features,
        text_features,
        img_labels,
        t2i_idx,
        ks=ks,
        normalize=normalize,
        chunk_size=chunk_size,
    )
    t2i = label_retrieval_metrics(
        text_features,
        image_features,
        t2i_idx,
        img_labels,
        ks=ks,
        normalize=normalize,
        chunk_size=chunk_size,
    )
    return i2t, t2i


def rsum(i2t: RetrievalScores, t2i: RetrievalScores, ks: Sequence[int] = DEFAULT_KS) -> float:
    """Sum of i2t and t2i R@K over ``ks`` (600 is perfect for K = 1, 5, 10)."""
    return float(sum(i2t.recall[k] + t2i.recall[k] for k in ks))


# ---- STS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores."""

    sentence1: list[str]
    sentence2: list[str]
    scores: np.ndarray  # (N,) float64
    source: str = ""

    def __len__(self) -> int:
        return len(self.scores)


_STS_COLUMNS = ("sentence1", "sentence2", "score")


def load_sts_pairs(path: str | Path) -> StsPairs:
    """Read ``sentence1, sentence2, score`` pairs from a ``.tsv``, ``.csv`` or ``.jsonl`` file.

    TSV/CSV files either have a header naming ``sentence1``, ``sentence2`` and ``score`` (other
    columns are ignored) or exactly three columns in that order without a header. JSONL files
    have one object per line with those keys.

    Raises:
        DatasetError: the file is missing, empty, malformed, or has fewer than 2 pairs.
    """
    p = Path(path)
    # regular file, size-capped (cusa.safe_files): a FIFO never blocks, /dev/zero is never read
    problem = regular_file_problem(p, MAX_INDEX_BYTES, what="STS pairs file")
    if problem:
        raise DatasetError(problem)
    suffix = p.suffix.lower()
    rows: list[tuple[str, str, str]] = []
    if suffix == ".jsonl":
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    rows.append(tuple(obj[c] for c in _STS_COLUMNS))  # type: ignore[arg-type]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DatasetError(
                        f"{str(p)!r} line {lineno}: expected a JSON object with keys "
                        f"{', '.join(_STS_COLUMNS)} ({exc})"
                    ) from exc
    elif suffix in (".tsv", ".csv"):
        delim = "\t" if suffix == ".tsv" else ","
        with p.open(encoding="utf-8", newline="") as fh:
            table = [r for r in csv.reader(fh, delimiter=delim, quoting=csv.QUOTE_MINIMAL) if r]
        if table and all(c in [h.strip().lower() for h in table[0]] for c in _STS_COLUMNS):
            header = [h.strip().lower() for h in table[0]]
            idx = [header.index(c) for c in _STS_COLUMNS]
            body = table[1:]
        else:
            idx, body = [0, 1, 2], table
        for lineno, r in enumerate(body, 2 if body is not table else 1):
            if len(r) <= max(idx) or (idx == [0, 1, 2] and len(r) != 3):
                raise DatasetError(
                    f"{str(p)!r} row {lineno}: expected columns sentence1, sentence2, score "
                    f"(a header naming them, or exactly 3 columns), got {len(r)} columns"
                )
            rows.append(tuple(r[i] for i in idx))  # type: ignore[arg-type]
    else:
        raise DatasetError(f"STS pairs file {str(p)!r} must end in .tsv, .csv or .jsonl")
    if len(rows) < 2:
        raise DatasetError(f"STS pairs file {str(p)!r} has {len(rows)} pairs; need at least 2")
    try:
        scores = np.array([float(r[2]) for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(
            f"STS pairs file {str(p)!r} has a score that is not a number ({exc})"
        ) from exc
    if not np.isfinite(scores).all():  # nan/inf gold scores would make Spearman nan
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise DatasetError(
            f"STS pairs file {str(p)!r} pair {bad + 1}: score {rows[bad][2]!r} is not a finite "
            "number; fix that row"
        )
    return StsPairs([str(r[0]) for r in rows], [str(r[1]) for r in rows], scores, source=str(p))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get their average rank (``scipy.stats.rankdata`` 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    # Boundaries of runs of equal values.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks), in [-1, 1].

    Uses ``scipy.stats.spearmanr`` when scipy is installed, else :func:`rankdata`.

    Raises:
        DatasetError: lengths differ, fewer than 2 values, or one side is constant.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise DatasetError(
            f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}"
        )
    if len(a) < 2:
        raise DatasetError(f"spearman needs at least 2 values, got {len(a)}")
    for name, v in (("predicted", a), ("gold", b)):
        if np.all(v == v[0]):
            raise DatasetError(f"the {name} scores are all equal ({v[0]!r}); Spearman is undefined")
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = rankdata(a), rankdata(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)))
    return float(spearmanr(a, b).statistic)


def sts_spearman(
    emb1: np.ndarray | torch.Tensor,
    emb2: np.ndarray | torch.Tensor,
    gold: Sequence[float] | np.ndarray,
) -> float:
    """Spearman correlation between the cosine similarity of paired embeddings and gold scores."""
    e1, e2 = as_features(emb1, "emb1"), as_features(emb2, "emb2")
    if e1.shape != e2.shape:
        raise DatasetError(
            f"paired embeddings differ in shape: {tuple(e1.shape)} vs {tuple(e2.shape)}"
        )
    cos = (l2_normalize(e1) * l2_normalize(e2)).sum(dim=1).double().numpy()  # (N,)
    return spearman(cos, gold)


# ---- rank-1 nearest neighbour (image retrieval benchmarks) ----------------------------------


@dataclass(frozen=True)
class Rank1Result:
    """Rank-1 of a nearest-neighbour search, in percent.

    Args:
        r1: share of queries whose nearest gallery item has the query's label.
        num_queries: every query, including those whose label has no other item in the gallery
            (they always count as misses, as in the official script).
        num_hits: queries whose nearest neighbour is a positive.
    """

    r1: float
    num_queries: int
    num_hits: int


#: ``official``: the official ``evaluation_img.py`` computation (ties as its ``torch.topk``);
#: ``strict``: the query excluded by index, ties counted as misses.
RANK1_PROTOCOLS = ("official", "strict")


def nearest_neighbour_rank1(
    queries: np.ndarray | torch.Tensor,
    query_labels: Sequence | np.ndarray,
    gallery: np.ndarray | torch.Tensor | None = None,
    gallery_labels: Sequence | np.ndarray | None = None,
    *,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    protocol: str = "strict",
) -> Rank1Result:
    """Rank-1 (R@1) as the official CUSA ``evaluation_img.py`` computes it.

    Both sides are L2-normalised, each query takes its Euclidean nearest neighbour and scores a
    hit when that neighbour has the query's label; the result is hits / all queries. On unit
    vectors ``|q - g|^2 = 2 - 2 cos``, so the nearest neighbour is the most cosine-similar item.
    The two protocols differ only where distances tie (exact duplicates, collapsed features):

    - ``strict`` (default here): without a gallery the queries are their own gallery and each
      query is excluded from its own search by index. With a gallery (In-Shop) nothing is
      excluded. Ties count against the query: a negative exactly as close as the nearest
      positive is a miss, so a collapsed model scores 0, never 100.
    - ``official``: the official ``get_metric`` line for line (Euclidean distances via
      ``addmm``, clamped at 1e-12 and square-rooted, ``torch.topk(k=2, largest=False)`` over 128
      queries at a time; without a gallery the 2nd item, with one the 1st). When a query has an
      exact duplicate in the gallery, the 2nd item can be the query itself, which counts as a
      hit; tied negatives win or lose by ``topk``'s order. This reproduces the paper's numbers;
      ``chunk_size`` is ignored (the official 128).

    Args:
        queries: ``(Q, D)`` query features.
        query_labels: ``Q`` class labels.
        gallery: optional ``(G, D)`` gallery features.
        gallery_labels: ``G`` labels, with ``gallery``.
        chunk_size: queries scored at once; memory is about ``chunk_size * G`` floats.
        device: where the similarity products run (default: CPU).
        protocol: ``strict`` or ``official`` (see above).

    Raises:
        DatasetError: shapes or label counts do not match.
        ConfigError: unknown protocol.
    """
    if protocol not in RANK1_PROTOCOLS:
        raise ConfigError(f"rank-1 protocol must be one of {RANK1_PROTOCOLS}, got {protocol!r}")
    q = as_features(queries, "queries")
    same = gallery is None
    if same != (gallery_labels is None):
        raise ConfigError("give both gallery and gallery_labels, or neither")
    g = q if same else as_features(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise DatasetError(
            f"queries have dimension {q.shape[1]} but the gallery has {g.shape[1]}; "
            "both sides must come from the same head"
        )
    ql, gl = _encode_labels(
        query_labels, query_labels if same else gallery_labels, q.shape[0], g.shape[0]
    )
    if same and q.shape[0] < 2:
        raise DatasetError("rank-1 without a gallery needs at least 2 queries")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if protocol == "official":
        return _official_rank1(q.to(dev), ql.to(dev), None if same else g.to(dev), gl.to(dev))
    q, g = l2_normalize(q).to(dev), l2_normalize(g).to(dev)
    ql, gl = ql.to(dev), gl.to(dev)
    neg_inf = torch.tensor(float("-inf"), device=dev)
    hits = 0
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        sim = q[start:stop] @ g.T  # (q, G) cosine = 1 - d^2 / 2
        pos = ql[start:stop, None] == gl[None, :]  # (q, G)
        if same:
            rows = torch.arange(stop - start, device=dev)
            sim[rows, rows + start] = neg_inf  # the query is not its own neighbour
            pos[rows, rows + start] = False
        best_pos = torch.where(pos, sim, neg_inf).amax(dim=1)  # (q,)
        best_neg = torch.where(pos, neg_inf, sim).amax(dim=1)  # (q,)
        hit = (best_pos > best_neg) & torch.isfinite(best_pos)
        hits += int(hit.sum())
    n = int(q.shape[0])
    return Rank1Result(r1=100.0 * hits / n, num_queries=n, num_hits=hits)


def _official_rank1(
    q: torch.Tensor, ql: torch.Tensor, g: torch.Tensor | None, gl: torch.Tensor
) -> Rank1Result:
    """``get_metric`` of the official ``evaluation_img.py`` (``euclidean_distance`` with topk 2,
    128 queries at a time), on features and integer labels."""
    q = torch.nn.functional.normalize(q)
    y = q if g is None else torch.nn.functional.normalize(g)
    preds = []
    for start in range(0, q.shape[0], 128):
        x = q[start : start + 128]
        m, n = x.size(0), y.size(0)
        xx = torch.pow(x, 2).sum(1, keepdim=True).expand(m, n)
        yy = torch.pow(y, 2).sum(1, keepdim=True).expand(n, m).t()
        dist = xx + yy
        dist.addmm_(mat1=x, mat2=y.t(), beta=1, alpha=-2)
        dist = dist.clamp(min=1e-12).sqrt()
        index = torch.topk(dist, min(2, n), largest=False).indices
        preds.append(index[:, 1] if g is None else index[:, 0])
    pred = torch.cat(preds)
    hits = int((ql == gl[pred]).sum())
    n_q = int(q.shape[0])
    return Rank1Result(r1=100.0 * hits / n_q, num_queries=n_q, num_hits=hits)
