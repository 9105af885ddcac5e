"""The fine-tuned student of the sensitivity study: the last MiniLM layer trained.

Its input, the hidden states of the all-MiniLM-L6-v2 text tower before its last layer, is computed
once per caption (:class:`MiniLMTail`, :func:`with_tokens`) and carried by
:class:`TokenSplitFeatures`; :class:`PartialTextTowerStudent` runs the trainable layer, pools and
adapts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.cusa_features import SplitFeatures
from benchmarks.cusa_training import mlp
from cusa.errors import ConfigError, StoreError


@dataclass
class TokenSplitFeatures(SplitFeatures):
    """A split whose text input is the MiniLM hidden states before its last layer.

    ``tokens`` (M, L, 384) fp16 and ``token_mask`` (M, L) bool hold, per caption (in
    ``caption_ids`` order), the output of layer ``n_layers - k`` for the last ``k`` layers to run.
    """

    tokens: np.ndarray | None = None
    token_mask: np.ndarray | None = None

    @classmethod
    def of(cls, data: SplitFeatures, tokens: np.ndarray, mask: np.ndarray) -> TokenSplitFeatures:
        """``data`` (its fields, not copied) with ``tokens`` and ``mask`` in its caption order."""
        return cls(
            **{f: getattr(data, f) for f in SplitFeatures.__dataclass_fields__},
            tokens=tokens,
            token_mask=mask,
        )

    def subset(self, image_index: np.ndarray) -> TokenSplitFeatures:
        keep = np.zeros(len(self.image_ids), dtype=bool)
        keep[image_index] = True
        cap_keep = keep[self.caption_image]
        base = SplitFeatures.subset(self, image_index)
        return TokenSplitFeatures.of(base, self.tokens[cap_keep], self.token_mask[cap_keep])

    def gather(
        self, which: str, image_index: np.ndarray, caption_index: np.ndarray
    ) -> tuple[Tensor, Any]:
        img, txt = SplitFeatures.gather(self, which, image_index, caption_index)
        if which != "towers":
            return img, txt
        mask = self.token_mask[caption_index]  # (B, L)
        length = max(1, int(mask.sum(1).max()))  # trim the padding this batch does not need
        hidden = torch.from_numpy(self.tokens[caption_index, :length].astype(np.float32))
        return img, (hidden, torch.from_numpy(mask[:, :length]))


class PartialTextTowerStudent(nn.Module):
    """Frozen MobileNetV2 features + an MLP adapter; MiniLM's last layer(s) *trained*, then mean
    pooling, L2 normalisation (as sentence-transformers) and an MLP adapter.

    ``encode_text`` takes ``(hidden (B, L, 384), mask (B, L))``; at initialisation its pooled
    output equals the stored all-MiniLM-L6-v2 feature (checked in the smoke test).
    """

    def __init__(
        self, layers: nn.ModuleList, image_in: int, text_in: int, hidden: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.image_adapter = mlp(image_in, hidden, embed_dim)
        self.text_layers = layers
        self.text_adapter = mlp(text_in, hidden, embed_dim)
        self.image_dim = self.text_dim = embed_dim

    def encode_image(self, features: Tensor) -> Tensor:  # (B, 1280) -> (B, E)
        return self.image_adapter(features)

    def pooled_text(self, texts: tuple[Tensor, Tensor]) -> Tensor:
        hidden, mask = texts  # (B, L, 384), (B, L)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.text_layers:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        m = mask[..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, 384) mean pooling
        return nn.functional.normalize(pooled, dim=-1)

    def encode_text(self, texts: tuple[Tensor, Tensor]) -> Tensor:  # -> (B, E)
        return self.text_adapter(self.pooled_text(texts))


class MiniLMTail:
    """The pretrained all-MiniLM-L6-v2 of the student's text tower, split before its last layers."""

    def __init__(self, train_layers: int = 1) -> None:
        from transformers import AutoModel, AutoTokenizer

        from cusa.extract.teachers.text import resolve_minilm

        resolved = resolve_minilm()
        self.source = resolved.source
        self.weights_sha256 = resolved.weights_sha256
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.source)
        self.model = AutoModel.from_pretrained(resolved.source).eval()
        self.n_layers = len(self.model.encoder.layer)
        if not 1 <= train_layers < self.n_layers:
            raise ConfigError(
                f"train_layers={train_layers!r}: MiniLM has {self.n_layers} layers; train 1 to "
                f"{self.n_layers - 1} of them"
            )
        self.train_layers = train_layers
        self.max_length = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2

    def layers(self) -> nn.ModuleList:
        """Fresh trainable copies of the last ``train_layers`` layers (pretrained weights)."""
        return nn.ModuleList(
            copy.deepcopy(layer) for layer in self.model.encoder.layer[-self.train_layers :]
        ).train()

    @torch.no_grad()
    def hidden_states(
        self, captions: Sequence[str], batch_size: int = 128
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(M, L, 384)`` fp16 input of the first trained layer and ``(M, L)`` mask."""
        from cusa.captions import pre_caption

        texts = [pre_caption(c) for c in captions]
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = np.zeros((*enc["input_ids"].shape, self.model.config.hidden_size), np.float16)
        for s in range(0, len(texts), batch_size):
            sl = slice(s, s + batch_size)
            res = self.model(
                input_ids=enc["input_ids"][sl],
                attention_mask=enc["attention_mask"][sl],
                token_type_ids=enc["token_type_ids"][sl] if "token_type_ids" in enc else None,
                output_hidden_states=True,
            )
            out[sl] = res.hidden_states[self.n_layers - self.train_layers].numpy()
        return out, enc["attention_mask"].numpy().astype(bool)


def caption_texts(dataset: str, split: str, caption_ids: Sequence[str]) -> list[str]:
    """The raw captions of ``caption_ids``, read through the dataset reader (by id, not position)."""
    from cusa.readers import open_dataset

    reader = open_dataset(dataset, split=split)
    by_id: dict[str, str] = {}
    for shard in reader.shards():
        for sample in reader.read(shard):
            for cid, cap in zip(sample.caption_ids, sample.captions, strict=True):
                by_id[cid] = cap if isinstance(cap, str) else cap.decode("utf-8", "replace")
    missing = [c for c in caption_ids if c not in by_id]
    if missing:
        raise StoreError(f"{dataset!r}/{split}: captions {missing[:3]!r} not in the dataset")
    return [by_id[c] for c in caption_ids]


def with_tokens(
    data: SplitFeatures, tail: MiniLMTail, dataset: str, split: str
) -> TokenSplitFeatures:
    """``data`` plus the MiniLM hidden states of its captions (the fine-tuned student's input)."""
    tokens, mask = tail.hidden_states(caption_texts(dataset, split, data.caption_ids))
    return TokenSplitFeatures.of(data, tokens, mask)
