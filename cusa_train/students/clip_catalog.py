"""The OpenAI CLIP models the official CUSA code accepts, by cusa student name.

It imports nothing, so the training config can map an official ``clip_model`` to a student
without loading torch models; ``cusa_train.students.registry`` registers one student per entry.
"""

from __future__ import annotations

#: Student name -> official OpenAI architecture (``clip.load`` names, the configs' ``clip_model``).
CLIP_STUDENTS: dict[str, str] = {
    "clip-rn50": "RN50",
    "clip-rn101": "RN101",
    "clip-rn50x4": "RN50x4",
    "clip-rn50x16": "RN50x16",
    "clip-rn50x64": "RN50x64",
    "clip-vit-b32": "ViT-B/32",
    "clip-vit-b16": "ViT-B/16",
    "clip-vit-l14": "ViT-L/14",
    "clip-vit-l14-336": "ViT-L/14@336px",
}
