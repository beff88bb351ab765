"""The torch side of image preparation: normalisation, and the device decode + augment path. No Ray.

* :class:`ImageNorm` is the one normalisation of the project: uint8 NCHW pixels (what
  :class:`datasets_io.shards.ImageTransform` hands out) -> float32 ``(x / 255 - mean) / std``,
  on whatever device the tensor is on. Training workers apply it right after a batch reaches
  their device (``pipelines.core.Precision.to_device``), evaluation and predict the same way, so
  only uint8 pixels (4x smaller than float32) travel through Ray's object store.
* :class:`DeviceImagePipeline` is the ``--decode device`` path: JPEG bytes -> batched
  ``torchvision.io.decode_jpeg(..., device=...)`` -> one augmentation definition on
  ``torchvision.transforms.v2`` functional ops (RandomResizedCrop, flip, RandAugment; or the eval
  resize + centre crop), uint8 NCHW out. Per-image randomness comes from ``(seed, epoch, image_id,
  repeat)``, so a batch is reproducible whatever the batching. Bytes that fail to decode are
  skipped and counted, never fatal.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ["ImageNorm", "DeviceImagePipeline", "image_seed"]


class ImageNorm:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` (channels_last on request), on the tensor's device.

    ``mean`` / ``std`` default to timm's ImageNet values (the project's default everywhere); a
    recipe's ``image`` dict (the backbone's ``pretrained_cfg``) gives others. Float input is
    taken as already normalised (it is only given the memory format).
    """

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.mean = tuple(float(m) for m in (IMAGENET_DEFAULT_MEAN if mean is None else mean))
        self.std = tuple(float(s) for s in (IMAGENET_DEFAULT_STD if std is None else std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean}, {self.std}")
        self._consts: dict = {}

    @classmethod
    def from_image_cfg(cls, image: Optional[dict]) -> "ImageNorm":
        image = image or {}
        return cls(image.get("mean"), image.get("std"))

    def __repr__(self) -> str:
        return f"ImageNorm(mean={self.mean}, std={self.std})"

    def _constants(self, device: torch.device):
        key = str(device)
        if key not in self._consts:
            self._consts[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                                      for v in (self.mean, self.std))
        return self._consts[key]

    def __call__(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        fmt = torch.channels_last if channels_last and images.dim() == 4 else torch.contiguous_format
        if images.dtype != torch.uint8:
            return images.contiguous(memory_format=fmt)
        mean, std = self._constants(images.device)
        # The same float32 operations, in the same order, as the numpy path this replaced: equal bits.
        x = images.to(dtype=torch.float32, memory_format=fmt)
        return x.div_(255.0).sub_(mean).div_(std)


def image_seed(seed: int, epoch: int, image_id: str, repeat: int = 0) -> int:
    """A 63-bit seed from ``(seed, epoch, crc32(image_id), repeat)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), zlib.crc32(str(image_id).encode("utf-8")),
                                    int(repeat)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _randaugment_args(policy: Optional[str]) -> tuple[int, int]:
    """(num_ops, magnitude) of a timm policy string ``rand-m9-n2-mstd0.5-inc1`` (torchvision's
    RandAugment has no magnitude noise or increasing variant: those parts are not used)."""
    num_ops, magnitude = 2, 9
    for part in (policy or "rand-m9-mstd0.5").split("-")[1:]:
        if part.startswith("mstd") or part.startswith("inc"):
            continue
        if part.startswith("m") and part[1:].isdigit():
            magnitude = int(part[1:])
        elif part.startswith("n") and part[1:].isdigit():
            num_ops = int(part[1:])
    return num_ops, magnitude


class DeviceImagePipeline:
    """Decode JPEG bytes and augment them on ``device``: one definition on torchvision.transforms.v2 ops.

    Train (``train=True``): RandomResizedCrop (``scale``, ratio 3/4..4/3, timm's sampling as in
    :func:`datasets_io.shards._random_resized_crop_box`), a horizontal flip with p=0.5, and
    ``v2.RandAugment`` (num_ops and magnitude from the timm ``auto_augment`` policy; torchvision's
    ops, not timm's: no magnitude noise, bilinear rotations, mean-colour fill) when
    ``augment == "randaugment"``. Eval: resize the shorter side to ``floor(S / crop_pct)``, centre
    crop S. Resizes use ``interpolation`` with antialiasing. Output: uint8 (N, 3, S, S) on
    ``device``, normalised later by :class:`ImageNorm` like every other batch.

    Randomness: each image draws from its own generators, seeded by
    :func:`image_seed` ``(seed, epoch, image_id, repeat)``: reproducible for the same image and
    epoch, different across epochs, independent of batching.
    """

    def __init__(self, image_size: int, *, train: bool, device: torch.device | str = "cpu", augment: str = "basic",
                 scale: Sequence[float] = (0.5, 1.0), interpolation: str = "bicubic", crop_pct: Optional[float] = None,
                 auto_augment: Optional[str] = None, seed: int = 0, mean: Optional[Sequence[float]] = None):
        from torchvision.transforms import InterpolationMode

        self.image_size = int(image_size)
        self.train = bool(train)
        self.device = torch.device(device)
        self.augment = augment if train else "none"
        self.scale = (float(scale[0]), float(scale[1]))
        self.interpolation = InterpolationMode(interpolation)
        self.crop_pct = 0.875 if crop_pct is None else float(crop_pct)
        self.seed = int(seed)
        self._randaugment = None
        if self.augment == "randaugment":
            from torchvision.transforms import v2

            num_ops, magnitude = _randaugment_args(auto_augment)
            # Tensor rotations/affines support nearest and bilinear only: bicubic becomes bilinear here.
            # Exposed areas are filled with the mean colour, as timm's RandAugment does.
            geometric = self.interpolation if self.interpolation in (InterpolationMode.NEAREST,
                                                                      InterpolationMode.BILINEAR) \
                else InterpolationMode.BILINEAR
            from timm.data import IMAGENET_DEFAULT_MEAN

            fill = [round(255 * m) for m in (IMAGENET_DEFAULT_MEAN if mean is None else mean)]
            self._randaugment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=geometric,
                                               fill=fill)

    def decode(self, data: Sequence[Any]) -> tuple[list[Optional[torch.Tensor]], int]:
        """Decoded uint8 (3, H, W) tensors on the device (None where the bytes failed) and the failure count.

        One batched ``decode_jpeg`` call; when it raises (one bad image fails the whole call), each
        image is decoded on its own and the failures are skipped."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(bytes(d)), dtype=torch.uint8) if d is not None and len(d) else None
               for d in data]
        device = self.device
        if all(r is not None for r in raw) and raw:
            try:
                return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)), 0
            except (RuntimeError, ValueError):
                pass
        out: list[Optional[torch.Tensor]] = []
        for r in raw:
            try:
                out.append(None if r is None else decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out, sum(o is None for o in out)

    def __call__(self, data: Sequence[Any], image_ids: Sequence[Any], *, epoch: int = 0,
                 repeats: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, np.ndarray, int]:
        """``(images uint8 (M, 3, S, S) on the device, kept row indices (M,), skipped count)``."""
        decoded, _ = self.decode(data)
        kept, images = [], []
        for i, img in enumerate(decoded):
            if img is None:
                continue
            key = str(image_ids[i]) if image_ids is not None else str(i)
            repeat = int(repeats[i]) if repeats is not None else 0
            images.append(self.one(img, image_seed(self.seed, epoch, key, repeat)))
            kept.append(i)
        size = self.image_size
        batch = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8, device=self.device)
        return batch, np.asarray(kept, dtype=np.int64), len(decoded) - len(kept)

    def one(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        """One decoded (3, H, W) uint8 image -> (3, S, S) uint8."""
        from torchvision.transforms.v2 import functional as F

        size = self.image_size
        if self.augment == "none":
            short = math.floor(size / self.crop_pct)
            img = F.resize(img, [short], interpolation=self.interpolation, antialias=True)
            return F.center_crop(img, [size, size])
        from datasets_io.shards import _random_resized_crop_box

        rng = np.random.default_rng(seed)
        h, w = int(img.shape[-2]), int(img.shape[-1])
        left, top, right, bottom = _random_resized_crop_box((w, h), rng, scale=self.scale)
        img = F.resized_crop(img, top, left, bottom - top, right - left, [size, size],
                             interpolation=self.interpolation, antialias=True)
        if rng.random() < 0.5:
            img = F.horizontal_flip(img)
        if self._randaugment is not None:
            # v2.RandAugment draws its ops and magnitudes from torch's global CPU generator: seed a forked one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**62)))
                img = self._randaugment(img)
        return img


_DROP = ("image", "image_id", "repeat", "text")


class DeviceBatches:
    """Numpy batches of :class:`datasets_io.shards.ImageBytes` rows -> tensor batches, images decoded
    and augmented by a :class:`DeviceImagePipeline` (uint8 on its device), targets as CPU tensors.

    The next ``prefetch`` batches are prepared in a background thread while the current one is in
    use; on CUDA that thread works on its own stream, so decode and augmentation kernels overlap
    the training step (``prefetch=0``: prepared in the consuming thread, when asked for). Rows whose bytes fail to decode are dropped from their batch and
    counted in :attr:`skipped`; a batch with none left is skipped whole.
    """

    def __init__(self, batches, pipeline: DeviceImagePipeline, epoch: int, prefetch: int = 1):
        self.batches = batches
        self.pipeline = pipeline
        self.epoch = int(epoch)
        self.prefetch = max(int(prefetch), 0)
        self.skipped = 0

    def convert(self, batch: dict) -> Optional[dict]:
        images, kept, skipped = self.pipeline(batch["image"], batch.get("image_id"), epoch=self.epoch,
                                              repeats=batch.get("repeat"))
        self.skipped += skipped
        if not len(kept):
            return None
        out = {"image": images}
        for key, value in batch.items():
            if key in _DROP:
                continue
            value = np.asarray(value)
            if value.dtype == object:
                out[key] = [value[i] for i in kept]
            else:
                out[key] = torch.from_numpy(np.ascontiguousarray(value if skipped == 0 else value[kept]))
        return out

    def __iter__(self):
        if self.prefetch:
            yield from self._threaded()
            return
        for batch in self.batches:
            out = self.convert(batch)
            if out is not None:
                yield out

    def _threaded(self):
        import queue
        import threading

        import contextlib

        device = self.pipeline.device
        cuda = device.type == "cuda"
        stream = torch.cuda.Stream(device=device) if cuda else None
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop = threading.Event()

        def work():
            try:
                on_stream = (torch.cuda.stream(stream) if cuda else contextlib.nullcontext())
                with on_stream:
                    for batch in self.batches:
                        if stop.is_set():
                            break
                        out = self.convert(batch)
                        if cuda:
                            stream.synchronize()   # this thread waits; the training stream never does
                        if out is not None:
                            ready.put(out)
                ready.put(done)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                ready.put(exc)

        thread = threading.Thread(target=work, name="device-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if cuda:  # made on the side stream, used on the current one: tell the caching allocator
                    item["image"].record_stream(torch.cuda.current_stream(device))
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()
