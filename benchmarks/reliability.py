"""Reliability figures: run the fault-injection suite for real and count what happened.

Runs ``pytest tests/reliability`` (every trial, the ``slow`` ones included, unless ``--fast``)
with ``CUSA_RELIABILITY_LOG`` set; each test logs the faults it injected (kill -9 of the local
runner or of a Ray teacher actor, concurrent writers, readers during writes, write errors and a
full disk, a store on S3) and the bad inputs it tried, with what happened. This script turns that
log into:

* ``benchmarks/results/reliability.json``: faults injected, runs survived, samples lost (must
  be 0), bad inputs tried and caught, and every trial;
* the table between the ``figures`` markers in ``docs/reliability.md``.

Run: ``python benchmarks/reliability.py`` (about 15 minutes on 2 CPU cores) or ``--fast``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "reliability.json"
DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
SCHEMA = 1


def summarize(log: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the suite's log (``{"faults": [...], "bad_inputs": [...]}``) into the figures."""
    faults, bad = log.get("faults", []), log.get("bad_inputs", [])
    by_kind: dict[str, dict[str, Any]] = {}
    for f in faults:
        k = by_kind.setdefault(f["kind"], {"injected": 0, "survived": 0, "samples_lost": 0})
        k["injected"] += 1
        k["survived"] += int(f["survived"])
        k["samples_lost"] += int(f["samples_lost"])
        if "outcome" in f:
            k.setdefault("outcomes", Counter())[f["outcome"]] += 1
        if "killed" in f:
            # Mid-run: killed before the last commit (trials record it; older logs only "killed").
            mid = f.get("mid_run", f["killed"])
            k["killed_mid_run"] = k.get("killed_mid_run", 0) + int(bool(mid))
    for k in by_kind.values():
        if "outcomes" in k:
            k["outcomes"] = dict(sorted(k["outcomes"].items()))
    by_category: dict[str, dict[str, int]] = {}
    for b in bad:
        c = by_category.setdefault(b["category"], {"tried": 0, "caught": 0})
        c["tried"] += 1
        c["caught"] += int(b["caught"])
    return {
        "schema": SCHEMA,
        "faults": {
            "injected": len(faults),
            "survived": sum(int(f["survived"]) for f in faults),
            "samples_lost": sum(int(f["samples_lost"]) for f in faults),
            "by_kind": dict(sorted(by_kind.items())),
        },
        "bad_inputs": {
            "tried": len(bad),
            "caught": sum(int(b["caught"]) for b in bad),
            "by_category": dict(sorted(by_category.items())),
            "items": sorted(
                ({k: b[k] for k in ("name", "category", "caught", "outcome")} for b in bad),
                key=lambda b: b["name"],
            ),
        },
        "trials": sorted(faults, key=lambda f: (f["kind"], str(f["trial"]))),
    }


def render_table(figures: dict[str, Any]) -> str:
    """The markdown table of ``docs/reliability.md`` (between the figures markers)."""
    f, b = figures["faults"], figures["bad_inputs"]
    lines = [
        f"Faults injected: **{f['injected']}**, runs survived: **{f['survived']}**, samples lost: "
        f"**{f['samples_lost']}**. Bad inputs tried: **{b['tried']}**, caught: **{b['caught']}**.",
        "",
        "| fault | injected | survived | samples lost | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for kind, k in f["by_kind"].items():
        notes = []
        if "killed_mid_run" in k:
            notes.append(f"{k['killed_mid_run']} killed mid-run")
        for outcome, n in k.get("outcomes", {}).items():
            notes.append(f"{n} {outcome}")
        lines.append(
            f"| {kind} | {k['injected']} | {k['survived']} | {k['samples_lost']} | "
            f"{', '.join(notes)} |"
        )
    lines += ["", "| bad input | caught | what cusa does |", "|---|:---:|---|"]
    for item in b["items"]:
        lines.append(
            f"| {item['name']} | {'yes' if item['caught'] else '**no**'} | {item['outcome']} |"
        )
    return "\n".join(lines)


def update_doc(figures: dict[str, Any], doc: Path = DOC) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{START}\n{render_table(figures)}\n{END}{tail}")


def run_suite(fast: bool, extra: list[str]) -> tuple[int, dict[str, Any], float]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.json"
        env = {**os.environ, "CUSA_RELIABILITY_LOG": str(log)}
        marks = "not slow" if fast else "slow or not slow"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "tests/reliability",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            marks,
            "--ignore=tests/reliability/test_zz_figures.py",
            *extra,
        ]
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=REPO, env=env)
        elapsed = time.perf_counter() - t0
        data = json.loads(log.read_text()) if log.exists() else {}
    return code, data, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the default (non-slow) trials")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/reliability.md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args()
    code, log, elapsed = run_suite(args.fast, args.pytest_args)
    figures = summarize(log)
    figures = {
        **figures,
        "suite": {
            "mode": "fast" if args.fast else "full",
            "pytest_exit_code": code,
            "elapsed_s": round(elapsed, 1),
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "generated_by": "python benchmarks/reliability.py" + (" --fast" if args.fast else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    if not args.no_doc:
        update_doc(figures)
    f, b = figures["faults"], figures["bad_inputs"]
    print(
        f"faults injected {f['injected']}, survived {f['survived']}, samples lost "
        f"{f['samples_lost']}; bad inputs tried {b['tried']}, caught {b['caught']}; "
        f"pytest exit {code} in {elapsed:.0f}s -> {args.out}"
    )
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
