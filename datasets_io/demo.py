"""Synthetic demo datasets in the real on-disk layouts, with a learnable VA signal.

:func:`make_demo` writes three small datasets that the real readers parse unchanged:

* ``fi/<Category>/<id>.jpg`` -- FI-like: 8 capitalised category folders, no split folders;
* ``emotion6/ground_truth.txt`` + ``emotion6/images/<emotion>/<n>.jpg`` -- Emotion6-like:
  SAM valence/arousal (1..9, one decimal) and 7 emotion probabilities per image;
* ``ser30k/Annotations/image-level/{train,val,test}.json`` + ``ser30k/Images/<topic>/<file>``
  -- SER30K-like stickers with short embedded texts.

Each image is rendered from a target (valence, arousal) on the canonical [-1, 1] scale
(:func:`render_va`): valence sets the hue (cold blue -> green -> warm orange) and the
brightness, arousal the saturation and the texture (smooth low-frequency blobs -> sharp,
high-frequency, high-contrast stripes). Random orientation, phase, blob positions,
clutter shapes and pixel noise keep an image from being a constant colour, so a small
CNN has to learn the colour/texture statistics, which is what makes the end-to-end demo
better than chance. Everything is drawn from ``numpy.random.default_rng`` seeded per
dataset, so the same seed writes byte-identical files.
"""
from __future__ import annotations

import io
import json
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from matplotlib.colors import hsv_to_rgb
from PIL import Image

from datasets_io import paths
from datasets_io.lexicon import CATEGORY_SETS, Lexicon, canonical_to_sam, sam_to_canonical
from datasets_io.readers import EMOTION6_CLASSES, stratified_split

PathLike = Union[str, Path]

DEMO_VERSION = 1  # bump when the rendering changes, so cached demos regenerate
DATASETS = ("fi", "emotion6", "ser30k")
JPEG_QUALITY = 90
MARKER = ".complete"

FI_SPREAD = 0.15        # std of VA around a category anchor (canonical scale)
EMOTION6_SPREAD = 0.3   # wider: VA varies continuously within an Emotion6 folder
EMOTION6_SHRINK = 0.7   # photos are rated less extreme than the words: centre at 0.7 x the anchor
SER30K_SPREAD = 0.2
EMOTION6_FOLDERS = tuple(name for name in EMOTION6_CLASSES if name != "neutral")  # as the real images/
EMOTION6_RATERS = 15
SER30K_TOPICS = ("cat", "dog", "bunny", "frog", "panda", "duck")
SER30K_PNG_FRACTION = 0.25
SER30K_TEXT_SIGNAL = 0.7  # probability that a sticker's text holds a word of its class
SER30K_WORDS = {
    "anger": ("angry", "mad", "furious", "grr"),
    "disgust": ("gross", "yuck", "ew", "nasty"),
    "fear": ("scared", "help", "afraid", "eek"),
    "happiness": ("happy", "yay", "love", "haha"),
    "neutral": ("ok", "fine", "noted", "sure"),
    "sadness": ("sad", "cry", "sorry", "sob"),
    "surprise": ("wow", "omg", "whoa", "really"),
}
FILLER_WORDS = ("the", "a", "so", "me", "you", "today", "this", "is", "just", "now", "hi", "oh", "we", "go")

_HUE_COLD, _HUE_WARM = 0.62, 0.07  # HSV hue at valence -1 (blue) and +1 (orange)


# ----------------------------------------------------------------------------- rendering

def render_va(valence: float, arousal: float, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """An RGB uint8 image (size, size, 3) whose colour and texture encode (valence, arousal).

    valence -> hue (blue .. orange) and brightness; arousal -> saturation, and the frequency,
    sharpness and contrast of an oriented grating that replaces smooth blobs as arousal grows.
    """
    t = (float(np.clip(valence, -1, 1)) + 1) / 2   # 0 (negative) .. 1 (positive)
    u = (float(np.clip(arousal, -1, 1)) + 1) / 2   # 0 (calm) .. 1 (excited)
    yy, xx = np.mgrid[0:size, 0:size] / size

    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    frequency = 1.5 + 10.0 * u                     # cycles per image
    sharpness = 0.5 + 10.0 * u
    grating = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    grating = np.tanh(sharpness * grating) / np.tanh(sharpness)
    blobs = np.zeros((size, size))
    for cy, cx, sigma, sign in zip(*rng.uniform(0, 1, (2, 3)), rng.uniform(0.15, 0.35, 3), rng.choice([-1, 1], 3)):
        blobs += sign * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    blobs = np.clip(blobs, -1, 1)
    texture = u * grating + (1 - u) * blobs

    hue = _HUE_COLD + (_HUE_WARM - _HUE_COLD) * t + rng.normal(0, 0.02) + 0.02 * blobs
    saturation = np.full((size, size), 0.15 + 0.75 * u + rng.normal(0, 0.04))
    value = 0.3 + 0.55 * t + rng.normal(0, 0.03) + (0.08 + 0.3 * u) * texture
    for _ in range(rng.integers(1, 4)):            # clutter: shapes in a shade of the image's colour
        mask = _random_shape(yy, xx, rng)
        hue = np.where(mask, hue + rng.normal(0, 0.04), hue)
        value = np.where(mask, value * rng.uniform(0.75, 1.2), value)
    hsv = np.stack([np.mod(hue, 1.0), np.clip(saturation, 0, 1), np.clip(value, 0, 1)], axis=-1)
    rgb = hsv_to_rgb(hsv) + rng.normal(0, 0.025, (size, size, 3))
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def _random_shape(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a disc or a rectangle at a random place, 10-30 % of the image across."""
    cy, cx = rng.uniform(0.1, 0.9, 2)
    ry, rx = rng.uniform(0.05, 0.15, 2)
    if rng.random() < 0.5:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def _write_image(path: Path, pixels: np.ndarray) -> None:
    """JPEG quality 90, or PNG by suffix; no metadata, so the bytes depend only on the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    if path.suffix == ".png":
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buffer.getvalue())


def _sample_va(anchor: Sequence[float], spread: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(anchor) + rng.normal(0, spread, 2), -1, 1)


def _balanced_order(n_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Each class index ``per_class`` times, shuffled (so file numbers do not give the class away)."""
    order = np.repeat(np.arange(n_classes), per_class)
    rng.shuffle(order)
    return order


def _rng(seed: int, dataset: str) -> np.random.Generator:
    """One generator per (seed, dataset), so a dataset does not depend on which others are made."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode())])


# ----------------------------------------------------------------------------- the three datasets

def _make_fi(out: Path, images_per_class: int, rng: np.random.Generator, size: int, lexicon: Lexicon) -> None:
    for category in CATEGORY_SETS["FI"]:
        anchor = lexicon.va(category)
        for index in range(images_per_class):
            v, a = _sample_va(anchor, FI_SPREAD, rng)
            _write_image(out / category.capitalize() / f"{category}_{index:05d}.jpg", render_va(v, a, rng, size))


def _make_emotion6(out: Path, images_per_class: int, rng: np.random.Generator, size: int,
                   lexicon: Lexicon) -> None:
    """Balanced folders; SAM VA with one decimal; probabilities = votes of 15 raters peaking on the folder."""
    rows = ["\t".join(["[image_filename]", "[valence]", "[arousal]"]
                      + [f"[prob. {name}]" for name in EMOTION6_CLASSES])]
    counters = dict.fromkeys(EMOTION6_FOLDERS, 0)
    for folder_index in _balanced_order(len(EMOTION6_FOLDERS), images_per_class, rng):
        folder = EMOTION6_FOLDERS[folder_index]
        counters[folder] += 1
        centre = EMOTION6_SHRINK * np.asarray(lexicon.va(folder))
        sam = np.round(canonical_to_sam(_sample_va(centre, EMOTION6_SPREAD, rng)), 1)
        name = f"{folder}/{counters[folder]}.jpg"
        _write_image(out / "images" / name, render_va(*sam_to_canonical(sam), rng, size))
        rows.append("\t".join([name, f"{sam[0]:g}", f"{sam[1]:g}"]
                              + [f"{p:g}" for p in _emotion6_probabilities(EMOTION6_CLASSES.index(folder), rng)]))
    (out / "ground_truth.txt").write_text("\n".join(rows) + "\n")


def _emotion6_probabilities(peak: int, rng: np.random.Generator) -> np.ndarray:
    """Vote shares of ``EMOTION6_RATERS`` raters; the ``peak`` emotion gets strictly the most votes."""
    weights = np.full(len(EMOTION6_CLASSES), 0.5)
    weights[peak], weights[-1] = 4.0, 1.5          # the folder's emotion, then neutral, are likeliest
    votes = rng.multinomial(EMOTION6_RATERS, weights / weights.sum())
    others = np.delete(votes, peak)
    votes[peak] = max(votes[peak], others.max() + 1)
    return votes / votes.sum()


def _make_ser30k(out: Path, images_per_class: int, rng: np.random.Generator, size: int,
                 lexicon: Lexicon) -> None:
    """7 classes x several topics; a 70/15/15 split stratified by class; texts with class words."""
    classes = CATEGORY_SETS["SER30K"]
    entries = []
    for index, label in enumerate(_balanced_order(len(classes), images_per_class, rng).tolist()):
        topic = SER30K_TOPICS[int(rng.integers(len(SER30K_TOPICS)))]
        suffix = ".png" if rng.random() < SER30K_PNG_FRACTION else ".jpg"
        file_name = f"{topic}_{index:05d}{suffix}"
        va = _sample_va(lexicon.va(classes[label]), SER30K_SPREAD, rng)
        _write_image(out / "Images" / topic / file_name, render_va(*va, rng, size))
        votes = [label + 1 if rng.random() < 0.8 else int(rng.integers(1, len(classes) + 1)) for _ in range(3)]
        entries.append({"topic": topic, "file_name": file_name, "text": _sticker_text(classes[label], rng),
                        "anno1": votes[0], "anno2": votes[1], "anno3": votes[2], "anno": label + 1})
    splits = stratified_split([entry["anno"] for entry in entries], (0.7, 0.15, 0.15), seed=int(rng.integers(2**31)))
    folder = out.joinpath("Annotations", "image-level")
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        chosen = [entry for entry, s in zip(entries, splits) if s == split]
        (folder / f"{split}.json").write_text(json.dumps({"annotations": chosen}, indent=1))


def _sticker_text(category: str, rng: np.random.Generator) -> str:
    """1-4 filler words; with probability :data:`SER30K_TEXT_SIGNAL` one of them is a class word."""
    words = list(rng.choice(FILLER_WORDS, int(rng.integers(1, 5))))
    if rng.random() < SER30K_TEXT_SIGNAL:
        words.insert(int(rng.integers(len(words) + 1)), rng.choice(SER30K_WORDS[category]))
    return " ".join(words)


_MAKERS = {"fi": _make_fi, "emotion6": _make_emotion6, "ser30k": _make_ser30k}


def make_demo(out: PathLike, images_per_class: int = 40, seed: int = 0, image_size: int = 64,
              which: Sequence[str] = DATASETS) -> dict[str, Path]:
    """Write the demo datasets named in ``which`` under ``out``; return {name: dataset root}.

    ``images_per_class`` images per FI category, Emotion6 folder and SER30K class, each
    ``image_size`` pixels square. A dataset folder that already holds files is refused
    rather than mixed with (or deleted for) the new images.
    """
    _check_options(images_per_class, image_size, which)
    out = Path(out)
    lexicon = Lexicon.builtin()
    roots = {name: out / name for name in which}
    for root in roots.values():
        if root.is_dir() and any(root.iterdir()):
            raise FileExistsError(f"{root}: already exists and is not empty; remove it or choose another folder")
    for name, root in roots.items():
        _MAKERS[name](root, images_per_class, _rng(seed, name), image_size, lexicon)
    return roots


def _check_options(images_per_class: int, image_size: int, which: Sequence[str]) -> None:
    unknown = [name for name in which if name not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown demo dataset(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    if images_per_class < 1 or image_size < 8:
        raise ValueError(f"need images_per_class >= 1 and image_size >= 8, got {images_per_class}, {image_size}")


# ----------------------------------------------------------------------------- cache

def ensure_demo(cache_dir: Optional[PathLike] = None, **kwargs) -> dict[str, Path]:
    """The demo datasets under ``<cache_dir>/demo``, generated on first use.

    A ``.complete`` marker holding the parameters is written last; when it is missing or
    its parameters differ from ``kwargs`` (see :func:`make_demo`), the folder is rebuilt.
    A file lock keeps concurrent callers (several Ray workers) from building it twice.
    """
    params = {"images_per_class": 40, "seed": 0, "image_size": 64, "which": list(DATASETS)}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"ensure_demo: unknown option(s) {', '.join(unknown)}; known: {', '.join(params)}")
    params.update(kwargs, version=DEMO_VERSION)
    params["which"] = list(params["which"])
    _check_options(params["images_per_class"], params["image_size"], params["which"])
    out = Path(cache_dir or paths.cache_dir()).expanduser() / "demo"
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    with _locked(out / ".lock"):
        if _marker_params(marker) != params:
            marker.unlink(missing_ok=True)
            for name in DATASETS:
                shutil.rmtree(out / name, ignore_errors=True)
            make_demo(out, **{k: v for k, v in params.items() if k != "version"})
            marker.write_text(json.dumps(params, sort_keys=True))
    return {name: out / name for name in params["which"]}


def _marker_params(marker: Path) -> Optional[dict]:
    """The parameters recorded in a completed demo's marker, or None (absent or unreadable)."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
