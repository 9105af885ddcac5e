"""Caption normalisation shared by the text teachers, evaluation and training.

``pre_caption`` is the official CUSA rule (lerogo/aaai24_itr_cusa ``dataset/utils.py``, inherited
from ALBEF); a text teacher records it in its spec, and the trainer and evaluation apply the same
function, so captions are seen exactly as the teacher saw them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, SampleError

#: The characters ``pre_caption`` turns into spaces (recorded in a text teacher's spec).
PRE_CAPTION_PUNCT = ",.'!?\"()*#:;~"
_PUNCT_RE = re.compile(r"([,.'!?\"()*#:;~])")
_MULTISPACE_RE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 64) -> str:
    """The official CUSA/ALBEF caption normalisation.

    Lower-case; each of ``,.'!?"()*#:;~`` -> a space; ``-`` and ``/`` -> a space; ``<person>`` ->
    ``person``; runs of 2+ whitespace -> one space; strip; keep the first ``max_words`` words.

    Raises:
        SampleError: nothing is left (the official code raises ``ValueError`` here too).
    """
    text = _PUNCT_RE.sub(" ", caption.lower()).replace("-", " ").replace("/", " ")
    text = text.replace("<person>", "person")
    text = _MULTISPACE_RE.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise SampleError(f"caption is empty after normalisation (raw: {caption!r})")
    return text


@dataclass(frozen=True)
class CaptionNormalization:
    """How captions are turned into teacher input; recorded in the spec's ``preprocessing``.

    Args:
        mode: ``"pre_caption"`` (official CUSA rule) or ``"raw"`` (unchanged, only rejected
            when blank).
        max_words: word limit of ``pre_caption``.
    """

    mode: str = "pre_caption"
    max_words: int = 64

    def __post_init__(self) -> None:
        if self.mode not in ("pre_caption", "raw"):
            raise ConfigError(
                f"caption normalisation must be 'pre_caption' or 'raw', got {self.mode!r}"
            )
        if self.max_words < 1:
            raise ConfigError(f"max_words must be >= 1, got {self.max_words}")

    @classmethod
    def of(cls, normalization: str | CaptionNormalization, max_words: int) -> CaptionNormalization:
        """``normalization`` itself if it is one, else ``CaptionNormalization(normalization, max_words)``."""
        if isinstance(normalization, CaptionNormalization):
            return normalization
        return cls(normalization, max_words)

    def __call__(self, caption: str | bytes) -> str:
        """Normalise one caption.

        Raises:
            SampleError: not valid UTF-8, not text, or empty after normalisation.
        """
        if isinstance(caption, bytes | bytearray):
            try:
                caption = bytes(caption).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SampleError(
                    f"caption is not valid UTF-8 ({exc.reason} at byte {exc.start}): {bytes(caption)[:60]!r}"
                ) from exc
        if not isinstance(caption, str):
            raise SampleError(f"caption must be str or UTF-8 bytes, got {type(caption).__name__}")
        if self.mode == "raw":
            if not caption.strip():
                raise SampleError(f"caption is blank (raw: {caption!r})")
            return caption
        return pre_caption(caption, self.max_words)

    def prepare(self, item: str | bytes) -> str:
        """Same as calling it: the picklable ``prepare`` half of a text teacher."""
        return self(item)

    def to_dict(self) -> dict[str, Any]:
        if self.mode == "raw":
            return {"caption": "raw"}
        return {
            "caption": "pre_caption",
            "source": "lerogo/aaai24_itr_cusa dataset/utils.py pre_caption (ALBEF)",
            "lowercase": True,
            "punctuation_to_space": PRE_CAPTION_PUNCT,
            "also_to_space": "-/",
            "replace": {"<person>": "person"},
            "collapse_whitespace": True,
            "max_words": self.max_words,
        }
