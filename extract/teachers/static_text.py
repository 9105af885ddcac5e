"""WordLlama static-embedding text teacher (``wordllama-l2-supercat``, 256-d).

WordLlama (package ``wordllama``, MIT) embeds a sentence as the weighted average of learned static
token embeddings (the ``l2_supercat`` model: a Llama-2 tokenizer vocabulary with 256-d embeddings
trained for sentence similarity). It has no attention at all, so it is a *weak, cheap* text
teacher: a useful contrast to the transformer teachers in the soft-label sensitivity study, and
it encodes thousands of captions per second on a CPU.

The weights ship inside the wheel (``wordllama/weights/l2_supercat_256.safetensors``); cusa loads
them with ``disable_download=True`` from the installed package and checks both files against the
SHA-256 pinned here, so nothing is fetched at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...captions import CaptionNormalization
from ...errors import WeightsError
from ...weights import installed_package_dir, sha256_file
from .base import TextTeacherBase, l2_normalize

WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256
WORDLLAMA_WEIGHTS = f"weights/{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}.safetensors"
WORDLLAMA_TOKENIZER = f"tokenizers/{WORDLLAMA_CONFIG}_tokenizer_config.json"
#: Observed in ``wordllama==0.4.0.post1`` on 2026-12-01.
WORDLLAMA_SHA256 = {
    WORDLLAMA_WEIGHTS: "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5",
    WORDLLAMA_TOKENIZER: "93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68",
}


def wordllama_package_dir() -> Path | None:
    """The installed ``wordllama`` package folder, or None."""
    return installed_package_dir("wordllama")


def wordllama_available() -> bool:
    """Cheap: is the package (with its shipped weights) installed?"""
    folder = wordllama_package_dir()
    return folder is not None and (folder / WORDLLAMA_WEIGHTS).is_file()


class WordLlamaTextTeacher(TextTeacherBase):
    """Captions -> L2-normalised 256-d WordLlama embeddings.

    Args:
        name: registry name recorded in the spec.
        normalization: ``"pre_caption"`` (official CUSA rule, default) or ``"raw"``.
        max_words: word limit of ``pre_caption``.
        batch_size: WordLlama's inner batch size.
        dtype: on-disk dtype recorded in the spec.

    Raises:
        WeightsError: the package is missing, or a shipped file's SHA-256 differs.
    """

    def __init__(
        self,
        *,
        name: str = "wordllama-l2-supercat",
        normalization: str = "pre_caption",
        max_words: int = 64,
        batch_size: int = 256,
        dtype: str = "float16",
    ) -> None:
        folder = wordllama_package_dir()
        if folder is None or not (folder / WORDLLAMA_WEIGHTS).is_file():
            raise WeightsError(
                "wordllama-l2-supercat needs `pip install wordllama==0.4.0.post1` (MIT; the 16 MB "
                "weights ship inside it), or `pip install cusa[extra-teachers]`"
            )
        hashes = {}
        for rel, expected in WORDLLAMA_SHA256.items():
            digest = sha256_file(folder / rel)
            if digest != expected:
                raise WeightsError(
                    f"checksum mismatch for {str(folder / rel)!r}: expected SHA-256 {expected}, "
                    f"got {digest}; reinstall wordllama==0.4.0.post1"
                )
            hashes[rel] = digest
        from wordllama import WordLlama

        self.model = WordLlama.load(
            config=WORDLLAMA_CONFIG, cache_dir=folder, dim=WORDLLAMA_DIM, disable_download=True
        )
        self.batch_size = batch_size
        self._preparer = CaptionNormalization(normalization, max_words)
        self._spec = self._sentence_spec(
            name=name,
            model=f"wordllama {WORDLLAMA_CONFIG} {WORDLLAMA_DIM}-d (package wordllama)",
            weights_sha256=hashes[WORDLLAMA_WEIGHTS],
            dim=WORDLLAMA_DIM,
            dtype=dtype,
            preprocessing={"tokenizer_sha256": hashes[WORDLLAMA_TOKENIZER]},
        )

    def _encode_captions(self, batch: list[str]) -> np.ndarray:
        emb = self.model.embed(list(batch), norm=False, batch_size=self.batch_size)
        return l2_normalize(np.asarray(emb, dtype=np.float32))  # (B, 256)
