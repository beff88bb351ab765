"""The batch streams a worker feeds the core with: plain PyTorch over a shard's iterator, no Ray import.

A *shard* is whatever ``iter_torch_batches`` / ``iter_batches`` (Ray Data's ``DataIterator``: the
worker's ``ray.train.get_dataset_shard(...)``) it is given. Here: training and evaluation batches
(``--decode cpu``: uint8 tensors; ``--decode device``: JPEG bytes decoded and augmented on the
worker's device), stage two's mixed dimensional + categorical batches, the validation cache, and
the weights digest a resume is checked with.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch

from pipelines.recipe import StageRecipe


def iter_batches(shard, batch_size: int, *, train: bool, seed: int, epoch: int,
                  device_images=None) -> Iterator[dict]:
    """A shard's batches as tensors. ``device_images`` (a :class:`datasets_io.pixels.DeviceImagePipeline`,
    ``--decode device``): the rows carry JPEG bytes, decoded and augmented on the worker's device."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": train}
    if train:
        kwargs.update(local_shuffle_buffer_size=max(4 * batch_size, 64), local_shuffle_seed=seed + epoch)
    if device_images is not None:
        from datasets_io.pixels import DeviceBatches

        prefetch = int(os.environ.get("EMOTION_RAY_DEVICE_PREFETCH", 1))  # batches prepared ahead (0: none)
        return DeviceBatches(shard.iter_batches(batch_format="numpy", **kwargs), device_images, epoch, prefetch)
    return shard.iter_torch_batches(**kwargs)


# A worker keeps its validation shard in memory after the first epoch when every rank's fits in this.
EVAL_CACHE_MB = float(os.environ.get("EMOTION_RAY_EVAL_CACHE_MB", 512))


class EvalCache:
    """``epoch -> batches`` of an evaluation shard, read through Ray Data once and then from memory.

    The first pass streams the shard (as every epoch did before) and keeps a copy of its batches
    (uint8 images: small) while they fit in ``budget_mb``; at the next call the ranks agree (one
    all-reduce) and, when all of them kept theirs, every later epoch replays the copy: no new
    streaming-split execution per epoch. Any rank over the budget keeps all of them streaming.
    """

    def __init__(self, make_batches, device: torch.device, budget_mb: float = EVAL_CACHE_MB):
        self.make_batches, self.device, self.budget = make_batches, device, budget_mb * 2**20
        self.cached: Optional[list] = None
        self._kept: Optional[list] = None
        self._passed = False
        self._decided = budget_mb <= 0

    def __call__(self, epoch: int):
        if not self._decided and self._passed:
            self._decided = True
            if _all_ranks(self._kept is not None, self.device):
                self.cached = self._kept
            self._kept = None
        if self.cached is not None:
            return iter(self.cached)
        if self._decided:
            return self.make_batches(epoch)
        return self._first_pass(epoch)

    def _first_pass(self, epoch: int):
        kept: Optional[list] = []
        size = 0
        for batch in self.make_batches(epoch):
            if kept is not None:
                size += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
                kept = None if size > self.budget else kept
                if kept is not None:
                    kept.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            yield batch
        self._kept, self._passed = kept, True


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (one all-reduce under DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def device_pipeline(recipe: StageRecipe, device: torch.device):
    """The ``--decode device`` training transform of a recipe (None for ``--decode cpu``)."""
    if recipe.decode == "cpu":
        return None
    if recipe.decode != "device":
        raise ValueError(f"unknown decode {recipe.decode!r}; expected 'cpu' or 'device'")
    from datasets_io.pixels import DeviceImagePipeline

    aug, image = recipe.augmentation or {}, recipe.image or {}
    return DeviceImagePipeline(recipe.image_size, train=True, device=device, augment=aug.get("augment", "basic"),
                               scale=tuple(aug.get("crop_scale") or (0.5, 1.0)),
                               interpolation=image.get("interpolation", "bicubic"), crop_pct=image.get("crop_pct"),
                               auto_augment=aug.get("auto_augment"), seed=recipe.seed, mean=image.get("mean"))


class MixedBatches:
    """:func:`mixed_batches` as an iterable that also counts the images skipped by device decoding."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.sources = args, kwargs, []

    def __iter__(self):
        return mixed_batches(*self.args, sources=self.sources, **self.kwargs)

    @property
    def skipped(self) -> int:
        return sum(getattr(s, "skipped", 0) for s in self.sources)


def mixed_batches(dim_shard, cat_shard, batch_size: int, seed: int, epoch: int, *, rank: int = 0, world: int = 1,
                  device_images=None, sources: Optional[list] = None) -> Iterator[dict]:
    """Stage-two multi-task: each dimensional batch is joined by a categorical one.

    The dimensional rows supervise VA only, the categorical rows the category head only, so every
    batch carries dimensional samples and the masked loss never sees an empty VA selection.
    """
    def categorical():
        cycle = 0
        while True:
            got = False
            batches = iter_batches(cat_shard, batch_size, train=True, seed=seed + 7919 * cycle, epoch=epoch,
                                    device_images=device_images)
            if sources is not None:
                sources.append(batches)
            for i, batch in enumerate(batches):
                if i % world == rank:
                    got = True
                    yield batch
            if not got:
                raise RuntimeError("the categorical stream of stage two is empty")
            cycle += 1

    cat_iter = categorical()
    dims = iter_batches(dim_shard, batch_size, train=True, seed=seed, epoch=epoch, device_images=device_images)
    if sources is not None:
        sources.append(dims)
    for dim in dims:
        yield mix_batches(dim, next(cat_iter))


def mix_batches(dim: dict, cat: dict) -> dict:
    """Concatenate a dimensional and a categorical batch with the masks that keep their roles apart."""
    n_dim, n_cat = dim["image"].shape[0], cat["image"].shape[0]
    num_classes = cat["label_dist"].shape[1]
    dim_part = dict(dim)
    dim_part["has_label"] = torch.zeros(n_dim, dtype=torch.bool)
    dim_part["label"] = torch.full((n_dim,), -1, dtype=torch.int64)
    dim_part["has_dist"] = torch.zeros(n_dim, dtype=torch.bool)
    dim_part["label_dist"] = torch.zeros(n_dim, num_classes, dtype=cat["label_dist"].dtype)
    cat_part = dict(cat)
    cat_part["has_va"] = torch.zeros(n_cat, dtype=torch.bool)
    keys = [k for k in dim_part if k in cat_part and isinstance(dim_part[k], torch.Tensor)]
    return {k: torch.cat([dim_part[k], cat_part[k].to(dim_part[k].dtype)]) for k in keys}


def weights_digest(model_state: dict) -> str:
    """SHA-256 of a model state dict (names, dtypes, shapes, bytes in key order): equal digests, equal weights."""
    import hashlib

    h = hashlib.sha256()
    for key, value in model_state.items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
