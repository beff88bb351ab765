"""The one record every reader yields, and the Parquet schema the ingest writes.

Valence and arousal are always on the project's canonical scale, [-1, 1]
(see :mod:`datasets_io.lexicon` for the converters from NRC 0..1 and SAM 1..9).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SCHEMA_VERSION = 1
VA_SCALE = "canonical[-1,1]"
SPLITS = ("train", "val", "test")
VA_SOURCES = ("measured", "lexicon", "none")

# Column order of the Parquet shards (one row per image).
COLUMNS = (
    "image",       # bytes: JPEG, longer side <= max_side
    "image_id",    # str: the image's path relative to the dataset root (posix)
    "split",       # str: train | val | test
    "label",       # int: class index, -1 if none
    "label_dist",  # list<float> over the classes, or null
    "valence",     # float on [-1, 1], or null
    "arousal",     # float on [-1, 1], or null
    "va_source",   # str: measured | lexicon | none
    "text",        # str: embedded text (SER30K), "" otherwise
    "group",       # str: topic (SER30K) or category folder; free-form grouping
)


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
