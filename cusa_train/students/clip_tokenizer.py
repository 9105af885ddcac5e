"""OpenAI CLIP's byte-level BPE tokenizer, written natively (ftfy and regex, no open_clip).

It reproduces ``clip.tokenize(texts, truncate=True)`` of openai/CLIP and of the official CUSA
repository (``clip/clip.py`` with ``clip/simple_tokenizer.py``) id for id;
``tests/fixtures/clip_tokenizer_golden.json`` holds the reference ids.

The steps, as upstream:

1. clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse runs of whitespace to one
   space, lower-case;
2. split with the CLIP pattern (contractions, runs of letters, single digits, runs of other
   non-space characters);
3. map each piece's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table), mark the
   last one with ``</w>`` and apply the 48,894 BPE merges of ``bpe_simple_vocab_16e6.txt.gz`` by
   rank;
4. frame with ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407), pad with zeros to the
   context length (77). A longer caption is cut to the context length and its last id replaced by
   the end token, as ``truncate=True`` does (the official training loader calls ``tokenize``
   without ``truncate`` and would raise instead; ``pre_caption``'s 64-word cap makes that rare).

Example:
    >>> tok = ClipTokenizer()
    >>> tok(["a dog on a couch"]).shape
    torch.Size([1, 77])
"""

from __future__ import annotations

import gzip
import html
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from cusa.errors import ConfigError

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges after the 512 byte symbols

# The split pattern of openai/CLIP; needs the ``regex`` module for \p{L} / \p{N}.
_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft hyphen...) are
    moved to code points 256 and up, in byte order, so BPE never sees whitespace or control
    characters. The dict's order (printable bytes first, then the moved ones) is the order of the
    first 256 vocabulary entries, so it matters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_path():
    """The packaged ``bpe_simple_vocab_16e6.txt.gz`` (a :class:`importlib.resources` traversable)."""
    return resources.files("cusa_train") / "assets" / BPE_VOCAB_FILE


def _clean(text: str, whitespace_re, ftfy_fix) -> str:
    text = ftfy_fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return whitespace_re.sub(" ", text).strip().lower()


class ClipTokenizer:
    """The CLIP BPE tokenizer: captions -> ``(B, context_length)`` int64 token ids.

    Args:
        context_length: length of every row (77 for all OpenAI CLIP models).
        bpe_path: a merges file in the ``bpe_simple_vocab_16e6.txt.gz`` format; default the one
            shipped in ``cusa_train/assets``.

    Raises:
        ConfigError: ``ftfy`` or ``regex`` is missing, or ``context_length`` < 2.
    """

    def __init__(
        self, context_length: int = CONTEXT_LENGTH, bpe_path: str | os.PathLike | None = None
    ) -> None:
        if context_length < 2:
            raise ConfigError(f"context_length must be >= 2, got {context_length!r}")
        try:
            import ftfy
            import regex
        except ImportError as exc:
            raise ConfigError(
                f"the CLIP tokenizer needs ftfy and regex: pip install ftfy regex ({exc})"
            ) from exc
        self.context_length = int(context_length)
        self._fix_text = ftfy.fix_text
        self._whitespace = regex.compile(r"\s+")
        self._split = regex.compile(_PATTERN, regex.IGNORECASE)
        source = Path(bpe_path) if bpe_path is not None else bpe_vocab_path()
        lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
        # Line 0 is a version header; the next 48,894 lines are merges, best first.
        merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
        self.byte_encoder = dict(byte_to_unicode())
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}  # type: ignore[misc]
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self._cache: dict[str, list[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[str]:
        """Merge one pre-split piece (already byte-mapped) into vocabulary symbols."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = [*piece[:-1], piece[-1] + "</w>"]
        while len(symbols) > 1:
            # The adjacent pair with the best (lowest) merge rank; stop when none is a merge.
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:], strict=False):
                rank = self.merge_rank.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            # Replace every non-overlapping occurrence of that pair, left to right.
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[piece] = symbols
        return symbols

    def clean(self, text: str) -> str:
        """The text the BPE sees: ftfy, double HTML unescape, whitespace collapsed, lower-case."""
        return _clean(text, self._whitespace, self._fix_text)

    def encode(self, text: str) -> list[int]:
        """One caption -> its BPE ids, without start/end tokens or padding."""
        ids: list[int] = []
        for piece in self._split.findall(self.clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """BPE ids -> text (lower-cased and cleaned, as the model saw it; specials kept)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self, texts: Sequence[str], context_length: int | None = None, *, truncate: bool = True
    ) -> torch.Tensor:
        """Captions -> ``(B, context_length)`` int64 ids: SOT, BPE ids, EOT, zero padding.

        Args:
            texts: the captions (a single ``str`` is refused, to catch character iteration).
            context_length: row length; default the tokenizer's (77).
            truncate: cut a longer caption and end it with EOT (``clip.tokenize(truncate=True)``);
                with ``False`` a longer caption is an error.

        Raises:
            ConfigError: ``texts`` is a str, or a caption is too long and ``truncate`` is False.
        """
        if isinstance(texts, str):
            raise ConfigError("tokenize expects a list of captions, got a single str; wrap it")
        n_ctx = self.context_length if context_length is None else int(context_length)
        out = torch.zeros(len(texts), n_ctx, dtype=torch.long)  # (B, n_ctx), 0 = padding
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > n_ctx:
                if not truncate:
                    raise ConfigError(
                        f"caption {text[:60]!r}... has {len(ids)} tokens, over the context length "
                        f"{n_ctx}; pass truncate=True to cut it (keeping the end token)"
                    )
                ids = ids[:n_ctx]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=4)
def default_tokenizer(context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
    """A shared :class:`ClipTokenizer` (loading the merges takes about a tenth of a second)."""
    return ClipTokenizer(context_length)
