"""HTML fragments of the report, and the page around them.

The page skeleton and its style live in ``templates/report.html`` (``string.Template``
placeholders such as ``${title}``) and ``templates/report.css``; they ship as package data.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from .thumbnails import data_uri


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def img_tag(uri: str | None, alt: str, cls: str = "thumb", title: str | None = None) -> str:
    if uri is None:
        return f'<div class="{cls} nothumb" title="{esc(title or alt)}">no image</div>'
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}" title="{esc(title or alt)}">'


def plot_tag(png: bytes, alt: str) -> str:
    return f'<img class="plot" src="{data_uri(png, "image/png")}" alt="{esc(alt)}">'


def note_box(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{text}</p>'


def short_id(sample_id: str, n: int = 28) -> str:
    return sample_id if len(sample_id) <= n else "…" + sample_id[-(n - 1) :]


@cache
def _template(name: str) -> str:
    return resources.files("cusa.viz").joinpath("templates").joinpath(name).read_text("utf-8")


def render_page(*, title: str, header: str, nav: str, sections: str, footer: str) -> str:
    """The whole page: the already-escaped pieces in ``templates/report.html`` with its CSS."""
    return Template(_template("report.html")).substitute(
        title=title,
        css=_template("report.css"),
        header=header,
        nav=nav,
        sections=sections,
        footer=footer,
    )
