"""What the library shows while it extracts (issue 23 item 9).

- ``cusa.extract.runner.extract()`` prints nothing: transformers' "Loading weights" bar is off
  while a text teacher loads (and the caller's setting is restored);
- the rates the progress bars show are the rates the run summary prints.
"""

from __future__ import annotations

import pytest

from cusa.extract.progress import RichProgress
from cusa.extract.runner import ExtractConfig, extract


class RecordingProgress:
    """A progress sink that keeps the last rate given per stage."""

    def __init__(self) -> None:
        self.rates: dict[str, float] = {}
        self.items: dict[str, int] = {}

    def start(self, totals):
        self.items = dict.fromkeys(totals, 0)

    def advance(self, stage, n=1, rate=None):
        self.items[stage] = self.items.get(stage, 0) + n
        if rate is not None:
            self.rates[stage] = rate

    def failures(self, n):
        return None

    def close(self):
        return None


def test_library_extract_prints_nothing_and_bars_agree_with_the_summary(tmp_path, capfd, request):
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    # The caller's setting: bars on, whatever an earlier test or import left (put back after).
    if not transformers_logging.is_progress_bar_enabled():
        request.addfinalizer(transformers_logging.disable_progress_bar)
    transformers_logging.enable_progress_bar()
    assert transformers_logging.is_progress_bar_enabled()
    progress = RecordingProgress()
    config = ExtractConfig(
        dataset="coco-sample", split="val", modalities=("text",),
        text_teacher="all-MiniLM-L6-v2", store=str(tmp_path / "store"), device="cpu",
        runner="local",
    )  # fmt: skip
    summary = extract(config, progress=progress)
    out, err = capfd.readouterr()
    assert out == "" and "Loading weights" not in err and "it/s" not in err, err
    assert transformers_logging.is_progress_bar_enabled()  # the caller's setting is back
    throughput = summary.throughput()
    assert {"read", "decode", "text teacher", "write"} <= set(progress.rates)
    for stage, rate in progress.rates.items():
        assert rate == pytest.approx(throughput[stage]), stage


def test_rich_bars_keep_the_reported_rate():
    bars = RichProgress()
    bars.start({"read": 10, "text teacher": None})
    bars.advance("text teacher", 5)  # before any commit: items per wall second
    bars.advance("read", 4, rate=177.0)
    bars.advance("read", 0)  # a later advance without a rate keeps the summary's
    fields = {t.description: t.fields["rate"] for t in bars._progress.tasks}
    bars.close()
    assert fields["read"] == "177.0/s"
    assert fields["text teacher"].endswith("/s")
