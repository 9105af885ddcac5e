"""Teachers: frozen models that map images or captions to features.

Public API::

    from . import get_teacher, list_teachers, register_teacher

    teacher = get_teacher("unicom-vit-b32", weights="FP16-ViT-B-32.pt")
    feats = teacher.encode([teacher.prepare(jpeg_bytes)])   # (1, 512) float32

What students and tools share with the teachers lives in the shared leaves below ``extract``:
image transforms in :mod:`cusa.image_transforms`, caption normalisation in :mod:`cusa.captions`,
the MobileNetV2 backbone in :mod:`cusa.mobilenet`, the paper's teacher names in
:mod:`cusa.teacher_defaults` and checked downloads in :mod:`cusa.weights`.
"""

from __future__ import annotations

from ...store.spec import TeacherSpec
from .base import Teacher
from .registry import (
    ENTRY_POINT_GROUP,
    TEACHERS,
    TeacherEntry,
    TeacherInfo,
    fetch_teacher,
    get_teacher,
    list_teachers,
    register_teacher,
)

# Registers the built-in teachers; the registry itself never imports it (no cycle).
from . import builtin as _builtin  # noqa: E402, F401  isort: skip

__all__ = [
    "ENTRY_POINT_GROUP",
    "TEACHERS",
    "Teacher",
    "TeacherEntry",
    "TeacherInfo",
    "TeacherSpec",
    "fetch_teacher",
    "get_teacher",
    "list_teachers",
    "register_teacher",
]
