"""Run MTEB's STS tasks (or any MTEB text task) on a cusa checkpoint's text tower.

``mteb`` is not a dependency of cusa; install it yourself (``pip install mteb``) where the
Hugging Face hub is reachable, since MTEB downloads its datasets from there::

    import mteb
    from cusa_train.evaluation.mteb_encoder import CusaMtebEncoder

    encoder = CusaMtebEncoder.from_checkpoint("runs/x/checkpoint-best.pt", head="usa")
    tasks = mteb.get_tasks(tasks=["STS12", "STS13", "STS14", "STS15", "STS16",
                                  "STSBenchmark", "SICK-R"])
    results = mteb.evaluate(encoder, tasks=tasks)

:class:`CusaMtebEncoder` follows mteb's ``EncoderProtocol`` (mteb 2.x: ``encode`` receives a
``DataLoader`` of batches ``{"text": [...]}`` plus ``task_metadata``, ``hf_split``,
``hf_subset``, ``prompt_type`` keywords) and still accepts a plain list of sentences, the
``encode(sentences, **kwargs)`` form of mteb 1.x and of sentence-transformers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cusa.errors import ConfigError
from cusa.weights import sha256_file
from cusa_train.evaluation.evaluate import load_checkpoint_model

HEADS = ("usa", "cross")


class CusaMtebEncoder:
    """A text encoder over a :class:`cusa_train.wrapper.CusaModel` for MTEB.

    Args:
        model: the trained CusaModel (e.g. from :func:`cusa_train.evaluation.evaluate.load_checkpoint_model`).
        head: ``"usa"`` (the uni-modal projector, what the official STS evaluation uses) or
            ``"cross"`` (the cross-modal head, the retrieval space).
        batch_size: sentences per forward pass when given a plain list.
        name: the model name MTEB records its results under (``org/name``); the head is
            appended so that the two heads never share MTEB's result cache.
        revision: recorded by MTEB next to the name; e.g. the checkpoint's hash.

    Raises:
        ConfigError: unknown head, or ``head="usa"`` on a model trained without USA heads.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        head: str = "usa",
        batch_size: int = 64,
        name: str = "cusa/checkpoint",
        revision: str | None = None,
    ) -> None:
        if head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
        if head == "usa" and getattr(model, "uni_text_head", None) is None:
            raise ConfigError(
                "this model has no USA (uni-modal) text head (it was trained with loss.usa "
                "disabled); use head='cross'"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model = model.eval()
        self.head = head
        self.batch_size = int(batch_size)
        self.name = f"{name}-{head}"
        self.revision = revision or "unknown"

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        head: str = "usa",
        device: str | torch.device | None = None,
        student: torch.nn.Module | None = None,
        batch_size: int = 64,
    ) -> CusaMtebEncoder:
        """Load a ``cusa train`` checkpoint; the name is ``cusa/<file stem>``, the revision
        the first 12 hex digits of the file's SHA-256."""
        model = load_checkpoint_model(path, student=student)
        if device is not None:
            model = model.to(device)
        digest = sha256_file(path)[:12]  # streamed: the file is not held in memory
        return cls(
            model, head=head, batch_size=batch_size, name=f"cusa/{Path(path).stem}",
            revision=digest,
        )  # fmt: skip

    # ---- encoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_sentences(self, sentences: Sequence[str]) -> np.ndarray:
        """``N`` sentences -> ``(N, D)`` float32 embeddings (not normalised)."""
        out = []
        for s in range(0, len(sentences), self.batch_size):
            batch = [str(x) for x in sentences[s : s + self.batch_size]]
            emb = self.model.encode_text(batch, uni_modal=self.head == "usa")
            out.append(emb.float().cpu().numpy())
        if not out:
            return np.zeros((0, int(self.model.embed_dim)), dtype=np.float32)
        return np.concatenate(out)

    def encode(self, inputs: Any, **kwargs: Any) -> np.ndarray:
        """MTEB's entry point.

        Args:
            inputs: a ``DataLoader`` (or any iterable) of batches ``{"text": list[str], ...}``
                (mteb 2.x), or a list of sentences (mteb 1.x, sentence-transformers style).
            **kwargs: ``task_metadata``, ``hf_split``, ``hf_subset``, ``prompt_type``,
                ``batch_size``...; accepted and not needed (there are no prompts).

        Returns:
            ``(N, D)`` float32 embeddings in input order.
        """
        if isinstance(inputs, str):
            raise ConfigError("encode takes a list of sentences or batches, not one string")
        if isinstance(inputs, Sequence) and all(isinstance(x, str) for x in inputs):
            return self.encode_sentences(list(inputs))
        parts = [self.encode_sentences(_batch_texts(batch)) for batch in inputs]
        if not parts:
            return np.zeros((0, int(self.model.embed_dim)), dtype=np.float32)
        return np.concatenate(parts)

    # ---- similarity (cosine, as the official STS evaluation) -----------------------------------

    @staticmethod
    def _unit(x: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        t = t.unsqueeze(0) if t.ndim == 1 else t
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """``(N1, N2)`` cosine similarities."""
        return self._unit(embeddings1) @ self._unit(embeddings2).T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """``(N,)`` cosine similarity of each pair."""
        return (self._unit(embeddings1) * self._unit(embeddings2)).sum(dim=1)

    @property
    def mteb_model_meta(self) -> Any:
        """An ``mteb.models.ModelMeta`` naming this checkpoint and head (needs mteb)."""
        try:
            from mteb.models import ModelMeta
        except ImportError as exc:
            raise ConfigError("mteb_model_meta needs the mteb package: pip install mteb") from exc
        return ModelMeta.create_empty(
            {"name": self.name, "revision": self.revision, "embed_dim": int(self.model.embed_dim)}
        )


def _batch_texts(batch: Any) -> list[str]:
    if isinstance(batch, Mapping) and "text" in batch:
        texts = batch["text"]
    elif isinstance(batch, str):
        raise ConfigError("encode got an iterable of strings that is not a list; pass a list")
    else:
        raise ConfigError(
            f"encode expects batches with a 'text' list (mteb's DataLoader), got {type(batch).__name__}"
        )
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise ConfigError("a batch's 'text' must be a list of strings")
    return [str(t) for t in texts]
