"""Shared pieces of the fault-injection suite (imported by its conftest and test modules)."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from helpers import IMAGE_T, TEXT_T

from cusa.extract.runner import ExtractConfig

LOG_ENV = "CUSA_RELIABILITY_LOG"

# The kill/concurrency trials run on the embedded real sample (always present): 8 real COCO
# images with 5 captions each, cut into 4 shards of 2 images -> 8 commits (image + text).
SAMPLE = dict(
    dataset="coco-sample",
    split="val",
    image_teacher=IMAGE_T,
    text_teacher=TEXT_T,
    batch_size=4,
    shard_size=2,
    device="cpu",
)
SAMPLE_SHARDS = 4


#: The longest one-line message a refusal may print (docs/reliability.md).
MAX_MESSAGE = 500


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read, an endless walk)."""

    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sample_config(store: str | os.PathLike, **changes: Any) -> ExtractConfig:
    return ExtractConfig(**{**SAMPLE, "store": str(store), "runner": "local", **changes})


def sample_cli_options() -> dict[str, Any]:
    return {k: v for k, v in SAMPLE.items() if k != "dataset"}


@dataclass
class ReliabilityLog:
    """What each test injected or tried, and what happened (figures, not assertions)."""

    faults: list[dict[str, Any]] = field(default_factory=list)
    bad_inputs: list[dict[str, Any]] = field(default_factory=list)

    def fault(
        self, kind: str, trial: str, *, survived: bool, samples_lost: int, **detail: Any
    ) -> None:
        """One injected fault: did the store come out complete and identical afterwards?"""
        self.faults.append(
            {
                "kind": kind,
                "trial": trial,
                "survived": bool(survived),
                "samples_lost": int(samples_lost),
                **detail,
            }
        )

    def bad_input(
        self, name: str, category: str, *, caught: bool, outcome: str, message: str = ""
    ) -> None:
        """One bad input: ``caught`` when it was rejected or recorded with a clear message."""
        self.bad_inputs.append(
            {
                "name": name,
                "category": category,
                "caught": bool(caught),
                "outcome": outcome,
                "message": message[:300],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {"faults": self.faults, "bad_inputs": self.bad_inputs}


@dataclass(frozen=True)
class S3Endpoint:
    url: str

    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.url,
            "client_kwargs": {"region_name": "eu-west-1"},
        }

    def env(self) -> dict[str, str]:
        """Environment for a ``cusa`` subprocess (the CLI takes no storage options)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }

    def new_bucket(self) -> str:
        import s3fs

        name = f"cusa-rel-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(**self.storage_options()).mkdir(name)
        return name


# What the full suite injects and tries; the committed figures must cover exactly these.
FAULT_KINDS = (
    "concurrent writers",
    "disk full (96 KiB tmpfs)",
    "kill -9 Ray teacher actor",
    "kill -9 local runner",
    "kill -9 with the store on S3 (moto)",
    "reader during writes",
    "verify during a concurrent seal",
    "write error mid-shard (injected ENOSPC)",
)
# Kill trials: each must have killed before the last commit (mid-run).
KILL_KINDS = (
    "kill -9 Ray teacher actor",
    "kill -9 local runner",
    "kill -9 with the store on S3 (moto)",
)
BAD_INPUTS = (
    "caption: 20 MB caption",
    "caption: empty caption",
    "caption: non-UTF-8 caption",
    "caption: punctuation-only caption",
    "caption: very long (3000 words)",
    "cli: --device banana",
    "cli: --device cuda:N that does not exist",
    "cli: --store s3:// without credentials",
    "cli: read-only store, new split",
    "cli: store export --to an existing file",
    "dataset: --shard-size changed on resume",
    "dataset: JSON nested 200k deep (ALBEF index)",
    "dataset: JSON nested 100k deep (tar .json member)",
    "dataset: caption added, then resumed",
    "dataset: caption edited, then resumed",
    "dataset: duplicate sample ids (JSON)",
    "dataset: duplicate sample ids (webdataset)",
    "dataset: image removed, then resumed",
    "dataset: manifest.json naming a tar outside its folder (../)",
    "dataset: manifest.json naming a tar outside its folder (absolute)",
    "dataset: tar FIFO member",
    "dataset: tar character-device member",
    "dataset: tar hard-link member",
    "dataset: tar member name appearing twice",
    "dataset: tar member name in Latin-1 (not UTF-8)",
    "dataset: tar member over the size cap",
    "dataset: tar member path escapes",
    "dataset: tar symlink member",
    "dataset: the index file is a FIFO",
    "dataset: truncated tar",
    "dataset: webdataset non-contiguous keys",
    "file: .npy needing pickle",
    "file: chunk file truncated on disk",
    "file: pickle instead of a state dict (pickle)",
    "file: pickle instead of a state dict (torch.save)",
    "file: store attributes edited to another teacher spec",
    "file: weights with the wrong SHA-256",
    "image: ../ path outside the root",
    "image: /dev/zero as the image path",
    "image: /dev/zero with --allow-outside-root",
    "image: 1x100000 PNG (huge resize output)",
    "image: FIFO as the image file",
    "image: absolute path outside the root",
    "image: alpha.png",
    "image: bomb.png",
    "image: cmyk.jpg",
    "image: empty.jpg",
    "image: file over the size cap (300 MB)",
    "image: gray16.png",
    "image: missing.jpg",
    "image: non-UTF-8 image id (JSON)",
    "image: random.jpg",
    "image: symlink to a file outside the root",
    "image: truncated.jpg",
    "store: FeatureLookup.gather('aaa') (a string, not a list)",
    "store: array zarr.json dtype edited to float32",
    "store: garbage commit record",
    "store: garbage cusa_store.json",
    "store: garbage manifest.parquet",
    "store: group attributes that are not an object",
    "store: sealed sample_id array deleted",
    "store: sealed.json = []",
    "store: stray .DS_Store (and other files) in the store",
    "store: teacher spec set to null",
    "store: truncated zarr.json of a group",
    "store: zeroed chunk file, then export",
)
# Round 3 (issue 21): the lab cache, evaluation inputs, config and weights files, store readers.
ROUND3_BAD_INPUTS = (
    "cache: CUSA_HOME is a regular file (cache clean)",
    "cache: CUSA_HOME is a regular file (cache info)",
    "cache: clean with a symlink out of $CUSA_HOME at a .partial file",
    "cache: clean with a symlink out of $CUSA_HOME at a model folder",
    "cache: clean with a symlink out of $CUSA_HOME at a segment file",
    "cache: clean with a symlink out of $CUSA_HOME at a store dataset folder",
    "cache: clean with a symlink out of $CUSA_HOME at cache (above segments)",
    "cache: clean with a symlink out of $CUSA_HOME at cache/segments (segments area)",
    "cache: clean with a symlink out of $CUSA_HOME at models (models area)",
    "cache: clean with a symlink out of $CUSA_HOME at models/parts (downloads folder)",
    "cache: clean with a symlink out of $CUSA_HOME at models/wheels (downloads folder)",
    "cache: clean with a symlink out of $CUSA_HOME at store (store area)",
    "cli: --name 'lab.' (stored in the folder of 'lab')",
    "cli: --name 'lab._' (stored in the folder of 'lab')",
    "cli: --name 'lab_' (stored in the folder of 'lab')",
    "cli: --set value with a YAML billion laughs",
    "cli: store export --to a dangling symlink",
    "cli: store export --to a new folder inside the store",
    "cli: store export --to a symlink into the store",
    "cli: store export --to the store root",
    "dataset: same --name, same file names, other image bytes",
    "dataset: the same sample id in two webdataset tars",
    "eval: CUB class folder symlinked outside --root",
    "eval: CUB class folder with `ln -s . l1; ln -s . l2`",
    "eval: SOP Ebay_test.txt is /dev/zero (a symlink)",
    "eval: SOP Ebay_test.txt is a FIFO",
    "eval: SOP Ebay_test.txt line with a ../ path outside --root",
    "eval: SOP Ebay_test.txt line with a 50 MB path",
    "eval: SOP Ebay_test.txt line with an absolute path",
    "eval: STS gold score inf",
    "eval: STS gold score nan",
    "eval: a 3 GB sparse .jpg listed by SOP",
    "eval: sts-test.csv is a FIFO",
    "file: config YAML billion laughs (aliases)",
    "file: config file is /dev/zero",
    "file: config file is a FIFO",
    "file: config file is a folder",
    "file: config file of 1 GB",
    "file: weights file is /dev/zero",
    "file: weights file is a FIFO",
    "file: weights file is a folder",
    "file: weights file is empty",
    "store: a commit record is a symlink (unsealed group)",
    "store: array zarr.json dtype edited to float32, then read",
    "store: features/zarr.json is a symlink",
    "store: garbage commit record, then read",
    "store: part zarr.json shape edited (unsealed group)",
    "store: sealed manifest.parquet is a symlink",
)
BAD_INPUTS = BAD_INPUTS + ROUND3_BAD_INPUTS
MIN_BAD_INPUTS = 45
MIN_KILL_TRIALS = 20
