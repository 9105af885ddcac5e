"""The store sections of the report: summary, soft labels, false negatives, neighbours.

:class:`StorePage` holds what the report collected about one dataset split of a store (teachers,
the image pool and its thumbnails, the soft-label batch) and renders each store section from it;
``cusa.viz.report`` fills it and puts the sections on the page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..sizes import human_bytes
from ..store.feature_store import FeatureGroup, FeatureStore
from ..store.knn import build_index
from ..store.lookup import FeatureLookup
from . import plots
from .html import esc, img_tag, note_box, plot_tag, short_id
from .options import ReportOptions
from .thumbnails import DatasetView


def image_of(caption_id: str) -> str:
    return caption_id.rsplit("#", 1)[0]


def unit_rows(x: np.ndarray) -> np.ndarray:
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
    f = unit_rows(features)
    cos = f @ f.T  # (B, B) cosine between teacher features
    return cos, softmax_rows(cos / tau)


def group_modality(group: FeatureGroup) -> str:
    modality = group.spec.get("modality")
    if modality in ("image", "text"):
        return modality
    name = str(group.spec.get("output_kind", ""))
    return "text" if name == "sentence" else "image"


@dataclass
class TeacherView:
    group: FeatureGroup
    lookup: FeatureLookup
    modality: str

    @property
    def name(self) -> str:
        return self.group.spec["name"]

    def feats(self, ids: Sequence[str]) -> np.ndarray:
        return unit_rows(self.lookup.gather(list(ids)))


@dataclass
class StorePage:
    fs: FeatureStore
    opts: ReportOptions
    info: dict[str, Any] = field(default_factory=dict)
    groups: list[FeatureGroup] = field(default_factory=list)  # every readable group of the store
    dataset: str | None = None
    split: str | None = None
    selection_note: str = ""
    view: DatasetView = field(default_factory=DatasetView)
    image_teachers: list[TeacherView] = field(default_factory=list)
    text_teachers: list[TeacherView] = field(default_factory=list)
    batch: list[str] = field(default_factory=list)  # image ids of the soft-label batch
    batch_captions: list[str] = field(default_factory=list)  # one caption id per batch image
    training: str = ""
    _caption_ids: dict[str, list[str]] = field(
        default_factory=dict
    )  # image -> caption ids with text feats
    _unreachable: str = ""  # why the dataset the store records could not be opened

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

    # -- display pieces -----------------------------------------------------------------------

    def caption(self, cid: str) -> str:
        text = self.view.captions.get(cid)
        return esc(text) if text is not None else f'<span class="id">{esc(cid)}</span>'

    def thumb(self, image_id: str, cls: str = "thumb") -> str:
        if not self.view.has_images:
            return f'<div class="{cls} nothumb" title="{esc(image_id)}">{esc(short_id(image_id))}</div>'
        reason = self.view.thumb_errors.get(image_id)
        return img_tag(
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
            f"<dt>Store</dt><dd><code>{esc(info['store'])}</code></dd>",
            f"<dt>Layout version</dt><dd>{esc(info['layout_version'])}</dd>",
            f"<dt>Created</dt><dd>{esc(info.get('created') or '?')}</dd>",
            f"<dt>Dataset splits</dt><dd>{esc(', '.join(datasets) or 'none')}</dd>",
            f"<dt>Feature groups</dt><dd>{len(groups)}</dd>",
            f"<dt>Size on disk</dt><dd>{human_bytes(total)}</dd>",
            "</dl>",
        ]
        if not groups:
            out.append(
                note_box(
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
                f"<tr><td>{esc(g['dataset'])}/{esc(g['split'])}</td>"
                f'<td><b>{esc(g["teacher"])}</b><br><span class="id">@{esc(g["fingerprint"])}</span></td>'
                f'<td>{esc(g["modality"] or "?")}</td><td class="num">{g["rows"]:,}</td>'
                f'<td class="num">{g["dim"]}</td><td>{esc(g["dtype"])}</td>'
                f'<td class="num"{failed_cls}>{g["failed"]:,}</td><td>{esc(state)}</td>'
                f'<td class="num">{human_bytes(g["size_bytes"])}</td></tr>'
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
                f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in spec.items()
            )
            out.append(
                f'<details class="spec"><summary><b>{esc(g["teacher"])}</b> '
                f'<span class="id">@{esc(g["fingerprint"])}</span> — {esc(spec.get("model", ""))}, '
                f"{esc(spec.get('dim'))}-d {esc(spec.get('output_kind', ''))}</summary>"
                f'<table class="kv">{rows}</table>'
                f"<p>Preprocessing</p><pre>{esc(json.dumps(pre, indent=2, sort_keys=True))}</pre>"
                + (
                    f"<p>Library versions</p><pre>{esc(json.dumps(versions, sort_keys=True))}</pre>"
                    if versions
                    else ""
                )
                + "</details>"
            )

        out.append("<h3>Failure ledger</h3>")
        failed = {x["url"] for x in groups if x["failed"]}
        failed_groups = [g for g in self.groups if g.url in failed]
        if not failed_groups:
            out.append(
                note_box(
                    "No failures: every sample read produced features for every teacher.", "ok"
                )
            )
        limit = 50
        for group in failed_groups:
            fails = group.failures()
            out.append(
                f"<p><b>{esc(group.spec['name'])}</b> on {esc(group.dataset)}/{esc(group.split)}: "
                f"{len(fails):,} sample(s) without features</p>"
            )
            out.append(
                '<table class="data"><thead><tr><th>sample id</th><th>shard</th><th>reason</th>'
                "</tr></thead><tbody>"
            )
            for f in fails[:limit]:
                out.append(
                    f"<tr><td><code>{esc(f['sample_id'])}</code></td><td>{esc(f['shard'])}</td>"
                    f"<td>{esc(f['error'] or '')}</td></tr>"
                )
            out.append("</tbody></table>")
            if len(fails) > limit:
                out.append(
                    note_box(
                        f"…and {len(fails) - limit:,} more; <code>cusa store verify</code> lists them all."
                    )
                )
        return "\n".join(out)

    def soft_label_section(self) -> str:
        if not (self.image_teachers or self.text_teachers):
            return note_box(
                "No features for this dataset split, so there are no soft labels to show.", "warn"
            )
        if len(self.batch) < 2:
            return note_box(
                f"Only {len(self.batch)} image(s) have features from every teacher; a batch "
                "needs at least 2.",
                "warn",
            )
        tau = self.opts.tau
        b = len(self.batch)
        out = [
            note_box(
                f"A random batch of {b} image-caption pairs (seed {self.opts.seed}). Soft labels are "
                f"<code>softmax(cos / τ)</code> over the teacher's in-batch cosine similarities with "
                f"τ = {tau:g}; CSA aligns the student's image-to-text distribution with them and USA its "
                "image-to-image and text-to-text ones. The dataset's own labels are one-hot (the outlined "
                "diagonal)."
            )
        ]
        sims, labels = [], [("one-hot (dataset)", np.eye(b, dtype=np.float32))]
        stats = []
        for kind, item, teachers, ids in (
            ("image", "image", self.image_teachers, self.batch),
            ("text", "caption", self.text_teachers, self.batch_captions),
        ):
            if teachers:
                t = teachers[0]
                cos, lab = soft_labels(t.lookup.gather(ids), tau)
                sims.append((f"{kind} teacher {t.name}: cos({item}, {item})", cos))
                labels.append((f"soft labels, {kind} teacher (τ={tau:g})", lab))
                stats.append((t.name, cos, lab))
        out.append(plot_tag(plots.heatmaps(sims, cmap="magma"), "teacher similarity heatmaps"))
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
        out.append(plot_tag(plots.heatmaps(labels, cmap="viridis"), "one-hot and soft labels"))
        rows = [0, 1, 2][: min(3, b)]
        out.append(
            plot_tag(
                plots.label_distributions(rows, labels), "label distributions of three queries"
            )
        )
        items = []
        for name, cos, lab in stats:
            off = cos[~np.eye(b, dtype=bool)]
            diag = float(np.mean(np.diag(lab)))
            items.append(
                f"<li><b>{esc(name)}</b>: off-diagonal cosine {off.mean():.3f} ± {off.std():.3f} "
                f"(max {off.max():.3f}); the positive keeps {100 * diag:.1f}% of a row's mass on "
                f"average (one-hot: 100%, uniform: {100 / b:.1f}%).</li>"
            )
        out.append(f"<ul>{''.join(items)}</ul>")
        if not self.image_teachers:
            out.append(
                note_box(
                    "No image teacher in this store: only the text-side soft labels are shown."
                )
            )
        if not self.text_teachers:
            out.append(
                note_box(
                    "No text teacher in this store: only the image-side soft labels are shown."
                )
            )
        return "\n".join(out)

    def false_negative_section(self) -> str:
        it = self.image_teachers[0] if self.image_teachers else None
        tt = self.text_teachers[0] if self.text_teachers else None
        if it is None and tt is None:
            return note_box(
                "No features for this dataset split, so no pairs can be scored.", "warn"
            )
        images = [i for i in self._eligible() if self._caption_ids.get(i) or tt is None]
        caps = [c for i in images for c in self._caption_ids.get(i, [])]
        if len(images) < 2:
            return note_box(
                f"Only {len(images)} image(s) in the pool have the features needed; "
                "false negatives need at least 2.",
                "warn",
            )
        if not caps:
            return note_box(
                "The store has no text features and no dataset was given, so the images "
                "have no captions to pair with. Pass <code>--dataset</code>.",
                "warn",
            )
        n, m = len(images), len(caps)
        col = {i: k for k, i in enumerate(images)}
        owner = np.array([col[image_of(c)] for c in caps])  # (m,) image index of each caption
        parts, used = [], []
        img_score = txt_score = None
        if it is not None:
            f = it.feats(images)
            s = f @ f.T  # (n, n) image-image cosine under the image teacher
            img_score = s[:, owner].T  # (m, n): image i vs the image of caption c
            parts.append(img_score)
            used.append(
                f"the image teacher <b>{esc(it.name)}</b> rates image <i>i</i> close to the image "
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
                f"the text teacher <b>{esc(tt.name)}</b> rates caption <i>c</i> close to the "
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
            note_box(
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
                note_box(
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
                f'<span class="id">{esc(j)}</span></p>'
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
            return note_box(
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
                needed.update(image_of(x) for x in [qid, *(h for h, _ in row)])
        self.view.ensure(needed, self.opts.max_scan)
        out = [
            note_box(
                f"For {self.opts.queries} query images and captions, their {k} nearest neighbours within "
                "the same modality under each teacher (cosine similarity, exact faiss search). "
                "Neighbours from the query's own image are marked."
            )
        ]
        for t, queries, hits, note in blocks:
            out.append(f"<h3>{esc(t.modality)} teacher {esc(t.name)}</h3>")
            if note:
                out.append(note_box(note))
            if not queries:
                out.append(note_box("No query with features in the pool.", "warn"))
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
                        f'<div class="tq"><b>query</b> {self.thumb(image_of(qid), "mini")} '
                        f'“{self.caption(qid)}”</div><ol class="tn">'
                    )
                    for hid, score in row:
                        same = image_of(hid) == image_of(qid)
                        badge = ' <span class="badge">same image</span>' if same else ""
                        out.append(
                            f"<li>{self.thumb(image_of(hid), 'mini')} “{self.caption(hid)}” "
                            f'<span class="score">{score:.3f}</span>{badge}</li>'
                        )
                    out.append("</ol>")
                out.append("</div>")
        return "\n".join(out)

    def _index(self, t: TeacherView, queries: list[str]) -> tuple[Any, str]:
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


class _SubsetIndex:
    """Exact cosine search over a subset of a group's rows, for groups too big to index whole."""

    def __init__(self, lookup: FeatureLookup, rows: np.ndarray) -> None:
        import faiss

        self.lookup = lookup
        self.ids = [lookup.ids[r] for r in rows]
        feats = np.ascontiguousarray(unit_rows(lookup.gather_rows(rows)))  # (n, D)
        self.index = faiss.IndexFlatIP(feats.shape[1])
        self.index.add(feats)

    def search_ids(self, sample_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        q = np.ascontiguousarray(unit_rows(self.lookup.gather(list(sample_ids))))
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
