"""Paired 95% intervals of the CUSA studies (issue 24, item 7): a direction only where the
interval excludes zero."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks.cusa_stats import ci_from_summary, direction, fmt_ci, paired_ci, t975


def test_t_quantiles_match_the_table_and_the_large_df_limit() -> None:
    assert t975(2) == pytest.approx(4.303) and t975(7) == pytest.approx(2.365)
    assert t975(30) == pytest.approx(2.042) and t975(200) == pytest.approx(1.972, abs=0.003)


def test_paired_ci_and_direction() -> None:
    diffs = [3.0, 2.0, 1.0, 4.0, 2.5, 3.5, 1.5, 2.0]
    ci = paired_ci(diffs)
    half = 2.365 * statistics.stdev(diffs) / math.sqrt(8)
    assert ci["ci95"] == pytest.approx([2.4375 - half, 2.4375 + half], abs=1e-3)
    assert ci["wins_n"] == "8/8" and direction(ci) == "helps"
    # 3/3 seeds above InfoNCE, yet the interval includes zero: no direction is stated.
    wide = paired_ci([0.5, 6.0, 1.0])
    assert wide["wins_n"] == "3/3" and wide["ci95"][0] < 0 and direction(wide) == "unclear"
    assert direction(paired_ci([-2.0, -3.0, -2.5])) == "hurts"
    assert direction(paired_ci([5.0])) == "unclear" and fmt_ci(paired_ci([5.0])) == "+5.0 [n/a]"
    assert fmt_ci(ci) == f"+2.4 [{2.4375 - half:+.1f}, {2.4375 + half:+.1f}]"
    stored = ci_from_summary({"mean": ci["mean"], "std": ci["std"], "n": 8}, "8/8")
    assert stored["ci95"] == pytest.approx(ci["ci95"], abs=2e-3)
