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
        # N is the one thing that changes: 100 shards at every N, compared with the 1M store
        assert r["shards"] == 100 and r["ref_n"] == 1_000_000


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def test_the_verdicts_the_page_states_follow_from_the_results():
    t, r = DATA["targets"], DATA["results"]
    big = r["100000000"]
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
        "open_gather_flat_within_1_3x",
        "seal_verify_within_1_3x_of_linear",
    )
    for key in met:
        assert t[key] is True, key
    # flat in N is judged in the same process as the 1M store (both ratios <= 1.3)
    assert t["open_vs_smallest_same_process"] == big["open_vs_ref"] <= 1.3
    assert t["gather_vs_smallest_same_process"] == big["gather_vs_ref"] <= 1.3
    assert SECTION.count("**met**") == 7 and "**missed**" not in SECTION
    # the figures the prose quotes
    ms = big["open_s"] * 1000
    assert f"**met**: {ms:.1f} ms and +{big['open_uss_mib']:.1f} MiB" in SECTION
    assert f"the median of 25: {big['open_median_s'] * 1000:.2f} ms)" in SECTION
    assert f"**met**: at most +{t['worst_worker_uss_growth_mib']:.2f} MiB" in SECTION
    assert f"**met**: {big['seal_peak_rss_mib']:.0f} MiB" in SECTION
    assert f"`verify` at 100M: {big['verify_peak_rss_mib']:.0f} MiB" in SECTION
    m = big["median_us"]
    same = (
        f"open {t['open_vs_smallest_same_process']:.2f}× ({big['open_median_s'] * 1000:.2f} "
        f"against {big['ref_open_median_s'] * 1000:.2f} ms), `gather` "
        f"{t['gather_vs_smallest_same_process']:.2f}× ({m['gather']:.0f} against "
        f"{m['gather_ref']:.0f} µs)"
    )
    assert same in SECTION
    across = (
        f"Across runs: open {t['open_s_ratio']:.2f}×, `gather` {t['gather_us_ratio']:.2f}× "
        f"({r['1000000']['median_us']['gather']:.0f} → {m['gather']:.0f} µs)"
    )
    assert across in SECTION
    drift = (
        f"the 1M store gathered in {m['gather_ref']:.0f} µs in the 100M run against "
        f"{r['1000000']['median_us']['gather']:.0f} µs in its own"
    )
    assert drift in SECTION
    cpu = f"CPU time {t['seal_cpu_vs_linear']:.2f}× (seal) and {t['verify_cpu_vs_linear']:.2f}×"
    assert cpu in SECTION
    # the worker whose first reading was large: clean file pages, not copies
    w = max(big["workers"], key=lambda w: w["uss_first_mib"])
    dirty_first = w["private_dirty_last_mib"] - w["private_dirty_growth_mib"]
    assert f"({w['uss_first_mib']:.0f} MiB for one worker at 100M)" in SECTION
    assert f"private dirty memory was {dirty_first:.1f} MiB then" in SECTION


def test_the_shard_sweep_figures_are_the_results():
    """What a shard adds to the open: the seal's stamp makes it one stat of its commit record."""
    sw = DATA["open_by_shards"]
    assert sw["n"] == 1_000_000 and sw["shards"] == [1, 10, 100, 1000]
    fit, old = sw["fit"]["us_per_shard"], sw["fit_without_stamp"]["us_per_shard"]
    assert 0 < fit < old  # the stamp is cheaper than reading each record
    assert sw["open_median_ms"][-1] < sw["open_median_ms_without_stamp"][-1]
    assert f"a reader `stat`s each record: {fit:.1f} µs a shard" in SECTION
    assert f"{sw['open_median_ms'][-1]:.1f} ms at 1,000 shards" in SECTION
    assert f"each record is read and parsed: {old:.0f} µs a shard" in SECTION
    assert f"({sw['open_median_ms_without_stamp'][-1]:.1f} ms at 1,000)" in SECTION
    assert f"costs ~{fit * 9900 / 1e6:.2f} s more than from 100 shards" in SECTION
    store_md = (REPO / "docs" / "store.md").read_text()
    assert f"flat in N, {fit:.1f} µs a shard ({old:.0f} µs where the records are read" in store_md
    assert f"before: {old:.0f} µs a shard instead of {fit:.1f} when opening" in store_md


def test_the_other_figures_the_docs_quote_are_the_results():
    """Every number of the section's prose and of docs/store.md's open-cost table."""
    t, r = DATA["targets"], DATA["results"]
    small, mid, big = r["1000000"], r["10000000"], r["100000000"]
    store_md = (REPO / "docs" / "store.md").read_text()
    m = {k: x["median_us"] for k, x in r.items()}

    first = (
        f"imports included: {big['first_open_s'] * 1000:.1f} ms, +{big['first_open_uss_mib']:.2f}"
    )
    assert first in SECTION
    # docs/store.md: the open of a sealed group and of one without its index file
    opens = (
        f"{big['ref_open_median_s'] * 1000:.2f} ms at 1M and {big['open_median_s'] * 1000:.2f} ms "
        "at 100M ids, both in 100 shards"
    )
    assert opens in store_md
    old = (
        f"{small['open_without_index_file_s']:.1f} s at 1M and "
        f"{mid['open_without_index_file_s']:.1f} s at 10M ids"
    )
    assert old in store_md
    usage = (
        f"+{small['open_without_index_file_uss_mib']:.0f} MiB at 1M, "
        f"+{mid['open_without_index_file_uss_mib']:.0f} MiB at 10M"
    )
    assert usage in store_md
    assert (
        f"takes {small['open_without_index_file_s']:.1f} s and "
        f"+{small['open_without_index_file_uss_mib']:.0f} MiB at 1M" in SECTION
    )
    assert (
        f"{mid['open_without_index_file_s']:.1f} s and "
        f"+{mid['open_without_index_file_uss_mib']:.0f} MiB at 10M" in SECTION
    )
    # gather against the dict, and what the dict costs
    assert f"{small['gather_vs_dict_plus_numpy']:.2f}× at 1M, " in SECTION
    assert f"{mid['gather_vs_dict_plus_numpy']:.2f}× at 10M" in SECTION
    assert f"+{small['baseline_uss_mib']:.0f} and +{mid['baseline_uss_mib']:,.0f} MiB" in SECTION
    # gather_rows ranges
    ram = [x["gather_rows_vs_numpy_rows"] for x in r.values()]
    of_map = [x["gather_rows_vs_numpy_rows_of_the_map"] for x in r.values()]
    assert f"{_range(ram)}× the array in RAM" in SECTION
    assert f"{_range(of_map)}× bare indexing of the same map" in SECTION
    # workers
    dirty = [w["private_dirty_growth_mib"] for x in r.values() for w in x["workers"]]
    assert f"private dirty growth {_range(dirty)} MiB per worker" in SECTION
    last = [w["private_dirty_last_mib"] for x in r.values() for w in x["workers"]]
    assert f"at the end {t['worker_private_dirty_last_ratio']:.1f}× " in SECTION
    assert f"({_range(last, '{:.1f}')} MiB)" in SECTION
    # seal at the smaller sizes, the id lookup alone, the store on disk
    assert (
        f"({small['seal_peak_rss_mib']:.0f} MiB at 1M, {mid['seal_peak_rss_mib']:.0f} MiB at 10M)"
        in SECTION
    )
    rows_only = (
        f"is {m['1000000']['rows_only']:.0f}\nµs at 1M and {m['100000000']['rows_only']:.0f} µs"
    )
    assert rows_only in SECTION
    search = (
        f"takes {m['1000000']['rows_binary_search']:.0f} and "
        f"{m['100000000']['rows_binary_search']:.0f} µs"
    )
    assert search in SECTION
    assert f"{big['bytes_on_disk'] / 1e9:.1f} GB sealed, {big['index_bytes'] / 1e9:.1f} GB" in PAGE
    assert (
        f"{big['shards']} shards, {big['write_s']:.0f} s here, ~{big['bytes_on_disk'] / 1e9:.1f} GB"
        in (PAGE)
    )
