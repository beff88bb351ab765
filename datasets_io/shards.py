"""Reading ingested shards for training, engine-free: this module never imports Ray.

What a trainer needs from the output of :mod:`datasets_io.ingest`:

* :class:`ImageTransform` turns JPEG bytes + nullable targets into fixed-shape arrays with
  presence masks (``ds.map_batches(ImageTransform(...), batch_format="numpy")`` on a Ray
  Dataset from :func:`datasets_io.ray_data.load_split`, or a plain call on a numpy batch);
* :func:`iter_local_batches` -> the same batches read with pyarrow (tests, benchmarks, a plain loop),
  over :func:`read_split_table` (a split's rows as one table, also what a small split is held as);
* :func:`repeat_rows` / :func:`ra_epoch_rows`: repeated augmentation's rows (the Ray Data plan
  is :func:`datasets_io.ray_data.repeated_augmentation`).

The format itself (:data:`~datasets_io.records.SHARD_SCHEMA`, the manifest) is defined in
:mod:`datasets_io.records`.
"""
from __future__ import annotations

import io
import math
import os
import random
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datasets_io.errors import DataError
from datasets_io.records import SHARD_SCHEMA, SPLITS, read_manifest

if TYPE_CHECKING:
    import torch

__all__ = ["split_folder", "split_files", "read_split_table", "ImageTransform", "ImageBytes", "to_tensors",
           "iter_local_batches", "numpy_batch", "AUGMENTATIONS", "repeat_rows", "ra_epoch_rows"]

AUGMENTATIONS = ("basic", "randaugment", "none")
RANDAUGMENT_POLICY = "rand-m9-mstd0.5"
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}
# The DeiT/PVT/LORA recipe: RandomResizedCrop scale and RandAugment policy (timm's create_transform
# with these drops its color jitter, as timm does whenever auto_augment is set).
DEIT_SCALE = (0.08, 1.0)
DEIT_RANDAUGMENT_POLICY = "rand-m9-mstd0.5-inc1"


# ----------------------------------------------------------------------------- the output folder

def split_folder(out: str | os.PathLike, split: str) -> Path:
    """``<out>/<split>`` of a complete ingest; clear errors for a bad split or folder."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    read_manifest(out)
    folder = Path(out) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: split folder is missing from the ingest output")
    return folder


# ----------------------------------------------------------------------------- transform

class ImageTransform:
    """Decode + augment a batch of shard rows into fixed-shape numpy arrays.

    For ``ds.map_batches(ImageTransform(...), batch_format="numpy")`` and for
    :func:`iter_local_batches`. Output keys: ``image`` uint8 (N, 3, S, S) pixels, not normalised
    (the consumer normalises on its device with :class:`datasets_io.pixels.ImageNorm`, so only
    uint8 travels through the object store; ``normalize=True`` returns float32 normalised by that
    same ImageNorm here, for plain CPU callers), ``label
    int64 (-1 = none) + ``has_label``, ``label_dist`` float32 (N, num_classes), zeros
    where null, + ``has_dist``, ``valence`` / ``arousal`` float32, 0 where null, +
    ``has_va``, and ``text`` (object array of str) only when ``keep_text``. String and
    bytes columns are dropped otherwise, so ``iter_torch_batches`` can tensorise all.

    Train: ``basic`` = timm's RandomResizedCrop(``scale``, default (0.5, 1)) + horizontal flip;
    ``randaugment`` adds timm's RandAugment ``auto_augment`` (default ``rand-m9-mstd0.5``) on top;
    ``none`` = the eval path. The DeiT recipe is ``scale=DEIT_SCALE, auto_augment=DEIT_RANDAUGMENT_POLICY``.
    Eval: resize the shorter side to ``floor(S / crop_pct)`` (timm's, 0.875 by default), centre crop S
    (torchvision's resize + center_crop: timm's eval transform exactly, tests/test_crop_geometry.py).
    Resizes use ``interpolation`` (the backbone's ``pretrained_cfg``; bicubic by default).

    Randomness: each image draws from its own ``np.random.default_rng``. With ``seed``
    it is seeded by ``(seed, crc32(image_id))``, so results do not depend on batching or
    on the worker; pass ``seed + epoch`` to vary augmentations across epochs. A ``repeat``
    column (repeated augmentation, :func:`repeat_rows`) joins the key, so the copies of an image
    get independent draws. Without a seed, fresh OS entropy per batch (so the pickled copies on
    Ray workers differ, and so do the copies of a repeated row).
    """

    def __init__(self, image_size: int, train: bool, num_classes: int, augment: str = "basic",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 seed: Optional[int] = None, keep_text: bool = False, interpolation: str = "bicubic",
                 crop_pct: Optional[float] = None, scale: Sequence[float] = (0.5, 1.0),
                 auto_augment: Optional[str] = None, normalize: bool = False) -> None:
        """``mean`` / ``std`` default to timm's ImageNet values (timm is imported here, not at module
        import, so importing this module stays light); ``interpolation``
        (``bicubic``, ``bilinear``, ``nearest``) and ``crop_pct`` (eval resize = ``S / crop_pct``,
        default timm's 0.875) follow the backbone's ``pretrained_cfg`` when the caller passes them
        (``emotion_models.va.data_config``)."""
        from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.data.auto_augment import rand_augment_transform

        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {augment!r}; expected one of {AUGMENTATIONS}")
        if image_size < 1 or num_classes < 1:
            raise ValueError(f"image_size and num_classes must be >= 1, got {image_size}, {num_classes}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.num_classes = int(num_classes)
        self.augment = augment if train else "none"
        mean = IMAGENET_DEFAULT_MEAN if mean is None else mean
        std = IMAGENET_DEFAULT_STD if std is None else std
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)
        self.normalize = bool(normalize)
        self.crop_pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}")
        self.interpolation = interpolation
        self.seed = seed
        self.keep_text = keep_text
        self.scale = (float(scale[0]), float(scale[1]))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.auto_augment = auto_augment or RANDAUGMENT_POLICY
        self._randaugment = None
        if self.augment == "randaugment":
            # As timm's create_transform: geometric ops use the training interpolation.
            hparams = {"translate_const": int(self.image_size * 0.45),
                       "img_mean": tuple(round(255 * m) for m in mean),
                       "interpolation": _RESAMPLE[self.interpolation]}
            self._randaugment = rand_augment_transform(self.auto_augment, hparams)

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, train={self.train}, "
                f"num_classes={self.num_classes}, augment={self.augment!r}, seed={self.seed})")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        ids = batch.get("image_id")
        repeats = batch.get("repeat")
        batch_rng = np.random.default_rng() if self.seed is None else None
        pixels = np.empty((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, data in enumerate(images):
            if data is None:
                raise DataError("ImageTransform: a row has no image bytes (not an ingest shard?)")
            key = str(ids[i]) if ids is not None else str(i)
            if repeats is not None:
                key = f"{key}#{int(repeats[i])}"
            rng = batch_rng if batch_rng is not None else np.random.default_rng(
                [self.seed, zlib.crc32(key.encode("utf-8"))])
            pixels[i] = self._one(bytes(data), rng)
        out = {"image": self._output(pixels)}
        out.update(_targets(batch, n, self.num_classes))
        if self.keep_text:
            text = batch.get("text")
            texts = [""] * n if text is None else ["" if t is None else str(t) for t in text]
            out["text"] = np.array(texts, dtype=object)
        return out

    def _one(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        """One image: decode, geometric transform (+ RandAugment), as HxWx3 uint8."""
        size = self.image_size
        with Image.open(io.BytesIO(data)) as img:
            if self.augment == "none":
                short = math.floor(size / self.crop_pct)
                img.draft("RGB", (short, short))  # JPEG: decode at a reduced scale when possible
                img = _resize_center_crop(img.convert("RGB"), short, size, self.interpolation)
            else:
                img = img.convert("RGB")
                left, top, right, bottom = _random_resized_crop_box(img, rng, scale=self.scale)
                img = _resized_crop(img, (left, top, right, bottom), size, self.interpolation)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                if self._randaugment is not None:
                    with _global_random_seeded(int(rng.integers(2**31))):
                        img = self._randaugment(img)
        return np.asarray(img, dtype=np.uint8)

    def _output(self, pixels: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # NHWC -> NCHW, uint8
        if not self.normalize:
            return images
        import torch

        from datasets_io.pixels import ImageNorm

        return ImageNorm(self.mean, self.std)(torch.from_numpy(images)).numpy()


class ImageBytes:
    """The ``--decode device`` batch step: the stored JPEG bytes (not decoded) plus dense targets.

    Output keys: ``image`` (object array of bytes), ``image_id`` (object array of str), ``repeat``
    (int64, 0 without repeated augmentation), the targets of :class:`ImageTransform`, and ``text``
    when ``keep_text``. The training worker decodes and augments on its device
    (:class:`datasets_io.pixels.DeviceImagePipeline`).
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
        out.update(_targets(batch, n, self.num_classes))
        if self.keep_text:
            text = batch.get("text")
            out["text"] = np.array(["" if text is None or t is None else str(t) for t in
                                    (text if text is not None else [None] * n)], dtype=object)
        return out


# ----------------------------------------------------------------------------- repeated augmentation

def repeat_rows(table: pa.Table, repeats: int) -> pa.Table:
    """Each row ``repeats`` times in a row, with a ``repeat`` column 0..repeats-1 (the augmentation
    RNG of :class:`ImageTransform` keys on it). For ``map_batches(..., batch_format="pyarrow")``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    index = np.repeat(np.arange(table.num_rows), repeats)
    out = table.take(pa.array(index))
    return out.append_column("repeat", pa.array(np.tile(np.arange(repeats, dtype=np.int64), table.num_rows)))


def ra_epoch_rows(num_rows: int, repeats: int, multiple: int = 256) -> tuple[int, int]:
    """``(rows per epoch, distinct images per epoch)`` of DeiT's repeated-augmentation sampler.

    DeiT's ``RASampler`` shuffles the dataset each epoch, repeats every index ``repeats`` times,
    deals the list round-robin to the replicas and keeps ``floor(N // 256 * 256 / world)`` per
    replica: an epoch is about one dataset's worth of rows (rounded down to a multiple of 256),
    made of a fresh random ``1 / repeats`` of the images, each ``repeats`` times with independent
    augmentation. Rows here are ``distinct x repeats`` (at most ``repeats - 1`` above the rounded
    size); a dataset smaller than ``multiple`` is not rounded.
    """
    if num_rows < 1 or repeats < 1 or multiple < 1:
        raise ValueError(f"num_rows, repeats and multiple must be >= 1, got {num_rows}, {repeats}, {multiple}")
    target = num_rows // multiple * multiple if num_rows >= multiple else num_rows
    distinct = min(num_rows, math.ceil(target / repeats))
    return distinct * repeats, distinct


def _targets(batch: dict[str, Any], n: int, num_classes: int) -> dict[str, np.ndarray]:
    """Labels, distributions and VA as dense arrays with presence masks (absent column = none)."""
    label = batch.get("label")
    label = np.full(n, -1, np.int64) if label is None else np.array(label, dtype=np.int64)
    dist = np.zeros((n, num_classes), dtype=np.float32)
    has_dist = np.zeros(n, dtype=bool)
    for i, row in enumerate(batch.get("label_dist", [None] * n)):
        if row is None:
            continue
        row = np.asarray(row, dtype=np.float32)
        if row.shape != (num_classes,):
            raise ValueError(f"label_dist has {row.size} values, ImageTransform expects num_classes={num_classes}")
        dist[i], has_dist[i] = row, True
    valence, has_v = _optional_floats(batch.get("valence"), n)
    arousal, has_a = _optional_floats(batch.get("arousal"), n)
    return {"label": label, "has_label": label >= 0, "label_dist": dist, "has_dist": has_dist,
            "valence": valence, "arousal": arousal, "has_va": has_v & has_a}


def _optional_floats(values: Optional[Sequence], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0, presence mask); nulls arrive as None or NaN."""
    if values is None:
        return np.zeros(n, np.float32), np.zeros(n, bool)
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
    present = ~np.isnan(array)
    return np.where(present, array, 0.0).astype(np.float32), present


def _random_resized_crop_box(image: Image.Image | tuple[int, int], rng: np.random.Generator,
                             scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (l, t, r, b) of ``image`` (or of an image of that (w, h) size).

    The sampling is timm's ``RandomResizedCropAndInterpolation.get_params`` (the DeiT recipe's),
    run on Python's ``random`` seeded from ``rng``: one draw of ``rng`` per image, so the box
    depends on the image's own generator only.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation

    if not isinstance(image, Image.Image):
        image = Image.new("1", tuple(image))  # only its size is read
    with _global_random_seeded(int(rng.integers(2**31))):
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(image, scale, ratio)
    if height < 1 or width < 1:  # a tiny image (a few pixels) can round to an empty crop: take it whole
        return 0, 0, image.width, image.height
    return left, top, left + width, top + height


def _resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int, interpolation: str) -> Image.Image:
    """Crop ``box`` and resize it to size x size: torchvision's ``resized_crop``, as timm's training crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    left, top, right, bottom = box
    return F.resized_crop(img, top, left, bottom - top, right - left, [size, size],
                          InterpolationMode(interpolation))


def _resize_center_crop(img: Image.Image, short: int, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize the shorter side to ``short`` (aspect kept), then take the centred size x size:
    torchvision's ``resize`` + ``center_crop``, i.e. timm's eval transform."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    return F.center_crop(F.resize(img, short, InterpolationMode(interpolation)), [size, size])


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


# ----------------------------------------------------------------------------- without Ray

def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, "torch.Tensor | list[str]"]:
    """Numeric/bool arrays -> ``torch.Tensor``; ``text`` (object arrays) -> a list of str.

    Writable contiguous arrays are shared, read-only ones (e.g. from Arrow) copied.
    """
    import torch

    return {key: value.tolist() if value.dtype == object else torch.from_numpy(_writable(value))
            for key, value in batch.items()}


def _writable(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def split_files(out: str | os.PathLike, split: str) -> list[Path]:
    """The Parquet files of one split, sorted by name."""
    return sorted(split_folder(out, split).glob("*.parquet"))


def read_split_table(out: str | os.PathLike, split: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """One split's rows (JPEG bytes, as stored) as one pyarrow table, in file order."""
    files = split_files(out, split)
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=SHARD_SCHEMA, columns=list(columns) if columns else None)
                             for f in files])


def iter_local_batches(out: str | os.PathLike, split: str, transform: ImageTransform,
                       batch_size: int = 32, shuffle: bool = False,
                       seed: Optional[int] = None, part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Transformed tensor batches of one split, read with pyarrow (no Ray).

    The split's Parquet files are read into memory (JPEG bytes, as stored), ordered as
    the files are (sorted by name) or permuted with ``np.random.default_rng(seed)``; the
    last batch may be smaller. ``part=(rank, world)``: every ``world``-th row of that order from
    ``rank`` on (one process's share under DDP).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    table = read_split_table(out, split)
    order = np.random.default_rng(seed).permutation(table.num_rows) if shuffle else np.arange(table.num_rows)
    rank, world = part
    order = order[rank::world]
    for start in range(0, len(order), batch_size):
        rows = table.take(pa.array(order[start:start + batch_size]))
        yield to_tensors(transform(numpy_batch(rows)))


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A pyarrow table as the dict of numpy columns that ``batch_format="numpy"`` gives."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
