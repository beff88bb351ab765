"""Reading ingested shards, engine-free: this module never imports Ray.

What a trainer needs from the output of :mod:`datasets_io.ingest`, besides the image preparation
(:mod:`datasets_io.prep`):

* :func:`targets` turns a batch's nullable targets into dense arrays with presence masks;
* :func:`iter_local_batches` reads a split's batches with pyarrow (tests, benchmarks, a plain loop),
  over :func:`read_split_table` (a split's rows as one table, also what a small split is held as);
  :func:`epoch_rows` + :func:`table_batches`: the deterministic training order (``deterministic: true``);
* :func:`repeat_rows` / :func:`ra_epoch_rows`: repeated augmentation's rows (the Ray Data plan
  is :func:`datasets_io.ray_data.repeated_augmentation`).

The format itself (:data:`~datasets_io.records.SHARD_SCHEMA`, the manifest) is defined in
:mod:`datasets_io.records`.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasets_io import storage
from datasets_io.records import SHARD_SCHEMA, SPLITS, read_manifest

if TYPE_CHECKING:
    import torch

__all__ = ["split_folder", "split_files", "read_split_table", "targets", "to_tensors", "iter_local_batches",
           "table_batches", "epoch_rows", "numpy_batch", "repeat_rows", "ra_epoch_rows"]


# ----------------------------------------------------------------------------- the output folder

def split_folder(out: str | os.PathLike, split: str) -> str:
    """``<out>/<split>`` of a complete ingest (a folder or a URI); clear errors for a bad split or folder."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    read_manifest(out)
    folder = storage.join(out, split)
    if not storage.is_dir(folder):
        raise FileNotFoundError(f"{folder}: split folder is missing from the ingest output")
    return folder


# ----------------------------------------------------------------------------- repeated augmentation

def repeat_rows(table: pa.Table, repeats: int) -> pa.Table:
    """Each row ``repeats`` times in a row, with a ``repeat`` column 0..repeats-1 (the augmentation
    RNG of :class:`datasets_io.prep.ImageTransform` keys on it). For ``map_batches(..., batch_format="pyarrow")``."""
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


def targets(batch: dict[str, Any], n: int, num_classes: int) -> dict[str, np.ndarray]:
    """Labels, distributions and VA of shard rows as dense arrays with presence masks (absent column = none).

    ``label`` int64 (-1 = none) + ``has_label``; ``label_dist`` float32 (N, num_classes), zeros where
    null, + ``has_dist``; ``valence`` / ``arousal`` float32, 0 where null, + ``has_va``; ``va_lexicon``:
    the row's VA comes from the lexicon (categorical sets), not from measurements.
    """
    label = batch.get("label")
    label = np.full(n, -1, np.int64) if label is None else np.array(label, dtype=np.int64)
    dist = np.zeros((n, num_classes), dtype=np.float32)
    has_dist = np.zeros(n, dtype=bool)
    for i, row in enumerate(batch.get("label_dist", [None] * n)):
        if row is None:
            continue
        row = np.asarray(row, dtype=np.float32)
        if row.shape != (num_classes,):
            raise ValueError(f"label_dist has {row.size} values, expected num_classes={num_classes}")
        dist[i], has_dist[i] = row, True
    valence, has_v = _optional_floats(batch.get("valence"), n)
    arousal, has_a = _optional_floats(batch.get("arousal"), n)
    source = batch.get("va_source")
    lexicon = np.zeros(n, bool) if source is None else np.array([s == "lexicon" for s in source], dtype=bool)
    return {"label": label, "has_label": label >= 0, "label_dist": dist, "has_dist": has_dist,
            "valence": valence, "arousal": arousal, "has_va": has_v & has_a, "va_lexicon": lexicon}


def _optional_floats(values: Optional[Sequence], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0, presence mask); nulls arrive as None or NaN."""
    if values is None:
        return np.zeros(n, np.float32), np.zeros(n, bool)
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
    present = ~np.isnan(array)
    return np.where(present, array, 0.0).astype(np.float32), present


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


def split_files(out: str | os.PathLike, split: str) -> list[tuple[str, int]]:
    """``(path, bytes)`` of the Parquet files of one split, sorted by name (URIs for object storage)."""
    return storage.list_files(split_folder(out, split), ".parquet")


def read_split_table(out: str | os.PathLike, split: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """One split's rows (image bytes, as stored) as one pyarrow table, in file order."""
    files = [path for path, _ in split_files(out, split)]
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    fs, _ = storage.filesystem(files[0])
    return pa.concat_tables([pq.read_table(storage.filesystem(f)[1], filesystem=fs, schema=SHARD_SCHEMA,
                                           columns=list(columns) if columns else None) for f in files])


def iter_local_batches(out: str | os.PathLike, split: str, transform,
                       batch_size: int = 32, shuffle: bool = False,
                       seed: Optional[int] = None, part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Tensor batches of one split, read with pyarrow (no Ray), through ``transform`` (a batch step of
    :meth:`datasets_io.prep.ImagePrep.batch_transform`).

    The split's Parquet files are read into memory (JPEG bytes, as stored), ordered as
    the files are (sorted by name) or permuted with ``np.random.default_rng(seed)``; the
    last batch may be smaller. ``part=(rank, world)``: every ``world``-th row of that order from
    ``rank`` on (one process's share under DDP).
    """
    table = read_split_table(out, split)
    order = np.random.default_rng(seed).permutation(table.num_rows) if shuffle else np.arange(table.num_rows)
    rank, world = part
    yield from table_batches(table, order[rank::world], transform, batch_size)


def table_batches(table: pa.Table, rows: np.ndarray, transform, batch_size: int, *, repeats: Optional[np.ndarray] = None,
                  drop_last: bool = False, tensors: bool = True) -> Iterator[dict[str, Any]]:
    """Batches of ``table``'s ``rows`` (indices, in that order) through ``transform``, as tensors (or the
    transform's numpy arrays); ``repeats``: each row's repeated-augmentation index (a ``repeat`` column the
    transform keys its draws on)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = len(rows) - len(rows) % batch_size if drop_last else len(rows)
    for start in range(0, stop, batch_size):
        chunk = table.take(pa.array(rows[start:start + batch_size]))
        if repeats is not None:
            chunk = chunk.append_column("repeat", pa.array(repeats[start:start + batch_size], pa.int64()))
        out = transform(numpy_batch(chunk))
        yield to_tensors(out) if tensors else out


def epoch_rows(num_rows: int, seed: int, epoch: int, *, rank: int = 0, world: int = 1,
               repeats: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The rows (and their repeat indices) one rank trains on in one epoch, a function of ``(seed, epoch,
    rank, world)`` only: a permutation seeded by ``(seed, epoch)``; with repeated augmentation its first
    :func:`ra_epoch_rows` images, each ``repeats`` times in a row; then every ``world``-th entry from
    ``rank`` on, cut to the same length on every rank (DDP needs equal step counts)."""
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(num_rows)
    repeat = np.zeros(num_rows, np.int64)
    if repeats > 1:
        _, distinct = ra_epoch_rows(num_rows, repeats)
        order = np.repeat(order[:distinct], repeats)
        repeat = np.tile(np.arange(repeats, dtype=np.int64), distinct)
    share = len(order) // world
    return order[rank::world][:share], repeat[rank::world][:share]


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A pyarrow table as the dict of numpy columns that ``batch_format="numpy"`` gives."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
