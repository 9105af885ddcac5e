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
import html
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cusa import __version__ as version
from cusa.errors import ConfigError, CusaError
from cusa.extract.readers import DATASETS, open_dataset
from cusa.store.feature_store import FeatureGroup, FeatureStore
from cusa.store.info import store_info
from cusa.store.knn import build_index
from cusa.store.lookup import FeatureLookup
from cusa.viz import plots
from cusa.viz.runs import as_labelled, read_embeddings, read_eval, read_run
from cusa.viz.thumbnails import THUMB_SIDE, DatasetView, data_uri

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


@dataclass(frozen=True)
class ReportOptions:
    """Knobs of :func:`build_report`; the defaults make a page of a few MB in seconds.

    Args:
        batch_size: images in the soft-label batch.
        seed: seeds every random choice (shard order, batch, queries, t-SNE).
        tau: soft-label temperature, ``softmax(cos / tau)`` (the official teacher tau is 1.0).
        pool_size: images read from the dataset to draw the batch, false negatives and queries.
        false_negatives: pairs shown in the gallery.
        queries: query images and query captions in the neighbours section.
        neighbours: neighbours shown per query.
        max_scan: images read at most from the dataset while looking for neighbour thumbnails.
        max_index_rows: above this many rows a group's kNN index holds a random subset.
        tsne_points: rows at most in each t-SNE panel.
        thumb_side: thumbnail size in pixels.
        find_dataset: without ``dataset``, open the dataset the store recorded at extraction
            (False: show sample ids only).
    """

    batch_size: int = 16
    seed: int = 0
    tau: float = 1.0
    pool_size: int = 256
    false_negatives: int = 8
    queries: int = 3
    neighbours: int = 5
    max_scan: int = 5000
    max_index_rows: int = 200_000
    tsne_points: int = 1500
    thumb_side: int = THUMB_SIDE
    find_dataset: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(
                f"batch_size={self.batch_size!r}: a soft-label batch needs at least 2 images"
            )
        if not self.tau > 0:
            raise ConfigError(f"tau={self.tau!r} must be > 0 (soft labels are softmax(cos / tau))")
        for name in (
            "pool_size",
            "false_negatives",
            "queries",
            "neighbours",
            "max_index_rows",
            "tsne_points",
            "thumb_side",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.pool_size < self.batch_size:
            raise ConfigError(
                f"pool_size={self.pool_size!r} is smaller than batch_size={self.batch_size!r}; "
                "raise pool_size or lower batch_size"
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
        dataset: dataset name or path for :func:`cusa.extract.readers.open_dataset`; it supplies
            thumbnails and caption text. Default: the dataset the store's groups recorded when
            they were extracted (name, or path with root and split), when it can be opened here;
            otherwise the page shows sample ids only and says why.
        split: the split to show; default: the store's only split for the dataset, else ``train``.
        run: a run directory (with ``metrics.jsonl``) or JSONL file; several as a list or
            ``{label: path}`` to overlay them (``"LABEL=PATH"`` strings also carry a label).
        eval_json: eval report(s) as written by ``cusa_train.evaluate``; several become columns.
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
    from dataclasses import replace

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


# ---- helpers ------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(uri: str | None, alt: str, cls: str = "thumb", title: str | None = None) -> str:
    if uri is None:
        return f'<div class="{cls} nothumb" title="{_e(title or alt)}">no image</div>'
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}" title="{_e(title or alt)}">'


def _plot(png: bytes, alt: str) -> str:
    return f'<img class="plot" src="{data_uri(png, "image/png")}" alt="{_e(alt)}">'


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{text}</p>'


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _image_of(caption_id: str) -> str:
    return caption_id.rsplit("#", 1)[0]


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def soft_labels(features: np.ndarray, tau: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Teacher cosine similarities and the soft labels they give.

    Args:
        features: ``(B, D)`` teacher features of one batch.
        tau: temperature.

    Returns:
        ``(cos, labels)``, both ``(B, B)``; each row of ``labels`` sums to 1.
    """
    f = _normalized(features)
    cos = f @ f.T  # (B, B) cosine between teacher features
    return cos, softmax_rows(cos / tau)


def _modality(group: FeatureGroup) -> str:
    modality = group.spec.get("modality")
    if modality in ("image", "text"):
        return modality
    name = str(group.spec.get("output_kind", ""))
    return "text" if name == "sentence" else "image"


@dataclass
class _Teacher:
    group: FeatureGroup
    lookup: FeatureLookup
    modality: str

    @property
    def name(self) -> str:
        return self.group.spec["name"]

    def feats(self, ids: Sequence[str]) -> np.ndarray:
        return _normalized(self.lookup.gather(list(ids)))


# ---- the page -----------------------------------------------------------------------------------


@dataclass
class _Page:
    fs: FeatureStore
    opts: ReportOptions
    info: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    split: str | None = None
    selection_note: str = ""
    view: DatasetView = field(default_factory=DatasetView)
    image_teachers: list[_Teacher] = field(default_factory=list)
    text_teachers: list[_Teacher] = field(default_factory=list)
    batch: list[str] = field(default_factory=list)  # image ids of the soft-label batch
    batch_captions: list[str] = field(default_factory=list)  # one caption id per batch image
    training: str = ""
    _caption_ids: dict[str, list[str]] = field(
        default_factory=dict
    )  # image -> caption ids with text feats
    _bodies: dict[str, str] = field(default_factory=dict)
    _unreachable: str = ""  # why the dataset the store records could not be opened

    # -- data -------------------------------------------------------------------------------

    def collect(self, dataset: str | None, split: str | None, root: str | None) -> None:
        self.info = store_info(self.fs)
        groups = self.fs.groups()
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
                        f"sections below show <b>{_e(self.dataset)}/{_e(split)}</b>. Pass "
                        "<code>--dataset</code>/<code>--split</code> to choose another."
                    )
            chosen = [g for g in groups if (g.dataset, g.split) == (self.dataset, split)]
            reader = self._recorded_reader(chosen) if self.opts.find_dataset else None
        self.split = split
        for g in chosen:
            lookup = FeatureLookup(g)
            if len(lookup) == 0:
                continue
            t = _Teacher(g, lookup, _modality(g))
            (self.image_teachers if t.modality == "image" else self.text_teachers).append(t)

        image_ids = set(self.image_teachers[0].lookup.ids) if self.image_teachers else set()
        for cid in self.text_teachers[0].lookup.ids if self.text_teachers else []:
            self._caption_ids.setdefault(_image_of(cid), []).append(cid)
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
                    f"The store records the dataset as the shell command <code>{_e(spec)}</code>, "
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
                    f"The store records the dataset as <code>{_e(where)}</code>, but it cannot "
                    f"be opened here ({_e(str(exc)[:300])}),"
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

    def _eligible(self) -> list[str]:
        """Pool images that every teacher of the split has features for."""
        out = []
        for i in self.view.pool:
            if self.image_teachers and i not in self.image_teachers[0].lookup:
                continue
            if self.text_teachers and not self._caption_ids.get(i):
                continue
            out.append(i)
        return out

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

    # -- display pieces -----------------------------------------------------------------------

    def caption(self, cid: str) -> str:
        text = self.view.captions.get(cid)
        return _e(text) if text is not None else f'<span class="id">{_e(cid)}</span>'

    def thumb(self, image_id: str, cls: str = "thumb") -> str:
        if not self.view.has_images:
            return f'<div class="{cls} nothumb" title="{_e(image_id)}">{_e(_short(image_id))}</div>'
        reason = self.view.thumb_errors.get(image_id)
        return _img(
            self.view.thumb(image_id),
            image_id,
            cls,
            title=f"{image_id}: {reason}" if reason else image_id,
        )

    # -- sections -----------------------------------------------------------------------------

    def summary_section(self) -> str:
        info = self.info
        groups = info["groups"]
        try:
            total = int(self.fs.fs.fs.du(self.fs.fs.path("")))
        except (OSError, NotImplementedError):
            total = sum(g["size_bytes"] for g in groups)
        datasets = sorted({f"{g['dataset']}/{g['split']}" for g in groups})
        out = [
            '<dl class="facts">',
            f"<dt>Store</dt><dd><code>{_e(info['store'])}</code></dd>",
            f"<dt>Layout version</dt><dd>{_e(info['layout_version'])}</dd>",
            f"<dt>Created</dt><dd>{_e(info.get('created') or '?')}</dd>",
            f"<dt>Dataset splits</dt><dd>{_e(', '.join(datasets) or 'none')}</dd>",
            f"<dt>Feature groups</dt><dd>{len(groups)}</dd>",
            f"<dt>Size on disk</dt><dd>{_size(total)}</dd>",
            "</dl>",
        ]
        if not groups:
            out.append(
                _note(
                    "This store holds no features yet. Fill it with "
                    "<code>cusa extract --dataset NAME --store PATH</code>.",
                    "warn",
                )
            )
            return "\n".join(out)
        out.append(
            '<table class="data"><thead><tr><th>dataset / split</th><th>teacher</th>'
            "<th>modality</th><th>rows</th><th>dim</th><th>dtype</th><th>failed</th>"
            "<th>state</th><th>size</th></tr></thead><tbody>"
        )
        for g in groups:
            state = "sealed" if g["sealed"] else f"{g['committed_shards']} shard(s) committed"
            failed_cls = ' class="bad"' if g["failed"] else ""
            out.append(
                f"<tr><td>{_e(g['dataset'])}/{_e(g['split'])}</td>"
                f'<td><b>{_e(g["teacher"])}</b><br><span class="id">@{_e(g["fingerprint"])}</span></td>'
                f'<td>{_e(g["modality"] or "?")}</td><td class="num">{g["rows"]:,}</td>'
                f'<td class="num">{g["dim"]}</td><td>{_e(g["dtype"])}</td>'
                f'<td class="num"{failed_cls}>{g["failed"]:,}</td><td>{_e(state)}</td>'
                f'<td class="num">{_size(g["size_bytes"])}</td></tr>'
            )
        out.append("</tbody></table>")

        out.append("<h3>Teacher specs</h3>")
        seen: set[str] = set()
        for g in groups:
            key = f"{g['teacher']}@{g['fingerprint']}"
            if key in seen:
                continue
            seen.add(key)
            spec = dict(g["spec"])
            pre = spec.pop("preprocessing", {})
            versions = spec.pop("library_versions", {})
            rows = "".join(
                f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in spec.items()
            )
            out.append(
                f'<details class="spec"><summary><b>{_e(g["teacher"])}</b> '
                f'<span class="id">@{_e(g["fingerprint"])}</span> — {_e(spec.get("model", ""))}, '
                f"{_e(spec.get('dim'))}-d {_e(spec.get('output_kind', ''))}</summary>"
                f'<table class="kv">{rows}</table>'
                f"<p>Preprocessing</p><pre>{_e(json.dumps(pre, indent=2, sort_keys=True))}</pre>"
                + (
                    f"<p>Library versions</p><pre>{_e(json.dumps(versions, sort_keys=True))}</pre>"
                    if versions
                    else ""
                )
                + "</details>"
            )

        out.append("<h3>Failure ledger</h3>")
        failed_groups = [
            g for g in self.fs.groups() if g.url in {x["url"] for x in groups if x["failed"]}
        ]
        if not failed_groups:
            out.append(
                _note("No failures: every sample read produced features for every teacher.", "ok")
            )
        limit = 50
        for group in failed_groups:
            fails = group.failures()
            out.append(
                f"<p><b>{_e(group.spec['name'])}</b> on {_e(group.dataset)}/{_e(group.split)}: "
                f"{len(fails):,} sample(s) without features</p>"
            )
            out.append(
                '<table class="data"><thead><tr><th>sample id</th><th>shard</th><th>reason</th>'
                "</tr></thead><tbody>"
            )
            for f in fails[:limit]:
                out.append(
                    f"<tr><td><code>{_e(f['sample_id'])}</code></td><td>{_e(f['shard'])}</td>"
                    f"<td>{_e(f['error'] or '')}</td></tr>"
                )
            out.append("</tbody></table>")
            if len(fails) > limit:
                out.append(
                    _note(f"…and {len(fails) - limit:,} more; see <code>cusa store info</code>.")
                )
        return "\n".join(out)

    def soft_label_section(self) -> str:
        if not (self.image_teachers or self.text_teachers):
            return _note(
                "No features for this dataset split, so there are no soft labels to show.", "warn"
            )
        if len(self.batch) < 2:
            return _note(
                f"Only {len(self.batch)} image(s) have features from every teacher; a batch "
                "needs at least 2.",
                "warn",
            )
        tau = self.opts.tau
        b = len(self.batch)
        out = [
            _note(
                f"A random batch of {b} image-caption pairs (seed {self.opts.seed}). Soft labels are "
                f"<code>softmax(cos / τ)</code> over the teacher's in-batch cosine similarities with "
                f"τ = {tau:g}; CSA aligns the student's image-to-text distribution with them and USA its "
                "image-to-image and text-to-text ones. The dataset's own labels are one-hot (the outlined "
                "diagonal)."
            )
        ]
        sims, labels = [], [("one-hot (dataset)", np.eye(b, dtype=np.float32))]
        stats = []
        if self.image_teachers:
            t = self.image_teachers[0]
            cos, lab = soft_labels(t.lookup.gather(self.batch), tau)
            sims.append((f"image teacher {t.name}: cos(image, image)", cos))
            labels.append((f"soft labels, image teacher (τ={tau:g})", lab))
            stats.append((t.name, cos, lab))
        if self.text_teachers:
            t = self.text_teachers[0]
            cos, lab = soft_labels(t.lookup.gather(self.batch_captions), tau)
            sims.append((f"text teacher {t.name}: cos(caption, caption)", cos))
            labels.append((f"soft labels, text teacher (τ={tau:g})", lab))
            stats.append((t.name, cos, lab))
        out.append(_plot(plots.heatmaps(sims, cmap="magma"), "teacher similarity heatmaps"))
        out.append("<h3>The batch</h3>")
        cells = []
        for k, (i, c) in enumerate(zip(self.batch, self.batch_captions, strict=True)):
            cap = self.caption(c) if c else '<span class="id">(no caption)</span>'
            cells.append(
                f'<figure class="cell"><span class="idx">{k}</span>{self.thumb(i)}'
                f"<figcaption>{cap}</figcaption></figure>"
            )
        out.append(f'<div class="grid">{"".join(cells)}</div>')
        out.append("<h3>Labels: one-hot and soft</h3>")
        out.append(_plot(plots.heatmaps(labels, cmap="viridis"), "one-hot and soft labels"))
        rows = [0, 1, 2][: min(3, b)]
        out.append(
            _plot(plots.label_distributions(rows, labels), "label distributions of three queries")
        )
        items = []
        for name, cos, lab in stats:
            off = cos[~np.eye(b, dtype=bool)]
            diag = float(np.mean(np.diag(lab)))
            items.append(
                f"<li><b>{_e(name)}</b>: off-diagonal cosine {off.mean():.3f} ± {off.std():.3f} "
                f"(max {off.max():.3f}); the positive keeps {100 * diag:.1f}% of a row's mass on "
                f"average (one-hot: 100%, uniform: {100 / b:.1f}%).</li>"
            )
        out.append(f"<ul>{''.join(items)}</ul>")
        if not self.image_teachers:
            out.append(
                _note("No image teacher in this store: only the text-side soft labels are shown.")
            )
        if not self.text_teachers:
            out.append(
                _note("No text teacher in this store: only the image-side soft labels are shown.")
            )
        return "\n".join(out)

    def false_negative_section(self) -> str:
        it = self.image_teachers[0] if self.image_teachers else None
        tt = self.text_teachers[0] if self.text_teachers else None
        if it is None and tt is None:
            return _note("No features for this dataset split, so no pairs can be scored.", "warn")
        images = [i for i in self._eligible() if self._caption_ids.get(i) or tt is None]
        caps = [c for i in images for c in self._caption_ids.get(i, [])]
        if len(images) < 2:
            return _note(
                f"Only {len(images)} image(s) in the pool have the features needed; "
                "false negatives need at least 2.",
                "warn",
            )
        if not caps:
            return _note(
                "The store has no text features and no dataset was given, so the images "
                "have no captions to pair with. Pass <code>--dataset</code>.",
                "warn",
            )
        n, m = len(images), len(caps)
        col = {i: k for k, i in enumerate(images)}
        owner = np.array([col[_image_of(c)] for c in caps])  # (m,) image index of each caption
        parts, used = [], []
        img_score = txt_score = None
        if it is not None:
            f = it.feats(images)
            s = f @ f.T  # (n, n) image-image cosine under the image teacher
            img_score = s[:, owner].T  # (m, n): image i vs the image of caption c
            parts.append(img_score)
            used.append(
                f"the image teacher <b>{_e(it.name)}</b> rates image <i>i</i> close to the image "
                "that caption <i>c</i> belongs to"
            )
        if tt is not None:
            t = tt.feats(caps)  # (m, d)
            mean = np.zeros((n, t.shape[1]), dtype=np.float32)
            np.add.at(mean, owner, t)
            mean /= np.bincount(owner, minlength=n)[:, None]
            txt_score = t @ mean.T  # (m, n): mean cosine of caption c to the captions of image i
            parts.append(txt_score)
            used.append(
                f"the text teacher <b>{_e(tt.name)}</b> rates caption <i>c</i> close to the "
                "captions of image <i>i</i>"
            )
        score = np.mean(parts, axis=0)  # (m, n)
        score[np.arange(m), owner] = -np.inf  # the dataset's own pairs are not negatives
        order = np.argsort(-score, axis=None)
        seen: set[tuple[int, int]] = set()
        shown = np.zeros(n, dtype=np.int64)  # times each image was the gallery's image i
        picks = []
        for flat in order:
            c, i = divmod(int(flat), n)
            if not np.isfinite(score[c, i]):
                break
            pair = (min(i, owner[c]), max(i, owner[c]))
            if pair in seen or shown[i] >= 2:  # keep the gallery varied
                continue
            seen.add(pair)
            shown[i] += 1
            picks.append((c, i))
            if len(picks) >= self.opts.false_negatives:
                break
        out = [
            _note(
                f"Pairs (image <i>i</i>, caption <i>c</i>) that the dataset labels as non-matching, "
                f"scored over {n} pooled images and {m} captions: {' and '.join(used)}"
                + (" (score = mean of both cosines)" if len(parts) == 2 else "")
                + ". The best caption per image pair is shown, highest score first. These are the "
                "missing inter-modal matches that soft labels recover."
            )
        ]
        if len(parts) == 1:
            which = "text" if tt is None else "image"
            out.append(
                _note(
                    f"This store has no {which} teacher, so pairs are ranked by one teacher only."
                )
            )
        cards = []
        for rank, (c, i) in enumerate(picks, 1):
            j = images[owner[c]]
            img_i = images[i]
            own = sorted(self._caption_ids.get(img_i, []))
            scores = []
            if img_score is not None:
                scores.append(f"image teacher {img_score[c, i]:.3f}")
            if txt_score is not None:
                scores.append(f"text teacher {txt_score[c, i]:.3f}")
            cards.append(
                f'<div class="fn"><div class="rank">#{rank}</div>{self.thumb(img_i)}'
                f'<div class="fn-text"><p class="cap">“{self.caption(caps[c])}”</p>'
                f'<p class="meta">labelled as a caption of {self.thumb(j, "mini")} '
                f'<span class="id">{_e(j)}</span></p>'
                f'<p class="meta">scores: {" · ".join(scores)}</p>'
                + (
                    f'<p class="meta">image\'s own caption: {self.caption(own[0])}</p>'
                    if own
                    else ""
                )
                + "</div></div>"
            )
        out.append(f'<div class="fns">{"".join(cards)}</div>')
        return "\n".join(out)

    def neighbour_section(self) -> str:
        teachers = self.image_teachers + self.text_teachers
        if not teachers:
            return _note(
                "No features for this dataset split, so there are no neighbours to show.", "warn"
            )
        k = self.opts.neighbours
        rng = np.random.default_rng(self.opts.seed + 1)
        blocks, needed = [], set()
        for t in teachers:
            if t.modality == "image":
                cands = [i for i in (self.batch or self.view.pool) if i in t.lookup]
            else:
                cands = [c for c in self.batch_captions if c and c in t.lookup]
                if not cands:
                    cands = [
                        c
                        for i in self.view.pool
                        for c in self._caption_ids.get(i, [])[:1]
                        if c in t.lookup
                    ]
            q = min(self.opts.queries, len(cands))
            queries = (
                [cands[x] for x in sorted(rng.choice(len(cands), q, replace=False))] if q else []
            )
            index, note = self._index(t, queries)
            hits = index.search_ids(queries, k) if queries else []
            blocks.append((t, queries, hits, note))
            for qid, row in zip(queries, hits, strict=True):
                needed.update(_image_of(x) for x in [qid, *(h for h, _ in row)])
        self.view.ensure(needed, self.opts.max_scan)
        out = [
            _note(
                f"For {self.opts.queries} query images and captions, their {k} nearest neighbours within "
                "the same modality under each teacher (cosine similarity, exact faiss search). "
                "Neighbours from the query's own image are marked."
            )
        ]
        for t, queries, hits, note in blocks:
            out.append(f"<h3>{_e(t.modality)} teacher {_e(t.name)}</h3>")
            if note:
                out.append(_note(note))
            if not queries:
                out.append(_note("No query with features in the pool.", "warn"))
            for qid, row in zip(queries, hits, strict=True):
                out.append('<div class="nn-row">')
                if t.modality == "image":
                    out.append(
                        f'<figure class="cell query">{self.thumb(qid)}'
                        "<figcaption><b>query</b></figcaption></figure>"
                    )
                    for hid, score in row:
                        out.append(
                            f'<figure class="cell">{self.thumb(hid)}'
                            f"<figcaption>{score:.3f}</figcaption></figure>"
                        )
                else:
                    out.append(
                        f'<div class="tq"><b>query</b> {self.thumb(_image_of(qid), "mini")} '
                        f'“{self.caption(qid)}”</div><ol class="tn">'
                    )
                    for hid, score in row:
                        same = _image_of(hid) == _image_of(qid)
                        badge = ' <span class="badge">same image</span>' if same else ""
                        out.append(
                            f"<li>{self.thumb(_image_of(hid), 'mini')} “{self.caption(hid)}” "
                            f'<span class="score">{score:.3f}</span>{badge}</li>'
                        )
                    out.append("</ol>")
                out.append("</div>")
        return "\n".join(out)

    def _index(self, t: _Teacher, queries: list[str]) -> tuple[Any, str]:
        n = len(t.lookup)
        if n <= self.opts.max_index_rows:
            return build_index(t.lookup, metric="ip", use_gpu=False), ""
        rng = np.random.default_rng(self.opts.seed)
        rows = np.union1d(
            rng.choice(n, self.opts.max_index_rows, replace=False), t.lookup.rows(queries)
        )
        return _SubsetIndex(t.lookup, rows), (
            f"Searched among a random {len(rows):,} of the {n:,} rows (max_index_rows)."
        )

    # -- page -------------------------------------------------------------------------------

    def render(self) -> str:
        bodies = {
            "summary": self.summary_section(),
            "soft-labels": self.soft_label_section(),
            "false-negatives": self.false_negative_section(),
            "neighbours": self.neighbour_section(),
            "training": self.training or _note("No training run given."),
        }
        header = [
            f'<p class="lead">Feature store <code>{_e(self.fs.url)}</code>'
            + (
                f", dataset <b>{_e(self.dataset)}</b> split <b>{_e(self.split)}</b>"
                if self.dataset
                else ""
            )
            + ".</p>"
        ]
        if self.selection_note:
            header.append(_note(self.selection_note))
        if self.view.missing_reason:
            header.append(_note(self.view.missing_reason, "warn"))
        elif self.view.has_images:
            header.append(
                _note(
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
        nav = " ".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS)
        sections = "\n".join(
            f'<section id="{sid}" data-section="{sid}"><h2>{_e(title)}</h2>\n{bodies[sid]}\n</section>'
            for sid, title in SECTIONS
        )
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return _TEMPLATE.format(
            title=_e(f"cusa report: {self.dataset or 'store'}"),
            css=_CSS,
            nav=nav,
            header="\n".join(header),
            sections=sections,
            footer=_e(
                f"Made by cusa {version} on {stamp}; seed {self.opts.seed}, τ {self.opts.tau:g}."
            ),
        )


class _SubsetIndex:
    """Exact cosine search over a subset of a group's rows, for groups too big to index whole."""

    def __init__(self, lookup: FeatureLookup, rows: np.ndarray) -> None:
        import faiss

        self.lookup = lookup
        self.ids = [lookup.ids[r] for r in rows]
        feats = np.ascontiguousarray(_normalized(lookup.gather_rows(rows)))  # (n, D)
        self.index = faiss.IndexFlatIP(feats.shape[1])
        self.index.add(feats)

    def search_ids(self, sample_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        q = np.ascontiguousarray(_normalized(self.lookup.gather(list(sample_ids))))
        scores, rows = self.index.search(q, min(k + 1, len(self.ids)))  # (Q, k+1)
        out = []
        for sid, rr, ss in zip(sample_ids, rows, scores, strict=True):
            out.append(
                [
                    (self.ids[r], float(s))
                    for r, s in zip(rr, ss, strict=True)
                    if r >= 0 and self.ids[r] != sid
                ][:k]
            )
        return out


def _short(sample_id: str, n: int = 28) -> str:
    return sample_id if len(sample_id) <= n else "…" + sample_id[-(n - 1) :]


# ---- training -----------------------------------------------------------------------------------


def _training_section(
    runs: Mapping[str, Path],
    evals: Mapping[str, Path],
    embeds: Mapping[str, Path],
    opts: ReportOptions,
) -> str:
    if not (runs or evals or embeds):
        return _note(
            "No training run given. Pass <code>--run RUN_DIR</code> (its <code>metrics.jsonl</code>), "
            "<code>--eval EVAL_JSON</code> and <code>--embeddings LABEL=FEATURES.npz</code> (twice, "
            "e.g. with and without USA) to see loss curves, temperatures, metrics and a t-SNE here."
        )
    out = []
    logs = [read_run(p, label) for label, p in runs.items()]
    if logs:
        out.append("<h3>Loss terms</h3>")
        sources = ", ".join(f"<code>{_e(r.source)}</code> ({r.lines} lines)" for r in logs)
        out.append(_note(f"From {sources}. One panel per term; runs overlaid."))
        panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for r in logs:
            for key in r.loss_keys():
                panels.setdefault(key, {})[r.label] = r.series[key]
        if panels:
            out.append(_plot(plots.curves(panels, logy=True), "loss curves"))
        else:
            out.append(_note("The metrics log has no loss terms (loss, itr, csa, usa).", "warn"))
        temps: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for r in logs:
            for key in r.temperature_keys():
                temps.setdefault(key, {})[r.label] = r.series[key]
        out.append("<h3>Temperatures</h3>")
        if temps:
            out.append(_plot(plots.curves(temps, ncols=4), "temperatures over steps"))
        else:
            out.append(_note("The metrics log records no temperatures (keys starting with tau)."))
        other: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for r in logs:
            for key in r.other_keys():
                other.setdefault(key, {})[r.label] = r.series[key]
        if other:
            out.append("<h3>Other logged values</h3>")
            out.append(_plot(plots.curves(other, ncols=4), "other logged values"))
    if evals:
        out.append("<h3>Evaluation</h3>")
        tables = {label: read_eval(p) for label, p in evals.items()}
        keys = list(dict.fromkeys(k for t in tables.values() for k in t))
        head = "".join(f"<th>{_e(label)}</th>" for label in tables)
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
            rows.append(f"<tr><th>{_e(key)}</th>{cells}</tr>")
        out.append(
            f'<table class="data metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    if embeds:
        out.append("<h3>Student features in 2-D (t-SNE)</h3>")
        out.append(_tsne_block(embeds, opts))
    return "\n".join(out)


def _tsne_block(embeds: Mapping[str, Path], opts: ReportOptions) -> str:
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _note(
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
            return _note(
                f"Too few rows in common between the feature files ({len(rows)}) for a t-SNE.",
                "warn",
            )
        x = _normalized(t.features[rows])
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
    return _note(
        f"{len(keep)} images and their captions, the same in every panel; colour = image, "
        "circle = image feature, triangle = caption feature. USA should pull an image's "
        "captions together (paper Fig. 4)."
    ) + _plot(plots.embedding_scatter(panels), "t-SNE of student features")


# ---- template -----------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde2ea; --bg:#ffffff; --soft:#f5f7fa; --accent:#2f5bd3; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); font-size: 21px; }
h3 { margin: 22px 0 8px; font-size: 16px; }
nav { position: sticky; top: 0; background: rgba(255,255,255,.95); border-bottom: 1px solid var(--line);
      padding: 8px 24px; z-index: 2; text-align: center; }
nav a { color: var(--accent); text-decoration: none; margin: 0 10px; font-weight: 600; font-size: 14px; }
code, pre, .id { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
.id { color: var(--muted); }
pre { background: var(--soft); padding: 8px 10px; overflow-x: auto; border-radius: 4px; }
.lead { font-size: 16px; color: var(--muted); }
.note { color: var(--muted); }
.warn { background: #fff6e0; border-left: 4px solid #e0a100; padding: 8px 12px; }
.ok { background: #e9f7ee; border-left: 4px solid #2e9d5b; padding: 8px 12px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table.data { border-collapse: collapse; width: 100%; font-size: 14px; }
table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left;
                              vertical-align: top; }
table.data thead th { background: var(--soft); }
table.metrics { width: auto; min-width: 360px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bad { color: #b3261e; font-weight: 600; }
td.best { font-weight: 700; }
table.kv th { text-align: left; padding-right: 14px; font-weight: 600; vertical-align: top; }
details.spec { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; margin: 6px 0; }
details.spec summary { cursor: pointer; }
img.plot { max-width: 100%; display: block; margin: 10px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(128px, 1fr)); gap: 10px; }
.grid .thumb { width: 100%; height: auto; aspect-ratio: 1 / 1; }
figure.cell { margin: 0; position: relative; font-size: 12.5px; }
figure.cell figcaption { color: var(--fg); margin-top: 4px; }
.idx { position: absolute; top: 4px; left: 4px; background: rgba(0,0,0,.7); color: #fff; font-size: 12px;
       padding: 0 6px; border-radius: 3px; }
.thumb { width: 150px; height: 150px; object-fit: cover; border-radius: 4px; display: block;
         background: var(--soft); }
.mini { width: 36px; height: 36px; object-fit: cover; border-radius: 3px; vertical-align: middle;
        display: inline-block; }
.nothumb { display: flex; align-items: center; justify-content: center; text-align: center; color: var(--muted);
           font-size: 11px; border: 1px dashed var(--line); overflow: hidden; word-break: break-all; }
.mini.nothumb { display: inline-flex; font-size: 8px; }
.fns { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
.fn { display: flex; gap: 12px; border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      position: relative; }
.fn .rank { position: absolute; top: 6px; right: 10px; color: var(--muted); font-weight: 700; }
.fn-text { padding-right: 28px; min-width: 0; }
.fn-text p { margin: 2px 0 6px; }
.fn .cap { font-size: 15px; }
.meta { color: var(--muted); font-size: 13px; }
.nn-row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; margin: 10px 0 16px; }
.nn-row figure.cell { width: 150px; text-align: center; }
figure.query .thumb { outline: 3px solid var(--accent); }
.tq { width: 100%; }
ol.tn { margin: 0; padding-left: 26px; width: 100%; }
ol.tn li { margin: 3px 0; }
.score { color: var(--muted); font-variant-numeric: tabular-nums; margin-left: 6px; }
.badge { background: #e9f7ee; color: #1f6f40; border-radius: 3px; padding: 0 5px; font-size: 12px; }
footer { color: var(--muted); font-size: 13px; padding: 30px 24px 40px; }
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1>{title}</h1>
{header}
</header>
<nav>{nav}</nav>
<main>
{sections}
</main>
<footer>{footer}</footer>
</body>
</html>
"""
