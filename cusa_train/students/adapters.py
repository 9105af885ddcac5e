"""Adapters that give open_clip and Hugging Face CLIP models the student interface.

Both are optional extras: their libraries are imported only when an adapter is built, and a
missing library is a :class:`cusa.errors.ConfigError` that says what to install. open_clip needs
torchvision (``pip install open_clip_torch torchvision``), which does not import beside the CPU
torch of this project's CI, so :class:`OpenClipStudent` is untested here.

Example::

    student = HFClipStudent.from_pretrained("openai/clip-vit-base-patch32")
    model = CusaModel(student)          # dims come from student.image_dim / text_dim
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cusa.errors import ConfigError
from cusa.image_transforms import clip_transform

OPEN_CLIP_HINT = "pip install open_clip_torch torchvision"
HF_HINT = "pip install transformers"


def hf_tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """A Hugging Face tokenizer over a batch of captions: padded to the longest, truncated."""
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _features(out: Any) -> Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    return out if isinstance(out, Tensor) else out.pooler_output


class OpenClipStudent(nn.Module):
    """An open_clip ``CLIP`` model as a student (``encode_image`` / ``encode_text``, unnormalised).

    Args:
        model: an open_clip model.
        tokenizer: ``open_clip.get_tokenizer(name)``; needed to encode lists of strings.
        preprocess: the eval image transform from ``create_model_and_transforms``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, preprocess: Any = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        dim = getattr(getattr(model, "visual", None), "output_dim", None)
        if not isinstance(dim, int):
            raise ConfigError(
                "cannot read the embedding size of this open_clip model (model.visual.output_dim)"
            )
        self.image_dim = self.text_dim = dim

    @classmethod
    def from_pretrained(
        cls, name: str, pretrained: str | None = None, **kwargs: Any
    ) -> OpenClipStudent:
        """``open_clip.create_model_and_transforms(name, pretrained=...)`` wrapped as a student."""
        try:
            import open_clip
        except (
            ImportError,
            RuntimeError,
        ) as exc:  # RuntimeError: a torchvision built for another torch
            raise ConfigError(
                f"the open_clip adapter needs open_clip and torchvision: {OPEN_CLIP_HINT} ({exc})"
            ) from exc
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, **kwargs
        )
        return cls(model, open_clip.get_tokenizer(name), preprocess)

    def preprocess_image(self, data: bytes) -> Tensor:
        import io

        from PIL import Image

        if self.preprocess is None:
            raise ConfigError(
                "this OpenClipStudent has no preprocess transform; build it with from_pretrained"
            )
        return self.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, texts: Sequence[str] | Tensor) -> Tensor:
        if not isinstance(texts, Tensor):
            if self.tokenizer is None:
                raise ConfigError(
                    "OpenClipStudent got strings but has no tokenizer; pass tokenizer="
                )
            texts = self.tokenizer(list(texts))
        device = next(self.model.parameters()).device
        return self.model.encode_text(texts.to(device))


class HFClipStudent(nn.Module):
    """A Hugging Face ``CLIPModel`` as a student (projected features, unnormalised).

    Args:
        model: a ``transformers.CLIPModel``.
        tokenizer: a CLIP tokenizer; needed to encode lists of strings (token dicts work without).
        image_size: side of the CLIP eval transform used by :meth:`preprocess_image`
            (defaults to ``model.config.vision_config.image_size``).
        max_length: longest caption in tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        image_size: int | None = None,
        max_length: int = 77,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        config = model.config
        self.image_dim = self.text_dim = int(config.projection_dim)
        self.image_size = int(image_size or config.vision_config.image_size)
        self._transform = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> HFClipStudent:
        """Load ``CLIPModel`` and its tokenizer from the hub or a local folder."""
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as exc:
            raise ConfigError(
                f"the Hugging Face CLIP adapter needs transformers: {HF_HINT} ({exc})"
            ) from exc
        return cls(
            CLIPModel.from_pretrained(name_or_path, **kwargs),
            AutoTokenizer.from_pretrained(name_or_path),
        )

    def preprocess_image(self, data: bytes) -> Tensor:
        """CLIP eval transform (bicubic resize, center crop, CLIP mean/std) with PIL, no torchvision."""
        if self._transform is None:
            self._transform = clip_transform(self.image_size)
        return torch.from_numpy(self._transform.from_bytes(data))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_image(self, pixels: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def encode_text(self, texts: Sequence[str] | Mapping[str, Tensor]) -> Tensor:
        if not isinstance(texts, Mapping):
            if self.tokenizer is None:
                raise ConfigError(
                    "HFClipStudent got strings but has no tokenizer; pass tokenizer= or token ids"
                )
            texts = hf_tokenize(self.tokenizer, texts, self.max_length)
        inputs = {
            k: v.to(self.device) for k, v in texts.items() if k in ("input_ids", "attention_mask")
        }
        return _features(self.model.get_text_features(**inputs))
