"""The Unicom image teacher: a native reimplementation of the official Unicom ViT.

The official class is ``VisionTransformer`` in deepglint/unicom ``unicom/vision_transformer.py``
(An et al., "Unicom: Universal and Compact Representation Learning for Image Retrieval", ICLR
2023). It is not on the package registry and imports timm/torchvision, so it is rebuilt here
module for module: the state-dict keys and shapes are exactly the official ones
(``tests/fixtures/unicom_state_dict_shapes.json``), so ``FP16-ViT-*.pt`` loads with
``strict=True``, and the tiny golden model reproduces the official outputs to ~1e-6.

Differences from the official file, none of which changes a number in fp32 eval:

- no activation checkpointing and no drop-path (inference only);
- the official blocks always enter ``torch.cuda.amp.autocast(True)``; here the autocast dtype is
  chosen by the caller (fp16 by default on CUDA, off on CPU). The attention core, the final
  LayerNorm and the head stay fp32, as in the official code.

Output kinds (part of the teacher name and spec):

- ``embedding``: the head output (512-d for ViT-B/32), what Unicom recommends for retrieval;
  L2-normalised.
- ``tokens``: ``forward_features``, the flattened patch tokens after the final LayerNorm
  (49 x 768 = 37,632-d for ViT-B/32), what the CUSA authors released; stored raw, not normalised,
  exactly like the release.
- ``tokens-proj{k}``: ``tokens`` times a fixed Gaussian random projection (seed 0, entries
  N(0, 1/k)) to k dims, then L2-normalised. By Johnson-Lindenstrauss it preserves the cosine
  similarities from which CUSA's soft labels are computed; see ``docs/teachers.md`` and
  ``benchmarks/results/teacher_fidelity.json`` for the measured soft-label KL.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, WeightsError
from ...image_transforms import ImagePreparer, ImageTransform, clip_transform
from ...store.spec import TeacherSpec, library_versions
from ...weights import (
    Release,
    load_state_dict,
    official_release,
    sha256_file,
    weights_file,
)
from .base import ImageTeacherBase

log = logging.getLogger(__name__)


# ---- architecture -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UnicomConfig:
    """Hyperparameters of one official Unicom ViT (``build_model`` in the official file)."""

    input_size: int = 224
    patch_size: int = 32
    in_channels: int = 3
    dim: int = 768
    embedding_size: int = 512
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def tokens_dim(self) -> int:
        return self.num_patches * self.dim

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


UNICOM_CONFIGS: dict[str, UnicomConfig] = {
    "ViT-B/32": UnicomConfig(224, 32, 3, 768, 512, 12, 12),
    "ViT-B/16": UnicomConfig(224, 16, 3, 768, 768, 12, 12),
    "ViT-L/14": UnicomConfig(224, 14, 3, 1024, 768, 24, 16),
    "ViT-L/14@336px": UnicomConfig(336, 14, 3, 1024, 768, 24, 16),
}


UNICOM_RELEASES: dict[str, Release] = {
    "ViT-B/32": Release(
        "FP16-ViT-B-32.pt",
        "https://github.com/deepglint/unicom/releases/download/b32/FP16-ViT-B-32.pt",
        "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a",
    ),
    "ViT-B/16": Release(
        "FP16-ViT-B-16.pt",
        "https://github.com/deepglint/unicom/releases/download/b16/FP16-ViT-B-16.pt",
        "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef",
    ),
    "ViT-L/14": Release(
        "FP16-ViT-L-14.pt",
        "https://github.com/deepglint/unicom/releases/download/l14/FP16-ViT-L-14.pt",
        "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd",
    ),
    "ViT-L/14@336px": Release(
        "FP16-ViT-L-14-336px.pt",
        "https://github.com/deepglint/unicom/releases/download/l14_336px/FP16-ViT-L-14-336px.pt",
        "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea",
    ),
}


class PatchEmbedding(nn.Module):
    """Non-overlapping patches by a strided conv: ``(B, 3, H, W) -> (B, N, dim)``."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class Attention(nn.Module):
    """Multi-head self-attention; qkv has no bias, the softmax runs in fp32 (as upstream)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (3, B, heads, N, head_dim)
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()  # Unicom uses ReLU6, not GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UnicomVisionTransformer(nn.Module):
    """The official Unicom ViT: no class token; the head flattens all patch tokens.

    Args:
        config: an entry of :data:`UNICOM_CONFIGS` or a custom :class:`UnicomConfig`.
        autocast_dtype: dtype for the blocks under CUDA autocast (``None`` = fp32 throughout).
    """

    def __init__(self, config: UnicomConfig, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        c = config
        self.config = c
        self.autocast_dtype = autocast_dtype
        self.dim = c.dim
        self.patch_embed = PatchEmbedding(c.input_size, c.patch_size, c.in_channels, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, c.dim))
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.feature = nn.Sequential(
            nn.Linear(c.dim * self.patch_embed.num_patches, c.dim, bias=False),
            nn.BatchNorm1d(c.dim, eps=2e-5),
            nn.Linear(c.dim, c.embedding_size, bias=False),
            nn.BatchNorm1d(c.embedding_size, eps=2e-5),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, N * dim)``: patch tokens after the final LayerNorm, flattened."""
        b = x.shape[0]
        use_amp = self.autocast_dtype is not None and x.device.type == "cuda"
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype, enabled=use_amp):
            x = self.patch_embed(x) + self.pos_embed  # (B, N, dim)
            for block in self.blocks:
                x = block(x)
        x = self.norm(x.float())
        return x.reshape(b, self.patch_embed.num_patches * self.dim)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N * dim) -> (B, embedding_size)``."""
        return self.feature(tokens.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_unicom(
    arch: str | UnicomConfig, *, device: str | torch.device = "cpu"
) -> UnicomVisionTransformer:
    """An (untrained) Unicom ViT for ``arch`` (``"ViT-B/32"``...) or a custom config.

    ``device="meta"`` builds it without allocating memory (for shape checks).

    Raises:
        ConfigError: unknown architecture name.
    """
    if isinstance(arch, str):
        if arch not in UNICOM_CONFIGS:
            raise ConfigError(
                f"unknown Unicom architecture {arch!r}; known: {', '.join(UNICOM_CONFIGS)}"
            )
        arch = UNICOM_CONFIGS[arch]
    with torch.device(device):
        return UnicomVisionTransformer(arch)


def load_unicom(
    arch: str | UnicomConfig, weights: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> UnicomVisionTransformer:
    """Build ``arch`` and load a checkpoint in the official format with ``strict=True``, in eval mode.

    Raises:
        WeightsError: the file is unreadable, not a plain state dict, or its keys/shapes differ.
    """
    model = build_unicom(arch)
    state = load_state_dict(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{str(weights)!r} does not match the Unicom {arch!r} architecture: "
            f"{str(exc).splitlines()[0]} (see the first lines of the error for missing/unexpected keys)"
        ) from exc
    return model.to(device).eval()


# ---- weights resolution -------------------------------------------------------------------------


def unicom_cache_dir() -> Path:
    """Where the official loader keeps checkpoints: ``~/.cache/unicom``."""
    return Path("~/.cache/unicom").expanduser()


OFFLINE_ALTERNATIVES = ("efficientnet-lite0", "mobilenetv2")


def resolve_unicom_weights(
    arch: str,
    weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    allow_unofficial: bool = False,
) -> tuple[Path, str]:
    """Find the checkpoint for ``arch`` and return ``(path, sha256)``.

    Order: (1) the explicit ``weights`` path; (2) ``<cache_dir>/FP16-ViT-*.pt`` (default
    ``~/.cache/unicom``); (3) download from the official release URL into ``cache_dir`` via a
    ``.partial`` file, checked against the published SHA-256.

    Args:
        arch: ``"ViT-B/32"``, ``"ViT-B/16"``, ``"ViT-L/14"`` or ``"ViT-L/14@336px"``.
        weights: an explicit checkpoint file.
        cache_dir: override ``~/.cache/unicom``.
        download: allow step (3); default: unless ``CUSA_OFFLINE``/``HF_HUB_OFFLINE`` is set.
        allow_unofficial: accept an explicit file whose hash is not the official one (e.g. a
            fine-tuned checkpoint); its real hash is what the spec records.

    Raises:
        WeightsError: no weights and no way to get them (the message names the file, where to put
            it, its SHA-256, the URL and the offline alternatives), or a checksum mismatch.
    """
    if arch not in UNICOM_RELEASES:
        raise ConfigError(
            f"unknown Unicom architecture {arch!r}; known: {', '.join(UNICOM_RELEASES)}"
        )
    rel = UNICOM_RELEASES[arch]
    if weights is not None:
        path, digest = weights_file(weights, f"Unicom {arch}")
        if digest != rel.sha256 and not allow_unofficial:
            raise WeightsError(
                f"checksum mismatch for Unicom {arch} weights {str(path)!r}: expected the official "
                f"SHA-256 {rel.sha256}, got {digest}. Use the official {rel.filename} from {rel.url}, "
                "or pass allow_unofficial=True for a checkpoint of your own."
            )
        return path, digest
    cache = Path(cache_dir).expanduser() if cache_dir is not None else unicom_cache_dir()
    path = official_release(
        rel,
        cache,
        what=f"Unicom {arch}",
        download=download,
        explicit="weights=PATH / --image-teacher-weights PATH",
        advice=f"Teachers whose weights work offline here: {', '.join(OFFLINE_ALTERNATIVES)} "
        "(stand-ins, not the paper's teacher).",
    )
    return path, rel.sha256


def unicom_weights_available(arch: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Cheap check: is the official checkpoint present in the cache? (no hashing, no loading)"""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else unicom_cache_dir()
    return (cache / UNICOM_RELEASES[arch].filename).is_file()


# ---- compact projection ----------------------------------------------------------------------


PROJECTION_SEED = 0


def gaussian_projection(in_dim: int, out_dim: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """The fixed ``(in_dim, out_dim)`` random projection, entries N(0, 1/out_dim), float32.

    Generated with torch's CPU Mersenne-Twister generator from ``seed``, so it is identical on every
    machine; :func:`projection_sha256` fingerprints it for the spec.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=gen, dtype=torch.float32) / float(out_dim) ** 0.5


def projection_sha256(matrix: torch.Tensor) -> str:
    return hashlib.sha256(matrix.contiguous().numpy().tobytes()).hexdigest()


# ---- teacher -----------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _use_all_cores() -> None:
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)


def _parse_output_kind(kind: str) -> tuple[str, int | None]:
    if kind in ("embedding", "tokens"):
        return kind, None
    if kind.startswith("tokens-proj"):
        try:
            k = int(kind.removeprefix("tokens-proj"))
        except ValueError:
            k = 0
        if k > 0:
            return "tokens-proj", k
    raise ConfigError(
        f"unknown Unicom output kind {kind!r}; use 'embedding', 'tokens' or 'tokens-proj<k>' "
        "(e.g. 'tokens-proj768')"
    )


class UnicomImageTeacher(ImageTeacherBase):
    """A frozen Unicom ViT mapping images to ``embedding``, ``tokens`` or ``tokens-proj<k>``.

    Args:
        arch: official architecture, e.g. ``"ViT-B/32"``.
        output_kind: ``"embedding"`` (default), ``"tokens"`` or ``"tokens-proj<k>"``.
        weights: explicit checkpoint path (resolution order in :func:`resolve_unicom_weights`).
        name: registry name recorded in the spec (default derived from arch and kind).
        device: ``"cpu"``, ``"cuda"``... (default: cuda when available).
        amp_dtype: ``"float16"`` (default, like upstream) or ``"bfloat16"`` autocast on CUDA;
            ``None`` for fp32. Ignored on CPU, which runs fp32 on all cores.
        dtype: the on-disk dtype recorded in the spec (``"float16"`` by default).
        cache_dir, download, allow_unofficial: see :func:`resolve_unicom_weights`.
        config: a custom :class:`UnicomConfig` (tests use the tiny golden model); requires
            ``weights`` and ``allow_unofficial=True``.
        alpha: alpha-channel policy for decoding (see :mod:`image_preprocess`).
        max_pixels: decompression-bomb limit (default: PIL's).
    """

    def __init__(
        self,
        arch: str = "ViT-B/32",
        output_kind: str = "embedding",
        *,
        weights: str | os.PathLike | None = None,
        name: str | None = None,
        device: str | None = None,
        amp_dtype: str | None = "float16",
        dtype: str = "float16",
        cache_dir: str | os.PathLike | None = None,
        download: bool | None = None,
        allow_unofficial: bool = False,
        config: UnicomConfig | None = None,
        alpha: str = "drop",
        max_pixels: int | None = None,
    ) -> None:
        base_kind, proj_dim = _parse_output_kind(output_kind)
        if config is None:
            if arch not in UNICOM_CONFIGS:
                raise ConfigError(
                    f"unknown Unicom architecture {arch!r}; known: {', '.join(UNICOM_CONFIGS)}"
                )
            config = UNICOM_CONFIGS[arch]
            path, digest = resolve_unicom_weights(
                arch,
                weights,
                cache_dir=cache_dir,
                download=download,
                allow_unofficial=allow_unofficial,
            )
        else:
            if weights is None or not allow_unofficial:
                raise ConfigError(
                    "a custom Unicom config needs weights=PATH and allow_unofficial=True"
                )
            path, digest = Path(weights), sha256_file(weights)
        self.arch = arch
        self.config = config
        self.output_kind = output_kind
        self.device = torch.device(device or _default_device())
        if self.device.type == "cpu":
            _use_all_cores()
        amp = {"float16": torch.float16, "bfloat16": torch.bfloat16, None: None}
        if amp_dtype not in amp:
            raise ConfigError(f"amp_dtype must be 'float16', 'bfloat16' or None, got {amp_dtype!r}")
        log.info("loading Unicom %s from %s", arch, path)
        model = load_unicom(config, path)
        model.autocast_dtype = amp[amp_dtype] if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model.eval().requires_grad_(False)
        self.transform: ImageTransform = clip_transform(config.input_size, alpha=alpha)  # type: ignore[arg-type]
        self._preparer = ImagePreparer(self.transform, max_pixels)

        self._projection: torch.Tensor | None = None
        projection_info: dict[str, Any] | None = None
        if base_kind == "embedding":
            dim, normalized = config.embedding_size, True
        elif base_kind == "tokens":
            dim, normalized = config.tokens_dim, False
        else:
            assert proj_dim is not None
            if proj_dim >= config.tokens_dim:
                raise ConfigError(
                    f"projection dim {proj_dim} must be below tokens dim {config.tokens_dim}"
                )
            proj = gaussian_projection(config.tokens_dim, proj_dim)
            projection_info = {
                "method": "gaussian-random-projection",
                "seed": PROJECTION_SEED,
                "in_dim": config.tokens_dim,
                "out_dim": proj_dim,
                "scale": "1/sqrt(out_dim)",
                "matrix_sha256": projection_sha256(proj),
            }
            self._projection = proj.to(self.device)
            dim, normalized = proj_dim, True
        self._base_kind = base_kind
        preprocessing = self.transform.to_dict()
        if projection_info is not None:
            preprocessing["projection"] = projection_info
        kind_slug = output_kind if output_kind != "embedding" else ""
        default_name = "unicom-" + arch.lower().replace("/", "").replace("@", "-")
        self._spec = TeacherSpec(
            name=name or (default_name + (f"-{kind_slug}" if kind_slug else "")),
            modality="image",
            model=f"unicom/{arch}",
            weights_sha256=digest,
            preprocessing=preprocessing,
            output_kind=output_kind,
            dim=dim,
            dtype=dtype,
            normalized=normalized,
            library_versions=library_versions(),
        )

    def _encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)  # (B, N*dim) fp32
        if self._base_kind == "embedding":
            out = self.model.forward_head(tokens)
        elif self._base_kind == "tokens":
            out = tokens
        else:
            out = tokens @ self._projection  # (B, k)
        if self._spec.normalized:
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out
