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


def test_the_verdicts_the_page_states_follow_from_the_results():
    t, r = DATA["targets"], DATA["results"]
    small, big = r["1000000"], r["100000000"]
    met = (
        "open_le_0_5s_at_100m",
        "open_le_64mib_at_100m",
        "worker_uss_growth_le_8mib_every_n",
        "gather_le_1_5x_dict_plus_numpy_where_it_fits",
        "gather_rows_le_1_2x_numpy_rows_every_n",
        "gather_rows_le_1_2x_numpy_rows_of_the_map_every_n",
        "seal_peak_rss_le_4gb_at_100m",
        "verify_peak_rss_le_4gb_at_100m",
        "memory_flat_within_1_3x",
        "seal_verify_within_1_3x_of_linear",
    )
    for key in met:
        assert t[key] is True, key
    # the one row stated "missed": open and gather flat in N
    assert t["open_gather_flat_within_1_3x"] is False
    assert t["open_s_ratio"] > 1.3 and t["gather_us_ratio"] > 1.3
    assert SECTION.count("**met**") == 6 and SECTION.count("**missed**") == 1
    assert "**missed** for open and `gather`, met for memory" in SECTION
    # the figures the prose quotes
    ms = big["open_s"] * 1000
    assert f"**met**: {ms:.1f} ms and +{big['open_uss_mib']:.1f} MiB" in SECTION
    per_shard_us = (big["open_s"] - small["open_s"]) / (big["shards"] - small["shards"]) * 1e6
    assert 5 <= per_shard_us <= 25  # "about 15 µs a shard"
    assert f"**met**: at most +{t['worst_worker_uss_growth_mib']:.2f} MiB" in SECTION
    assert f"**met**: {big['seal_peak_rss_mib']:.0f} MiB" in SECTION
    assert f"`verify` at 100M: {big['verify_peak_rss_mib']:.0f} MiB" in SECTION
    assert f"Open {t['open_s_ratio']:.2f}×" in SECTION
    assert f"`gather` {t['gather_us_ratio']:.2f}×" in SECTION
    assert f"`gather_rows` {t['gather_rows_us_ratio']:.2f}×" in SECTION
    cpu = f"CPU time {t['seal_cpu_vs_linear']:.2f}× (seal) and {t['verify_cpu_vs_linear']:.2f}×"
    assert cpu in SECTION
    # the worker whose first reading was large: clean file pages, not copies
    w = max(big["workers"], key=lambda w: w["uss_first_mib"])
    dirty_first = w["private_dirty_last_mib"] - w["private_dirty_growth_mib"]
    assert f"({w['uss_first_mib']:.0f} MiB for one worker at 100M)" in SECTION
    assert f"private dirty memory was {dirty_first:.1f} MiB then" in SECTION
