"""prepare_image: every kind of bad file is rejected with its reason; every mode becomes RGB."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from datasets_io.images import BadImage, decode_image, prepare_image


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, the reason prepare_image must give). Also used by test_ingest."""
    jpeg = encode(noise(64, 48), "JPEG")
    png = encode(noise(32, 32), "PNG")
    idat = png.index(b"IDAT") + 8
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt.png": (png[:idat] + bytes(b ^ 0xFF for b in png[idat:idat + 32]) + png[idat + 32:], "corrupt"),
        "notes.jpg": (b"shopping list: eggs, milk\n" * 20, "not an image"),
        # 20000 x 20000 1-bit PNG: 48 kB on disk, 400 megapixels declared in the header
        "bomb.png": (encode(Image.new("1", (20000, 20000)), "PNG"), "decompression bomb"),
    }


@pytest.fixture(scope="module")
def bad_cases() -> dict[str, tuple[bytes, str]]:
    return bad_files()


@pytest.mark.parametrize("name", ["empty.jpg", "truncated.jpg", "corrupt.png", "notes.jpg", "bomb.png"])
def test_bad_file_is_rejected_with_reason(bad_cases, name):
    data, reason = bad_cases[name]
    with pytest.raises(BadImage) as info:
        prepare_image(data)
    assert info.value.reason.split(":")[0] == reason


def test_truncated_by_a_few_bytes_is_caught():
    jpeg = encode(noise(64, 64), "JPEG")
    with pytest.raises(BadImage, match="truncated"):
        prepare_image(jpeg[:-8])  # missing only the end marker and a little data


def test_pixel_bound_is_read_from_header_and_configurable():
    data = encode(noise(100, 50), "PNG")
    with pytest.raises(BadImage, match=r"decompression bomb: 100x50 exceeds 4999 pixels"):
        prepare_image(data, max_pixels=4999)
    assert decode_image(prepare_image(data, max_pixels=5000)).shape == (50, 100, 3)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = red, 1 = blue (transparent)
    img.paste(1, (0, 0, 4, 8))
    return img


# (image, format, save options, expected RGB of pixel (0, 0), expected RGB of the last pixel)
MODES = {
    "RGB": (Image.new("RGB", (8, 8), (10, 200, 30)), "JPEG", {}, (10, 200, 30), (10, 200, 30)),
    "CMYK": (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", {}, (0, 255, 255), (0, 255, 255)),
    "RGBA": (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG", {}, (255, 255, 255), (255, 255, 255)),
    "LA": (Image.new("LA", (8, 8), (0, 128)), "PNG", {}, (127, 127, 127), (127, 127, 127)),
    "P+transparency": (_palette_with_transparency(), "PNG", {"transparency": 1}, (255, 255, 255), (255, 0, 0)),
    "P": (_palette_with_transparency(), "PNG", {}, (0, 0, 255), (255, 0, 0)),
    "I;16": (Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG", {}, (255, 255, 255), (255, 255, 255)),
    "I": (Image.fromarray(np.full((8, 8), 32896, np.int32)), "TIFF", {}, (128, 128, 128), (128, 128, 128)),
    "F": (Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF", {}, (128, 128, 128), (128, 128, 128)),
    "L": (Image.new("L", (8, 8), 100), "PNG", {}, (100, 100, 100), (100, 100, 100)),
    "1": (Image.new("1", (8, 8), 1), "PNG", {}, (255, 255, 255), (255, 255, 255)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_becomes_rgb_with_right_colours(mode):
    img, fmt, options, first, last = MODES[mode]
    data = encode(img, fmt, **options)
    assert Image.open(io.BytesIO(data)).mode == mode.split("+")[0]
    pixels = decode_image(prepare_image(data))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[0, 0], first, atol=6)  # JPEG re-encoding is lossy
    np.testing.assert_allclose(pixels[-1, -1], last, atol=6)
    assert Image.open(io.BytesIO(prepare_image(data))).format == "JPEG"


def test_wide_samples_are_scaled_not_clipped():
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1)))
    gray = decode_image(prepare_image(encode(ramp, "PNG")))[:, :, 0].astype(int)
    assert abs(gray[1, 0]) <= 4 and abs(gray[1, -1] - 255) <= 4 and abs(gray[1, 32] - 130) <= 6


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    pixels = decode_image(prepare_image(encode(img, "JPEG", exif=exif)))
    assert pixels.shape == (40, 20, 3)  # portrait once oriented
    assert pixels[2, 10, 0] > 200 and pixels[-3, 10, 2] > 200  # red on top, blue at the bottom


@pytest.mark.parametrize("size, max_side, expected", [
    ((1000, 500), 256, (256, 128)),    # landscape: longer side exactly max_side
    ((300, 600), 256, (128, 256)),     # portrait
    ((2000, 1000), 100, (100, 50)),    # large JPEG: decoded at reduced scale first
    ((1001, 333), 256, (256, 85)),     # aspect kept with rounding
    ((100, 50), 256, (100, 50)),       # never upscaled
])
def test_resize_longer_side(size, max_side, expected):
    data = encode(noise(*size), "JPEG")
    pixels = decode_image(prepare_image(data, max_side=max_side))
    assert (pixels.shape[1], pixels.shape[0]) == expected


def test_resize_keeps_content():
    img = Image.new("RGB", (400, 200), (255, 0, 0))
    img.paste((0, 255, 0), (200, 0, 400, 200))  # right half green
    pixels = decode_image(prepare_image(encode(img, "PNG"), max_side=64)).astype(int)
    assert pixels.shape == (32, 64, 3)
    assert pixels[16, 8, 0] > 230 and pixels[16, 8, 1] < 30
    assert pixels[16, 56, 1] > 230 and pixels[16, 56, 0] < 30


def test_bad_max_side_is_a_value_error():
    with pytest.raises(ValueError, match="max_side"):
        prepare_image(encode(noise(8, 8), "PNG"), max_side=0)
