"""The frozen, JSON-serialisable description of a teacher that the store records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Modality = Literal["image", "text"]

# Fields that decide which store group features go to (issue: model + weights + preprocessing + kind).
FINGERPRINT_FIELDS = ("model", "weights_sha256", "preprocessing", "output_kind")
# Fields that may differ between runs without making features different.
IGNORED_ON_COMPARE = ("library_versions",)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to say who made a feature array and how.

    Args:
        name: registry name, e.g. ``"unicom-vit-b32"``.
        modality: ``"image"`` or ``"text"``.
        model: the model's own name, e.g. ``"ViT-B/32"`` or ``"sentence-transformers/all-mpnet-base-v2"``.
        weights_sha256: SHA-256 of the weights file actually loaded.
        preprocessing: a JSON-able description (image transform or caption normalisation).
        output_kind: ``"embedding"``, ``"tokens"``, ``"pooled"``, ``"sentence"``...
        dim: feature dimension.
        dtype: dtype stored on disk, ``"float16"`` or ``"float32"``.
        normalized: whether features are L2-normalised.
        library_versions: versions of torch and friends, informative only.
    """

    name: str
    modality: Modality
    model: str
    weights_sha256: str
    preprocessing: dict[str, Any]
    output_kind: str
    dim: int
    dtype: str = "float16"
    normalized: bool = True
    library_versions: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """12 hex chars of SHA-256 over model, weights hash, preprocessing and output kind."""
        return spec_fingerprint(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSpec:
        return cls(**d)

    def replace(self, **changes: Any) -> TeacherSpec:
        from dataclasses import replace

        return replace(self, **changes)


def spec_fingerprint(spec: dict[str, Any]) -> str:
    payload = json.dumps({k: spec[k] for k in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def spec_diff(
    recorded: dict[str, Any], given: dict[str, Any], *, subset: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ, as ``{field: (recorded, given)}``; informative fields ignored.

    With ``subset=True`` only the fields present in ``given`` are compared.
    """
    keys = set(given) if subset else set(recorded) | set(given)
    keys -= set(IGNORED_ON_COMPARE)
    return {
        k: (recorded.get(k), given.get(k)) for k in sorted(keys) if recorded.get(k) != given.get(k)
    }


def format_spec_diff(
    diff: dict[str, tuple[Any, Any]], ours: str = "stored", theirs: str = "given"
) -> str:
    """``"dtype: stored 'float16' != given 'float32'; ..."`` for error messages."""
    return "; ".join(f"{k}: {ours} {a!r} != {theirs} {b!r}" for k, (a, b) in diff.items())


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape features, for the record."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "numpy", "pillow", "sentence-transformers", "transformers", "cusa"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
