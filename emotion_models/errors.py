"""The one error type for a model the user asked for that cannot be built or loaded."""
from __future__ import annotations


class ModelConfigError(ValueError):
    """An unknown model or backbone name, a model configuration that cannot be built (e.g. an image
    size or a text length the architecture does not take), or a weights/checkpoint file that cannot be
    read or does not fit the model. The message names the file (or the setting) and the problem.

    A subclass of :class:`ValueError`, so ``except ValueError`` still catches it; :func:`pipelines.cli.run_main`
    prints it as one line and exits 2, while any other ``ValueError`` is a bug and keeps its traceback.
    """
