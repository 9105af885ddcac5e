"""The remote-open figures docs/store.md quotes are the committed results
(benchmarks/results/remote_open.json, ``python -m benchmarks.remote_open``)."""

from __future__ import annotations

import json
from pathlib import Path

from cusa.store import fs

REPO = Path(__file__).resolve().parents[2]
DATA = json.loads((REPO / "benchmarks" / "results" / "remote_open.json").read_text())
STORE_MD = " ".join((REPO / "docs" / "store.md").read_text().split())


def test_the_docs_quote_the_committed_results():
    (hundred,) = [r for r in DATA["results"] if r["shards"] == 100]
    med = hundred["median_s"]
    assert DATA["concurrency"] == fs.READ_MANY_CONCURRENCY
    assert f"{fs.READ_MANY_CONCURRENCY} requests at a time" in STORE_MD
    assert (
        hundred["rtt_ms_simulated"] == 20.0 and "by 20 ms (a **simulated** round trip)" in STORE_MD
    )
    quoted = (
        f"100 records take {med['batched']:.2f} s instead of {med['one_by_one']:.2f} s one after "
        f"the other ({hundred['batched_vs_one_by_one']:.2f}×), and the whole open of a 100-shard "
        f"group {med['open']:.2f} s"
    )
    assert quoted in STORE_MD
    # the batch never waited for a resent handshake (~1 s) in this run
    assert hundred["max_s"]["batched"] < 2 * med["batched"]
