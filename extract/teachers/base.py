"""The interface every teacher implements.

A teacher is split in two so that a runner can put the halves on different workers:
``prepare`` is cheap per-sample CPU work (decode + preprocess an image, normalise a caption) and
raises :class:`cusa.errors.SampleError` for a bad sample; ``encode`` maps a batch of prepared
items to features on the teacher's device.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...captions import CaptionNormalization
from ...store.spec import Modality, TeacherSpec, library_versions


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


class TeacherBase:
    """What every built-in teacher shares: its spec, and ``prepare`` through a weight-free,
    picklable preparer. Subclasses set ``_spec`` and ``_preparer``."""

    _spec: TeacherSpec
    _preparer: Preparer

    @property
    def spec(self) -> TeacherSpec:
        return self._spec

    def prepare(self, item: Any) -> Any:
        """One raw input -> a prepared item. Raises SampleError for a bad input."""
        return self._preparer.prepare(item)

    def preparer(self) -> Preparer:
        """The weight-free, picklable ``prepare`` (for CPU read workers)."""
        return self._preparer


class ImageTeacherBase(TeacherBase):
    """Plumbing shared by image teachers: spec, the weight-free preparer, batch -> tensor.

    Subclasses set ``_spec``, ``_preparer`` (image bytes -> ``(3, S, S)`` float32 array),
    ``model`` and ``device`` and implement ``_encode_tensor(x) -> (B, dim)`` on a
    ``(B, 3, S, S)`` tensor already on ``device``.
    """

    modality: Modality = "image"

    def encode(self, batch: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Prepared images (a list, or an already stacked array) -> ``(B, spec.dim)`` float32."""
        import torch

        if len(batch) == 0:
            return np.zeros((0, self._spec.dim), dtype=np.float32)
        # An already stacked batch is used as is: no copy on the per-batch path.
        stacked = np.ascontiguousarray(batch) if isinstance(batch, np.ndarray) else np.stack(batch)
        with torch.inference_mode():
            x = torch.from_numpy(stacked).to(self.device, non_blocking=True)  # (B, 3, S, S)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            return self._encode_tensor(x).float().cpu().numpy()

    def _encode_tensor(self, x: Any) -> Any:
        raise NotImplementedError

    def forward_bare(self, x: Any) -> Any:
        """The bare model forward on an already-prepared tensor (for throughput baselines)."""
        import torch

        with torch.inference_mode():
            return self.model(x.to(self.device))


def l2_normalize(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


class TextTeacherBase(TeacherBase):
    """Plumbing shared by text teachers: the caption normalisation as the preparer, the spec of
    an L2-normalised sentence embedding, and the empty batch.

    Subclasses set ``_preparer`` (a :class:`~cusa.captions.CaptionNormalization`)
    and ``_spec`` (with :meth:`_sentence_spec`) and implement ``_encode_captions(batch)`` ->
    ``(B, dim)`` float32, L2-normalised, on a non-empty batch.
    """

    modality: Modality = "text"
    _preparer: CaptionNormalization

    @property
    def normalization(self) -> CaptionNormalization:
        """How captions become teacher input (the preparer), recorded in the spec."""
        return self._preparer

    def encode(self, batch: list[str]) -> np.ndarray:
        """Prepared captions -> ``(B, spec.dim)`` float32, L2-normalised."""
        if not batch:
            return np.zeros((0, self._spec.dim), dtype=np.float32)
        return self._encode_captions(batch)

    def _encode_captions(self, batch: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _sentence_spec(
        self,
        *,
        name: str,
        model: str,
        weights_sha256: str,
        dim: int,
        dtype: str,
        preprocessing: dict[str, Any],
    ) -> TeacherSpec:
        """The spec of this teacher: the caption normalisation followed by the entries of
        ``preprocessing`` as its preprocessing, one L2-normalised sentence embedding as output."""
        return TeacherSpec(
            name=name,
            modality="text",
            model=model,
            weights_sha256=weights_sha256,
            preprocessing={**self._preparer.to_dict(), **preprocessing},
            output_kind="sentence",
            dim=dim,
            dtype=dtype,
            normalized=True,
            library_versions=library_versions(),
        )
