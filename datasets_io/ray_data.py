"""The Ray Data side of reading shards: a split as a ``ray.data.Dataset``, repeated augmentation.

Everything engine-free (the transform, the local batch iterator, the format) lives in
:mod:`datasets_io.shards` and :mod:`datasets_io.records`; this module is the only reader that
imports Ray.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import ray.data

from datasets_io.shards import ra_epoch_rows, read_split_table, repeat_rows, split_files, split_folder

__all__ = ["load_split", "repeated_augmentation", "IN_MEMORY_MB", "BLOCK_ROWS"]

# A split whose Parquet files total at most this many MiB is read once and kept in Ray's object store.
IN_MEMORY_MB = float(os.environ.get("EMOTION_RAY_IN_MEMORY_MB", 512))
# Rows per in-memory block: the unit of one decode task and of the hand-out to the workers.
BLOCK_ROWS = 128


def load_split(out: str | os.PathLike, split: str, *, columns: Optional[Sequence[str]] = None,
               shuffle_seed: Optional[int] = None, in_memory_mb: Optional[float] = None) -> ray.data.Dataset:
    """The Parquet shards of one split as a Ray Dataset.

    A split whose files total at most ``in_memory_mb`` (default :data:`IN_MEMORY_MB`) is read here,
    once, with pyarrow and handed to Ray as in-memory blocks of :data:`BLOCK_ROWS` rows
    (``ray.data.from_arrow``, the JPEG bytes as stored). Every epoch then starts from the object
    store and decodes its blocks in parallel tasks; read from the files, each epoch would first
    list them and read their footers (about a second with Ray 2.60's Parquet reader, which also
    packs a small split into one block: one decode task, and no batch before it ends). Larger
    splits stream from the files every epoch.

    ``shuffle_seed`` (training): in memory, the rows are permuted once with the seed and the block
    order is drawn afresh every epoch; streamed, the file order is. Neither per-epoch draw is
    seeded: Ray's per-execution reseeding (``RandomSeedConfig``) repeated the first epoch's order in
    the second under Ray Train's streaming split, and which rank gets which block is Ray's choice at
    run time anyway. With the worker's local shuffle buffer this mixes every batch and every rank's
    share across the split, whatever order the files are in.
    """
    budget = IN_MEMORY_MB if in_memory_mb is None else in_memory_mb
    size_mb = sum(size for _, size in split_files(out, split)) / 2**20
    if size_mb > budget:
        ds = ray.data.read_parquet(split_folder(out, split), file_extensions=["parquet"],
                                   shuffle=None if shuffle_seed is None else "files")
        return ds.select_columns(list(columns)) if columns else ds
    table = read_split_table(out, split, columns)
    if shuffle_seed is not None:
        table = table.take(pa.array(np.random.default_rng(shuffle_seed).permutation(table.num_rows)))
    blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, table.num_rows, BLOCK_ROWS)] or [table]
    ds = ray.data.from_arrow(blocks)
    if shuffle_seed is not None:
        ds = ds.randomize_block_order()  # unseeded: a new order every execution, i.e. every epoch
    return ds


def repeated_augmentation(ds: ray.data.Dataset, repeats: int, num_rows: int,
                          multiple: int = 256) -> ray.data.Dataset:
    """The training rows of one epoch under repeated augmentation (see :func:`~datasets_io.shards.ra_epoch_rows`).

    A Ray Data plan runs afresh every epoch, so ``random_shuffle()`` (unseeded: Ray Data has no
    epoch number to seed it with) picks a new random subset each epoch; ``limit`` keeps the
    distinct images, :func:`~datasets_io.shards.repeat_rows` makes the copies. Apply before
    :class:`~datasets_io.shards.ImageTransform`.
    """
    if repeats <= 1:
        return ds
    _, distinct = ra_epoch_rows(num_rows, repeats, multiple)
    return ds.random_shuffle().limit(distinct).map_batches(repeat_rows, fn_kwargs={"repeats": repeats},
                                                           batch_format="pyarrow")
