"""One reader per on-disk dataset layout, all yielding the same :class:`~datasets_io.records.Record`.

The readers are registered, with how to recognise their folders and the dataset names that
use them, in :mod:`datasets_io.layouts`; read a dataset with :func:`datasets_io.layouts.read_dataset`.

The layouts on disk are tabled there too.

Readers never open images (the ingest validates the bytes), but they do check that every
file an annotation names exists and stays inside the dataset root; files that do not are
returned in ``ReaderResult.skipped`` with the reason. A malformed annotation file is a
configuration error and raises a one-line ValueError naming the file and line, so a bad
run stops before any training starts. Output is sorted by path and deterministic.
"""
from __future__ import annotations

import os
import posixpath
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Hashable, Optional, Sequence, Union

import numpy as np

from datasets_io.errors import DataError
from datasets_io.lexicon import (CATEGORY_SETS, Lexicon, has_header, normalize_dist, parse_number, parse_va,
                                 read_table, resolve_categories, sam_to_canonical)
from datasets_io.paths import IMAGE_EXTENSIONS
from datasets_io.records import SPLITS, Record, ReaderResult, read_json_object

PathLike = Union[str, Path]
Ratios = Sequence[float]

SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
DEFAULT_RATIOS = (0.8, 0.1, 0.1)

MISSING = "missing on disk"
ESCAPES = "path escapes dataset root"
DUPLICATE = "listed more than once"


# ----------------------------------------------------------------------------- shared helpers

class _Members:
    """Resolves files named relative to one dataset root and remembers what had to be skipped.

    Every reader goes through :meth:`get`, so path safety is decided in one place: an
    absolute name, a ``..`` component, or a path that leaves the root once symlinks are
    resolved is skipped with :data:`ESCAPES`; a name that is not a file on disk with
    :data:`MISSING`; a second mention of the same file with :data:`DUPLICATE`, unless
    ``keep_duplicates`` (then every mention is returned, e.g. SER30K's annotation entries).
    """

    def __init__(self, root: PathLike, keep_duplicates: bool = False) -> None:
        self.root = _existing_dir(root)
        self.keep_duplicates = keep_duplicates
        self.skipped: list[dict] = []
        self._seen: set[str] = set()

    def get(self, *parts: str) -> Optional[str]:
        """The posix path of ``root/part0/part1/...`` relative to the root, or None if skipped."""
        texts = [str(part).replace("\\", "/") for part in parts if part]
        pure = [PurePosixPath(text) for text in texts]
        if any(p.is_absolute() or ".." in p.parts or PureWindowsPath(t).drive for p, t in zip(pure, texts)):
            return self._skip(posixpath.join(*texts), ESCAPES)
        rel = PurePosixPath(*pure).as_posix() if pure else "."
        try:
            real = (self.root / rel).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return self._skip(rel, MISSING)
        if not real.is_relative_to(self.root):
            return self._skip(rel, ESCAPES)
        if not real.is_file():
            return self._skip(rel, MISSING)
        if rel in self._seen and not self.keep_duplicates:
            return self._skip(rel, DUPLICATE)
        self._seen.add(rel)
        return rel

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})
        return None


def _existing_dir(root: PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root {path} does not exist or is not a folder")
    return path.resolve()


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted); hidden files and folders are ignored.

    Symlinked folders are not followed; symlinked files are listed and left to
    :class:`_Members` to check.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, name) for name in filenames
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def stratified_split(keys: Sequence[Hashable], ratios: Ratios = DEFAULT_RATIOS, seed: int = 42) -> list[str]:
    """Assign "train" / "val" / "test" to each item so that every key (class) is split by ``ratios``.

    Each stratum is shuffled with its own generator seeded by ``(seed, key)``, so the result
    depends only on the seed and the items' order within their stratum, never on which other
    strata exist. Per stratum of n items, val gets round(n * ratios[1]) and test
    round(n * ratios[2]) items (never all of them: train keeps at least one).
    """
    ratios = _check_ratios(ratios)
    strata: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        strata.setdefault(key, []).append(index)
    splits = ["train"] * len(keys)
    for key, members in strata.items():
        order = list(members)
        random.Random(f"{seed}/{key}").shuffle(order)
        n_val = round(len(order) * ratios[1])
        n_test = min(round(len(order) * ratios[2]), max(len(order) - 1 - n_val, 0))
        for index in order[:n_val]:
            splits[index] = "val"
        for index in order[n_val:n_val + n_test]:
            splits[index] = "test"
    return splits


def _assign_splits(records: list[Record], key: Callable[[Record], Hashable], ratios: Ratios, seed: int) -> None:
    """Sort ``records`` by path, then set their split with :func:`stratified_split` over ``key``."""
    records.sort(key=lambda record: record.path)
    for record, split in zip(records, stratified_split([key(r) for r in records], ratios, seed)):
        record.split = split


def _check_ratios(ratios: Ratios) -> tuple[float, float, float]:
    values = tuple(float(r) for r in ratios)
    if len(values) != 3 or any(r < 0 for r in values) or abs(sum(values) - 1.0) > 1e-6:
        raise DataError(f"split_ratios must be three non-negative numbers (train, val, test) summing to 1, "
                        f"got {list(ratios)}")
    return values


def _as_lexicon(lexicon: Union[None, PathLike, Lexicon]) -> Lexicon:
    """None -> the built-in anchors; a path -> that NRC-VAD file; a Lexicon as is."""
    if lexicon is None:
        return Lexicon.builtin()
    if isinstance(lexicon, Lexicon):
        return lexicon
    return Lexicon.from_file(lexicon)


def _inside(root: Path, path: PathLike, what: str) -> Path:
    """``path`` (relative to ``root`` or absolute) resolved; it must be a folder inside the root."""
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise DataError(f"{what} {path} is outside the dataset root {root}")
    if not resolved.is_dir():
        raise FileNotFoundError(f"{what} {resolved} does not exist or is not a folder")
    return resolved


def _result(records: list[Record], classes: list[str], members: _Members, **params) -> ReaderResult:
    records.sort(key=lambda record: record.path)
    return ReaderResult(records, classes, members.skipped, {"root": str(members.root), **params})


# ----------------------------------------------------------------------------- folder

def read_folder(root: PathLike, categories: Union[None, str, Sequence[str]] = None,
                split_ratios: Ratios = DEFAULT_RATIOS, seed: int = 42,
                lexicon: Union[None, PathLike, Lexicon] = None) -> ReaderResult:
    """A folder per category (FI, Flickr, Instagram); folder names match case-insensitively.

    ``root/train``, ``root/val`` (or ``valid`` / ``validation``) and ``root/test`` are used
    as the split when present; otherwise a seeded split stratified by category.
    ``categories``: a list of names, a built-in set name ("FI", "Flickr", ...), or None to
    take the (lower-cased, sorted) folder names. VA is the lexicon anchor of the category.
    """
    members = _Members(root)
    lexicon = _as_lexicon(lexicon)
    split_roots = _split_folders(members.root)
    folders = {split: _category_folders(folder) for split, folder in split_roots.items()}
    on_disk = sorted({name for by_name in folders.values() for name in by_name})
    if not on_disk:
        raise DataError(f"{members.root}: no category folders")
    classes = on_disk if categories is None else resolve_categories(categories)
    unknown = [by_name[name] for by_name in folders.values() for name in by_name if name not in classes]
    if unknown:
        raise DataError(f"{unknown[0]}: folder is not one of the categories {classes}")
    absent = [name for name in classes if name not in on_disk]
    if absent:
        raise DataError(f"{members.root}: no folder for categor{'y' if len(absent) == 1 else 'ies'} "
                        f"{', '.join(absent)}")
    anchors = lexicon.va_many(classes)

    records = []
    for split, by_name in folders.items():
        for name, folder in by_name.items():
            label = classes.index(name)
            for file in _image_files(folder):
                rel = members.get(file.relative_to(members.root).as_posix())
                if rel is not None:
                    records.append(Record(rel, split or "", label=label, valence=float(anchors[label, 0]),
                                          arousal=float(anchors[label, 1]), va_source="lexicon", group=name))
    if None in split_roots:
        _assign_splits(records, lambda record: record.label, split_ratios, seed)
    return _result(records, classes, members, layout="folder", categories=classes,
                   split_ratios=list(split_ratios), seed=seed, lexicon=lexicon.source,
                   split_source="seeded" if None in split_roots else "folders")


def _split_folders(root: Path) -> dict[Optional[str], Path]:
    """{split: folder} from ``train/ val/ test/`` folders, or {None: root} when there are none."""
    by_lower = {p.name.lower(): p for p in _visible_dirs(root)}
    found = {split: next((by_lower[n] for n in names if n in by_lower), None)
             for split, names in SPLIT_FOLDER_NAMES.items()}
    present = [split for split, folder in found.items() if folder is not None]
    if not present:
        return {None: root}
    if len(present) < len(SPLITS):
        missing = [" or ".join(SPLIT_FOLDER_NAMES[s]) for s in SPLITS if found[s] is None]
        raise DataError(f"{root}: has split folder(s) {', '.join(present)} but no {'; no '.join(missing)} "
                        "folder; provide all three or none (then a seeded split is made)")
    return found


def _category_folders(folder: Path) -> dict[str, Path]:
    """{lower-cased name: folder} of the category folders inside ``folder``."""
    by_name: dict[str, Path] = {}
    for path in _visible_dirs(folder):
        name = path.name.lower()
        if name in by_name:
            raise DataError(f"{path}: folder name repeats {by_name[name].name} case-insensitively")
        by_name[name] = path
    return by_name


# ----------------------------------------------------------------------------- label distributions

IMAGE_COLUMN_NAMES = ("image", "img", "name", "filename", "file_name", "file", "image_name")
TABLE_EXTENSIONS = (".csv", ".tsv", ".txt")


def read_ldl(root: PathLike, table: Optional[PathLike] = None, images_dir: Optional[PathLike] = None,
             categories: Union[str, Sequence[str]] = "FI", split_ratios: Ratios = DEFAULT_RATIOS,
             seed: int = 42, lexicon: Union[None, PathLike, Lexicon] = None) -> ReaderResult:
    """A label-distribution table (FlickrLDL, TwitterLDL): image name + votes over the categories.

    ``table``: the CSV/TSV (delimiter sniffed), default the single ``*.csv|*.tsv|*.txt`` in
    ``root``. A header names the columns (matched case-insensitively; the image column is
    one named image/img/name/filename, else the first); without one, rows are
    ``name, one count per category in order``. Votes may be counts or probabilities:
    label_dist is their normalisation, label the argmax, VA the distribution-weighted
    mean of the lexicon anchors. Images live in ``images_dir`` (relative to ``root``),
    default ``root/images`` if it exists, else ``root``.
    """
    members = _Members(root)
    lexicon = _as_lexicon(lexicon)
    classes = resolve_categories(categories)
    anchors = lexicon.va_many(classes)
    table_path = _find_table(members.root) if table is None else members.root / table
    if images_dir is None:
        images_dir = "images" if (members.root / "images").is_dir() else "."
    images_rel = _inside(members.root, images_dir, "images_dir").relative_to(members.root).as_posix()
    images_rel = "" if images_rel == "." else images_rel

    rows = read_table(table_path)
    if not rows:
        raise DataError(f"{table_path}: the table is empty")
    image_col, vote_cols, rows = _ldl_columns(table_path, rows, classes)
    records = []
    for lineno, fields in rows:
        where = f"{table_path}:{lineno}"
        if len(fields) <= max(image_col, *vote_cols):
            raise DataError(f"{where}: expected at least {max(image_col, *vote_cols) + 1} fields, got {len(fields)}")
        votes = [parse_number(fields[col], f"{where}: vote for {name}") for col, name in zip(vote_cols, classes)]
        dist = normalize_dist(votes, where)
        rel = members.get(images_rel, fields[image_col])
        if rel is not None:
            v, a = dist @ anchors
            records.append(Record(rel, "", label=int(np.argmax(dist)), label_dist=dist.tolist(),
                                  valence=float(v), arousal=float(a), va_source="lexicon",
                                  group=classes[int(np.argmax(dist))]))
    _assign_splits(records, lambda record: record.label, split_ratios, seed)
    return _result(records, classes, members, layout="ldl", table=str(table_path), images_dir=images_rel,
                   categories=classes, split_ratios=list(split_ratios), seed=seed, lexicon=lexicon.source)


def _find_table(root: Path) -> Path:
    tables = sorted(p for p in root.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TABLE_EXTENSIONS)
    if len(tables) != 1:
        found = ", ".join(p.name for p in tables) or "none"
        raise DataError(f"{root}: expected exactly one *.csv/*.tsv/*.txt label table, found {found}; "
                        "pass table=")
    return tables[0]


def _ldl_columns(path: Path, rows: list[tuple[int, list[str]]],
                 classes: list[str]) -> tuple[int, list[int], list[tuple[int, list[str]]]]:
    """(image column, vote column per class, data rows) from the header if there is one."""
    lineno, first = rows[0]
    if has_header(rows):
        header = [field.lower() for field in first]
        image_col = next((header.index(n) for n in IMAGE_COLUMN_NAMES if n in header), 0)
        missing = [name for name in classes if name not in header]
        if missing:
            raise DataError(f"{path}:{lineno}: no column for {', '.join(missing)} in header {first}")
        return image_col, [header.index(name) for name in classes], rows[1:]
    return 0, list(range(1, len(classes) + 1)), rows


# ----------------------------------------------------------------------------- Emotion6

EMOTION6_TABLE = "ground_truth.txt"
EMOTION6_CLASSES = CATEGORY_SETS["Emotion6"]
EMOTION6_IMAGES = "images"
EMOTION6_SPLIT_FOLDERS = ("train", "test")  # the published layout's given split (no images/ folder)
DEFAULT_VAL_FRACTION = 0.2                   # the published random_split(train, [0.8, 0.2])


@dataclass(frozen=True)
class _Emotion6Row:
    """One parsed ground_truth.txt row: SAM valence/arousal and the 7 normalised probabilities."""

    where: str                # "<table>:<line>", for messages
    valence: float
    arousal: float
    dist: np.ndarray

    def record(self, rel: str, split: str = "") -> Record:
        """The image at ``rel`` (``<folder>/<emotion>/<file>``): canonical VA, label = argmax."""
        parts = PurePosixPath(rel).parts
        return Record(rel, split, label=int(np.argmax(self.dist)), label_dist=self.dist.tolist(),
                      valence=float(sam_to_canonical(self.valence)), arousal=float(sam_to_canonical(self.arousal)),
                      va_source="measured", group=parts[1] if len(parts) > 2 else "")


def read_emotion6(root: PathLike, split_ratios: Optional[Ratios] = None, seed: int = 42,
                  train_list: Optional[PathLike] = None, test_list: Optional[PathLike] = None,
                  val_fraction: Optional[float] = None) -> ReaderResult:
    """Cornell Emotion6: ``ground_truth.txt`` rows ``<emotion>/<n>.jpg  V  A  p1..p7``, and its images.

    Valence and arousal are SAM ratings (1..9), converted to the canonical scale
    (va_source "measured"); label_dist is the 7 probabilities (anger, disgust, fear, joy,
    sadness, surprise, neutral) normalised, label their argmax, group the image's emotion folder.

    The split (``params["split_source"]``), decided in this order:

    * ``"lists"``: ``train_list`` and ``test_list`` given, files of one ``anger/1.jpg``-style
      path per line, relative to ``images/`` (the list files: absolute, or relative to the root);
    * ``"seeded"``: ``images/<emotion>/<n>.jpg`` (Emotion6 as Cornell ships it, no split): a
      split stratified by folder, ``split_ratios`` (default 0.8/0.1/0.1) seeded by ``seed``;
    * ``"folders"``: no ``images/`` but ``train/<emotion>/<file>`` and ``test/<emotion>/<file>``
      (the published training layout); ``train/anger/1.jpg`` is ground_truth.txt's
      ``anger/1.jpg``, or, when that is absent and the file is named ``anger_1.jpg``, too.

    With a given split (lists or folders), test is exactly the given test images and val a
    seeded random ``val_fraction`` (default 0.2) of the given training images, as the
    published ``random_split(train, [0.8, 0.2])``. An image given twice, or one that
    ground_truth.txt does not list, is a one-line DataError naming the file and line.
    """
    members = _Members(root)
    rows = _emotion6_rows(members.root / EMOTION6_TABLE)
    source = _emotion6_split_source(members.root, train_list, test_list)
    classes = list(EMOTION6_CLASSES)
    if source == "seeded":
        if val_fraction is not None:
            raise DataError(f"{members.root}: val_fraction applies to a given split (train_list/test_list or "
                            f"train/ and test/ folders); this one is seeded: use split_ratios")
        ratios = DEFAULT_RATIOS if split_ratios is None else split_ratios
        records = [row.record(rel) for key, row in rows
                   if (rel := members.get(EMOTION6_IMAGES, key)) is not None]
        _assign_splits(records, lambda record: record.group, ratios, seed)
        return _result(records, classes, members, layout="emotion6", split_source=source,
                       split_ratios=list(ratios), seed=seed)
    if split_ratios is not None:
        raise DataError(f"{members.root}: split_ratios applies to the seeded split; this split is given "
                        f"({source}): use val_fraction")
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else _check_fraction(val_fraction)
    table = {}
    for key, row in rows:
        table.setdefault(key, row)
    if source == "lists":
        lists = {"train": members.root / train_list, "test": members.root / test_list}
        given = [entry for split, path in lists.items() for entry in _listed(path, split, table)]
    else:
        lists = {}
        given = [entry for split in EMOTION6_SPLIT_FOLDERS for entry in _in_folder(members.root, split, table)]
    _check_disjoint(given)
    records = [table[key].record(rel, split) for split, key, parts, _ in given
               if (rel := members.get(*parts)) is not None]
    _hold_out_val(records, fraction, seed)
    return _result(records, classes, members, layout="emotion6", split_source=source, val_fraction=fraction,
                   seed=seed, **{f"{split}_list": str(path) for split, path in lists.items()})


def _emotion6_rows(path: Path) -> list[tuple[str, _Emotion6Row]]:
    """``(image key, row)`` per row of ground_truth.txt, in file order (the header line skipped)."""
    rows = read_table(path)
    if has_header(rows):
        rows = rows[1:]  # "[image_filename]  [valence]  [arousal]  [prob. anger] ..."
    n_fields = 3 + len(EMOTION6_CLASSES)
    parsed = []
    for lineno, fields in rows:
        where = f"{path}:{lineno}"
        if len(fields) != n_fields:
            raise DataError(f"{where}: expected {n_fields} fields (image, valence, arousal, "
                            f"{len(EMOTION6_CLASSES)} probabilities), got {len(fields)}")
        valence, arousal = parse_va(fields[1:3], where, (1.0, 9.0), "the SAM scale")
        dist = normalize_dist([parse_number(text, f"{where}: probability") for text in fields[3:]], where)
        parsed.append((_key(fields[0]), _Emotion6Row(where, valence, arousal, dist)))
    return parsed


def _key(name: str) -> str:
    """An image name as ground_truth.txt keys it: posix separators."""
    return name.strip().replace("\\", "/")


def _emotion6_split_source(root: Path, train_list: Optional[PathLike], test_list: Optional[PathLike]) -> str:
    """``"lists"``, ``"seeded"`` or ``"folders"`` (see :func:`read_emotion6`); a one-line error otherwise."""
    if (train_list is None) != (test_list is None):
        raise DataError(f"{root}: train_list and test_list go together; got only "
                        f"{'train_list' if test_list is None else 'test_list'}")
    has_images = (root / EMOTION6_IMAGES).is_dir()
    if train_list is not None:
        if not has_images:
            raise DataError(f"{root}: train_list/test_list name images under {EMOTION6_IMAGES}/, "
                            "which is not a folder here")
        return "lists"
    if has_images:
        return "seeded"
    present = [name for name in EMOTION6_SPLIT_FOLDERS if (root / name).is_dir()]
    if len(present) == len(EMOTION6_SPLIT_FOLDERS):
        return "folders"
    found = f"; found only {present[0]}/" if present else ""
    raise DataError(f"{root}: no {EMOTION6_IMAGES}/ folder, nor both train/ and test/ folders{found}")


def _listed(path: Path, split: str, table: dict) -> list[tuple[str, str, tuple[str, ...], str]]:
    """``(split, key, path parts, where)`` per line of a split list; every key must be in the table."""
    entries = []
    for lineno, fields in read_table(path):
        where = f"{path}:{lineno}"
        if len(fields) != 1:
            raise DataError(f"{where}: expected one image path per line, got {len(fields)} fields")
        key = _key(fields[0])
        if key not in table:
            raise DataError(f"{where}: {key} is not in {EMOTION6_TABLE}")
        entries.append((split, key, (EMOTION6_IMAGES, key), where))
    return entries


def _in_folder(root: Path, split: str, table: dict) -> list[tuple[str, str, tuple[str, ...], str]]:
    """``(split, key, path parts, where)`` per image of ``root/split/<emotion>/``, keyed in the table
    as ``<emotion>/<file>``, else (published naming) ``<emotion>_<n>.jpg`` as ``<emotion>/<n>.jpg``."""
    entries = []
    for file in _image_files(root / split):
        parts = file.relative_to(root / split).parts
        if len(parts) != 2:
            raise DataError(f"{file}: expected {split}/<emotion>/<file>")
        folder, name = parts
        keys = [f"{folder}/{name}"] + ([f"{folder}/{name[len(folder) + 1:]}"]
                                       if name.startswith(f"{folder}_") else [])
        key = next((k for k in keys if k in table), None)
        if key is None:
            raise DataError(f"{file}: not in {EMOTION6_TABLE} (looked up as {' or '.join(keys)})")
        entries.append((split, key, (split, folder, name), str(file)))
    return entries


def _check_disjoint(entries: list[tuple[str, str, tuple[str, ...], str]]) -> None:
    """Every image at most once across the given splits; a one-line error naming both places otherwise."""
    first: dict[str, str] = {}
    for _, key, _, where in entries:
        if key in first:
            raise DataError(f"{where}: {key} is given twice (also at {first[key]})")
        first[key] = where


def _check_fraction(fraction: float) -> float:
    value = float(fraction)
    if not 0.0 <= value < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
    return value


def _hold_out_val(records: list[Record], fraction: float, seed: int) -> None:
    """Move a seeded random ``fraction`` of the train records (by path order) to val."""
    train = sorted((record for record in records if record.split == "train"), key=lambda record: record.path)
    for record in random.Random(f"{seed}/val").sample(train, round(len(train) * fraction)):
        record.split = "val"


# ----------------------------------------------------------------------------- SER30K

SER30K_ANNOTATIONS = ("Annotations", "image-level")
SER30K_CLASSES = CATEGORY_SETS["SER30K"]


def read_ser30k(root: PathLike, lexicon: Union[None, PathLike, Lexicon] = None,
                keep_duplicates: bool = False) -> ReaderResult:
    """SER30K stickers: ``Annotations/image-level/{train,val,test}.json`` + ``Images/<topic>/<file>``.

    Each json is ``{"annotations": [{"topic", "file_name", "text", "anno1", "anno2",
    "anno3", "anno"}], "categories": optional}`` with ``anno`` in 1..C (label = anno - 1).
    Classes come from ``categories`` (names, or {"id", "name"} dicts ordered by id) when
    present, else the 7 SER30K emotions. VA is the lexicon anchor of the class
    (happiness -> joy); text is the sticker's embedded text; group its topic.

    An entry naming a file already listed is skipped ("listed more than once") unless
    ``keep_duplicates``: then every entry is a record, as the published ``SER_Full`` dataset
    trains on every annotation entry (a file listed twice is trained on twice; its rows share
    the image_id).
    """
    members = _Members(root, keep_duplicates=keep_duplicates)
    lexicon = _as_lexicon(lexicon)
    documents = {split: _load_json(members.root.joinpath(*SER30K_ANNOTATIONS, f"{split}.json")) for split in SPLITS}
    classes = _ser30k_classes(documents)
    anchors = lexicon.va_many(classes)
    records = []
    for split, (path, document) in documents.items():
        annotations = document.get("annotations")
        if not isinstance(annotations, list):
            raise DataError(f"{path}: expected an 'annotations' list")
        for index, entry in enumerate(annotations):
            where = f"{path}: annotation #{index}"
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("topic", "file_name")):
                raise DataError(f"{where}: needs string fields 'topic' and 'file_name'")
            anno = entry.get("anno")
            if isinstance(anno, str) and anno.strip().isdigit():
                anno = int(anno)
            if isinstance(anno, bool) or not isinstance(anno, int) or not 1 <= anno <= len(classes):
                raise DataError(f"{where}: anno {anno!r} is not in 1..{len(classes)}")
            rel = members.get("Images", entry["topic"], entry["file_name"])
            if rel is not None:
                label = anno - 1
                records.append(Record(rel, split, label=label, valence=float(anchors[label, 0]),
                                      arousal=float(anchors[label, 1]), va_source="lexicon",
                                      text=str(entry.get("text") or ""), group=entry["topic"]))
    return _result(records, classes, members, layout="ser30k", categories=classes, lexicon=lexicon.source,
                   keep_duplicates=keep_duplicates)


def _load_json(path: Path) -> tuple[Path, dict]:
    return path, read_json_object(path, "SER30K split file is missing (train.json, val.json and test.json "
                                        "are all required)", "a JSON object with an 'annotations' list")


def _ser30k_classes(documents: dict[str, tuple[Path, dict]]) -> list[str]:
    """Class names from the first json with a ``categories`` field (all that have one must agree)."""
    found: list[tuple[Path, list[str]]] = []
    for path, document in documents.values():
        categories = document.get("categories")
        if categories is None:
            continue
        if isinstance(categories, list) and all(isinstance(c, str) for c in categories):
            names = categories
        elif isinstance(categories, list) and all(isinstance(c, dict) and "name" in c and "id" in c
                                                  for c in categories):
            names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
        else:
            raise DataError(f"{path}: 'categories' must be a list of names or of {{'id', 'name'}} objects")
        found.append((path, resolve_categories(names)))
    if any(names != found[0][1] for _, names in found):
        raise DataError(f"{found[0][0]}: 'categories' differ between the split files")
    return found[0][1] if found else list(SER30K_CLASSES)
