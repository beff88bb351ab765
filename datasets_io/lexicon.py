"""Emotion category -> valence/arousal, through the NRC-VAD lexicon.

The project keeps one VA scale inside: canonical [-1, 1] for both valence and arousal.
Converters map to and from the two scales the datasets use:

* NRC-VAD lexicon values, 0..1 (``x -> 2x - 1``);
* SAM ratings (Emotion6), 1..9 (``x -> (x - 5) / 4``).

The built-in anchors are the NRC-VAD v1 values of the handful of category words the
supported datasets use, as published in:

    Saif M. Mohammad. "Obtaining Reliable Human Ratings of Valence, Arousal, and
    Dominance for 20,000 English Words." ACL 2018.
    https://saifmohammad.com/WebPages/nrc-vad.html

The full lexicon (about 20,000 words, free for research, licence needed for commercial
use) is not shipped; :meth:`Lexicon.from_file` reads a user's copy to map other names.

The small table-reading helpers at the bottom (:func:`read_table`, :func:`parse_number`,
:func:`normalize_dist`) are shared with :mod:`datasets_io.readers`, so every text table in
the project fails the same way: one line naming the file, the line and the problem.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

from datasets_io.errors import DataError

FloatOrArray = Union[float, np.ndarray]

# NRC-VAD v1 (Mohammad, ACL 2018): word -> (valence, arousal), both on the lexicon's 0..1 scale.
ANCHORS_NRC: dict[str, tuple[float, float]] = {
    "amusement": (0.929, 0.837),
    "anger": (0.167, 0.865),
    "awe": (0.469, 0.740),
    "contentment": (0.875, 0.610),
    "disgust": (0.052, 0.775),
    "excitement": (0.896, 0.684),
    "fear": (0.073, 0.840),
    "joy": (0.980, 0.824),
    "sadness": (0.052, 0.288),
    "surprise": (0.875, 0.875),
    "neutral": (0.469, 0.184),
    "positive": (0.959, 0.510),
    "negative": (0.102, 0.527),
}

# Dataset category names that are not lexicon words of their own.
ALIASES: dict[str, str] = {"happiness": "joy"}

_FI = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
_SENTIMENT = ["positive", "negative", "neutral"]

# Category lists of the supported datasets, in their conventional label order.
CATEGORY_SETS: dict[str, list[str]] = {
    "FI": list(_FI),
    "Flickr": list(_SENTIMENT),
    "Instagram": list(_SENTIMENT),
    "FlickrLDL": list(_FI),
    "TwitterLDL": list(_FI),
    "Emotion6": ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"],
    "SER30K": ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"],
}

# At most this many names are listed in an "unknown category" message (a full lexicon has ~20k).
_MAX_LISTED = 40


def nrc_to_canonical(x: FloatOrArray) -> FloatOrArray:
    """NRC-VAD 0..1 -> canonical [-1, 1]."""
    return 2.0 * x - 1.0


def sam_to_canonical(x: FloatOrArray) -> FloatOrArray:
    """SAM 1..9 (Emotion6 ratings) -> canonical [-1, 1]."""
    return (x - 5.0) / 4.0


def canonical_to_sam(x: FloatOrArray) -> FloatOrArray:
    """Canonical [-1, 1] -> SAM 1..9."""
    return 4.0 * x + 5.0


def resolve_categories(spec: Union[str, Sequence[str]]) -> list[str]:
    """A built-in set name ("FI", "flickr", ...) or a list of names -> lower-cased names.

    Raises ValueError for an unknown set name, an empty list or a repeated name.
    """
    if isinstance(spec, str):
        by_lower = {name.lower(): names for name, names in CATEGORY_SETS.items()}
        if spec.lower() not in by_lower:
            raise DataError(f"unknown category set {spec!r}; built-in sets: {', '.join(CATEGORY_SETS)} "
                            "(or pass a list of category names)")
        return list(by_lower[spec.lower()])
    names = [str(name).strip().lower() for name in spec]
    if not names:
        raise DataError("the category list is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"category names repeat (case-insensitively): {', '.join(repeated)}")
    return names


class Lexicon:
    """Maps category names to (valence, arousal) on the canonical scale.

    Names are matched case-insensitively; :data:`ALIASES` map dataset names that are not
    lexicon words (SER30K's "happiness") to one that is. Build one with :meth:`builtin`
    or :meth:`from_file`.
    """

    def __init__(self, entries: Mapping[str, tuple[float, float]], source: str = "builtin") -> None:
        """``entries``: name -> (valence, arousal) on the NRC 0..1 scale; ``source`` names the origin."""
        self._va = {name.strip().lower(): (float(nrc_to_canonical(v)), float(nrc_to_canonical(a)))
                    for name, (v, a) in entries.items()}
        self.source = source

    @classmethod
    def builtin(cls) -> "Lexicon":
        """The cited anchor table :data:`ANCHORS_NRC`."""
        return cls(ANCHORS_NRC)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Lexicon":
        """Read an NRC-VAD file (``word<TAB>valence<TAB>arousal<TAB>dominance``, values 0..1).

        A header line is detected (its valence field is not a number) and skipped. The
        file's words extend the built-in anchors and override them where they repeat.
        """
        path = Path(path)
        rows = read_table(path)
        if has_header(rows):
            rows = rows[1:]  # e.g. "Word  Valence  Arousal  Dominance"
        if not rows:
            raise DataError(f"{path}: no lexicon entries")
        entries = dict(ANCHORS_NRC)
        for lineno, fields in rows:
            where = f"{path}:{lineno}"
            if len(fields) < 3:
                raise DataError(f"{where}: expected 'word valence arousal [dominance]', got {len(fields)} field(s)")
            entries[fields[0]] = parse_va(fields[1:3], where, (0.0, 1.0), "the NRC-VAD v1 range")
        return cls(entries, source=f"builtin+{path}")

    @property
    def names(self) -> list[str]:
        """Known names (lexicon words and aliases), sorted."""
        return sorted(set(self._va) | {alias for alias, word in ALIASES.items() if word in self._va})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) is not None

    def __len__(self) -> int:
        return len(self._va)

    def __repr__(self) -> str:
        return f"Lexicon({len(self)} words, source={self.source!r})"

    def _key(self, name: str) -> str | None:
        key = name.strip().lower()
        if key in self._va:
            return key
        alias = ALIASES.get(key)
        return alias if alias in self._va else None

    def check(self, names: Iterable[str]) -> None:
        """Raise ValueError naming every unknown category and listing the known ones."""
        unknown = [name for name in names if name not in self]
        if unknown:
            known = self.names
            listed = ", ".join(known[:_MAX_LISTED])
            if len(known) > _MAX_LISTED:
                listed += f", ... ({len(known)} in all)"
            raise DataError(f"unknown emotion categor{'y' if len(unknown) == 1 else 'ies'} "
                            f"{', '.join(map(repr, unknown))} (lexicon: {self.source}); known: {listed}; "
                            "pass an NRC-VAD lexicon file to map other names")

    def va(self, name: str) -> tuple[float, float]:
        """(valence, arousal) of one category on the canonical scale."""
        self.check([name])
        return self._va[self._key(name)]

    def va_many(self, names: Sequence[str]) -> np.ndarray:
        """(C, 2) array of the categories' (valence, arousal), canonical scale."""
        self.check(names)
        return np.array([self._va[self._key(name)] for name in names], dtype=np.float64).reshape(-1, 2)


def is_number(text: str) -> bool:
    """Whether ``text`` parses as a float (the test that tells a header line from data)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def has_header(rows: Sequence[tuple[int, list[str]]]) -> bool:
    """Whether the first row of :func:`read_table` output is a header: a non-number after its first field."""
    return bool(rows) and not all(map(is_number, rows[0][1][1:]))


def parse_va(fields: Sequence[str], where: str, bounds: tuple[float, float], scale: str) -> tuple[float, float]:
    """(valence, arousal) from two text fields, each checked to lie within ``bounds`` of the named scale."""
    v, a = (parse_number(text, f"{where}: {what}") for text, what in zip(fields, ("valence", "arousal")))
    low, high = bounds
    if not (low <= v <= high and low <= a <= high):
        raise DataError(f"{where}: valence/arousal {v:g}/{a:g} outside {scale} {low:g}..{high:g}")
    return v, a


def parse_number(text: str, where: str) -> float:
    """``float(text)``, or a ValueError "<where>: 'text' is not a number" (NaN/inf rejected too)."""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: {text!r} is not a finite number")
    return value


def normalize_dist(values: Sequence[float], where: str = "distribution") -> np.ndarray:
    """Scale non-negative weights (vote counts or probabilities) to sum to 1.

    Raises ValueError, prefixed with ``where``, for negative, non-finite or all-zero weights.
    """
    weights = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise DataError(f"{where}: weights must be finite and non-negative, got {weights.tolist()}")
    total = weights.sum()
    if total <= 0:
        raise DataError(f"{where}: all weights are zero")
    return weights / total


def sniff_delimiter(line: str) -> str | None:
    """Tab, comma or semicolon, the first found in ``line``; None means runs of whitespace."""
    for delimiter in ("\t", ",", ";"):
        if delimiter in line:
            return delimiter
    return None


def read_table(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows of a delimited text file as (1-based line number, stripped fields).

    The delimiter is sniffed from the first non-blank line (:func:`sniff_delimiter`).
    Fields may be quoted as in CSV. Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    numbered = [(lineno, line) for lineno, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        return []
    delimiter = sniff_delimiter(numbered[0][1])
    if delimiter is None:
        return [(lineno, line.split()) for lineno, line in numbered]
    parsed = csv.reader((line for _, line in numbered), delimiter=delimiter)
    return [(lineno, [field.strip() for field in fields]) for (lineno, _), fields in zip(numbered, parsed)]
