"""Caption normalisation shared by the text teachers, evaluation and training.

``pre_caption`` is the official CUSA rule (lerogo/aaai24_itr_cusa ``dataset/utils.py``, inherited
from ALBEF); a text teacher records it in its spec, and the trainer and evaluation apply the same
function, so captions are seen exactly as the teacher saw them.
"""

from __future__ import annotations

import re

from .errors import SampleError

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
