"""The one error type for bad input data, reported by the command lines as one ``error: ...`` line."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a dataset folder, annotation file, manifest, lexicon or image, or an unknown
    category set, layout or dataset name. The message names the file (or the name) and the problem.

    A subclass of :class:`ValueError`, so ``except ValueError`` still catches it; the command lines
    (:func:`pipelines.cli.run_main`, ``python -m datasets_io``) print it as one line and exit 2,
    while any other ``ValueError`` is a bug and keeps its traceback.
    """
