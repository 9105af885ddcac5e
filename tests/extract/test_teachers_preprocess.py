"""Image decoding policy and the Unicom/CLIP transform against the official golden output."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cusa.errors import ConfigError, SampleError
from cusa.image_transforms import (
    ImagePreparer,
    ImageTransform,
    clip_transform,
    decode_image,
    imagenet_transform,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IMAGES = FIXTURES / "unicom_preprocess_images"


@pytest.fixture(scope="module")
def real_jpeg() -> bytes:
    return (IMAGES / "COCO_val2014_000000293537.jpg").read_bytes()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_preprocess_matches_official_golden():
    with np.load(FIXTURES / "unicom_preprocess_golden.npz", allow_pickle=False) as golden:
        assert len(golden.files) == 3
        t = clip_transform(224)
        for name in golden.files:
            ours = t.from_bytes((IMAGES / name).read_bytes())
            assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
            np.testing.assert_allclose(ours, golden[name], atol=1e-6, rtol=0)


def test_transform_serialises_and_round_trips():
    t = clip_transform(336)
    d = t.to_dict()
    assert (
        d["resize"] == 336
        and d["interpolation"] == "bicubic"
        and d["mean"][0] == pytest.approx(0.48145466)
    )
    assert ImageTransform.from_dict(d) == t
    assert imagenet_transform().to_dict()["resize"] == 256


def test_transform_rejects_bad_options():
    with pytest.raises(ConfigError, match="interpolation 'cubic' unknown"):
        ImageTransform("x", 224, 224, "cubic")
    with pytest.raises(ConfigError, match="crop 300 is larger than resize 224"):
        ImageTransform("x", 224, 300)


def test_resize_short_side_and_center_crop_on_wide_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 300, 3), dtype=np.uint8))
    out = clip_transform(224)(img)
    assert out.shape == (3, 224, 224)


def test_truncated_jpeg_is_a_sample_error(real_jpeg):
    with pytest.raises(SampleError, match="corrupt or truncated"):
        decode_image(real_jpeg[: len(real_jpeg) // 2])


def test_zero_bytes_is_a_sample_error():
    with pytest.raises(SampleError, match="empty image file"):
        decode_image(b"")


def test_random_bytes_are_a_sample_error():
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(SampleError, match="not a recognised image"):
        decode_image(junk)


def test_text_file_is_a_sample_error():
    with pytest.raises(SampleError, match="not a recognised image"):
        decode_image(b"<html>not an image</html>")


def test_decompression_bomb_is_refused_from_the_header():
    # A real 1x1 PNG whose header claims 20000x20000 would be huge; simpler: a genuine small PNG
    # and a limit below its size, plus a real oversized (but cheap, highly compressible) image.
    small = _encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(SampleError, match="decompression-bomb guard"):
        decode_image(small, max_pixels=1000)
    big = _encode(Image.new("L", (12000, 8000)), "PNG")  # 96 MP > PIL's default ~89 MP
    with pytest.raises(SampleError, match="decompression-bomb"):
        decode_image(big)


def test_greyscale_is_converted():
    img = decode_image(_encode(Image.new("L", (40, 30), 77), "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_cmyk_jpeg_is_converted():
    img = decode_image(_encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red


def test_16bit_png_is_scaled_not_clipped():
    arr = np.full((20, 20), 32768, dtype=np.uint16)
    img = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (128, 128, 128)  # 32768 / 257 = 127.5 -> 128, not 255


def test_alpha_png_drop_and_white_policies():
    rgba = Image.new("RGBA", (10, 10), (10, 20, 30, 0))  # fully transparent dark pixel
    data = _encode(rgba, "PNG")
    assert decode_image(data).getpixel((0, 0)) == (10, 20, 30)  # alpha dropped, like convert("RGB")
    assert decode_image(data, alpha="white").getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ConfigError, match="alpha policy"):
        decode_image(data, alpha="black")  # type: ignore[arg-type]


def test_palette_png_with_transparency_is_converted():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
    data = _encode(p, "PNG", transparency=0)
    assert decode_image(data).mode == "RGB"
    assert decode_image(data, alpha="white").getpixel((0, 0)) == (255, 255, 255)


def test_not_bytes_is_a_sample_error():
    with pytest.raises(SampleError, match="must be bytes"):
        decode_image("a/path.jpg")  # type: ignore[arg-type]


def test_preparer_is_picklable_and_equal_to_transform(real_jpeg):
    prep = ImagePreparer(clip_transform(224))
    clone = pickle.loads(pickle.dumps(prep))
    np.testing.assert_array_equal(
        clone.prepare(real_jpeg), clip_transform(224).from_bytes(real_jpeg)
    )
    with pytest.raises(SampleError, match="expected encoded image bytes"):
        prep.prepare(None)  # type: ignore[arg-type]
