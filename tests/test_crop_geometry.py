"""The prep's crops are timm's: eval = timm's eval transform, train = timm's RandomResizedCrop (with the
per-image seeding of ImageTransform), so no hand-written geometry needs its own proof."""
from __future__ import annotations

import io
import random
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_io.prep import ImagePrep, ImageTransform, crop_box


def _normalized(prep: ImagePrep, train: bool, batch: dict, **kw) -> np.ndarray:
    pixels = ImageTransform(prep, train=train, num_classes=3, **kw)(batch)["image"]
    return prep.resolve().norm()(torch.from_numpy(pixels)).numpy()

SIZES = [(90, 60), (64, 64), (33, 77), (120, 45), (41, 40)]


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")  # PNG: no JPEG draft decoding, so the inputs are identical
    return out.getvalue()


def _batch() -> dict:
    return {"image": np.array([_png(w, h, i) for i, (w, h) in enumerate(SIZES)], dtype=object),
            "image_id": np.array([f"img{i}" for i in range(len(SIZES))], dtype=object)}


@pytest.mark.parametrize("interpolation,crop_pct", [("bicubic", None), ("bilinear", 0.9), ("bicubic", 1.0)])
def test_eval_path_equals_timms_eval_transform(interpolation, crop_pct):
    from timm.data import DEFAULT_CROP_PCT, create_transform

    batch = _batch()
    ours = _normalized(ImagePrep(size=32, interpolation=interpolation, crop_pct=crop_pct), False, batch)
    timm_eval = create_transform(32, is_training=False, interpolation=interpolation,
                                 crop_pct=crop_pct or DEFAULT_CROP_PCT)
    for i, data in enumerate(batch["image"]):
        expected = timm_eval(Image.open(io.BytesIO(data)).convert("RGB"))
        torch.testing.assert_close(torch.from_numpy(ours[i]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [(0.5, 1.0), (0.08, 1.0)])
def test_train_crop_is_timms_random_resized_crop_seeded_per_image(scale):
    """augment='basic' = timm's RandomResizedCropAndInterpolation on ``random`` seeded by the image's
    own generator, then a flip drawn from that generator; the normalisation is timm's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import functional as F

    batch = _batch()
    ours = _normalized(ImagePrep(size=24, scale=scale), True, batch, seed=5)
    crop = RandomResizedCropAndInterpolation(24, scale=scale, interpolation="bicubic")
    for i, data in enumerate(batch["image"]):
        rng = np.random.default_rng([5, zlib.crc32(f"img{i}".encode())])
        random.seed(int(rng.integers(2**31)))
        img = crop(Image.open(io.BytesIO(data)).convert("RGB"))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected = F.normalize(F.to_tensor(img), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        torch.testing.assert_close(torch.from_numpy(ours[i]), expected, rtol=0, atol=1e-5)


def test_crop_box_depends_only_on_the_images_generator_and_leaves_global_state():
    state = random.getstate(), np.random.get_state()[1].copy()
    boxes = [crop_box((300, 200), np.random.default_rng(7), scale=(0.08, 1.0)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    left, top, right, bottom = boxes[0]
    assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])


def test_a_tiny_image_never_gets_an_empty_crop():
    for seed in range(50):
        left, top, right, bottom = crop_box((2, 1), np.random.default_rng(seed), scale=(0.08, 1.0))
        assert right > left and bottom > top
