"""The data format, engine-free: the record every reader yields, the Parquet schema of the
shards and the manifest that marks an ingest output complete.

An ingest output (written by :mod:`datasets_io.ingest`, read by :mod:`datasets_io.shards`
and :mod:`datasets_io.ray_data`) is::

    <out>/manifest.json              classes, VA scale, counts, every skipped file + reason (+ its
                                     split when it failed validation), params (max_side 0: originals)
    <out>/{train,val,test}/*.parquet columns = COLUMNS, schema = SHARD_SCHEMA

Valence and arousal are always on the project's canonical scale, [-1, 1]
(see :mod:`datasets_io.lexicon` for the converters from NRC 0..1 and SAM 1..9).
This module imports pyarrow but neither Ray nor torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from datasets_io import storage
from datasets_io.errors import DataError

SCHEMA_VERSION = 1
VA_SCALE = "canonical[-1,1]"
SPLITS = ("train", "val", "test")
VA_SOURCES = ("measured", "lexicon", "none")

# The Parquet schema of the shards (one row per image), in column order. Explicit types, so that
# a block whose label_dist / valence are all null keeps them.
SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),                 # JPEG, longer side <= max_side; max_side 0: the file's own bytes
    ("image_id", pa.string()),              # the image's path relative to the dataset root (posix); rows
                                            # share it when a reader keeps an entry listed twice
    ("split", pa.string()),                 # train | val | test
    ("label", pa.int64()),                  # class index, -1 if none
    ("label_dist", pa.list_(pa.float32())), # distribution over the classes, or null
    ("valence", pa.float32()),              # on [-1, 1], or null
    ("arousal", pa.float32()),              # on [-1, 1], or null
    ("va_source", pa.string()),             # measured | lexicon | none
    ("text", pa.string()),                  # embedded text (SER30K), "" otherwise
    ("group", pa.string()),                 # topic (SER30K) or category folder; free-form grouping
])
COLUMNS = tuple(SHARD_SCHEMA.names)

MANIFEST_NAME = "manifest.json"  # written last: its presence marks an ingest output complete


@dataclass
class Record:
    """One image as a reader sees it, before its bytes are read."""

    path: str                      # relative to the dataset root, posix separators
    split: str                     # train | val | test
    label: int = -1
    label_dist: Optional[list[float]] = None
    valence: Optional[float] = None
    arousal: Optional[float] = None
    va_source: str = "none"
    text: str = ""
    group: str = ""

    @property
    def image_id(self) -> str:
        return self.path


@dataclass
class ReaderResult:
    """What a reader returns: the records, the class names, and what it had to skip."""

    records: list[Record]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    params: dict = field(default_factory=dict)          # the reader's effective options


# ----------------------------------------------------------------------------- the manifest

def is_ingested(out: str | os.PathLike) -> bool:
    """Whether ``out`` (a folder or an object-store URI) is a complete ingest output (its manifest is
    written last)."""
    return storage.is_file(storage.join(out, MANIFEST_NAME))


def read_manifest(out: str | os.PathLike) -> dict:
    """Load ``<out>/manifest.json``; a one-line error if absent, unreadable or another schema."""
    path = storage.join(out, MANIFEST_NAME)
    manifest = read_json_object(path, f"not found; {out} is not a complete ingest output "
                                      "(run: python -m datasets_io ingest ...)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {version!r}, this code reads {SCHEMA_VERSION}; "
                        "re-ingest with --overwrite")
    return manifest


def read_json_object(path, missing: str, expected: str = "a JSON object") -> dict:
    """A JSON file (local or a URI) holding an object, or a one-line error naming the file (``missing``
    when absent)."""
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        document = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected {expected}")
    return document
