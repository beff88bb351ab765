"""validate_image (the ingest's --max-side 0): the checks of prepare_image, the file's own bytes kept."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets_io.images import BadImage, prepare_image, validate_image
from test_images import bad_files, encode, noise

BAD = bad_files()  # made once: the bomb is a 20000 x 20000 PNG


@pytest.mark.parametrize("data", [
    encode(noise(640, 480), "JPEG", quality=95),
    encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"),
    encode(Image.new("CMYK", (30, 50), (0, 255, 0, 0)), "JPEG"),
    encode(Image.fromarray(np.full((20, 20), 30000, np.uint16)), "PNG"),
], ids=["jpeg", "rgba-png", "cmyk-jpeg", "gray16-png"])
def test_a_good_file_comes_back_byte_for_byte(data):
    assert validate_image(data) is data


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_file_is_rejected_for_the_same_reason_as_by_prepare_image(name):
    data, reason = BAD[name]
    with pytest.raises(BadImage) as kept:
        validate_image(data)
    with pytest.raises(BadImage) as prepared:
        prepare_image(data)
    assert kept.value.reason.split(":")[0] == prepared.value.reason.split(":")[0] == reason


def test_the_pixel_bound_applies():
    with pytest.raises(BadImage, match=r"decompression bomb: 100x50 exceeds 4999 pixels"):
        validate_image(encode(noise(100, 50), "PNG"), max_pixels=4999)
