"""Evaluation: cross-modal retrieval, ECCV Caption, image retrieval and STS, as the paper reports.

Layers, each importing only those before it: :mod:`~cusa_train.evaluation.metrics` (pure
numpy/torch) -> :mod:`~cusa_train.evaluation.report` -> :mod:`~cusa_train.evaluation.eccv`,
:mod:`~cusa_train.evaluation.scores`, :mod:`~cusa_train.evaluation.stored_features` ->
:mod:`~cusa_train.evaluation.data`, :mod:`~cusa_train.evaluation.encoding` ->
:mod:`~cusa_train.evaluation.image_benchmarks`, :mod:`~cusa_train.evaluation.sts_benchmarks` ->
:mod:`~cusa_train.evaluation.evaluate` (the entry points) and
:mod:`~cusa_train.evaluation.validation` (evaluation during training).
"""
