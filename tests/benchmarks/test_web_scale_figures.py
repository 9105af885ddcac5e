"""The committed web-scale figures (benchmarks/results/web_scale.json, docs/scale.md) are honest.

The table in docs/scale.md's "Web scale" section must be the one ``python -m benchmarks.web_scale
--tables`` renders from the committed results, the targets stored in the results must be the ones
the results compute, and the verdicts the page states must follow from them.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.web_scale import _targets, markdown_table

REPO = Path(__file__).resolve().parents[2]
DATA = json.loads((REPO / "benchmarks" / "results" / "web_scale.json").read_text())
PAGE = (REPO / "docs" / "scale.md").read_text()
SECTION = PAGE[PAGE.index("\n## Web scale\n") :].split("\n## ", 2)[1]


def test_docs_table_is_rendered_from_the_committed_results():
    rows = [r for r in markdown_table(DATA["results"]).splitlines() if r.startswith("| 1")]
    assert len(rows) == 3
    for row in rows:
        assert row in SECTION, f"docs/scale.md (Web scale) lacks the results row {row!r}"


def test_the_stored_targets_are_the_computed_ones():
    assert _targets(DATA["results"]) == DATA["targets"]


def test_sizes_are_the_ones_the_issue_asks_for():
    assert sorted(DATA["results"], key=int) == ["1000000", "10000000", "100000000"]
    for r in DATA["results"].values():
        assert r["verify_ok"] and r["verify_errors"] == []
        assert r["worker_batches"] == 10_000 and len(r["workers"]) == 4
