"""Safe image decoding and the Unicom/CLIP and ImageNet transforms, with PIL and numpy only.

No torchvision: :class:`ImageTransform` reproduces ``Resize(n, bicubic) -> CenterCrop(n) ->
ToTensor -> Normalize`` exactly (torchvision's ``Resize`` on a PIL image calls PIL's own resize),
which ``tests/extract/test_teachers_preprocess.py`` checks against the official golden output.

Decoding policy (:func:`decode_image`), every failure is a :class:`cusa.errors.SampleError` for
that one sample:

- zero bytes, bytes PIL cannot identify, truncated or corrupt files: error. Truncated JPEGs are
  *not* silently padded (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off).
- more than ``max_pixels`` pixels (PIL's decompression-bomb limit by default): error, decided from
  the header before any pixel is decoded.
- greyscale, palette, CMYK, YCbCr: converted to RGB with PIL's ``convert("RGB")`` (CMYK without
  colour management, as the official pipeline does).
- 16-bit / 32-bit integer greyscale (``I;16``, ``I``): scaled to 8 bits (``/257``), then RGB.
- alpha (RGBA, LA, PA, palette with transparency): ``alpha="drop"`` (default) discards the alpha
  channel like the official CUSA loader's ``Image.open(p).convert("RGB")``; ``alpha="white"``
  composites onto white instead. The choice is recorded in the teacher spec.
- EXIF orientation is not applied, as in the official pipeline.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, SampleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AlphaPolicy = Literal["drop", "white"]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def default_max_pixels() -> int:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), about 89 megapixels."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def decode_image(
    data: bytes, *, alpha: AlphaPolicy = "drop", max_pixels: int | None = None
) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, or fail this one sample.

    Args:
        data: the encoded file (JPEG, PNG, ...).
        alpha: ``"drop"`` the alpha channel or composite onto ``"white"``.
        max_pixels: refuse images with more pixels; default :func:`default_max_pixels`.

    Returns:
        A fully loaded ``RGB`` image.

    Raises:
        SampleError: empty, not an image, truncated/corrupt, or too large.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SampleError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise SampleError("empty image file (0 bytes)")
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit and raises above 2x; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            w, h = img.size
            if w * h > limit:
                raise SampleError(
                    f"image is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
                    "(decompression-bomb guard); raise max_pixels if this image is genuine"
                )
            img.load()
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError(f"image refused by the decompression-bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise SampleError(
            f"not a recognised image file ({len(data)} bytes starting {bytes(data[:8])!r})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise SampleError(f"corrupt or truncated image: {exc}") from exc
    return to_rgb(img, alpha=alpha)


def to_rgb(img: Image.Image, *, alpha: AlphaPolicy = "drop") -> Image.Image:
    """Convert any PIL mode to RGB following the module's documented policy."""
    if alpha not in ("drop", "white"):
        raise ConfigError(f"alpha policy must be 'drop' or 'white', got {alpha!r}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit range -> 8-bit; 32-bit "I" images from PNG hold 16-bit values too.
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info)
    if has_alpha and alpha == "white":
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, center-crop, scale to [0, 1] and normalise; JSON-serialisable.

    Args:
        name: a label recorded in specs, e.g. ``"clip"`` or ``"imagenet"``.
        resize: target length of the short side (torchvision ``Resize(int)``).
        crop: side of the square center crop.
        interpolation: ``"bicubic"``, ``"bilinear"``, ``"nearest"`` or ``"lanczos"`` (PIL filters).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        alpha: alpha policy used by :meth:`from_bytes` (see :func:`to_rgb`).
    """

    name: str
    resize: int
    crop: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    alpha: str = "drop"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(
                f"interpolation {self.interpolation!r} unknown; use one of {sorted(_RESAMPLE)}"
            )
        if self.crop > self.resize:
            raise ConfigError(f"crop {self.crop} is larger than resize {self.resize}")
        if self.alpha not in ("drop", "white"):
            raise ConfigError(f"alpha policy must be 'drop' or 'white', got {self.alpha!r}")

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> ``(3, crop, crop)`` float32 array."""
        img = to_rgb(img, alpha=self.alpha)  # type: ignore[arg-type]
        img = self._resize(img)
        img = self._center_crop(img)
        # ToTensor: uint8 HWC -> float32 CHW / 255 ; Normalize: (x - mean) / std, all float32.
        x = np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def from_bytes(self, data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
        """Decode (see :func:`decode_image`) and transform; raises SampleError for a bad image."""
        return self(decode_image(data, alpha=self.alpha, max_pixels=max_pixels))  # type: ignore[arg-type]

    def _resize(self, img: Image.Image) -> Image.Image:
        # torchvision Resize(int): short side -> `resize`, long side -> int(resize * long / short).
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), _RESAMPLE[self.interpolation])

    def _center_crop(self, img: Image.Image) -> Image.Image:
        # torchvision CenterCrop: top/left = int(round((size - crop) / 2)).
        w, h = img.size
        top = int(round((h - self.crop) / 2.0))
        left = int(round((w - self.crop) / 2.0))
        return img.crop((left, top, left + self.crop, top + self.crop))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["steps"] = [
            f"decode(alpha={self.alpha})",
            "convert(RGB)",
            f"resize_short_side({self.resize}, {self.interpolation})",
            f"center_crop({self.crop})",
            "to_float(/255)",
            "normalize(mean, std)",
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTransform:
        fields = {k: d[k] for k in ("name", "resize", "crop", "interpolation", "alpha") if k in d}
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), **fields)  # type: ignore[arg-type]


def clip_transform(n_px: int = 224, *, alpha: AlphaPolicy = "drop") -> ImageTransform:
    """The official Unicom/CLIP transform: bicubic resize to ``n_px``, crop ``n_px``, CLIP mean/std."""
    return ImageTransform("clip", n_px, n_px, "bicubic", CLIP_MEAN, CLIP_STD, alpha)


def imagenet_transform(crop: int = 224, *, alpha: AlphaPolicy = "drop") -> ImageTransform:
    """The standard ImageNet eval transform: bilinear resize to ``crop/0.875``, crop, ImageNet mean/std."""
    return ImageTransform(
        "imagenet", int(round(crop / 0.875)), crop, "bilinear", IMAGENET_MEAN, IMAGENET_STD, alpha
    )


@dataclass(frozen=True)
class ImagePreparer:
    """The picklable ``prepare`` half of an image teacher: bytes -> transformed array, no weights.

    Runners ship it to CPU read workers so the model never travels with the data.
    """

    transform: ImageTransform
    max_pixels: int | None = None

    def prepare(self, item: bytes) -> np.ndarray:
        """Image bytes -> ``(3, crop, crop)`` float32. Raises SampleError for a bad image."""
        if not isinstance(item, bytes | bytearray | memoryview):
            raise SampleError(f"expected encoded image bytes, got {type(item).__name__}")
        return self.transform.from_bytes(bytes(item), max_pixels=self.max_pixels)
