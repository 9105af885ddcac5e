"""Opening a published store over the network: the commit records read in one batch.

A reader of a remote group (HTTP or S3, ``cusa store publish``) reads every commit record when
it opens the group (readers refuse a group whose records ``verify`` refuses; on a remote store
there is no ``stat`` to check them by, see ``store.commits.records_stamp``). One record per
shard, so one round trip per shard made opening a 100-shard group wait 100 round trips.
``StoreFS.read_many`` now sends them together through fsspec's batched ``cat``.

Measured here, in one process: a store of S shards (tiny rows) is sealed, published to a folder
and served by a local threaded HTTP server that waits ``--rtt-ms`` before each answer (a
**simulated** network round trip: the machine has no remote host). Taking turns, 15 times each:

* ``one_by_one``: the group's commit records read one request after the other (what opening
  did before);
* ``batched``: the same records through ``read_many`` (what opening does now);
* ``open``: the whole ``FeatureLookup.open`` of the group over HTTP (the index and the feature
  chunk are cached locally after the first open, as a training node's are).

Run: ``python -m benchmarks.remote_open`` -> ``benchmarks/results/remote_open.json``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, take_turns, versions, write_json
from benchmarks.web_scale import DIM
from benchmarks.web_scale import spec as web_spec

OUT = RESULTS_DIR / "remote_open.json"
REPS = 15


def _handler(rtt_s: float) -> type:
    class Slow(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            time.sleep(rtt_s)
            super().do_GET()

        def do_HEAD(self) -> None:  # noqa: N802
            time.sleep(rtt_s)
            super().do_HEAD()

        def log_message(self, *args: Any) -> None:
            pass

    return Slow


def _store(root: Path, shards: int) -> Path:
    """A sealed store of ``shards`` shards of 4 rows each, published to a folder."""
    from cusa.store import FeatureStore
    from cusa.store.publish import publish_store

    store = FeatureStore.open(root / "store", create=True)
    group = store.group("web", "train", web_spec(), create=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        feats = rng.standard_normal((4, DIM), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        group.write_shard(f"shard-{s:05d}", [f"{s:05d}#{k}" for k in range(4)], feats)
    group.seal()
    out = root / "published"
    publish_store(store, str(out))
    return out


def measure(shards: int, rtt_ms: float, workdir: str | None = None) -> dict[str, Any]:
    from cusa.store import FeatureLookup, FeatureStore

    with tempfile.TemporaryDirectory(prefix="remote-open-", dir=workdir) as tmp:
        published = _store(Path(tmp), shards)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # python -m http.server's server (docs/store.md serves published stores with it): its
        # listen queue holds 5 connections
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port),
            functools.partial(_handler(rtt_ms / 1000), directory=str(published)),
        )
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{port}"
            store = FeatureStore.open(url)
            group = store.find_group("web", "train", "web-teacher")
            rels = [f"{group.rel}/commits/{n}" for n in group.fs.ls(f"{group.rel}/commits")]
            assert len(rels) == shards
            cache = Path(tmp) / "cache"

            def open_group(_: int = 0) -> Any:
                return FeatureLookup.open(
                    store, dataset="web", split="train", teacher="web-teacher", cache_dir=cache
                )

            paths = {
                "one_by_one": lambda _: [group.fs.read_bytes(r) for r in rels],
                "batched": lambda _: group.fs.read_many(rels),
                "open": open_group,
            }
            assert paths["one_by_one"](0) == paths["batched"](0)
            open_group()  # the first open copies the index and the chunk into the cache
            ns = take_turns(paths, REPS, seed=3)
        finally:
            httpd.shutdown()
            httpd.server_close()
    times = {k: [t / 1e9 for t in v] for k, v in ns.items()}
    med = {k: round(statistics.median(v), 4) for k, v in times.items()}
    return {
        "shards": shards,
        "rtt_ms_simulated": rtt_ms,
        "median_s": med,
        "max_s": {k: round(max(v), 4) for k, v in times.items()},
        "batched_vs_one_by_one": round(med["batched"] / med["one_by_one"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="10,100")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--concurrency", type=int, default=0, help="requests in flight [default: cusa's]"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from cusa.store import fs

    if args.concurrency:
        fs.READ_MANY_CONCURRENCY = args.concurrency
    results = [measure(int(s), args.rtt_ms, args.workdir) for s in args.shards.split(",")]
    data = {
        "benchmark": "remote_open",
        "concurrency": fs.READ_MANY_CONCURRENCY,
        "server": "python -m http.server's ThreadingHTTPServer (listen queue 5) on 127.0.0.1, "
        "each answer delayed by rtt_ms (a simulated round trip)",
        "versions": versions(),
        "results": results,
    }
    write_json(args.out, data)
    for r in results:
        print(r)


if __name__ == "__main__":
    main()
