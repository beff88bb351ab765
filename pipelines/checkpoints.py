"""Checkpoint folders: their files, written atomically and read with ``torch.load(weights_only=True)``.

A folder may be local (or mounted) or on object storage (``s3://...``): files are read through
:mod:`datasets_io.storage`.

A checkpoint folder holds ``state.pt`` (the weights; while training also the optimiser, schedule,
early-stopping, RNG and scaler states) and ``meta.json`` (``{"recipe": StageRecipe, "epoch", "val"}``):
the recipe rebuilds the model and says how to prepare images, so predict, ``--eval`` and the MLflow
model need nothing else. A run folder holds ``result.json`` and ``pipeline_state.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from datasets_io import storage
from emotion_models.errors import ModelConfigError
from pipelines.recipe import RecipeError, StageRecipe, jsonable

STATE_FILE = "state.pt"        # weights (+ optimizer, scheduler, RNG states while training)
META_FILE = "meta.json"        # {"recipe": StageRecipe, "epoch": ..., "val": {...}}
RESULT_FILE = "result.json"    # a run's outcome: test metrics, selected checkpoints, MLflow ids
RUN_STATE_FILE = "pipeline_state.json"  # a run's progress: MLflow run ids and finished stages


def save_state(path, payload: dict) -> None:
    """Write atomically: a crash never leaves a half-written file under ``path``."""
    import torch

    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_state(path) -> dict:
    """A ``state.pt`` (local or a URI) read with ``weights_only=True``: tensors and plain values, never
    arbitrary objects.

    A file that is not one (a pickle of other objects, truncated or garbage bytes) raises one
    :class:`ModelConfigError` line naming it and what torch refused."""
    import io
    import pickle

    import torch

    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelConfigError(f"{path}: not a readable checkpoint state ({load_error_reason(exc)})") from None


def load_error_reason(exc: BaseException) -> str:
    """``torch.load``'s refusal in one line: the weights-only unpickler's reason (``Unsupported global:
    GLOBAL builtins.eval ...``) rather than its multi-line advice, else the error's first line."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.split("error: ", 1)[-1].split(". Please", 1)[0]
    return lines[0] if lines else type(exc).__name__


def state_path(checkpoint_dir: str | Path) -> str:
    path = storage.join(checkpoint_dir, STATE_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path}: checkpoint has no {STATE_FILE}")
    return path


def read_meta(checkpoint_dir: str | Path) -> dict:
    """``meta.json`` of a checkpoint folder, its recipe as a :class:`StageRecipe` under ``"recipe"``."""
    path = storage.join(checkpoint_dir, META_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path}: not an emotion-ray checkpoint (no {META_FILE})")
    try:
        meta = json.loads(storage.read_text(path))
    except ValueError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
    stored = meta.pop("recipe", None)
    if not isinstance(stored, dict):
        raise ModelConfigError(f"{path}: no stage recipe in it")
    try:
        recipe = StageRecipe.from_dict(stored, f"{path}: recipe")
    except RecipeError as exc:
        raise ModelConfigError(str(exc)) from None
    return {**meta, "recipe": recipe}


def write_meta(checkpoint_dir: str | Path, recipe: StageRecipe, **fields) -> Path:
    path = Path(checkpoint_dir) / META_FILE
    path.write_text(json.dumps(jsonable({"recipe": recipe.to_dict(), **fields}), indent=1))
    return path


def load_model(checkpoint_dir: str | Path):
    """Rebuild the model a checkpoint folder was trained as, with its weights. Returns ``(model, meta)``."""
    meta = read_meta(checkpoint_dir)
    model = build_stage_model(meta["recipe"], weights_from=checkpoint_dir)
    return model, meta


def build_stage_model(recipe: StageRecipe, weights_from: str | Path | None = None):
    """The model a stage recipe trains, ready to train: built, its starting weights loaded, frozen.

    Starting weights: the recipe's ``model.weights`` (hub, a file, or none), then ``init_from`` (a
    checkpoint folder: stage two starts from stage one's) or ``init_weights`` (a file of another
    format, e.g. a published ``checkpoint.pth``: exact fit). ``weights_from`` (a checkpoint folder)
    replaces all of that: the model is built without any pretrained file and takes its weights.
    """
    from dataclasses import replace

    from emotion_models.registry import NONE, build_model

    spec = recipe.model
    start = recipe.init_from if weights_from is None else weights_from
    if start is not None or recipe.init_weights:
        spec = replace(spec, weights=NONE)   # the weights come from a checkpoint: no pretrained file is read
    model = build_model(spec)
    if start is not None:
        model.load_state_dict(load_state(state_path(start))["model"])
    elif recipe.init_weights:
        from emotion_models.weights import load_weights

        load_weights(model, recipe.init_weights)
    if weights_from is None and recipe.freeze is not None:
        model.freeze(recipe.freeze, freeze_bn=recipe.freeze_bn)
    return model
