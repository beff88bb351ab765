"""A stage's spec (a plain, JSON-able dict) and the builders that turn it into objects.

The driver writes a spec; every Ray Train worker, ``pipelines.predict`` and the benchmarks build
the model and the objective from it with the same two functions. No Ray import here.

Spec keys::

    name            "stage1", "stage2", "sticker", ...
    model           kwargs of emotion_models.create_model, with "name"
    objective       {"kind": "va", task, alpha, va_loss, num_classes, anchors}
                    or {"kind": "classify", num_classes, label_smoothing, use_text}
    init_from       path of a checkpoint folder whose model weights start this stage (or None)
    freeze_until    passed to model.freeze() after init (VA models), or None
    optimizer       {"name", "lr", "weight_decay"}
    scheduler       {"name", "warmup_epochs"}
    epochs, early_stop, monitor, monitor_mode, batch_size, seed, grad_clip
    classes         class names (for predict and plots)
    mix_categorical True: stage-2 multi-task, every batch mixes a categorical stream in
    mlflow          {"tracking_uri", "run_id"} or None: rank 0 logs per-epoch metrics there
    fault           {"epoch", "step", "rank", "marker"} or None: kill a worker once (tests)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from emotion_models import create_model

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def build_model(spec: dict) -> nn.Module:
    kwargs = dict(spec["model"])
    name = kwargs.pop("name")
    return create_model(name, **kwargs)


def build_objective(spec: dict):
    from pipelines.objectives import ClassificationObjective, VAObjective

    cfg = dict(spec["objective"])
    kind = cfg.pop("kind")
    if kind == "va":
        anchors = cfg.pop("anchors", None)
        return VAObjective(anchors=None if anchors is None else np.asarray(anchors, dtype=np.float32), **cfg)
    if kind == "classify":
        return ClassificationObjective(**cfg)
    raise ValueError(f"unknown objective kind {kind!r}")


def read_meta(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an emotion-ray checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def checkpoint_state_path(checkpoint_dir: str | Path) -> Path:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint has no {STATE_FILE}")
    return path


def load_model_from_checkpoint(checkpoint_dir: str | Path, spec_override: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint folder was trained as, with its weights. Returns (model, meta)."""
    from pipelines.core import load_checkpoint

    meta = read_meta(checkpoint_dir)
    spec = {**meta["spec"], **(spec_override or {})}
    model = build_model(spec)
    state = load_checkpoint(checkpoint_state_path(checkpoint_dir))
    model.load_state_dict(state["model"])
    return model, meta


def jsonable(value: Any) -> Any:
    """Numbers and arrays as plain JSON values (NaN kept as null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if value != value else value
    if isinstance(value, np.integer):
        return int(value)
    return value
