"""Benchmarks: scripts run from the repository root (``python -m benchmarks.<name>``), not installed."""

if __name__ != "benchmarks":
    # The repository root is the ``cusa`` package in an editable install; one name per module.
    raise ImportError(
        f"import benchmarks, not {__name__}: run `python -m benchmarks.<name>` from the repository root"
    )
