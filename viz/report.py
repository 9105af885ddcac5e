"""``build_report``: one self-contained HTML page about a feature store and, optionally, a run.

The page has five sections (paper figures in brackets):

- **Store summary**: datasets, splits, teachers with their specs, counts, the failure ledger
  with reasons, size on disk.
- **Soft labels**: for a random batch, the image-teacher and text-teacher similarity matrices,
  and the soft labels ``softmax(cos / tau)`` they give next to the one-hot labels.
- **False negatives** (Fig. 1): image-caption pairs the dataset calls non-matching that the
  teachers rate as similar, ranked.
- **Neighbours** (Fig. 5): nearest neighbours within a modality under each teacher (faiss).
- **Training** (Fig. 4): loss terms and temperatures over steps, eval metrics, and a t-SNE of
  student features, side by side when several runs are given (e.g. with and without USA).

Everything is embedded (PNG plots and JPEG thumbnails as ``data:`` URIs), so the page opens
offline as a single file. Thumbnails are made from the dataset; originals are never copied.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__ as version
from ..errors import ConfigError, CusaError
from ..readers import DATASETS, open_dataset
from ..store import FeatureGroup, FeatureStore
from ..store.info import store_info
from ..store.lookup import FeatureLookup
from . import plots
from .html import esc, note_box, plot_tag, render_page
from .options import ReportOptions
from .runs import RunLog, as_labelled, read_embeddings, read_eval, read_run
from .sections import (
    StorePage,
    TeacherView,
    group_modality,
    image_of,
    soft_labels,
    softmax_rows,
    unit_rows,
)
from .thumbnails import DatasetView

__all__ = ["ReportOptions", "build_report", "soft_labels", "softmax_rows"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
Labelled = PathLike | Sequence[PathLike] | Mapping[str, PathLike] | None

SECTIONS = (
    ("summary", "Store summary"),
    ("soft-labels", "Soft labels"),
    ("false-negatives", "False negatives"),
    ("neighbours", "Neighbours"),
    ("training", "Training"),
)


def build_report(
    store: PathLike | FeatureStore | None,
    out_html: PathLike,
    dataset: str | None = None,
    split: str | None = None,
    run: Labelled = None,
    eval_json: Labelled = None,
    batch_size: int = 16,
    seed: int = 0,
    dataset_root: str | None = None,
    *,
    embeddings: Labelled = None,
    tau: float = 1.0,
    options: ReportOptions | None = None,
) -> Path:
    """Write the HTML report of ``store`` (and of training runs, when given) to ``out_html``.

    Args:
        store: a store path/URL, an open :class:`FeatureStore`, or None for the default store.
        out_html: the page to write (its folder is created).
        dataset: dataset name or path for :func:`cusa.readers.open_dataset`; it supplies
            thumbnails and caption text. Default: the dataset the store's groups recorded when
            they were extracted (name, or path with root and split), when it can be opened here;
            otherwise the page shows sample ids only and says why.
        split: the split to show; default: the store's only split for the dataset, else ``train``.
        run: a run directory (with ``metrics.jsonl``) or JSONL file; several as a list or
            ``{label: path}`` to overlay them (``"LABEL=PATH"`` strings also carry a label).
        eval_json: eval report(s) as written by ``cusa_train.evaluation.evaluate``; several become columns.
        batch_size: images in the soft-label batch.
        seed: seeds every random choice.
        dataset_root: ``--root`` for registered datasets that need one.
        embeddings: student feature file(s) for the t-SNE panel(s), e.g.
            ``{"with USA": "usa.npz", "without USA": "base.npz"}``.
        tau: soft-label temperature.
        options: further knobs; ``batch_size``, ``seed`` and ``tau`` override its fields.

    Returns:
        The path of the written page.

    Raises:
        NotAStoreError: ``store`` is not a cusa store.
        ConfigError: bad options, a missing run/eval/features path, or a dataset/split the
            store has no features for.
        DatasetError: the dataset cannot be opened.
    """
    base = options or ReportOptions()
    opts = replace(
        base, batch_size=batch_size, seed=seed, tau=tau, pool_size=max(base.pool_size, batch_size)
    )
    runs = as_labelled(run, "run")
    evals = as_labelled(eval_json, "eval JSON")
    embeds = as_labelled(embeddings, "features file")
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)

    page = _Page(fs, opts)
    page.collect(dataset, split, dataset_root)
    page.training = _training_section(runs, evals, embeds, opts)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(page.render(), encoding="utf-8")
    tmp.replace(out)
    log.info("wrote report of %s to %s (%.1f MB)", fs.url, out, out.stat().st_size / 1e6)
    return out


# ---- the page -----------------------------------------------------------------------------------


class _Page(StorePage):
    """Collects the store's data for one dataset split, then renders the whole page."""

    # -- data -------------------------------------------------------------------------------

    def collect(self, dataset: str | None, split: str | None, root: str | None) -> None:
        self.info = store_info(self.fs)
        self.groups = groups = self.fs.groups()
        reader = None
        if dataset is not None:
            split = split or self._default_split(groups, dataset)
            reader = open_dataset(dataset, root=root, split=split)
            names = {dataset, getattr(reader, "name", dataset)}
            chosen = [g for g in groups if g.dataset in names and g.split == split]
            if groups and not chosen:
                raise ConfigError(
                    f"store {self.fs.url!r} has no features for dataset {dataset!r} split "
                    f"{split!r}; it holds {self._pairs(groups)}. Pass one of those with "
                    "--dataset/--split, or run `cusa extract` for this one."
                )
            self.dataset = chosen[0].dataset if chosen else getattr(reader, "name", dataset)
        else:
            pairs = sorted({(g.dataset, g.split) for g in groups if split in (None, g.split)})
            if split is not None and groups and not pairs:
                raise ConfigError(
                    f"store {self.fs.url!r} has no split {split!r}; it holds {self._pairs(groups)}"
                )
            if pairs:
                self.dataset, split = pairs[0]
                if len(pairs) > 1:
                    self.selection_note = (
                        f"The store holds several dataset splits ({self._pairs(groups)}); the "
                        f"sections below show <b>{esc(self.dataset)}/{esc(split)}</b>. Pass "
                        "<code>--dataset</code>/<code>--split</code> to choose another."
                    )
            chosen = [g for g in groups if (g.dataset, g.split) == (self.dataset, split)]
            reader = self._recorded_reader(chosen) if self.opts.find_dataset else None
        self.split = split
        for g in chosen:
            lookup = FeatureLookup(g)
            if len(lookup) == 0:
                continue
            t = TeacherView(g, lookup, group_modality(g))
            (self.image_teachers if t.modality == "image" else self.text_teachers).append(t)

        image_ids = set(self.image_teachers[0].lookup.ids) if self.image_teachers else set()
        for cid in self.text_teachers[0].lookup.ids if self.text_teachers else []:
            self._caption_ids.setdefault(image_of(cid), []).append(cid)
        with_features = image_ids | set(self._caption_ids)

        if reader is not None:
            self.view = DatasetView.from_reader(
                reader,
                self.opts.pool_size,
                self.opts.seed,
                keep=with_features or None,
                max_side=self.opts.thumb_side,
            )
        else:
            if self._unreachable:
                why = self._unreachable + " "
            elif self.opts.find_dataset and self.info.get("groups"):
                why = "No dataset was given and the store records none that can be opened here, "
            else:
                why = "No dataset was given, "
            self.view = DatasetView.without_dataset(
                why + "so this page shows sample ids instead of thumbnails and caption text. Pass "
                "<code>--dataset NAME_OR_PATH</code> (and <code>--root DIR</code> for datasets "
                "that need one) to see the pictures; they are made from the dataset and "
                "embedded, originals are never copied."
            )
            rng = np.random.default_rng(self.opts.seed)
            ids = sorted(with_features)
            take = min(len(ids), self.opts.pool_size)
            self.view.pool = (
                [ids[i] for i in rng.choice(len(ids), take, replace=False)] if take else []
            )
        if not self.text_teachers:
            # No text features: captions come from the dataset, when one was given.
            self._caption_ids = {i: list(c) for i, c in self.view.image_captions.items()}
        self._choose_batch()

    def _recorded_reader(self, groups: Sequence[FeatureGroup]) -> Any:
        """The dataset the store recorded for these groups, opened again; None when it cannot be.

        Groups written since the dataset source is recorded name it (the registered name or the
        absolute path, root and split of ``cusa extract``). Older groups of a registered dataset
        that needs no root (``coco-sample``) are opened by name.
        """
        sources = [g.source for g in groups if g.source]
        if sources:
            src = sources[0]
            spec, root, split = src.get("dataset"), src.get("root"), src.get("split")
            if str(spec).startswith("pipe:") or str(root).startswith("pipe:"):
                # Never run a shell command read from a (shared, writable) store's attributes.
                self._unreachable = (
                    f"The store records the dataset as the shell command <code>{esc(spec)}</code>, "
                    "which a report does not run by itself,"
                )
                return None
            try:
                reader = open_dataset(str(spec), root=root, split=split)
                log.info("report: images from the recorded dataset %s (root %s)", spec, root)
                return reader
            except (CusaError, OSError) as exc:
                where = f"{spec}" + (f" (root {root})" if root else "")
                self._unreachable = (
                    f"The store records the dataset as <code>{esc(where)}</code>, but it cannot "
                    f"be opened here ({esc(str(exc)[:300])}),"
                )
                return None
        if groups:
            name = groups[0].dataset
            if name in DATASETS and not DATASETS.get(name).needs_root:
                try:
                    return open_dataset(name, split=groups[0].split)
                except (CusaError, OSError):
                    return None
        return None

    @staticmethod
    def _pairs(groups: Sequence[FeatureGroup]) -> str:
        return ", ".join(sorted({f"{g.dataset}/{g.split}" for g in groups})) or "nothing"

    @staticmethod
    def _default_split(groups: Sequence[FeatureGroup], dataset: str) -> str:
        splits = sorted({g.split for g in groups if g.dataset == dataset}) or sorted(
            {g.split for g in groups}
        )
        if len(splits) == 1:
            return splits[0]
        return "train" if "train" in splits or not splits else splits[0]

    def _choose_batch(self) -> None:
        rng = np.random.default_rng(self.opts.seed)
        eligible = self._eligible()
        b = min(self.opts.batch_size, len(eligible))
        picks = rng.choice(len(eligible), b, replace=False) if b else []
        self.batch = [eligible[i] for i in picks]
        self.batch_captions = []
        for i in self.batch:
            caps = sorted(self._caption_ids.get(i, []))
            self.batch_captions.append(caps[int(rng.integers(len(caps)))] if caps else "")

    # -- page -------------------------------------------------------------------------------

    def render(self) -> str:
        bodies = {
            "summary": self.summary_section(),
            "soft-labels": self.soft_label_section(),
            "false-negatives": self.false_negative_section(),
            "neighbours": self.neighbour_section(),
            "training": self.training or note_box("No training run given."),
        }
        header = [
            f'<p class="lead">Feature store <code>{esc(self.fs.url)}</code>'
            + (
                f", dataset <b>{esc(self.dataset)}</b> split <b>{esc(self.split)}</b>"
                if self.dataset
                else ""
            )
            + ".</p>"
        ]
        if self.selection_note:
            header.append(note_box(self.selection_note))
        if self.view.missing_reason:
            header.append(note_box(self.view.missing_reason, "warn"))
        elif self.view.has_images:
            header.append(
                note_box(
                    f"Thumbnails: {len(self.view.thumbs)} made from the dataset ({self.view.scanned} images "
                    f"read, at most {self.opts.thumb_side}px, originals not copied)"
                    + (
                        f"; {len(self.view.thumb_errors)} could not be decoded"
                        if self.view.thumb_errors
                        else ""
                    )
                    + "."
                )
            )
        nav = " ".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
        sections = "\n".join(
            f'<section id="{sid}" data-section="{sid}"><h2>{esc(title)}</h2>\n{bodies[sid]}\n</section>'
            for sid, title in SECTIONS
        )
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return render_page(
            title=esc(f"cusa report: {self.dataset or 'store'}"),
            nav=nav,
            header="\n".join(header),
            sections=sections,
            footer=esc(
                f"Made by cusa {version} on {stamp}; seed {self.opts.seed}, τ {self.opts.tau:g}."
            ),
        )


# ---- training -----------------------------------------------------------------------------------


def _training_section(
    runs: Mapping[str, Path],
    evals: Mapping[str, Path],
    embeds: Mapping[str, Path],
    opts: ReportOptions,
) -> str:
    if not (runs or evals or embeds):
        return note_box(
            "No training run given. Pass <code>--run RUN_DIR</code> (its <code>metrics.jsonl</code>), "
            "<code>--eval EVAL_JSON</code> and <code>--embeddings LABEL=FEATURES.npz</code> (twice, "
            "e.g. with and without USA) to see loss curves, temperatures, metrics and a t-SNE here."
        )
    out = []
    logs = [read_run(p, label) for label, p in runs.items()]
    if logs:
        out.append("<h3>Loss terms</h3>")
        sources = ", ".join(f"<code>{esc(r.source)}</code> ({r.lines} lines)" for r in logs)
        out.append(note_box(f"From {sources}. One panel per term; runs overlaid."))
        panels = _panels(logs, RunLog.loss_keys)
        if panels:
            out.append(plot_tag(plots.curves(panels, logy=True), "loss curves"))
        else:
            out.append(note_box("The metrics log has no loss terms (loss, itr, csa, usa).", "warn"))
        temps = _panels(logs, RunLog.temperature_keys)
        out.append("<h3>Temperatures</h3>")
        if temps:
            out.append(plot_tag(plots.curves(temps, ncols=4), "temperatures over steps"))
        else:
            out.append(
                note_box("The metrics log records no temperatures (keys starting with tau).")
            )
        other = _panels(logs, RunLog.other_keys)
        if other:
            out.append("<h3>Other logged values</h3>")
            out.append(plot_tag(plots.curves(other, ncols=4), "other logged values"))
    if evals:
        out.append("<h3>Evaluation</h3>")
        tables = {label: read_eval(p) for label, p in evals.items()}
        keys = list(dict.fromkeys(k for t in tables.values() for k in t))
        head = "".join(f"<th>{esc(label)}</th>" for label in tables)
        rows = []
        for key in keys:
            vals = [t.get(key) for t in tables.values()]
            present = [v for v in vals if v is not None]
            best = max(present) if len(present) > 1 else None
            cells = "".join(
                '<td class="num"></td>'
                if v is None
                else f'<td class="num{" best" if best is not None and v == best else ""}">{v:.2f}</td>'
                for v in vals
            )
            rows.append(f"<tr><th>{esc(key)}</th>{cells}</tr>")
        out.append(
            f'<table class="data metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    if embeds:
        out.append("<h3>Student features in 2-D (t-SNE)</h3>")
        out.append(_tsne_block(embeds, opts))
    return "\n".join(out)


def _panels(
    logs: Sequence[RunLog], keys: Callable[[RunLog], list[str]]
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{key: {run label: (steps, values)}}`` for the keys ``keys`` picks from each run."""
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for r in logs:
        for key in keys(r):
            panels.setdefault(key, {})[r.label] = r.series[key]
    return panels


def _tsne_block(embeds: Mapping[str, Path], opts: ReportOptions) -> str:
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError:
        return note_box(
            "The t-SNE needs scikit-learn: <code>pip install 'cusa[report]'</code>.", "warn"
        )

    tables = [read_embeddings(p, label) for label, p in embeds.items()]
    # Show the same images in every panel, so runs (with / without USA) compare like for like.
    common = set(tables[0].groups)
    for t in tables[1:]:
        common &= set(t.groups)
    groups = sorted(common)
    rng = np.random.default_rng(opts.seed)
    rng.shuffle(groups)
    per_group = max(1, max(len(t.ids) for t in tables) // max(1, len(common)))
    keep = set(groups[: max(2, opts.tsne_points // per_group)])
    panels = []
    for t in tables:
        rows = [r for r, g in enumerate(t.groups) if g in keep][: opts.tsne_points]
        if len(rows) < 5:
            return note_box(
                f"Too few rows in common between the feature files ({len(rows)}) for a t-SNE.",
                "warn",
            )
        x = unit_rows(t.features[rows])
        perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
        # One thread: a few thousand points take ~1 s, while OpenMP threads competing with other
        # work on a small machine made the same fit 30x slower.
        with threadpool_limits(1):
            tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=opts.seed)
            xy = tsne.fit_transform(x)
        panels.append(
            (
                f"{t.label} ({len(rows)} rows)",
                xy,
                [t.groups[r] for r in rows],
                [t.is_caption[r] for r in rows],
            )
        )
    return note_box(
        f"{len(keep)} images and their captions, the same in every panel; colour = image, "
        "circle = image feature, triangle = caption feature. USA should pull an image's "
        "captions together (paper Fig. 4)."
    ) + plot_tag(plots.embedding_scatter(panels), "t-SNE of student features")
