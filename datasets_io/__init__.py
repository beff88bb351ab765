"""From a dataset on disk to Parquet shards of validated images, and back into batches.

The public names are loaded lazily (PEP 562), so ``import datasets_io`` stays cheap and
does not import Ray or torch; ``datasets_io.ingest(...)`` imports what it needs on first use.

``ingest`` is both a submodule and its main function: the name always resolves to the
submodule, which is callable (it forwards to :func:`datasets_io.ingest.ingest`), so
``from datasets_io import ingest; ingest("folder", root, out)`` works whatever was
imported before.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    # records
    "Record": "records", "ReaderResult": "records", "COLUMNS": "records",
    "SCHEMA_VERSION": "records", "SPLITS": "records", "VA_SCALE": "records",
    # readers and lexicon
    "read_dataset": "readers", "LAYOUTS": "readers", "Lexicon": "lexicon",
    # demo data
    "make_demo": "demo", "ensure_demo": "demo", "default_cache_dir": "demo",
    # images
    "prepare_image": "images", "decode_image": "images", "BadImage": "images",
    # ingest (Ray Data)
    "ingest": "ingest", "is_ingested": "ingest", "read_manifest": "ingest",
    "SHARD_SCHEMA": "ingest",
    # reading shards
    "load_split": "shards", "ImageTransform": "shards", "iter_local_batches": "shards",
    "to_tensors": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    submodule = importlib.import_module(f"{__name__}.{module}")
    value = submodule if name == module else getattr(submodule, name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
