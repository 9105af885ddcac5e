"""Six hand-written sentence pairs with gold similarity scores (0-5), and a writer for them."""

from __future__ import annotations

import json

STS_PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 5.0),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.6),
    ("A dog runs across the grass.", "A dog is running on a lawn.", 4.2),
    ("A child is riding a bicycle.", "A kid is walking next to a bike.", 2.6),
    ("Two people are cooking dinner in a kitchen.", "A plane is taking off from the runway.", 0.4),
    ("The cat sleeps on the sofa.", "Stock markets fell sharply today.", 0.0),
]


def write_sts(tmp_path, fmt: str):
    """TSV without a header; CSV with a header in another order plus an extra column; JSONL."""
    p = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        keys = ("sentence1", "sentence2", "score")
        p.write_text("".join(json.dumps(dict(zip(keys, r, strict=True))) + "\n" for r in STS_PAIRS))
    elif fmt == "tsv":
        p.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in STS_PAIRS))
    else:
        p.write_text(
            "score,sentence1,sentence2,genre\n"
            + "".join(f'{s},"{a}","{b}",captions\n' for a, b, s in STS_PAIRS)
        )
    return p
