"""How images are prepared, defined once: :class:`ImagePrep` and everything built from it. No Ray.

One frozen dataclass (a stage recipe's ``prep`` section) holds the image size, the normalisation,
the interpolation, the evaluation crop fraction, the stored max side, the training augmentation
policy (crop scale and ratio, flip, RandAugment, repeated augmentation) and where training images
are decoded. From it come, sharing one definition of the crop (:func:`crop_box`) and of the policy:

* :meth:`ImagePrep.batch_transform` -- the Ray Data batch step: :class:`ImageTransform` (decode +
  crop + augment on the CPU, uint8 NCHW out) or, for training with ``decode="device"``,
  :class:`ImageBytes` (the stored bytes, passed through);
* :meth:`ImagePrep.device_pipeline` -- :class:`DeviceImagePipeline`, the same crop and policy on
  ``torchvision.transforms.v2`` ops on the worker's device (nvJPEG on a GPU);
* :meth:`ImagePrep.norm` -- :class:`ImageNorm`, the one normalisation (uint8 -> float on the
  device), used by training, evaluation, predict and the MLflow model alike.

The CPU path runs timm's RandAugment on PIL images (the published SER30K recipe is timm's); the
device path runs torchvision's (no magnitude noise, bilinear rotations): the policy string is the
same, the two implementations differ.
"""
from __future__ import annotations

import io
import math
import random
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from datasets_io.errors import DataError
from datasets_io.shards import targets

__all__ = ["ImagePrep", "ImageTransform", "ImageBytes", "ImageNorm", "DeviceImagePipeline", "crop_box",
           "image_seed", "DEFAULT_MAX_SIDE"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}
DEFAULT_RANDAUGMENT = "rand-m9-mstd0.5"
DEFAULT_MAX_SIDE = 512


@dataclass(frozen=True)
class ImagePrep:
    """How a stage's images are prepared (a recipe's ``prep`` section).

    ``mean``, ``std``, ``interpolation`` and ``crop_pct`` left None take the backbone's
    ``pretrained_cfg`` (:meth:`resolve`), then timm's ImageNet defaults. ``max_side``: the longer side
    images were stored at by the ingest (0: the original files, as the published codes read them);
    predict shrinks new images the same way. Training: RandomResizedCrop (``scale``, ``ratio``; timm's
    sampling), a horizontal flip with probability ``hflip``, RandAugment ``auto_augment`` when
    ``augment="randaugment"`` (``"none"``: the evaluation transform), DeiT's repeated augmentation
    ``repeated_aug`` times. Evaluation: resize the shorter side to ``floor(size / crop_pct)``, centre
    crop ``size``. ``val_augment``: dataset layouts whose validation split takes the *training*
    transform (the published two-stage code validates on ``random_split``s of its train-mode Emotion6
    and LDL datasets). ``decode``: where training images are decoded and augmented.
    """

    size: int = 224
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    interpolation: Optional[Literal["bicubic", "bilinear", "nearest"]] = None
    crop_pct: Optional[float] = None
    max_side: int = DEFAULT_MAX_SIDE
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    augment: Literal["basic", "randaugment", "none"] = "basic"
    auto_augment: str = DEFAULT_RANDAUGMENT
    repeated_aug: int = 1
    val_augment: tuple[str, ...] = ()
    decode: Literal["cpu", "device"] = "cpu"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, not {self.size}")
        if self.max_side < 0:
            raise ValueError(f"max_side must be >= 0 (0: the original files), not {self.max_side}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], not {self.crop_pct}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, not {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, not {list(self.ratio)}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must lie in [0, 1], not {self.hflip}")
        if self.repeated_aug < 1:
            raise ValueError(f"repeated_aug must be >= 1, not {self.repeated_aug}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} needs 3 values, got {list(value)}")

    def resolve(self, defaults: Optional[dict] = None) -> "ImagePrep":
        """Every None filled: from ``defaults`` (a backbone's data config: ``mean``, ``std``,
        ``interpolation``, ``crop_pct``), then timm's ImageNet values, bicubic and 0.875."""
        from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        base = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic",
                "crop_pct": DEFAULT_CROP_PCT, **(defaults or {})}
        filled = {k: (tuple(base[k]) if k in ("mean", "std") else base[k]) for k in base
                  if k in ("mean", "std", "interpolation", "crop_pct") and getattr(self, k) is None}
        return replace(self, **filled)

    @property
    def eval_short_side(self) -> int:
        """The shorter side evaluation resizes to before the centre crop."""
        return math.floor(self.size / (self.crop_pct or 0.875))

    def norm(self) -> "ImageNorm":
        return ImageNorm(self.mean, self.std)

    def validates_like_training(self, layout: Optional[str]) -> bool:
        """Whether the validation split of a dataset of ``layout`` takes the training transform."""
        return layout in self.val_augment

    def batch_transform(self, *, train: bool, num_classes: int, keep_text: bool = False,
                        seed: Optional[int] = None):
        """The Ray Data batch step for a split: :class:`ImageTransform`, or :class:`ImageBytes` for
        training with ``decode="device"`` (the worker decodes)."""
        if train and self.decode == "device":
            return ImageBytes(num_classes, keep_text=keep_text)
        return ImageTransform(self, train=train, num_classes=num_classes, seed=seed, keep_text=keep_text)

    def device_pipeline(self, device, seed: int) -> Optional["DeviceImagePipeline"]:
        """The worker-side training transform for ``decode="device"`` (None for ``decode="cpu"``)."""
        return DeviceImagePipeline(self, train=True, device=device, seed=seed) if self.decode == "device" else None


# ----------------------------------------------------------------------------- the crop, once

def crop_box(size: tuple[int, int], rng: np.random.Generator, scale: Sequence[float] = (0.08, 1.0),
             ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(left, top, right, bottom)`` of an image of ``size = (w, h)``.

    The sampling is timm's ``RandomResizedCropAndInterpolation.get_params`` (torchvision's rule: ten
    tries of area and log-ratio, then a centre crop), run on Python's ``random`` seeded from ``rng``:
    one draw of ``rng`` per image, so the box depends on the image's own generator only.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation

    image = Image.new("1", tuple(size))  # only its size is read
    with _global_random_seeded(int(rng.integers(2**31))):
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(image, tuple(scale), tuple(ratio))
    if height < 1 or width < 1:  # a tiny image (a few pixels) can round to an empty crop: take it whole
        return 0, 0, size[0], size[1]
    return left, top, left + width, top + height


@contextmanager
def _global_random_seeded(seed: int) -> Iterator[None]:
    """Seed ``random`` and ``np.random`` (timm's RandAugment draws from them), then restore."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ----------------------------------------------------------------------------- the CPU path

class ImageTransform:
    """Decode + crop + augment a batch of shard rows on the CPU into fixed-shape numpy arrays.

    For ``ds.map_batches(...)`` and for :func:`datasets_io.shards.iter_local_batches`. Output keys:
    ``image`` uint8 (N, 3, S, S) pixels, not normalised (the consumer normalises on its device with
    :class:`ImageNorm`, so only uint8 travels through the object store), the dense targets of
    :func:`datasets_io.shards.targets`, and ``text`` (object array of str) only when ``keep_text``.

    Randomness: each image draws from its own ``np.random.default_rng``. With ``seed`` it is seeded
    by ``(seed, crc32(image_id[#repeat]))``, so results do not depend on batching or on the worker;
    pass ``seed + epoch`` to vary augmentations across epochs. Without a seed, fresh OS entropy per
    batch (so the pickled copies on Ray workers differ, and so do the copies of a repeated row).
    """

    def __init__(self, prep: ImagePrep, *, train: bool, num_classes: int, seed: Optional[int] = None,
                 keep_text: bool = False) -> None:
        from timm.data.auto_augment import rand_augment_transform

        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.prep = prep.resolve()
        self.train = bool(train) and self.prep.augment != "none"
        self.num_classes = int(num_classes)
        self.seed = seed
        self.keep_text = keep_text
        self._randaugment = None
        if self.train and self.prep.augment == "randaugment":
            # As timm's create_transform: geometric ops use the training interpolation.
            hparams = {"translate_const": int(self.prep.size * 0.45),
                       "img_mean": tuple(round(255 * m) for m in self.prep.mean),
                       "interpolation": _RESAMPLE[self.prep.interpolation]}
            self._randaugment = rand_augment_transform(self.prep.auto_augment, hparams)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.prep.size}, train={self.train}, seed={self.seed})"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        ids = batch.get("image_id")
        repeats = batch.get("repeat")
        batch_rng = np.random.default_rng() if self.seed is None else None
        size = self.prep.size
        pixels = np.empty((n, size, size, 3), dtype=np.uint8)
        for i, data in enumerate(images):
            if data is None:
                raise DataError("ImageTransform: a row has no image bytes (not an ingest shard?)")
            key = str(ids[i]) if ids is not None else str(i)
            if repeats is not None:
                key = f"{key}#{int(repeats[i])}"
            rng = batch_rng if batch_rng is not None else np.random.default_rng(
                [self.seed, zlib.crc32(key.encode("utf-8"))])
            pixels[i] = self._one(bytes(data), rng)
        out = {"image": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))}  # NHWC -> NCHW, uint8
        out.update(targets(batch, n, self.num_classes))
        if self.keep_text:
            out["text"] = _texts(batch, n)
        return out

    def _one(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        """One image: decode, geometric transform (+ RandAugment), as HxWx3 uint8."""
        p = self.prep
        with Image.open(io.BytesIO(data)) as img:
            if not self.train:
                short = p.eval_short_side
                if p.max_side:  # stored by the ingest: decode at a reduced JPEG scale when that is enough
                    img.draft("RGB", (short, short))   # (originals are decoded in full, as published)
                img = _resize_center_crop(img.convert("RGB"), short, p.size, p.interpolation)
            else:
                img = img.convert("RGB")
                box = crop_box(img.size, rng, p.scale, p.ratio)
                img = _resized_crop(img, box, p.size, p.interpolation)
                if rng.random() < p.hflip:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                if self._randaugment is not None:
                    with _global_random_seeded(int(rng.integers(2**31))):
                        img = self._randaugment(img)
        return np.asarray(img, dtype=np.uint8)


def _resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int, interpolation: str) -> Image.Image:
    """Crop ``box`` and resize it to size x size: torchvision's ``resized_crop``, as timm's training crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    left, top, right, bottom = box
    return F.resized_crop(img, top, left, bottom - top, right - left, [size, size], InterpolationMode(interpolation))


def _resize_center_crop(img: Image.Image, short: int, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize the shorter side to ``short`` (aspect kept), then take the centred size x size:
    torchvision's ``resize`` + ``center_crop``, i.e. timm's eval transform."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    return F.center_crop(F.resize(img, short, InterpolationMode(interpolation)), [size, size])


def _texts(batch: dict[str, Any], n: int) -> np.ndarray:
    text = batch.get("text")
    return np.array(["" if text is None or text[i] is None else str(text[i]) for i in range(n)], dtype=object)


class ImageBytes:
    """The ``decode="device"`` training batch step: the stored image bytes (not decoded) plus dense targets.

    Output keys: ``image`` (object array of bytes), ``image_id`` (object array of str), ``repeat``
    (int64, 0 without repeated augmentation), the targets, and ``text`` when ``keep_text``. The
    training worker decodes and augments on its device (:class:`DeviceImagePipeline`).
    """

    def __init__(self, num_classes: int, keep_text: bool = False):
        self.num_classes = int(num_classes)
        self.keep_text = keep_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        ids = batch.get("image_id")
        repeats = batch.get("repeat")
        out = {"image": np.array([None if d is None else bytes(d) for d in images] + [None], dtype=object)[:n],
               "image_id": np.array([str(ids[i]) if ids is not None else str(i) for i in range(n)], dtype=object),
               "repeat": np.zeros(n, np.int64) if repeats is None else np.asarray(repeats, dtype=np.int64)}
        out.update(targets(batch, n, self.num_classes))
        if self.keep_text:
            out["text"] = _texts(batch, n)
        return out


# ----------------------------------------------------------------------------- normalisation

class ImageNorm:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` (channels_last on request), on the tensor's device.

    ``mean`` / ``std`` default to timm's ImageNet values. Float input is taken as already normalised
    (it is only given the memory format).
    """

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.mean = tuple(float(m) for m in (IMAGENET_DEFAULT_MEAN if mean is None else mean))
        self.std = tuple(float(s) for s in (IMAGENET_DEFAULT_STD if std is None else std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean}, {self.std}")
        self._consts: dict = {}

    def __repr__(self) -> str:
        return f"ImageNorm(mean={self.mean}, std={self.std})"

    def _constants(self, device):
        import torch

        key = str(device)
        if key not in self._consts:
            self._consts[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                                      for v in (self.mean, self.std))
        return self._consts[key]

    def __call__(self, images, channels_last: bool = False):
        import torch

        fmt = torch.channels_last if channels_last and images.dim() == 4 else torch.contiguous_format
        if images.dtype != torch.uint8:
            return images.contiguous(memory_format=fmt)
        mean, std = self._constants(images.device)
        x = images.to(dtype=torch.float32, memory_format=fmt)
        return x.div_(255.0).sub_(mean).div_(std)


# ----------------------------------------------------------------------------- the device path

def image_seed(seed: int, epoch: int, image_id: str, repeat: int = 0) -> int:
    """A 63-bit seed from ``(seed, epoch, crc32(image_id), repeat)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), zlib.crc32(str(image_id).encode("utf-8")),
                                    int(repeat)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _randaugment_args(policy: str) -> tuple[int, int]:
    """(num_ops, magnitude) of a timm policy string ``rand-m9-n2-mstd0.5-inc1`` (torchvision's
    RandAugment has no magnitude noise or increasing variant: those parts are not used)."""
    num_ops, magnitude = 2, 9
    for part in policy.split("-")[1:]:
        if part.startswith("mstd") or part.startswith("inc"):
            continue
        if part.startswith("m") and part[1:].isdigit():
            magnitude = int(part[1:])
        elif part.startswith("n") and part[1:].isdigit():
            num_ops = int(part[1:])
    return num_ops, magnitude


class DeviceImagePipeline:
    """Decode image bytes and augment them on ``device`` with ``torchvision.transforms.v2`` ops.

    Train: :func:`crop_box` (the CPU path's crop), a flip with probability ``hflip``, and
    ``v2.RandAugment`` (num_ops and magnitude from the policy; torchvision's ops, not timm's) when
    ``augment == "randaugment"``. Eval: resize the shorter side to ``floor(S / crop_pct)``, centre
    crop S. Output: uint8 (N, 3, S, S) on ``device``, normalised later by :class:`ImageNorm`.
    JPEGs are decoded in one batched ``decode_jpeg`` call (nvJPEG on a GPU); other formats (stored
    originals) with ``decode_image``. Randomness per image from :func:`image_seed`
    ``(seed, epoch, image_id, repeat)``: reproducible, different across epochs, independent of batching.
    """

    def __init__(self, prep: ImagePrep, *, train: bool, device="cpu", seed: int = 0):
        import torch
        from torchvision.transforms import InterpolationMode

        self.prep = prep.resolve()
        self.train = bool(train) and self.prep.augment != "none"
        self.device = torch.device(device)
        self.interpolation = InterpolationMode(self.prep.interpolation)
        self.seed = int(seed)
        self._randaugment = None
        if self.train and self.prep.augment == "randaugment":
            from torchvision.transforms import v2

            num_ops, magnitude = _randaugment_args(self.prep.auto_augment)
            # Tensor rotations/affines support nearest and bilinear only: bicubic becomes bilinear here.
            # Exposed areas are filled with the mean colour, as timm's RandAugment does.
            geometric = self.interpolation if self.interpolation in (InterpolationMode.NEAREST,
                                                                      InterpolationMode.BILINEAR) \
                else InterpolationMode.BILINEAR
            fill = [round(255 * m) for m in self.prep.mean]
            self._randaugment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=geometric,
                                               fill=fill)

    def decode(self, data: Sequence[Any]) -> tuple[list, int]:
        """Decoded uint8 (3, H, W) tensors on the device (None where the bytes failed) and the failure count.

        One batched ``decode_jpeg`` call; when it raises (one bad image fails the whole call), each
        image is decoded on its own and the failures are skipped."""
        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        raw = [torch.frombuffer(bytearray(bytes(d)), dtype=torch.uint8) if d is not None and len(d) else None
               for d in data]
        if raw and all(r is not None for r in raw):
            try:
                return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)), 0
            except (RuntimeError, ValueError):
                pass
        out = []
        for r in raw:
            try:
                out.append(None if r is None else decode_image(r, mode=ImageReadMode.RGB).to(self.device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out, sum(o is None for o in out)

    def __call__(self, data: Sequence[Any], image_ids: Optional[Sequence[Any]], *, epoch: int = 0,
                 repeats: Optional[Sequence[int]] = None):
        """``(images uint8 (M, 3, S, S) on the device, kept row indices (M,), skipped count)``."""
        import torch

        decoded, _ = self.decode(data)
        kept, images = [], []
        for i, img in enumerate(decoded):
            if img is None:
                continue
            key = str(image_ids[i]) if image_ids is not None else str(i)
            repeat = int(repeats[i]) if repeats is not None else 0
            images.append(self.one(img, image_seed(self.seed, epoch, key, repeat)))
            kept.append(i)
        size = self.prep.size
        batch = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8, device=self.device)
        return batch, np.asarray(kept, dtype=np.int64), len(decoded) - len(kept)

    def one(self, img, seed: int):
        """One decoded (3, H, W) uint8 image -> (3, S, S) uint8."""
        import torch
        from torchvision.transforms.v2 import functional as F

        p = self.prep
        if not self.train:
            img = F.resize(img, [p.eval_short_side], interpolation=self.interpolation, antialias=True)
            return F.center_crop(img, [p.size, p.size])
        rng = np.random.default_rng(seed)
        h, w = int(img.shape[-2]), int(img.shape[-1])
        left, top, right, bottom = crop_box((w, h), rng, p.scale, p.ratio)
        img = F.resized_crop(img, top, left, bottom - top, right - left, [p.size, p.size],
                             interpolation=self.interpolation, antialias=True)
        if rng.random() < p.hflip:
            img = F.horizontal_flip(img)
        if self._randaugment is not None:
            # v2.RandAugment draws its ops and magnitudes from torch's global CPU generator: seed a forked one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**62)))
                img = self._randaugment(img)
        return img
