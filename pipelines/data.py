"""From a dataset name, a raw folder or an ingested shard folder to Ray Datasets of tensors.

Dataset names, layouts, their detection and what each can serve come from the one registry,
:mod:`datasets_io.layouts`; the default folders from :mod:`datasets_io.paths`.

Everything here runs on the driver *before* any training starts, so a wrong path, an unknown
dataset name or mismatched classes stop the job with one line. Data that is not yet ingested is
ingested first with the same code as ``python -m datasets_io ingest``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from datasets_io import storage
from datasets_io.errors import DataError
from datasets_io.layouts import (DATASETS, DEMO_SETS, MEASURED_VA, dataset_options, detect_layout, ingest_options,
                                 require)
from datasets_io.paths import cache_dir as default_cache_dir
from datasets_io.paths import data_dir
from datasets_io.records import is_ingested, read_manifest


def _known() -> str:
    return ", ".join(DATASETS)


def check_dataname(name: str, flag: str = "") -> None:
    """A known dataset name or an existing path (local, or shards on object storage); anything else stops
    with one line (before any work)."""
    if name in DATASETS or (storage.is_uri(name) and storage.exists(name)) or Path(name).expanduser().exists():
        return
    where = f" ({flag})" if flag else ""
    if os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"{name}: no such dataset folder{where}")
    raise DataError(f"unknown dataset {name!r}; known names: {_known()} (or a path to a dataset folder){where}")


def resolve_shards(name_or_path: str, *, data_root: Optional[str] = None, max_side: int = 512,
                   lexicon: Optional[str] = None, seed: int = 42, reader_options: Optional[dict] = None,
                   show_progress: bool = True) -> Path:
    """The ingested shard folder (or object-store URI) for a dataset name or path, ingesting it first when
    needed.

    - ingested shards (a folder or a URI with ``manifest.json``): used as they are;
    - a raw folder: ingested into ``<data_dir>/<folder name>`` (once);
    - a known name (FI, Flickr, ...): ``<data_dir>/<name>`` if ingested, else ``data_root`` is ingested there.
    """
    if storage.is_uri(name_or_path):
        if is_ingested(name_or_path):
            return name_or_path
        raise DataError(f"{name_or_path}: not ingested shards (no manifest.json); raw datasets are read from a "
                        "local or mounted folder: ingest them first (python -m datasets_io ingest --out URI)")
    path = Path(name_or_path).expanduser()
    if path.exists():
        path = path.resolve()
        if is_ingested(path):
            return path
        if not path.is_dir():
            raise DataError(f"{path}: neither an ingested shard folder nor a raw dataset folder")
        layout = detect_layout(path)
        return _ingest_once(layout, path, data_dir() / path.name, {"seed": seed, **(reader_options or {})},
                            max_side, lexicon, show_progress, checked=reader_options)
    check_dataname(name_or_path)
    layout, options = dataset_options(name_or_path)
    out = data_dir() / name_or_path
    if is_ingested(out):
        return out
    if data_root is None:
        raise FileNotFoundError(
            f"{out}: dataset {name_or_path} is not ingested yet; pass its raw folder with --data-root "
            f"(or run: python -m datasets_io ingest --layout {layout} --root RAW --out {out})")
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder (--data-root for {name_or_path})")
    return _ingest_once(layout, root, out, {**options, "seed": seed, **(reader_options or {})}, max_side, lexicon,
                        show_progress, checked=reader_options)


def _ingest_once(layout: str, root: Path, out: Path, options: dict, max_side: int, lexicon: Optional[str],
                 show_progress: bool, checked: Optional[dict] = None) -> Path:
    """Ingest ``root`` into ``out`` unless it is there already; ``checked``: the reader options a recipe
    asks for, compared (with ``max_side``) against an existing ingest's."""
    options = ingest_options(layout, options)  # e.g. SER30K ships its own split: no seed
    if is_ingested(out):
        _note_other_ingest(out, max_side, ingest_options(layout, checked or {}))
    else:
        from datasets_io.ingest import ingest
        from pipelines import cli

        cli.init_ray()  # Ray started here, not inside the ingest, so that the console settings apply
        ingest(layout, root, out, max_side=max_side, reader_options=options, lexicon_path=lexicon,
               show_progress=show_progress)
    return out


def _note_other_ingest(out: Path, max_side: int, options: dict) -> None:
    """One line when shards already on disk were ingested otherwise than the recipe asks (they are used
    as they are; ``python -m datasets_io ingest ... --overwrite`` makes them again)."""
    params = read_manifest(out).get("params") or {}
    differ = []
    if params.get("max_side") != max_side:
        differ.append(f"max_side {params.get('max_side')} (the recipe: {max_side})")
    stored = params.get("reader_options") or {}
    differ += [f"{k} {stored.get(k)!r} (the recipe: {v!r})" for k, v in options.items() if stored.get(k, v) != v]
    if differ:
        print(f"note: {out} was ingested with {', '.join(differ)}; using it as it is "
              f"(re-ingest with --overwrite to match the recipe)")


def demo_shards(cache_dir: Optional[str] = None, *, images_per_class: int = 60, image_size: int = 64,
                seed: int = 0, show_progress: bool = True) -> dict[str, Path]:
    """Generate the embedded demo datasets (once) and ingest them (once); returns their shard folders,
    keyed as :data:`datasets_io.layouts.DEMO_SETS` (``demo_key(role)`` names the one for a role)."""
    from datasets_io.demo import ensure_demo

    cache = Path(cache_dir or default_cache_dir()).expanduser().resolve()
    raw = ensure_demo(cache / "raw", images_per_class=images_per_class, image_size=image_size, seed=seed)
    shards = {}
    for key, (layout, options) in DEMO_SETS.items():
        out = cache / "shards" / f"demo-{key}-{images_per_class}-{image_size}-{seed}"
        shards[key] = _ingest_once(layout, Path(raw[key]), out, {**options, "seed": seed}, max(image_size * 2, 64),
                                   None, show_progress)
    return shards


def check_shards(path, *, role: str, need_va: bool = False, need_labels: bool = False,
                 splits=("train", "val", "test")) -> dict:
    """Read a manifest and make sure it can serve ``role``; returns the manifest."""
    manifest = {**read_manifest(path), "shards": str(path)}
    counts = manifest.get("counts", {})
    empty = [s for s in splits if not counts.get(s)]
    if empty:
        raise DataError(f"{path}: the {role} dataset has no images in split(s) {', '.join(empty)} "
                        f"(counts {counts})")
    if need_labels and not manifest.get("classes"):
        raise DataError(f"{path}: the {role} dataset has no classes in its manifest")
    if need_va:
        require(manifest, MEASURED_VA, path, role)
    return manifest


def split_dataset(path, split: str, prep, *, num_classes: int, seed: int, augment: bool = False,
                  keep_text: bool = False, train_rows: Optional[int] = None):
    """One split's Ray Dataset of uint8 pixels and dense targets (never float32: the workers normalise
    on their device), prepared as ``prep`` says.

    The split's image bytes are held in Ray's object store when small, else streamed from the files
    (:func:`datasets_io.ray_data.load_split`). ``split == "train"`` is reordered every epoch (rows
    permuted once with ``seed``, then block or file order drawn per epoch), repeated
    (``prep.repeated_aug`` over ``train_rows``) and handed over as stored bytes with
    ``prep.decode="device"``. ``augment``: the training transform (fresh draws every epoch; the
    training split, or a validation split the recipe augments), else the evaluation transform.
    """
    from datasets_io.prep import ImageTransform
    from datasets_io.ray_data import load_split, repeated_augmentation

    train = split == "train"
    if train:
        transform = prep.batch_transform(train=True, num_classes=num_classes, keep_text=keep_text)
    else:   # evaluation splits are decoded on the CPU, whatever prep.decode says
        transform = ImageTransform(prep, train=augment, num_classes=num_classes, keep_text=keep_text,
                                   seed=None if augment else seed)
    ds = load_split(path, split, shuffle_seed=seed if train else None)
    if train and prep.repeated_aug > 1:
        if not train_rows:
            raise ValueError("repeated augmentation needs the number of training rows")
        ds = repeated_augmentation(ds, prep.repeated_aug, train_rows)
    ds = ds.map_batches(transform, batch_format="numpy")
    # Training shows one line per epoch; Ray Data's per-operator bars, streamed from every worker each
    # epoch, would bury it (the ingest keeps its bars).
    ds.context.enable_progress_bars = False
    return ds


def training_datasets(manifest: dict, prep, *, num_classes: int, seed: int, splits=("train", "val"),
                      keep_text: bool = False) -> dict:
    """Ray Datasets per split of an ingested dataset (its ``manifest``, as :func:`check_shards` returns
    it), prepared as ``prep`` says (:func:`split_dataset`); the validation split takes the training
    transform when the recipe says so for the dataset's layout (``prep.val_augment``)."""
    from pipelines import cli

    # Ray Data's first call would start Ray itself, with Ray's console (every worker's log, INFO lines);
    # started here, it gets the project's console settings. (With a cached demo nothing else starts it first.)
    cli.init_ray()
    path = manifest["shards"]
    augment_val = prep.validates_like_training(manifest.get("layout"))
    return {split: split_dataset(path, split, prep, num_classes=num_classes, seed=seed, keep_text=keep_text,
                                 augment=split == "val" and augment_val, train_rows=manifest["counts"]["train"])
            for split in splits}


class Shards:
    """An ingested dataset a pipeline uses: its manifest, classes and their VA anchors, and its Ray
    Datasets, built once per image preparation (a sweep's trials that change no ``prep`` field share them)."""

    def __init__(self, manifest: dict, lexicon):
        self.manifest = manifest
        self.classes = tuple(manifest["classes"])
        lexicon.check(self.classes)
        self.anchors = tuple(tuple(float(x) for x in row) for row in lexicon.va_many(self.classes))
        self._cache: dict = {}

    @property
    def layout(self) -> str:
        return self.manifest.get("layout", "")

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts", {})

    @property
    def max_side(self) -> Optional[int]:
        return (self.manifest.get("params") or {}).get("max_side")

    def datasets(self, prep, seed: int, splits=("train", "val", "test"), keep_text: bool = False) -> dict:
        key = (prep, seed, tuple(splits), keep_text)
        if key not in self._cache:
            self._cache[key] = training_datasets(self.manifest, prep, num_classes=len(self.classes), seed=seed,
                                                 splits=splits, keep_text=keep_text)
        return self._cache[key]

    def local_split(self, prep, seed: int, *, keep_text: bool = False, post=None):
        """The training split as the workers read it themselves in a ``deterministic`` stage."""
        from pipelines.batches import LocalSplit

        return LocalSplit(self.manifest["shards"], "train", prep, len(self.classes), seed, keep_text=keep_text,
                          post=post)

    def training_images(self, prep, seed: int):
        """The training and validation images, with the evaluation transform, as one dataset: what the
        published LDL code scores as its test split (``DimensionalDataset`` reads ``train/`` in test mode)."""
        key = ("training_images", prep, seed)
        if key not in self._cache:
            path = self.manifest["shards"]
            parts = [split_dataset(path, split, prep, num_classes=len(self.classes), seed=seed, augment=False)
                     for split in ("train", "val")]
            self._cache[key] = parts[0].union(parts[1])
        return self._cache[key]
