"""The one registry of dataset layouts: adding a layout means one :class:`Layout` entry in :data:`REGISTRY`.

Each entry says, for one on-disk layout:

* ``reader``: the function of :mod:`datasets_io.readers` that parses it (its keyword
  parameters are the layout's reader options, :attr:`Layout.options`);
* ``detect``: how to recognise a raw folder of it (:func:`detect_layout`);
* ``capabilities``: what the pipelines may rely on (:data:`MEASURED_VA`, :data:`STICKERS`,
  :data:`OWN_SPLIT`), checked with :func:`require`;
* ``datasets``: the paper's dataset names stored in this layout, with their reader options
  (:func:`dataset_options`);
* ``demo``: the synthetic demo set of :mod:`datasets_io.demo` in this layout, if any, and the
  pipeline role it stands in for (:func:`demo_key`).

=========  =====================================================================
layout     on disk
=========  =====================================================================
folder     a folder per category (FI, Flickr, Instagram), optionally inside
           ``train/ val/ test/`` folders; otherwise a seeded stratified split
ldl        a CSV/TSV of image name + votes over the categories (FlickrLDL,
           TwitterLDL) and a folder of images
emotion6   ``ground_truth.txt`` (SAM valence/arousal + 7 probabilities) and
           ``images/<emotion>/<n>.jpg``
ser30k     ``Annotations/image-level/{train,val,test}.json`` and
           ``Images/<topic>/<file_name>``
=========  =====================================================================

No Ray, no torch: the readers need numpy only, so the pipelines' driver can check names,
paths and manifests before it starts anything.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from datasets_io.errors import DataError
from datasets_io.readers import (EMOTION6_TABLE, SER30K_ANNOTATIONS, read_emotion6, read_folder, read_ldl,
                                 read_ser30k)
from datasets_io.records import ReaderResult, is_ingested, read_manifest

__all__ = ["Layout", "Demo", "REGISTRY", "LAYOUTS", "DATASETS", "DEMO_SETS", "MEASURED_VA", "STICKERS",
           "OWN_SPLIT", "CAPABILITIES", "get_layout", "reader_options", "read_dataset", "detect_layout",
           "dataset_options", "layout_of", "has", "require", "demo_key", "ingest_options"]

# What a layout can guarantee to the pipelines (capability -> what a dataset with it does, for messages).
MEASURED_VA = "measured_va"
STICKERS = "stickers"
OWN_SPLIT = "own_split"
CAPABILITIES = MappingProxyType({
    MEASURED_VA: "carry measured valence/arousal",
    STICKERS: "be a sticker set with embedded text",
    OWN_SPLIT: "ship its own train/val/test split",
})


@dataclass(frozen=True)
class Demo:
    """A synthetic demo set (:func:`datasets_io.demo.make_demo`) in a layout."""

    key: str                 # its name in make_demo / demo_shards: "fi", "emotion6", "ser30k"
    role: str                # the pipeline role it stands in for: categorical | dimensional | sticker
    options: Mapping[str, Any] = field(default_factory=dict)  # reader options to ingest it with


@dataclass(frozen=True)
class Layout:
    """One on-disk dataset layout: how to read it, recognise it, and what it carries."""

    name: str
    reader: Callable[..., ReaderResult]
    detect: Callable[[Path], bool]        # does this raw folder look like the layout?
    capabilities: frozenset = frozenset()
    datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # paper name -> reader options
    demo: Optional[Demo] = None

    @property
    def options(self) -> tuple[str, ...]:
        """The reader options the layout accepts (the reader's parameters after the root)."""
        return tuple(inspect.signature(self.reader).parameters)[1:]


def _has_table(root: Path) -> bool:
    return any(p.suffix.lower() in (".csv", ".tsv") for p in root.iterdir() if p.is_file())


# detect_layout tries the entries from the last to the first: register general layouts first.
REGISTRY: tuple[Layout, ...] = (
    Layout("folder", read_folder, detect=lambda root: True,  # anything else is a folder per category
           datasets={"FI": {"categories": "FI"}, "Flickr": {"categories": "Flickr"},
                     "Instagram": {"categories": "Instagram"}},
           demo=Demo("fi", "categorical", {"categories": "FI"})),
    Layout("ldl", read_ldl, detect=_has_table,
           datasets={"FlickrLDL": {"categories": "FI"}, "TwitterLDL": {"categories": "FI"}}),
    Layout("emotion6", read_emotion6, detect=lambda root: (root / EMOTION6_TABLE).exists(),
           capabilities=frozenset({MEASURED_VA}), datasets={"Emotion6": {}},
           demo=Demo("emotion6", "dimensional")),
    Layout("ser30k", read_ser30k, detect=lambda root: root.joinpath(*SER30K_ANNOTATIONS).is_dir(),
           capabilities=frozenset({STICKERS, OWN_SPLIT}), datasets={"SER30K": {}},
           demo=Demo("ser30k", "sticker")),
)

LAYOUTS = tuple(layout.name for layout in REGISTRY)
_BY_NAME = {layout.name: layout for layout in REGISTRY}
# Derived views of the registry: paper dataset name / demo key -> (layout, reader options).
DATASETS: Mapping[str, tuple[str, dict]] = MappingProxyType(
    {name: (layout.name, dict(options)) for layout in REGISTRY for name, options in layout.datasets.items()})
DEMO_SETS: Mapping[str, tuple[str, dict]] = MappingProxyType(
    {layout.demo.key: (layout.name, dict(layout.demo.options)) for layout in REGISTRY if layout.demo})
_DEMO_ROLES = {layout.demo.role: layout.demo.key for layout in REGISTRY if layout.demo}

assert len(_BY_NAME) == len(REGISTRY), "layout names must be unique"
assert len(DATASETS) == sum(len(layout.datasets) for layout in REGISTRY), "dataset names must be unique"
assert len(DEMO_SETS) == len(_DEMO_ROLES) == sum(bool(layout.demo) for layout in REGISTRY), \
    "demo keys and roles must be unique"
assert all(set(layout.capabilities) <= set(CAPABILITIES) for layout in REGISTRY), "unknown capability"


def get_layout(name: str) -> Layout:
    """The registered layout ``name``; a one-line error naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset layout {name!r}; known: {', '.join(LAYOUTS)}") from None


def reader_options(layout: str) -> list[str]:
    """The options the reader of ``layout`` takes (besides the root)."""
    return list(get_layout(layout).options)


def read_dataset(layout: str, root: Union[str, os.PathLike], **options) -> ReaderResult:
    """Read the dataset at ``root`` with the reader of ``layout`` (one of :data:`LAYOUTS`)."""
    entry = get_layout(layout)
    extra = sorted(set(options) - set(entry.options))
    if extra:
        raise DataError(f"layout {layout!r} does not take {', '.join(extra)}; it takes {', '.join(entry.options)}")
    return entry.reader(root, **options)


def ingest_options(layout: str, options: Mapping[str, Any]) -> dict:
    """``options`` without those the layout's reader does not take (e.g. no ``seed`` where the
    dataset ships its own split)."""
    accepted = get_layout(layout).options
    return {key: value for key, value in options.items() if key in accepted}


def dataset_names(*, having: frozenset = frozenset(), lacking: frozenset = frozenset()) -> list[str]:
    """The paper dataset names of the layouts that have every capability in ``having`` and none in
    ``lacking`` (``lacking={MEASURED_VA, STICKERS}``: the categorical sets of stage one)."""
    return [name for layout in REGISTRY if having <= layout.capabilities and not layout.capabilities & lacking
            for name in layout.datasets]


def detect_layout(root: Union[str, os.PathLike]) -> str:
    """The layout of a raw dataset folder (used when a path is given without a layout)."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such dataset folder")
    return next(layout.name for layout in reversed(REGISTRY) if layout.detect(path))


def dataset_options(name: str) -> tuple[str, dict]:
    """``(layout, reader options)`` of one of the paper's dataset names (FI, ..., SER30K)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known names: {', '.join(DATASETS)}")
    layout, options = DATASETS[name]
    return layout, dict(options)


def layout_of(name_or_root: Union[str, os.PathLike]) -> str:
    """The layout of a paper dataset name, an ingested shard folder (its manifest) or a raw folder."""
    if isinstance(name_or_root, str) and name_or_root in DATASETS:
        return DATASETS[name_or_root][0]
    path = Path(name_or_root).expanduser()
    if is_ingested(path):
        return str(read_manifest(path).get("layout"))
    if path.is_dir():
        return detect_layout(path)
    raise DataError(f"{name_or_root}: neither a known dataset name ({', '.join(DATASETS)}) nor a dataset folder")


def has(layout: str, capability: str) -> bool:
    """Whether ``layout`` has ``capability`` (an unknown layout has none)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
    entry = _BY_NAME.get(layout)
    return entry is not None and capability in entry.capabilities


def require(manifest: Mapping[str, Any], capability: str, path: Union[str, os.PathLike], role: str) -> None:
    """Stop with one line naming ``path`` unless the ingested dataset's layout has ``capability``.

    ``manifest``: the dataset's manifest (:func:`~datasets_io.records.read_manifest`);
    ``role``: what the pipeline uses it for, in the message ("dimensional", "sticker", ...).
    """
    layout = manifest.get("layout")
    if not has(layout, capability):
        fitting = " or ".join(entry.name for entry in REGISTRY if capability in entry.capabilities)
        raise DataError(f"{path}: the {role} dataset must {CAPABILITIES[capability]} "
                        f"(layout {fitting or 'none registered'}), not layout {layout!r}")


def demo_key(role: str) -> str:
    """The demo set (key of ``demo_shards()`` / ``make_demo``) that stands in for ``role``:
    ``categorical`` -> ``fi``, ``dimensional`` -> ``emotion6``, ``sticker`` -> ``ser30k``."""
    if role not in _DEMO_ROLES:
        raise ValueError(f"no demo dataset for role {role!r}; known roles: {', '.join(_DEMO_ROLES)}")
    return _DEMO_ROLES[role]
