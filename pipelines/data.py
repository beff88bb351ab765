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

from datasets_io.errors import DataError
from datasets_io.layouts import (DATASETS, DEMO_SETS, MEASURED_VA, dataset_options, detect_layout, ingest_options,
                                 require)
from datasets_io.paths import cache_dir as default_cache_dir
from datasets_io.paths import data_dir
from datasets_io.records import is_ingested, read_manifest


def _known() -> str:
    return ", ".join(DATASETS)


def check_dataname(name: str, flag: str = "") -> None:
    """A known dataset name or an existing path; anything else stops with one line (before any work)."""
    if name in DATASETS or Path(name).expanduser().exists():
        return
    where = f" ({flag})" if flag else ""
    if os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"{name}: no such dataset folder{where}")
    raise DataError(f"unknown dataset {name!r}; known names: {_known()} (or a path to a dataset folder){where}")


def resolve_shards(name_or_path: str, *, data_root: Optional[str] = None, max_side: int = 512,
                   lexicon: Optional[str] = None, seed: int = 42, show_progress: bool = True) -> Path:
    """The ingested shard folder for a dataset name or path, ingesting it first when needed.

    - an ingested folder (has ``manifest.json``): used as it is;
    - a raw folder: ingested into ``<data_dir>/<folder name>`` (once);
    - a known name (FI, Flickr, ...): ``<data_dir>/<name>`` if ingested, else ``data_root`` is ingested there.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        path = path.resolve()
        if is_ingested(path):
            return path
        if not path.is_dir():
            raise DataError(f"{path}: neither an ingested shard folder nor a raw dataset folder")
        layout = detect_layout(path)
        return _ingest_once(layout, path, data_dir() / path.name, {"seed": seed}, max_side, lexicon, show_progress)
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
    return _ingest_once(layout, root, out, {**options, "seed": seed}, max_side, lexicon, show_progress)


def _ingest_once(layout: str, root: Path, out: Path, options: dict, max_side: int, lexicon: Optional[str],
                 show_progress: bool) -> Path:
    options = ingest_options(layout, options)  # e.g. SER30K ships its own split: no seed
    if not is_ingested(out):
        from datasets_io.ingest import ingest
        from pipelines import cli

        cli.init_ray()  # Ray started here, not inside the ingest, so that the console settings apply
        ingest(layout, root, out, max_side=max_side, reader_options=options, lexicon_path=lexicon,
               show_progress=show_progress)
    return out


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


def check_shards(path: Path, *, role: str, need_va: bool = False, need_labels: bool = False,
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


def training_datasets(path: Path, *, image_size: int, num_classes: int, seed: int, augment: str = "basic",
                      splits=("train", "val"), keep_text: bool = False, image_cfg: Optional[dict] = None,
                      crop_scale: Optional[tuple] = None, auto_augment: Optional[str] = None,
                      repeated_aug: int = 1, train_rows: Optional[int] = None, decode: str = "cpu") -> dict:
    """Ray Datasets per split: uint8 pixels (decoded, cropped, augmented on ``train`` only; the
    workers normalise them on their device with the recipe's mean/std), never float32.

    Each split's JPEG bytes are held in Ray's object store when small, else streamed from the files
    (:func:`datasets_io.ray_data.load_split`); ``train`` is reordered every epoch (rows permuted
    once with ``seed``, then block or file order drawn per epoch).

    ``decode="device"``: the ``train`` split hands over the stored JPEG bytes and targets
    (:class:`datasets_io.shards.ImageBytes`); the workers decode and augment on their device
    (:class:`datasets_io.pixels.DeviceImagePipeline`). Evaluation splits always use the CPU eval
    transform, the one ``pipelines.predict`` uses.

    ``image_cfg`` (``mean``, ``std``, ``interpolation``, ``crop_pct``; see
    ``emotion_models.va.data_config``) prepares images as the backbone's pretrained_cfg says;
    without it, timm's ImageNet defaults. ``train``: RandomResizedCrop (``crop_scale``), flip,
    ``augment`` (RandAugment with the ``auto_augment`` policy), and DeiT's repeated augmentation
    when ``repeated_aug`` > 1 (over ``train_rows`` rows); fresh draws every epoch. Others: resize +
    centre crop.
    """
    from datasets_io.ray_data import load_split, repeated_augmentation
    from datasets_io.shards import ImageBytes, ImageTransform
    from pipelines import cli

    if decode not in ("cpu", "device"):
        raise ValueError(f"unknown decode {decode!r}; expected 'cpu' or 'device'")
    # Ray Data's first call would start Ray itself, with Ray's console (every worker's log, INFO lines);
    # started here, it gets the project's console settings. (With a cached demo nothing else starts it first.)
    cli.init_ray()
    out = {}
    for split in splits:
        train = split == "train"
        # Training crops are drawn fresh each epoch (seed=None): a seeded transform would repeat the
        # same crop of an image every epoch. Evaluation has no randomness.
        options = {k: v for k, v in (("scale", tuple(crop_scale) if crop_scale else None),
                                     ("auto_augment", auto_augment)) if v is not None and train}
        transform = ImageTransform(image_size, train=train, num_classes=num_classes,
                                   augment=augment if train else "none", seed=None if train else seed,
                                   keep_text=keep_text, **(image_cfg or {}), **options)
        if train and decode == "device":
            transform = ImageBytes(num_classes, keep_text=keep_text)
        ds = load_split(path, split, shuffle_seed=seed if train else None)
        if train and repeated_aug > 1:
            if not train_rows:
                raise ValueError("repeated augmentation needs the number of training rows")
            ds = repeated_augmentation(ds, repeated_aug, train_rows)
        ds = ds.map_batches(transform, batch_format="numpy")
        # Training shows one line per epoch; Ray Data's per-operator bars, streamed from every
        # worker each epoch, would bury it (the ingest keeps its bars).
        ds.context.enable_progress_bars = False
        out[split] = ds
    return out
