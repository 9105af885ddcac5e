"""OpenAI CLIP weights for :mod:`cusa_train.students.clip`: where they come from and how they are read.

- :data:`CLIP_RELEASES`: the official download URL and SHA-256 of every released model (from
  openai/CLIP ``clip/clip.py``, identical in lerogo/aaai24_itr_cusa).
- :func:`resolve_clip_weights`: an explicit path, else ``~/.cache/clip/<file>`` (the cache
  openai/CLIP's ``clip.load`` uses), else the official URL; the SHA-256 is checked every time.
- :func:`load_openai_checkpoint`: plain state dicts through ``torch.load(weights_only=True)``;
  ``torch.jit.load`` only for a TorchScript archive whose SHA-256 is an official release's.
- :func:`clip_config_from_state_dict` / :func:`build_model_from_openai_state_dict`: the model a
  state dict describes, as the official ``build_model`` infers it.
- :func:`load_clip`: all of it, returning a :class:`~cusa_train.students.clip.ClipStudent`.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cusa.errors import ConfigError, WeightsError
from cusa.weights import Release, load_state_dict, official_release, sha256_file, weights_file
from cusa_train.students.clip import CLIP_CONFIGS, ClipConfig, ClipStudent, Freeze

log = logging.getLogger(__name__)

# Keys some OpenAI-format checkpoints carry that are not parameters of the CUSA model: OpenAI's
# TorchScript files hold the last four; ``attn_mask`` appears when a ClipStudent is traced.
DROPPED_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size", "attn_mask")

# A release's SHA-256 is also its URL's folder name.
_CLIP_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
# From openai/CLIP ``clip/clip.py`` ``_MODELS`` (identical in lerogo/aaai24_itr_cusa).
_CLIP_SHA256 = {
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": (
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
    ),
}
CLIP_RELEASES: dict[str, Release] = {
    arch: Release(name, f"{_CLIP_BASE_URL}/{sha}/{name}", sha)
    for arch, (sha, name) in _CLIP_SHA256.items()
}
_OFFICIAL_SHA256 = {rel.sha256 for rel in CLIP_RELEASES.values()}


# ---- building from OpenAI state dicts --------------------------------------------------------


def _count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def clip_config_from_state_dict(sd: Mapping[str, Any]) -> ClipConfig:
    """Infer the architecture from an OpenAI-format state dict's shapes (upstream ``build_model``).

    Raises:
        WeightsError: a key the inference needs is missing, or the shapes are inconsistent.
    """
    try:
        if "visual.proj" in sd:  # ViT
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            layers: int | tuple[int, int, int, int] = _count_blocks(
                sd, "visual.transformer.resblocks."
            )
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            resolution = patch * grid
            if grid**2 + 1 != sd["visual.positional_embedding"].shape[0]:
                raise WeightsError("visual.positional_embedding is not a square grid plus 1")
        else:  # ModifiedResNet
            layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4))  # type: ignore[assignment]
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            rows = sd["visual.attnpool.positional_embedding"].shape[0]
            grid = round((rows - 1) ** 0.5)
            if grid**2 + 1 != rows:
                raise WeightsError(
                    "visual.attnpool.positional_embedding is not a square grid plus 1"
                )
            patch, resolution = None, grid * 32
        text_width = sd["ln_final.weight"].shape[0]
        return ClipConfig(
            embed_dim=sd["text_projection"].shape[1],
            image_resolution=int(resolution),
            vision_layers=layers,
            vision_width=int(width),
            vision_patch_size=None if patch is None else int(patch),
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=text_width,
            transformer_heads=text_width // 64,
            transformer_layers=_count_blocks(sd, "transformer.resblocks."),
        )
    except KeyError as exc:
        raise WeightsError(
            f"not an OpenAI-format CLIP state dict: key {exc.args[0]!r} is missing "
            f"(found {len(sd)} keys, e.g. {sorted(sd)[:3]})"
        ) from exc


def build_model_from_openai_state_dict(
    sd: Mapping[str, Any], *, freeze: Freeze = "none"
) -> ClipStudent:
    """Build the CLIP an OpenAI-format state dict describes and load it, fp32, ``strict=True``.

    ``logit_scale``, ``input_resolution``, ``context_length`` and ``vocab_size`` are dropped when
    present; the caller's dict is not modified. Heads are ``width // 64`` in both towers.

    Raises:
        WeightsError: the dict is not a CLIP state dict, or its keys/shapes do not fit.
    """
    state = {k: v for k, v in sd.items() if k not in DROPPED_KEYS}
    config = clip_config_from_state_dict(state)
    model = ClipStudent(config, freeze=freeze)
    try:
        model.load_state_dict(state, strict=True)  # copies into fp32 parameters (fp16 -> fp32)
    except RuntimeError as exc:
        raise WeightsError(
            f"the state dict does not fit the CLIP it describes ({config}): "
            f"{str(exc).splitlines()[0]} {' '.join(str(exc).splitlines()[1:3])}"
        ) from exc
    return model.train(False)


# ---- weights ---------------------------------------------------------------------------------


def clip_cache_dir() -> Path:
    """Where openai/CLIP's ``clip.load`` keeps checkpoints: ``~/.cache/clip``."""
    return Path("~/.cache/clip").expanduser()


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (``torch.jit.save``), which holds code, not only tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def load_openai_checkpoint(
    path: str | os.PathLike, *, sha256: str | None = None
) -> dict[str, Tensor]:
    """Read an OpenAI-format CLIP checkpoint into a state dict of tensors.

    A plain state dict is read with ``torch.load(weights_only=True)``. OpenAI's released ``.pt``
    files are TorchScript archives, which ``weights_only`` cannot read; ``torch.jit.load`` (which
    deserialises code) is used for them only when ``sha256`` is the file's hash *and* one of the
    official releases' (the caller has already checked the bytes), never for other files.

    Args:
        path: the checkpoint.
        sha256: the file's SHA-256 if the caller computed it (computed here otherwise).

    Raises:
        WeightsError: unreadable, a pickle that would run code, or a TorchScript archive that is
            not an official release.
    """
    path = Path(path)
    if is_torchscript_archive(path):
        digest = sha256 or sha256_file(path)
        if digest not in _OFFICIAL_SHA256:
            raise WeightsError(
                f"{str(path)!r} is a TorchScript archive whose SHA-256 {digest} is not one of the "
                "official OpenAI CLIP releases; refusing to torch.jit.load it (that runs code from "
                "the file). Save its weights as a plain state dict "
                "(torch.save(torch.jit.load(p).state_dict(), out)) where you trust it, and pass that."
            )
        # Safe enough: these bytes are exactly a published OpenAI release (SHA-256 checked).
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as exc:
            raise WeightsError(f"cannot read TorchScript checkpoint {str(path)!r}: {exc}") from exc
    state = load_state_dict(path)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def resolve_clip_weights(
    arch: str,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> tuple[Path, str]:
    """Find the checkpoint for ``arch`` and return ``(path, sha256)``.

    Order: (1) the explicit ``weights`` path, any OpenAI-format checkpoint (fine-tuned ones
    included; its own hash is returned); (2) ``<cache_dir>/<file>`` (default ``~/.cache/clip``),
    checked against the official SHA-256; (3) the official URL, downloaded into ``cache_dir`` via a
    ``.partial`` file and checked.

    Args:
        arch: ``"RN50"``, ..., ``"ViT-L/14@336px"`` (see :data:`CLIP_RELEASES`).
        weights: an explicit checkpoint file.
        cache_dir: override ``~/.cache/clip``.
        download: allow step (3); default: unless ``CUSA_OFFLINE``/``HF_HUB_OFFLINE`` is set.

    Raises:
        ConfigError: unknown ``arch``.
        WeightsError: no weights and no way to get them (the message names the file, its SHA-256,
            the URL and where to put it), or a cached/downloaded file fails its checksum.
    """
    if arch not in CLIP_RELEASES:
        raise ConfigError(f"unknown CLIP architecture {arch!r}; known: {', '.join(CLIP_RELEASES)}")
    rel = CLIP_RELEASES[arch]
    if weights is not None:
        path, digest = weights_file(weights, f"CLIP {arch}")
        if digest != rel.sha256:
            log.info(
                "CLIP %s weights %s are not the official release (SHA-256 %s)", arch, path, digest
            )
        return path, digest
    cache = Path(cache_dir).expanduser() if cache_dir is not None else clip_cache_dir()
    path = official_release(
        rel,
        cache,
        what=f"OpenAI CLIP {arch}",
        download=download,
        explicit="student option weights: PATH",
        advice="No CLIP weights install from the package registry; offline, use pretrained: "
        "false (random weights) or the built-in student 'mobilenetv2-minilm'.",
    )
    return path, rel.sha256


def load_clip(
    arch: str | None,
    weights: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    freeze: Freeze = "none",
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> ClipStudent:
    """Build an OpenAI CLIP student, pretrained (:func:`resolve_clip_weights`) or random.

    Args:
        arch: an official architecture (``"ViT-B/32"``...), or None to take the architecture
            from ``weights`` (any OpenAI-format checkpoint, e.g. a tiny test model).
        weights: an explicit checkpoint path.
        pretrained: False builds ``arch`` with upstream's random initialisation.
        freeze: see :class:`ClipStudent`.
        cache_dir, download: see :func:`resolve_clip_weights`.

    Raises:
        ConfigError: unknown ``arch``, contradictory options.
        WeightsError: weights missing, failing their checksum, unreadable, or of another
            architecture than ``arch``.
    """
    if arch is not None and arch not in CLIP_CONFIGS:
        raise ConfigError(f"unknown CLIP architecture {arch!r}; known: {', '.join(CLIP_CONFIGS)}")
    if not pretrained:
        if weights is not None:
            raise ConfigError("pretrained=False builds random weights; do not pass weights too")
        if arch is None:
            raise ConfigError("a random CLIP needs an architecture (arch=...)")
        return ClipStudent(CLIP_CONFIGS[arch], freeze=freeze)
    if arch is None:
        if weights is None:
            raise ConfigError("without an architecture, weights=PATH is required")
        path, digest = weights_file(weights, "CLIP")
    else:
        path, digest = resolve_clip_weights(arch, weights, cache_dir=cache_dir, download=download)
    log.info("loading CLIP %s from %s", arch or "(architecture from the checkpoint)", path)
    state = load_openai_checkpoint(path, sha256=digest)
    if arch is not None:
        found = clip_config_from_state_dict(
            {k: v for k, v in state.items() if k not in DROPPED_KEYS}
        )
        if found != CLIP_CONFIGS[arch]:
            raise WeightsError(
                f"{str(path)!r} is not a CLIP {arch} checkpoint: its shapes describe {found}, "
                f"while {arch} is {CLIP_CONFIGS[arch]}. Pick the matching student, or use "
                "'clip-checkpoint' to take the architecture from the file."
            )
    model = build_model_from_openai_state_dict(state, freeze=freeze)
    model.weights_path, model.weights_sha256 = str(path), digest
    return model
