"""Progress reporting. The library reports events; the CLI chooses to draw them with rich.

Stages: read, decode, image teacher, text teacher, write (plus a failure counter).
"""

from __future__ import annotations

import time
from typing import Protocol


class ProgressSink(Protocol):
    def start(self, totals: dict[str, int | None]) -> None: ...

    def advance(self, stage: str, n: int = 1, rate: float | None = None) -> None:
        """``n`` more items through ``stage``; ``rate``: the stage's items per busy second so
        far, as the run summary computes it (``ExtractSummary.throughput``)."""
        ...

    def failures(self, n: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing (library default)."""

    def start(self, totals: dict[str, int | None]) -> None:
        return None

    def advance(self, stage: str, n: int = 1, rate: float | None = None) -> None:
        return None

    def failures(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


class RichProgress:
    """Live bars per stage with items/s and ETA, plus failures so far (used by the CLI).

    A stage's items/s is the rate the run summary prints (items per second the stage was busy)
    once the runner reports it with a committed shard; until then, items per wall second.
    """

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:>14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>9}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._tasks: dict[str, int] = {}
        self._t0 = time.perf_counter()
        self._failed = 0
        self._reported: set[str] = set()  # stages whose rate comes from the summary

    def start(self, totals: dict[str, int | None]) -> None:
        self._progress.start()
        for stage, total in totals.items():
            self._tasks[stage] = self._progress.add_task(stage, total=total, rate="")
        self._tasks["failed"] = self._progress.add_task("failed", total=None, rate="")

    def advance(self, stage: str, n: int = 1, rate: float | None = None) -> None:
        task = self._tasks.get(stage)
        if task is None:
            return
        self._progress.advance(task, n)
        if rate is not None:
            self._reported.add(stage)
        elif stage in self._reported:
            return  # keep the summary's rate; a wall-clock rate would disagree with it
        else:
            done = self._progress.tasks[task].completed
            rate = done / max(time.perf_counter() - self._t0, 1e-9)
        self._progress.update(task, rate=f"{rate:,.1f}/s")

    def failures(self, n: int) -> None:
        self._failed += n
        self._progress.update(self._tasks["failed"], completed=self._failed)

    def close(self) -> None:
        self._progress.stop()
