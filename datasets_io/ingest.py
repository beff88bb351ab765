"""Ingest: a dataset on disk -> validated image rows in Parquet shards, as one Ray Data job.

The output format (``<out>/manifest.json`` + ``<out>/{train,val,test}/*.parquet``, schema
:data:`~datasets_io.records.SHARD_SCHEMA`) is defined in :mod:`datasets_io.records`; it is
complete only when the manifest is present.

The job streams: record metadata, one Arrow block per task -> ``map_batches`` (read bytes,
:func:`prepare_image`, or :func:`validate_image` with ``max_side=0``) -> a datasink that
writes the good rows per split and returns the bad ones (path, split, reason: a few bytes
each) to the driver. Map and write fuse into one task per block, so every CPU has a task
from the start and no image passes through the driver or the object store. Everything is
written into ``<out>.tmp-<id>`` next to ``<out>`` and renamed onto it after the manifest,
so an interrupted ingest never leaves an ``<out>`` that looks complete.

The console stays quiet (:mod:`datasets_io.quiet_ray`): a running Ray is used as it is,
else one is started without the dashboard and without forwarding its output; Ray Data
prints no plan and at most one total bar, on a terminal only. ``verbose`` gives Ray's
output back.

Workers read ``root`` and write ``out`` by path: on a cluster both must be on storage
every node sees (the embedded default, one machine, needs nothing).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from datasets_io.errors import DataError
from datasets_io.images import DEFAULT_MAX_PIXELS, KEEP_ORIGINAL, BadImage, prepare_image, validate_image
from datasets_io.layouts import read_dataset, reader_options
from datasets_io.quiet_ray import init_ray, is_verbose, quiet_ray_data
from datasets_io.readers import ESCAPES, MISSING
from datasets_io.records import (COLUMNS, MANIFEST_NAME, SCHEMA_VERSION, SHARD_SCHEMA, SPLITS, VA_SCALE, ReaderResult,
                                 is_ingested, read_manifest)

__all__ = ["ingest"]

MAX_ROWS_PER_TASK = 1024  # upper bound on rows per write task = per file and split (~50 MB)
_TASKS_PER_CPU = 4         # enough tasks to keep every core busy and balance stragglers
_BATCH_SIZE = 16           # images per map_batches call inside a task (bounds its memory)
ROW_ORDER_SEED = 0          # the fixed order rows are written in (see ingest)

# What the map step takes: a Record's fields (path = the image_id to be), typed as the shard columns.
_RECORD_SCHEMA = pa.schema([pa.field("path", pa.string())] + [SHARD_SCHEMA.field(name) for name in COLUMNS[2:]])
# What the map step emits: the shard columns plus the reason a row was rejected (null if good).
_PREPARED_SCHEMA = SHARD_SCHEMA.append(pa.field("error", pa.string()))


def ingest(
    layout: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_side: int = 512,
    overwrite: bool = False,
    reader_options: Optional[dict[str, Any]] = None,
    lexicon_path: Optional[str | os.PathLike] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_output_files: Optional[int] = None,
    show_progress: bool = True,
    address: Optional[str] = None,
    verbose: Optional[bool] = None,
    split_lines: bool = False,
) -> dict:
    """Read ``root`` with the ``layout`` reader and write validated shards to ``out``.

    Returns the manifest. If ``out`` is already a complete ingest it is returned
    unchanged unless ``overwrite``; with ``overwrite`` the previous output is removed
    only after the new one is complete. ``max_side=0`` keeps every file's own bytes
    (validated, never re-encoded or shrunk). A running Ray is used as it is; else
    ``address`` (or ``RAY_ADDRESS``) is connected to, else a local Ray is started
    without the dashboard. ``verbose`` (default: ``EMOTION_RAY_VERBOSE``) leaves Ray's
    console output on; ``show_progress`` shows one bar, on a terminal only unless
    verbose. Prints the summary line, after one line per split if ``split_lines``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        FileExistsError: ``out`` exists, is not an ingest output, and not ``overwrite``.
        ValueError: bad options, or the reader rejected the dataset (one-line message).
    """
    start = time.perf_counter()
    root = Path(root).expanduser().resolve()
    out = Path(out).expanduser().absolute()
    if max_side < 0 or max_pixels < 1:
        raise ValueError(f"max_side must be >= 0 ({KEEP_ORIGINAL} keeps the original files) and max_pixels "
                         f">= 1, got {max_side}, {max_pixels}")
    if num_output_files is not None and num_output_files < 1:
        raise ValueError(f"num_output_files must be >= 1, got {num_output_files}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found (or not a folder)")
    if is_ingested(out) and not overwrite:
        print(f"already ingested: {out} (use --overwrite)")
        return read_manifest(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an ingest output (no {MANIFEST_NAME}); "
                              "use --overwrite to replace it")

    options = dict(reader_options or {})
    result = _read_records(layout, root, options, lexicon_path)
    # Written in a fixed random order, so that every file mixes the classes: a split streamed from its
    # files is shuffled per epoch by file order and a local buffer only (datasets_io.ray_data.load_split),
    # and readers list images folder by folder, i.e. class by class.
    order = np.random.default_rng(ROW_ORDER_SEED).permutation(len(result.records))
    rows = [asdict(result.records[i]) for i in order]

    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        counts, bad = _run_pipeline(rows, root, tmp, max_side, max_pixels, num_output_files,
                                    show_progress, address, is_verbose(verbose))
        params = {"max_side": max_side, "max_pixels": max_pixels, "reader_options": result.params or options,
                  "lexicon_path": str(Path(lexicon_path).resolve()) if lexicon_path else None}
        manifest = _manifest(layout, root, result, counts, bad, params)
        _write_manifest(tmp, manifest)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if split_lines:
        print("\n".join(_split_lines(manifest)))
    print(_summary(manifest, out, time.perf_counter() - start))
    return manifest


# ----------------------------------------------------------------------------- driver side

def _read_records(layout: str, root: Path, options: dict, lexicon_path) -> ReaderResult:
    """Run the layout's reader; check it found images and gave each a known split."""
    if lexicon_path is not None and "lexicon" in reader_options(layout):  # Emotion6's VA is measured
        options = {**options, "lexicon": Path(lexicon_path)}
    result = read_dataset(layout, root, **options)
    if not result.records:
        raise DataError(f"{root}: the {layout!r} reader found no images")
    for record in result.records:
        if record.split not in SPLITS:
            raise ValueError(f"{root}: record {record.path!r} has split {record.split!r}, "
                             f"expected one of {SPLITS}")
    return result


def _manifest(layout: str, root: Path, result: ReaderResult, counts: dict[str, int],
              bad_images: list[dict], params: dict) -> dict:
    """The manifest: what was ingested, from where, how, and every file left out and why."""
    skipped = list(result.skipped) + sorted(bad_images, key=lambda item: item["path"])
    return {
        "schema_version": SCHEMA_VERSION,
        "layout": layout,
        "root": str(root),
        "classes": list(result.classes),
        "va_scale": VA_SCALE,
        "counts": counts,
        "skipped": skipped,
        "num_skipped": len(skipped),
        "params": params,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "columns": list(COLUMNS),
    }


def _run_pipeline(rows: list[dict], root: Path, tmp: Path, max_side: int, max_pixels: int,
                  num_output_files: Optional[int], show_progress: bool, address: Optional[str],
                  verbose: bool) -> tuple[dict[str, int], list[dict]]:
    """The Ray Data job; returns rows written per split and the rejected files."""
    init_ray(address, verbose=verbose, dashboard=False)  # a local Ray only for the ingest: no dashboard
    ds = ray.data.from_arrow(_input_blocks(rows, _rows_per_task(len(rows)))).map_batches(
        load_and_prepare,
        fn_kwargs={"root": str(root), "max_side": max_side, "max_pixels": max_pixels},
        batch_format="pyarrow",
        batch_size=_BATCH_SIZE,
    )
    if num_output_files is not None:
        ds = ds.repartition(num_output_files)
    _configure(ds.context, show_progress, verbose)
    sink = _ShardSink(str(tmp))
    ds.write_datasink(sink)
    for split in SPLITS:  # every split gets a folder and at least one (maybe empty) file
        if sink.counts[split] == 0:
            _write_table(SHARD_SCHEMA.empty_table(), tmp / split / "part-empty.parquet")
    return sink.counts, sink.skipped


def _input_blocks(rows: list[dict], per_task: int) -> list[pa.Table]:
    """The records as Arrow tables of ``per_task`` rows: one block, hence one task, each."""
    table = pa.Table.from_pylist(rows, schema=_RECORD_SCHEMA)
    return [table.slice(start, per_task) for start in range(0, len(rows), per_task)]


def _configure(context, show_progress: bool, verbose: bool) -> None:
    """This dataset's own DataContext (the caller's global one is left alone): console and resources."""
    if not verbose:
        quiet_ray_data(context)  # no execution plan, no per-operator bars, Ray Data's console at ERROR
    # One total bar; when quiet, on a terminal only (piped, Ray Data logs its progress every few seconds).
    context.enable_progress_bars = show_progress and (verbose or sys.stdout.isatty())
    # The job is one fused map+write operator; with Ray Data's per-operator resource
    # reservation on, it got half the CPUs (measured: 8 tasks on 2 CPUs ran one at a time).
    context.op_resource_reservation_enabled = False


def _rows_per_task(num_rows: int) -> int:
    """Rows each fused read+prepare+write task takes.

    The map step fuses with the write, so this sets both the parallelism and the file
    size: about ``_TASKS_PER_CPU`` tasks per CPU of the cluster, within
    ``[_BATCH_SIZE, MAX_ROWS_PER_TASK]``.
    """
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(_BATCH_SIZE, min(MAX_ROWS_PER_TASK, -(-num_rows // (_TASKS_PER_CPU * cpus))))


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest (the completion marker, so it is always written last)."""
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished ``new`` onto ``out``; a previous ``out`` goes only once ``new`` is done."""
    if not out.exists():
        os.replace(new, out)
        return
    previous = new.with_name(new.name + "-previous")  # still matches *.tmp-*: never "complete"
    os.replace(out, previous)
    os.replace(new, out)
    if previous.is_dir():
        shutil.rmtree(previous)
    else:
        previous.unlink()


def _split_lines(manifest: dict) -> list[str]:
    """``<split>: N images written, k skipped`` per split (k: that split's files that failed validation;
    the files a reader skipped belong to no split and are counted in the summary)."""
    bad = Counter(item.get("split") for item in manifest["skipped"])
    return [f"{split}: {manifest['counts'][split]} images written, {bad[split]} skipped" for split in SPLITS]


def _summary(manifest: dict, out: Path, seconds: float) -> str:
    """``ingested N images (train a / val b / test c), skipped k (reasons: ...) -> out in Xs``."""
    counts = manifest["counts"]
    per_split = " / ".join(f"{split} {counts[split]}" for split in SPLITS)
    reasons = Counter(item["reason"].split(":")[0] for item in manifest["skipped"])
    why = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
    skipped = f"skipped {manifest['num_skipped']}" + (f" (reasons: {why})" if why else "")
    return (f"ingested {sum(counts.values())} images ({per_split}), {skipped} "
            f"\u2192 {out} in {seconds:.1f}s")


# ----------------------------------------------------------------------------- worker side

def load_and_prepare(batch: pa.Table, root: str, max_side: int, max_pixels: int) -> pa.Table:
    """Map step: read each record's file under ``root`` and run :func:`prepare_image`
    (:func:`validate_image`, which keeps the file's bytes, when ``max_side`` is 0).

    Emits every row with ``image`` set and ``error`` null, or, for a file that cannot
    be used, ``image`` null and ``error`` the short reason. The record's columns pass
    through as they are (``path`` becomes ``image_id``).
    """
    batch = batch.select(_RECORD_SCHEMA.names).cast(_RECORD_SCHEMA)
    images: list[Optional[bytes]] = []
    errors: list[Optional[str]] = []
    for path in batch.column("path").to_pylist():
        try:
            data = read_inside(root, path)
            images.append(validate_image(data, max_pixels) if max_side == KEEP_ORIGINAL
                          else prepare_image(data, max_side=max_side, max_pixels=max_pixels))
            errors.append(None)
        except BadImage as err:
            images.append(None)
            errors.append(err.reason)
    columns = [pa.array(images, pa.binary()), *batch.columns, pa.array(errors, pa.string())]
    return pa.Table.from_arrays(columns, schema=_PREPARED_SCHEMA)


def read_inside(root: str | os.PathLike, relative: str) -> bytes:
    """Bytes of ``root/relative``; a path that leaves ``root`` or is missing is a BadImage.

    The readers already skip such records; this re-check guards the read itself (files
    can change between listing and reading) and uses the readers' reason strings.
    """
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(base):
        raise BadImage(ESCAPES)
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise BadImage(MISSING) from err
    except OSError as err:
        raise BadImage(f"unreadable: {err.strerror or err}") from err


def _write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


class _ShardSink(Datasink):
    """Writes good rows to ``<folder>/<split>/part-<task>.parquet``; returns the bad ones.

    File names depend only on the write task's index, so a retried task overwrites
    its own file instead of duplicating rows. A write task takes what its fused map
    step made from one input block, so a block's rows make one file per split.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.counts: dict[str, int] = dict.fromkeys(SPLITS, 0)
        self.skipped: list[dict] = []

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return {"counts": {}, "skipped": []}
        table = pa.concat_tables(tables, promote_options="permissive").cast(_PREPARED_SCHEMA)
        bad = pc.is_valid(table["error"])
        skipped = [{"path": row["image_id"], "reason": row["error"], "split": row["split"]}
                   for row in table.filter(bad).select(["image_id", "error", "split"]).to_pylist()]
        good = table.filter(pc.invert(bad)).select(list(COLUMNS))
        counts = {}
        for split in SPLITS:
            part = good.filter(pc.equal(good["split"], split))
            if part.num_rows:
                _write_table(part, Path(self.folder) / split / f"part-{ctx.task_idx:05d}.parquet")
                counts[split] = part.num_rows
        return {"counts": counts, "skipped": skipped}

    def on_write_complete(self, write_result) -> None:
        for result in write_result.write_returns:
            for split, n in result["counts"].items():
                self.counts[split] += n
            self.skipped.extend(result["skipped"])
