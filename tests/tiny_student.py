"""A tiny but real dual encoder for fast tests: a small CNN and a byte-level bag-of-embeddings.

Not a mock: it is a trainable torch model with the same interface as the built-in students
(``preprocess_image(bytes)``, ``encode_image(pixels)``, ``encode_text(list[str])``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn


class TinyDualEncoder(nn.Module):
    image_dim = 24
    text_dim = 16

    def __init__(self, image_size: int = 32) -> None:
        super().__init__()
        self.image_size = image_size
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, self.image_dim),
        )
        self.text_embed = nn.EmbeddingBag(257, 32, mode="mean", padding_idx=256)
        self.text_proj = nn.Linear(32, self.text_dim)

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((self.image_size, self.image_size))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        encoded = [list(t.encode("utf-8")[:64]) or [0] for t in texts]
        longest = max(len(e) for e in encoded)
        return torch.tensor([e + [256] * (longest - len(e)) for e in encoded], dtype=torch.long)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixels)

    def encode_text(self, texts: list[str] | torch.Tensor) -> torch.Tensor:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.text_proj(self.text_embed(tokens))
