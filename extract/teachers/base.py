"""The interface every teacher implements.

A teacher is split in two so that a runner can put the halves on different workers:
``prepare`` is cheap per-sample CPU work (decode + preprocess an image, normalise a caption) and
raises :class:`cusa.errors.SampleError` for a bad sample; ``encode`` maps a batch of prepared
items to features on the teacher's device.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from cusa.extract.teachers.spec import Modality, TeacherSpec


@runtime_checkable
class Preparer(Protocol):
    def prepare(self, item: Any) -> Any: ...


@runtime_checkable
class Teacher(Protocol):
    @property
    def spec(self) -> TeacherSpec: ...

    @property
    def modality(self) -> Modality: ...

    def prepare(self, item: Any) -> Any:
        """One raw input (image bytes, or a caption str/bytes) -> a prepared item.

        Raises:
            SampleError: the input is bad; the caller records it in the ledger.
        """
        ...

    def preparer(self) -> Preparer:
        """A small picklable object whose ``prepare`` equals this teacher's, without weights.

        Runners ship it to CPU read tasks (Ray) so the model never travels with the data.
        """
        ...

    def encode(self, batch: list[Any]) -> np.ndarray:
        """Prepared items -> ``(B, spec.dim)`` float32 features (L2-normalised if spec.normalized)."""
        ...
