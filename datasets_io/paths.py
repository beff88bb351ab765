"""Where things live on disk, and which files are images: the project's path roots, defined once.

=====================  ==========================================  =====================================
function               environment variable                        default
=====================  ==========================================  =====================================
:func:`home_dir`       ``EMOTION_RAY_HOME``                        ``~/emotion-ray`` (runs, MLflow)
:func:`data_dir`       ``EMOTION_RAY_DATA``                        ``<home_dir>/data`` (ingested shards)
:func:`cache_dir`      ``EMOTION_RAY_CACHE``                       ``~/.cache/emotion-ray`` (demo data)
=====================  ==========================================  =====================================

Standard library only (no Ray, no torch), so anything may import it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "home_dir", "data_dir", "cache_dir"]

# File suffixes (lower case) that readers and prediction treat as images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def home_dir() -> Path:
    """Where runs, MLflow's database and artifacts go by default (``$EMOTION_RAY_HOME``)."""
    return Path(os.environ.get("EMOTION_RAY_HOME", Path.home() / "emotion-ray")).expanduser().resolve()


def data_dir() -> Path:
    """Where ingested shards are kept by default (``$EMOTION_RAY_DATA`` or ``<home>/data``)."""
    return Path(os.environ.get("EMOTION_RAY_DATA", home_dir() / "data")).expanduser().resolve()


def cache_dir() -> Path:
    """Where the generated demo data is cached (``$EMOTION_RAY_CACHE``, else ``~/.cache/emotion-ray``)."""
    return Path(os.environ.get("EMOTION_RAY_CACHE") or Path.home() / ".cache" / "emotion-ray").expanduser()
