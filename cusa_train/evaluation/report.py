"""The result of an evaluation: :class:`EvalReport`, a flat metric dictionary with its counts
and provenance, as JSON and as a plain-text table.

Metric keys without a suffix come from the features given, i.e. the cross-modal head of a
model; the suffix :data:`USA` (``_usa``) marks the same metric through the USA head, and
:data:`BACKBONE` (``_backbone``) through the student's backbone features (the image retrieval
and STS benchmarks of a model without USA heads: what the official scripts score).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cusa_train.evaluation.metrics import DEFAULT_KS

USA = "_usa"  # suffix of metrics computed through the USA (uni-modal) heads
#: suffix of metrics computed on the student's backbone features: what the official
#: ``encode_*(cross_modal=False)`` returns for a model trained without USA heads
BACKBONE = "_backbone"


@dataclass(frozen=True)
class EvalReport:
    """The result of one evaluation.

    Args:
        metrics: flat ``{name: value}``; percent for retrieval, [-1, 1] for ``sts_spearman``,
            Spearman x 100 for the SentEval tasks. Keys (``_usa``: through the USA head):

            - cross-modal: ``i2t_r{K}``, ``t2i_r{K}``, ``rsum``, ``r_mean`` (= RSUM / 6, the
              official model-selection number);
            - on the dataset's own pairs: ``{i2t,t2i}_{map_at_r,r_precision}``;
            - ECCV Caption (only on the COCO 5K test split, real ground truth):
              ``eccv_{i2t,t2i}_{map_at_r,r_precision,r1}``; another explicit ground truth:
              ``gt_{i2t,t2i}_{map_at_r,r_precision,r1}``;
            - uni-modal: ``i2i_r1``, ``i2i_map_at_r`` (with image labels), ``t2t_r1``,
              ``t2t_map_at_r``, and their ``_usa`` twins;
            - STS pairs file: ``sts_spearman``, ``sts_spearman_usa``;
            - image retrieval benchmarks: ``{cub,sop,inshop,inat,cars}_r1`` (+ ``_usa`` or
              ``_backbone``), ``image_avg_r1`` (+ the same);
            - SentEval: ``sts12`` ... ``sts16``, ``stsb``, ``sickr``, ``sts_avg`` (+ ``_usa`` or
              ``_backbone``).
        counts: sizes, e.g. ``num_images``, ``num_texts``, ``t2t_queries``, ``cub_queries``.
        info: how it was computed: ``task``, ``ks``, ``heads``, ``eccv``, ``i2i_positives``,
            ``t2t_positives``, ``sts_file`` and any caller metadata (``checkpoint``...).
    """

    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        try:
            return self.metrics[key]
        except KeyError:
            raise KeyError(f"no metric {key!r}; this report has {sorted(self.metrics)}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"metrics", "counts", "info"}``."""
        return {
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "counts": {k: int(v) for k, v in self.counts.items()},
            "info": json.loads(json.dumps(self.info, default=str)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        return cls(dict(d["metrics"]), dict(d.get("counts", {})), dict(d.get("info", {})))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` (temporary name, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(p)

    def to_table(self) -> str:
        """A readable plain-text table of every metric present."""
        m, c, info = self.metrics, self.counts, self.info
        lines: list[str] = []

        def cells(values: Sequence[float | None], width: int = 9) -> str:
            return "".join(f"{'-' if v is None else f'{v:.2f}':>{width}}" for v in values)

        def row(label: str, values: Sequence[float | None]) -> str:
            return f"  {label:<6}{cells(values)}"

        def header(names: Sequence[str], pad: int = 6) -> str:
            return "  " + " " * pad + "".join(f"{h:>9}" for h in names)

        def section(title: str) -> None:
            if lines:
                lines.append("")
            lines.append(title)

        if "rsum" in m:
            ks = [int(k) for k in info.get("ks", DEFAULT_KS)]
            section(
                f"Cross-modal retrieval ({c.get('num_images', '?')} images, "
                f"{c.get('num_texts', '?')} captions)"
                + (f" - {info['benchmark']}" if info.get("benchmark") else "")
            )
            lines.append(header([f"R@{k}" for k in ks]))
            for d in ("i2t", "t2i"):
                lines.append(row(d, [m.get(f"{d}_r{k}") for k in ks]))
            lines.append(f"  RSUM {m['rsum']:.2f}   R-mean {m.get('r_mean', float('nan')):.2f}")
        if "i2t_map_at_r" in m:
            section("mAP@R and R-Precision on the dataset's own pairs (not ECCV Caption)")
            lines.append(header(("mAP@R", "R-P")))
            for d in ("i2t", "t2i"):
                lines.append(row(d, [m.get(f"{d}_map_at_r"), m.get(f"{d}_r_precision")]))
        for prefix, title in (
            ("eccv", "ECCV Caption (COCO 5K test, ground truth of the eccv-caption package)"),
            ("gt", f"Explicit ground truth {info.get('gt', '')!r}"),
        ):
            if any(k.startswith(prefix + "_") for k in m):
                section(title)
                lines.append(header(("mAP@R", "R-P", "R@1")))
                for d in ("i2t", "t2i"):
                    keys = ("map_at_r", "r_precision", "r1")
                    lines.append(row(d, [m.get(f"{prefix}_{d}_{x}") for x in keys]))
        if "rsum" in m and info.get("eccv") and not any(k.startswith("eccv_") for k in m):
            lines.append(f"  ECCV Caption: not computed ({info['eccv']})")

        two = any(k.endswith(USA) for k in m)  # a USA column exists
        cols = ("USA head", "cross") if two else ("cross",)
        if any(k.startswith(("i2i_", "t2t_")) for k in m):
            section("Uni-modal retrieval" + (" (USA head: the official protocol)" if two else ""))
            sub = [f"{x} {h.split()[0]}" for h in cols for x in ("R@1", "mAP@R")]
            lines.append("  " + " " * 6 + "".join(f"{h:>13}" for h in sub) + "  positives")
            for d in ("i2i", "t2t"):
                if f"{d}_r1" not in m:
                    lines.append(f"  {d:<6}{'not computed':>18}  {info.get(f'{d}_positives', '')}")
                    continue
                vals = []
                for sfx in (USA, "") if two else ("",):
                    vals += [m.get(f"{d}_r1{sfx}"), m.get(f"{d}_map_at_r{sfx}")]
                lines.append(
                    f"  {d:<6}{cells(vals, 13)}  {info.get(f'{d}_positives', '')} "
                    f"({c.get(f'{d}_queries', '?')} queries)"
                )
        if "sts_spearman" in m:
            section(f"STS pairs file {info.get('sts_file', '')} ({c.get('sts_pairs', '?')} pairs)")
            lines.append(header(cols, 10))
            vals = [m.get("sts_spearman_usa"), m["sts_spearman"]] if two else [m["sts_spearman"]]
            lines.append(f"  {'Spearman':<10}" + "".join(f"{v:>9.4f}" for v in vals))

        # The benchmarks' first column is what the official scripts score,
        # encode_*(cross_modal=False): the USA head, or the backbone of a model without one.
        uni = USA if two else BACKBONE if any(k.endswith(BACKBONE) for k in m) else None
        bcols = ("USA head", "cross") if uni == USA else ("backbone", "cross") if uni else cols

        def bench_vals(key: str) -> list[float | None]:
            return [m.get(f"{key}{uni}"), m.get(key)] if uni else [m.get(key)]

        bench = info.get("image_benchmarks") or []
        if bench:
            protocol = info.get("rank1_protocol", "official")
            section(f"Image retrieval, rank-1 ({protocol} protocol"
                    + (", as evaluation_img.py)" if protocol == "official" else ")"))  # fmt: skip
            lines.append(header(bcols, 26))
            for name in bench:
                title = info.get("image_benchmark_titles", {}).get(name, name)
                lines.append(f"  {title:<26}{cells(bench_vals(f'{name}_r1'))}")
            if "image_avg_r1" in m:
                lines.append(f"  {'Avg.':<26}{cells(bench_vals('image_avg_r1'))}")
        sts_tasks = info.get("sts_tasks") or []
        if sts_tasks:
            section("STS, Spearman x 100 (SentEval; official aggregation)")
            lines.append(header(bcols, 18))
            for key, name in sts_tasks:
                lines.append(f"  {name:<18}{cells(bench_vals(key))}")
            if "sts_avg" in m:
                lines.append(f"  {'Avg.':<18}{cells(bench_vals('sts_avg'))}")
        if info.get("heads") and not two and (bench or sts_tasks or "t2t_r1" in m):
            lines.append(f"  ({info['heads']})")
        return "\n".join(lines)
