"""The batch streams a worker feeds the core with: plain PyTorch over a shard's iterator, no Ray import.

A *shard* is whatever ``iter_torch_batches`` / ``iter_batches`` (Ray Data's ``DataIterator``: the
worker's ``ray.train.get_dataset_shard(...)``) it is given. Here: training and evaluation batches
(``decode="cpu"``: uint8 tensors; ``decode="device"``: image bytes decoded and augmented on the
worker's device, :class:`DeviceBatches`), stage two's multi-task batches (``joined``:
:class:`MixedBatches`; the published ``pool``: :class:`PoolBatches`), the validation cache, and the
weights digest a resume is checked with.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import numpy as np
import torch


def iter_batches(shard, batch_size: int, *, train: bool, seed: int, epoch: int, device_images=None,
                 drop_last: Optional[bool] = None) -> Iterator[dict]:
    """A shard's batches as tensors: shuffled through a local buffer and the last partial batch dropped
    when ``train`` (``drop_last`` says otherwise). ``device_images`` (a
    :class:`datasets_io.prep.DeviceImagePipeline`, ``decode="device"``): the rows carry image bytes,
    decoded and augmented on the worker's device."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": train if drop_last is None else drop_last}
    if train:
        kwargs.update(local_shuffle_buffer_size=max(4 * batch_size, 64), local_shuffle_seed=seed + epoch)
    if device_images is not None:
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

    def __init__(self, make_batches, device: torch.device, budget_mb: Optional[float] = None):
        budget_mb = EVAL_CACHE_MB if budget_mb is None else budget_mb
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


class LocalSplit:
    """A training split the worker reads itself (``deterministic: true``): the same rows, in the same order,
    with the same augmentation, whenever an epoch runs (a resumed epoch repeats the interrupted one).

    ``for_epoch(epoch, rank, world)`` gives a stand-in for the Ray Data shard (the same ``iter_torch_batches``
    / ``iter_batches`` calls) over :func:`datasets_io.shards.epoch_rows`: a permutation seeded by
    ``(seed, epoch)``, every ``world``-th row for ``rank``; each image's crop, flip and RandAugment seeded by
    ``(seed, epoch, image, repeat)``. The split's bytes are read once per stage (pyarrow, from the shards'
    folder or object store); decoding runs in the worker, not in Ray Data's tasks: the price of the order.
    ``post``: a batch step applied after the image step (the sticker text's tokenizer).
    """

    def __init__(self, shards: str, split: str, prep, num_classes: int, seed: int, *, keep_text: bool = False,
                 post=None):
        self.shards, self.split, self.prep, self.num_classes = shards, split, prep, num_classes
        self.seed, self.keep_text, self.post = seed, keep_text, post
        self._table = None

    @property
    def table(self):
        """The split's rows (read from the shards once, on first use)."""
        from datasets_io.shards import read_split_table

        if self._table is None:
            self._table = read_split_table(self.shards, self.split)
        return self._table

    def for_epoch(self, epoch: int, rank: int = 0, world: int = 1) -> "_EpochShard":
        from datasets_io.shards import epoch_rows

        rows, repeats = epoch_rows(self.table.num_rows, self.seed, epoch, rank=rank, world=world,
                                   repeats=self.prep.repeated_aug)
        return _EpochShard(self, epoch, rows, repeats)


class _EpochShard:
    """One epoch of a :class:`LocalSplit` for one rank, with the calls of a Ray Data shard iterator."""

    def __init__(self, split: LocalSplit, epoch: int, rows, repeats):
        self.split, self.epoch, self.rows, self.repeats = split, epoch, rows, repeats

    def _batches(self, transform, batch_size: int, drop_last: bool, tensors: bool = True):
        from datasets_io.shards import table_batches

        step = transform if self.split.post is None else (lambda batch: self.split.post(transform(batch)))
        return table_batches(self.split.table, self.rows, step, batch_size, repeats=self.repeats,
                             drop_last=drop_last, tensors=tensors)

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False, **_ignored):
        """Decoded on the CPU, in this process; ``local_shuffle_*`` are ignored: the order is the epoch's."""
        from datasets_io.prep import ImageTransform

        seed = int(np.random.SeedSequence([int(self.split.seed) & 0xFFFFFFFF, self.epoch]).generate_state(1)[0])
        transform = ImageTransform(self.split.prep, train=True, num_classes=self.split.num_classes, seed=seed,
                                   keep_text=self.split.keep_text)
        return self._batches(transform, batch_size, drop_last)

    def iter_batches(self, *, batch_format: str = "numpy", batch_size: int, drop_last: bool = False, **_ignored):
        """The stored bytes (``decode="device"``: the worker's pipeline decodes them, seeded per image)."""
        from datasets_io.prep import ImageBytes

        transform = ImageBytes(self.split.num_classes, keep_text=self.split.keep_text)
        return self._batches(transform, batch_size, drop_last, tensors=False)


class PoolBatches:
    """Stage two's published batching (``batching="pool"``): one shuffled pool of this rank's dimensional
    and categorical training rows, cut into batches of ``batch_size``, one pass over both per epoch.

    The published loader shuffles ``ConcatDataset([categorical train, Emotion6 train])`` and cuts it
    into batches of 10 (``drop_last``). The same distribution without moving either set through a
    global shuffle: each stream is read in its own shuffled order, and each batch takes ``k`` rows from
    the dimensional stream and ``batch_size - k`` from the categorical one, ``k`` drawn from the
    hypergeometric distribution of the rows still left (seeded by seed, epoch and rank): consecutive
    batches of a uniformly shuffled pool have exactly these counts. A batch with no dimensional row
    is a category-only step (see :func:`emotion_models.losses.multitask_loss`). ``n_dim`` / ``n_cat``:
    the rows each stream holds for this rank.
    """

    def __init__(self, dim_shard, cat_shard, batch_size: int, seed: int, epoch: int, *, n_dim: int, n_cat: int,
                 rank: int = 0, device_images=None):
        self.streams = [iter_batches(s, batch_size, train=True, seed=seed + i, epoch=epoch,
                                     device_images=device_images, drop_last=False)
                        for i, s in enumerate((dim_shard, cat_shard))]
        self.batch_size, self.counts = batch_size, (int(n_dim), int(n_cat))
        self.rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(rank)])

    @property
    def skipped(self) -> int:
        return sum(getattr(s, "skipped", 0) for s in self.streams)

    def __iter__(self) -> Iterator[dict]:
        dim, cat = (_Rows(iter(s)) for s in self.streams)
        left_dim, left_cat = self.counts
        while left_dim + left_cat >= self.batch_size:
            k = int(self.rng.hypergeometric(left_dim, left_cat, self.batch_size)) if left_dim and left_cat \
                else (self.batch_size if left_dim else 0)
            dims, cats = dim.take(k), cat.take(self.batch_size - k)
            if dims is None or cats is None:   # a stream ran dry before its expected count: the epoch ends
                return
            left_dim, left_cat = left_dim - k, left_cat - (self.batch_size - k)
            yield mix_batches(dims, cats)


class _Rows:
    """Rows of a batch stream, taken ``k`` at a time across batch boundaries."""

    def __init__(self, batches: Iterator[dict]):
        self.batches, self.pending, self.at = batches, None, 0

    def _refill(self) -> bool:
        while self.pending is None or self.at >= _length(self.pending):
            following = next(self.batches, None)
            if following is None:
                return False
            self.pending, self.at = following, 0
        return True

    def take(self, k: int) -> Optional[dict]:
        """The next ``k`` rows as one batch (zero rows keep the stream's keys and shapes); None when the
        stream has fewer left."""
        parts = []
        while k > 0:
            if not self._refill():
                return None
            end = min(self.at + k, _length(self.pending))
            parts.append(_slice(self.pending, self.at, end))
            k, self.at = k - (end - self.at), end
        if parts:
            return {key: torch.cat([p[key] for p in parts]) if isinstance(parts[0][key], torch.Tensor)
                    else [v for p in parts for v in p[key]] for key in parts[0]}
        if self.pending is None and not self._refill():
            return None
        return _slice(self.pending, 0, 0)


def _length(batch: dict) -> int:
    return int(batch["image"].shape[0])


def _slice(batch: dict, start: int, end: int) -> dict:
    return {key: value[start:end] for key, value in batch.items()}


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


_DROP = ("image", "image_id", "repeat", "text")


class DeviceBatches:
    """Numpy batches of :class:`datasets_io.prep.ImageBytes` rows -> tensor batches, images decoded
    and augmented by a :class:`datasets_io.prep.DeviceImagePipeline` (uint8 on its device), targets as
    CPU tensors.

    The next ``prefetch`` batches are prepared in a background thread while the current one is in
    use; on CUDA that thread works on its own stream, so decode and augmentation kernels overlap
    the training step (``prefetch=0``: prepared in the consuming thread, when asked for). Rows whose bytes fail to decode are dropped from their batch and
    counted in :attr:`skipped`; a batch with none left is skipped whole.
    """

    def __init__(self, batches, pipeline, epoch: int, prefetch: int = 1):
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
        import contextlib
        import queue
        import threading

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


def weights_digest(model_state: dict) -> str:
    """SHA-256 of a model state dict (names, dtypes, shapes, bytes in key order): equal digests, equal weights."""
    import hashlib

    h = hashlib.sha256()
    for key, value in model_state.items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
