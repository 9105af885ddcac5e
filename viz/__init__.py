"""Pictures of a feature store and a training run: ``build_report`` writes one self-contained
HTML page (store summary, soft labels, false negatives, neighbours, training curves)."""

from .report import ReportOptions, build_report, soft_labels

__all__ = ["ReportOptions", "build_report", "soft_labels"]
