"""OpenAI CLIP as a CUSA student: a native, torch-only rebuild of the official model family.

The official CUSA code trains OpenAI CLIP (``clip/model.py`` of lerogo/aaai24_itr_cusa, itself
openai/CLIP's ``clip/model.py`` with ``logit_scale`` removed and fp32 kept). This module rebuilds
that model module for module, so that :class:`ClipStudent`'s ``state_dict()`` has exactly the
OpenAI keys and shapes (``visual.*``, ``transformer.resblocks.*``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.*``, ``text_projection``; checked against
``tests/fixtures/clip_state_dict_shapes.json``) and computes the same features (checked against
the official training-step golden file to 1e-6):

- image towers: :class:`ModifiedResNet` (RN50, RN101, RN50x4, RN50x16, RN50x64: three-conv stem,
  anti-aliased strided bottlenecks, attention pooling) and :class:`VisionTransformer` (ViT-B/32,
  ViT-B/16, ViT-L/14, ViT-L/14@336px: class token, pre-LayerNorm blocks, ``ln_post`` then
  ``proj``);
- text tower: a causal pre-LayerNorm transformer over the 77 BPE ids of
  :mod:`cusa_train.students.clip_tokenizer`, pooled at the end token (``tokens.argmax(-1)``, the EOT id
  49407 being the largest), then ``text_projection``;
- blocks use ``nn.MultiheadAttention`` (sequence-first, as upstream), QuickGELU
  (``x * sigmoid(1.702 x)``) and LayerNorm computed in fp32.

There is no ``logit_scale``: CUSA removed it (its temperatures live in the CUSA heads). Loading
accepts and drops ``logit_scale``, ``input_resolution``, ``context_length`` and ``vocab_size`` when
a checkpoint has them. Everything stays fp32, as in the official CUSA training.

Weights live in :mod:`cusa_train.students.clip_weights` (official URLs and SHA-256, ``~/.cache/clip``,
TorchScript archives read only for official hashes, the model a state dict describes).

Example:
    >>> from cusa_train.students.clip_weights import load_clip
    >>> student = load_clip("ViT-B/32")          # ~/.cache/clip/ViT-B-32.pt or the official URL
    >>> pixels = torch.stack([student.preprocess_image(open("cat.jpg", "rb").read())])
    >>> student.encode_image(pixels).shape, student.encode_text(["a cat"]).shape
    (torch.Size([1, 512]), torch.Size([1, 512]))
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cusa.errors import ConfigError
from cusa.image_transforms import clip_transform
from cusa_train.students.clip_tokenizer import VOCAB_SIZE, default_tokenizer

log = logging.getLogger(__name__)

Freeze = Literal["none", "image", "text", "both"]
_FREEZE = ("none", "image", "text", "both")

# ---- configurations and releases ----------------------------------------------------------------


@dataclass(frozen=True)
class ClipConfig:
    """Hyperparameters of one CLIP model (the arguments of the official ``CLIP`` class).

    ``vision_layers`` is an int for a ViT and four block counts for a ModifiedResNet (then
    ``vision_patch_size`` is None).
    """

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    @property
    def vision_heads(self) -> int:
        # Upstream: 64-d heads; the ResNet's attention pool works on width * 32 channels.
        return self.vision_width * 32 // 64 if self.is_resnet else self.vision_width // 64

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.is_resnet:
            d["vision_layers"] = list(self.vision_layers)  # type: ignore[arg-type]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipConfig:
        d = dict(d)
        if isinstance(d.get("vision_layers"), list | tuple):
            d["vision_layers"] = tuple(int(v) for v in d["vision_layers"])
        return cls(**d)


def _rn(embed, res, layers, width, text_width, text_heads) -> ClipConfig:
    return ClipConfig(embed, res, layers, width, None, 77, VOCAB_SIZE, text_width, text_heads, 12)


def _vit(embed, res, layers, width, patch, text_width, text_heads) -> ClipConfig:
    return ClipConfig(embed, res, layers, width, patch, 77, VOCAB_SIZE, text_width, text_heads, 12)


# What build_model infers from each released checkpoint (and open_clip's model_configs say).
CLIP_CONFIGS: dict[str, ClipConfig] = {
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B/32": _vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B/16": _vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L/14": _vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L/14@336px": _vit(768, 336, 24, 1024, 14, 768, 12),
}


# ---- modules ----------------------------------------------------------------------------------


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 activations normalise stably."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (the released weights were trained with it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an average pool after the 3x3 conv (anti-aliasing)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or in_planes != out_planes:
            # Key names "-1"/"0"/"1" are the official ones: pool, then a 1x1 conv with stride 1.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(in_planes, out_planes, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(out_planes)),
                    ]
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token queries all ``H*W`` tokens, one head per 64 channels."""

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(grid**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # (B, C, H, W) -> (HW, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1, B, C)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out.squeeze(0)  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with an average pool, anti-aliased strides, attention pooling.

    Args:
        layers: bottleneck blocks per stage, e.g. ``(3, 4, 6, 3)`` for RN50.
        output_dim: embedding size after attention pooling.
        heads: attention-pool heads (``width * 32 // 64``).
        input_resolution: image side; the pool's positional embedding has ``(side/32)**2 + 1`` rows.
        width: stem width (64 for RN50); stage ``i`` has ``width * 2**i`` planes.
    """

    def __init__(
        self,
        layers: Sequence[int],
        output_dim: int,
        heads: int,
        input_resolution: int = 224,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        in_planes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(in_planes, planes, stride)]
            in_planes = planes * Bottleneck.expansion
            stage += [Bottleneck(in_planes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first (L, B, D), as upstream
        self.ln_1 = LayerNormFp32(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNormFp32(width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        mask = attn_mask.to(dtype=x.dtype, device=x.device) if attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` over ``(L, B, width)`` sequences."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads) for _ in range(layers)]
        )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT: patch conv (no bias), class token, ``ln_pre``, blocks, ``ln_post``, ``proj``."""

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid**2 + 1, width))
        self.ln_pre = LayerNormFp32(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNormFp32(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid**2, width)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
        )  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        return self.ln_post(x[:, 0, :]) @ self.proj  # (B, output_dim)


# ---- the student ---------------------------------------------------------------------------


class ClipStudent(nn.Module):
    """An OpenAI CLIP model with the student interface; its ``state_dict()`` is the OpenAI layout.

    Build it with :func:`load_clip` (pretrained) or :func:`build_model_from_openai_state_dict`;
    the constructor gives random weights initialised as upstream does.

    Args:
        config: the architecture.
        freeze: ``"none"``, ``"image"`` (``visual.*``), ``"text"`` (everything else) or
            ``"both"``; frozen towers get ``requires_grad=False`` and stay in eval mode.

    Attributes:
        image_dim, text_dim: both ``config.embed_dim``; features are not normalised.
        weights_path, weights_sha256: where the weights came from (None for random weights).
    """

    def __init__(self, config: ClipConfig, *, freeze: Freeze = "none") -> None:
        super().__init__()
        if freeze not in _FREEZE:
            raise ConfigError(f"freeze must be one of {_FREEZE}, got {freeze!r}")
        self.config = config
        self.image_dim = self.text_dim = config.embed_dim
        self.input_resolution = config.image_resolution
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.visual: ModifiedResNet | VisionTransformer
        if config.is_resnet:
            self.visual = ModifiedResNet(
                config.vision_layers,  # type: ignore[arg-type]
                config.embed_dim,
                config.vision_heads,
                config.image_resolution,
                config.vision_width,
            )
        else:
            assert config.vision_patch_size is not None
            self.visual = VisionTransformer(
                config.image_resolution,
                config.vision_patch_size,
                config.vision_width,
                config.vision_layers,  # type: ignore[arg-type]
                config.vision_heads,
                config.embed_dim,
            )
        width = config.transformer_width
        self.transformer = Transformer(width, config.transformer_layers, config.transformer_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.ln_final = LayerNormFp32(width)
        self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))
        # (L, L) additive causal mask: -inf above the diagonal. Not persistent, so it is not a
        # state-dict key (upstream keeps it as a plain attribute).
        mask = torch.full((config.context_length, config.context_length), float("-inf"))
        self.register_buffer("attn_mask", mask.triu_(1), persistent=False)
        self._transform = None
        self.init_weights()
        self.freeze = freeze
        self._apply_freeze()
        self.train(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Upstream's random initialisation (``CLIP.initialize_parameters``)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3,
                          self.visual.layer4):  # fmt: skip
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    # -- freezing and modes -------------------------------------------------------------------

    def _text_modules(self) -> list[nn.Module]:
        return [self.transformer, self.token_embedding, self.ln_final]

    def _apply_freeze(self) -> None:
        image_frozen = self.freeze in ("image", "both")
        text_frozen = self.freeze in ("text", "both")
        self.visual.requires_grad_(not image_frozen)
        for module in self._text_modules():
            module.requires_grad_(not text_frozen)
        self.positional_embedding.requires_grad_(not text_frozen)
        self.text_projection.requires_grad_(not text_frozen)

    def train(self, mode: bool = True) -> ClipStudent:
        super().train(mode)
        # A frozen ResNet keeps its BatchNorm statistics: frozen means unchanged.
        if self.freeze in ("image", "both"):
            self.visual.eval()
        if self.freeze in ("text", "both"):
            for module in self._text_modules():
                module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    # -- image ----------------------------------------------------------------------------------

    def preprocess_image(self, data: bytes) -> Tensor:
        """Encoded image bytes -> ``(3, S, S)`` float32: CLIP's eval transform at the model's size.

        Bicubic resize of the short side, center crop, CLIP mean/std (no torchvision).

        Raises:
            SampleError: the bytes are not a decodable image.
        """
        if self._transform is None:
            self._transform = clip_transform(self.input_resolution)
        return torch.from_numpy(self._transform.from_bytes(data))

    def encode_image(self, pixels: Tensor) -> Tensor:
        """``(B, 3, S, S)`` preprocessed pixels -> ``(B, embed_dim)`` image features (unnormalised)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ConfigError(
                f"encode_image expects (B, 3, H, W) pixels from preprocess_image, got {tuple(pixels.shape)}"
            )
        return self.visual(pixels.to(self.device, self.dtype))

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Captions -> ``(B, context_length)`` int64 CLIP BPE ids (``clip.tokenize(truncate=True)``).

        Raises:
            ConfigError: ``texts`` is a single str, or this model's vocabulary is not CLIP's.
        """
        if self.vocab_size != VOCAB_SIZE:
            raise ConfigError(
                f"this CLIP has a vocabulary of {self.vocab_size} tokens, not the {VOCAB_SIZE} of "
                "the CLIP BPE tokenizer; pass token ids to encode_text instead of strings"
            )
        if len(texts) == 0:
            raise ConfigError("tokenize got an empty list of captions")
        return default_tokenizer(self.context_length)(texts)

    def encode_text(self, texts: Sequence[str] | Tensor) -> Tensor:
        """Captions or ``(B, L)`` token ids -> ``(B, embed_dim)`` text features (unnormalised).

        The feature is the final-LayerNorm output at each row's largest id (the end token), times
        ``text_projection``. Rows shorter than the context length use the first ``L`` positions.
        """
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ConfigError(
                f"encode_text expects (B, L<={self.context_length}) token ids, got {tuple(tokens.shape)}"
            )
        tokens = tokens.to(self.device, torch.long)
        n = tokens.shape[1]
        x = self.token_embedding(tokens).to(self.dtype)  # (B, L, width)
        x = x + self.positional_embedding[:n].to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask[:n, :n]).permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)  # (B, L, width)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, width)
        return eot @ self.text_projection

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
        """``(image_features, text_features)``, as CUSA's modified ``CLIP.forward``."""
        return self.encode_image(images), self.encode_text(texts)
