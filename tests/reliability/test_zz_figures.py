"""The committed figures (benchmarks/results/reliability.json, docs/reliability.md) are honest.

They are produced by ``python benchmarks/reliability.py``, which runs this suite with every slow
trial. Here the committed file is checked for its claims, and compared with the figures of the
run in progress (this module runs last in the directory and reads what the other tests logged).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from reliability_common import BAD_INPUTS, FAULT_KINDS, KILL_KINDS, MIN_BAD_INPUTS, MIN_KILL_TRIALS

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "reliability.json"


def _bench():
    spec = importlib.util.spec_from_file_location(
        "cusa_bench_reliability", REPO / "benchmarks" / "reliability.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _keys(d, prefix=""):
    """Key paths of nested dicts (the structure), skipping per-kind and per-item contents."""
    out = set()
    for k, v in d.items():
        if k in ("by_kind", "by_category", "items", "trials", "machine", "outcomes"):
            out.add(prefix + k)
            continue
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(RESULTS.read_text())


def test_committed_figures_hold_their_claims(committed):
    f, b = committed["faults"], committed["bad_inputs"]
    assert committed["suite"]["mode"] == "full" and committed["suite"]["pytest_exit_code"] == 0
    assert f["samples_lost"] == 0
    assert f["survived"] == f["injected"] > 0
    assert sorted(f["by_kind"]) == sorted(FAULT_KINDS)
    kills = (
        f["by_kind"]["kill -9 local runner"]["injected"]
        + f["by_kind"]["kill -9 Ray teacher actor"]["injected"]
    )
    assert kills >= MIN_KILL_TRIALS
    for kind in KILL_KINDS:  # every kill trial killed before the last commit
        k = f["by_kind"][kind]
        assert k["killed_mid_run"] == k["injected"] == k["survived"], (kind, k)
    assert all(t.get("mid_run") for t in committed["trials"] if t["kind"] in KILL_KINDS)
    ray = f["by_kind"]["kill -9 Ray teacher actor"]
    assert sum(ray["outcomes"].values()) == ray["injected"]  # the driver's outcome, each trial
    assert len(committed["trials"]) == f["injected"]
    assert b["caught"] == b["tried"] == len(BAD_INPUTS) >= MIN_BAD_INPUTS
    assert len(set(BAD_INPUTS)) == len(BAD_INPUTS)
    assert sorted(i["name"] for i in b["items"]) == sorted(BAD_INPUTS)
    # The figures are a pure function of the trials (nothing edited by hand).
    bench = _bench()
    again = bench.summarize(
        {"faults": committed["trials"], "bad_inputs": [{**i, "message": ""} for i in b["items"]]}
    )
    assert again["faults"] == f and again["bad_inputs"] == b


def test_docs_table_matches_committed_figures(committed):
    bench = _bench()
    doc = (REPO / "docs" / "reliability.md").read_text()
    block = doc.split(bench.START, 1)[1].split(bench.END, 1)[0].strip()
    assert block == bench.render_table(committed).strip()


def test_fresh_run_matches_committed_figures(committed, reliability_log):
    """The run in progress has the committed file's structure and makes the same claims."""
    if not reliability_log.faults and not reliability_log.bad_inputs:
        pytest.skip("no trials ran in this session; run the whole tests/reliability directory")
    bench = _bench()
    fresh = bench.summarize(reliability_log.to_dict())
    assert _keys(fresh) <= _keys(committed)
    assert set(fresh["faults"]["by_kind"]) <= set(committed["faults"]["by_kind"])
    assert {i["name"] for i in fresh["bad_inputs"]["items"]} <= set(BAD_INPUTS)
    for kind, k in fresh["faults"]["by_kind"].items():
        assert set(k) <= set(committed["faults"]["by_kind"][kind]) | {"outcomes"}, kind
    assert fresh["faults"]["samples_lost"] == 0
    assert fresh["faults"]["survived"] == fresh["faults"]["injected"]
    for kind in set(KILL_KINDS) & set(fresh["faults"]["by_kind"]):
        k = fresh["faults"]["by_kind"][kind]
        assert k["killed_mid_run"] == k["injected"], (kind, k)
    assert fresh["bad_inputs"]["caught"] == fresh["bad_inputs"]["tried"]
