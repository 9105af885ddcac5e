"""Teachers: frozen models that map images or captions to features.

Public API::

    from . import get_teacher, list_teachers, register_teacher

    teacher = get_teacher("unicom-vit-b32", weights="FP16-ViT-B-32.pt")
    feats = teacher.encode([teacher.prepare(jpeg_bytes)])   # (1, 512) float32

Also public, for students and tools that must see inputs exactly as the teachers do: the image
transforms (``clip_transform``, ``imagenet_transform``), the official caption normalisation
(``pre_caption``), the MobileNetV2 backbone (``mobilenet_v2``), the paper's teacher names
(``DEFAULT_IMAGE_TEACHER``, ``DEFAULT_TEXT_TEACHER``) and the checked-download helpers of
:mod:`cusa.extract.teachers.weights`.
"""

from __future__ import annotations

from ...store.spec import TeacherSpec
from .base import Teacher
from .defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from .image_preprocess import clip_transform, imagenet_transform
from .mobilenet import mobilenet_v2
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
from .text import MINILM_DISTRIBUTION, MINILM_MODULE, pre_caption
from .weights import (
    Release,
    download_with_sha256,
    file_lock,
    installed_package_dir,
    load_state_dict,
    official_release,
    offline_requested,
    sha256_file,
    weights_file,
)

# Registers the built-in teachers; the registry itself never imports it (no cycle).
from . import builtin as _builtin  # noqa: E402, F401  isort: skip

__all__ = [
    "DEFAULT_IMAGE_TEACHER",
    "DEFAULT_TEXT_TEACHER",
    "ENTRY_POINT_GROUP",
    "MINILM_DISTRIBUTION",
    "MINILM_MODULE",
    "TEACHERS",
    "Release",
    "Teacher",
    "TeacherEntry",
    "TeacherInfo",
    "TeacherSpec",
    "clip_transform",
    "download_with_sha256",
    "fetch_teacher",
    "file_lock",
    "get_teacher",
    "imagenet_transform",
    "installed_package_dir",
    "list_teachers",
    "load_state_dict",
    "mobilenet_v2",
    "official_release",
    "offline_requested",
    "pre_caption",
    "register_teacher",
    "sha256_file",
    "weights_file",
]
