"""The Ray Data side of reading shards: a split as a ``ray.data.Dataset``, repeated augmentation.

Everything engine-free (the transform, the local batch iterator, the format) lives in
:mod:`datasets_io.shards` and :mod:`datasets_io.records`; this module is the only reader that
imports Ray.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import ray.data

from datasets_io.shards import ra_epoch_rows, repeat_rows, split_folder

__all__ = ["load_split", "repeated_augmentation"]


def load_split(out: str | os.PathLike, split: str, *,
               columns: Optional[Sequence[str]] = None) -> ray.data.Dataset:
    """The Parquet shards of one split as a (lazy) Ray Dataset."""
    folder = split_folder(out, split)
    return ray.data.read_parquet(str(folder), columns=list(columns) if columns else None,
                                 file_extensions=["parquet"])


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
