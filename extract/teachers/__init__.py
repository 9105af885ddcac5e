"""Teachers: frozen models that map images or captions to features.

Public API::

    from cusa.extract.teachers import get_teacher, list_teachers, register_teacher

    teacher = get_teacher("unicom-vit-b32", weights="FP16-ViT-B-32.pt")
    feats = teacher.encode([teacher.prepare(jpeg_bytes)])   # (1, 512) float32
"""

from __future__ import annotations

from cusa.extract.teachers.base import Teacher
from cusa.extract.teachers.registry import (
    ENTRY_POINT_GROUP,
    TEACHERS,
    TeacherEntry,
    TeacherInfo,
    fetch_teacher,
    get_teacher,
    list_teachers,
    register_teacher,
)
from cusa.extract.teachers.spec import TeacherSpec

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
