"""What a training stage *is*, as one typed, JSON-able recipe; and the checkpoint folder's files.

A :class:`StageRecipe` says what is trained and how it learns: the model, the objective, the
optimiser and schedule, the epochs, the data preparation and the selection rule. The pipelines
(``two_stage``, ``sticker``) build one per stage from their flags; every Ray Train worker,
``pipelines.predict``, ``--eval`` and the MLflow model rebuild the model and the objective from it
with :func:`build_model` and :func:`build_objective`. Each checkpoint folder stores it in
``meta.json``; where and how a stage runs (storage, workers, the MLflow run, fault injection)
is a separate, never-persisted context (:class:`pipelines.train_loop.RunOptions`,
:class:`pipelines.train_loop.StageContext`).

No Ray import here, and torch only when a builder is called.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

# The files of a checkpoint folder, and of a pipeline run folder.
STATE_FILE = "state.pt"        # weights (+ optimizer, scheduler, RNG states while training)
META_FILE = "meta.json"        # {"recipe": StageRecipe, "epoch": ..., "val": {...}}
RESULT_FILE = "result.json"    # a run's outcome: test metrics, best checkpoints, MLflow ids
RUN_STATE_FILE = "pipeline_state.json"  # a run's progress: MLflow run ids and finished stages

# The datasets a stage trains on, by name: split evenly across workers (DDP); and stage two's
# categorical stream (multi-task), read whole by every worker.
TRAIN_KEY = "train"
MIX_KEY = "train_categorical"


# The speed flags both pipelines take (pipelines/two_stage.py and pipelines/sticker.py): same text.
COMPILE_HELP = ("torch.compile the training model (after DDP wrapping); the first steps pay a warm-up of tens of "
                "seconds (more on CPU) before the faster steps; validation/test stay eager")
DECODE_HELP = ("where training images are decoded and augmented: cpu (Ray Data tasks, uint8 pixels to the "
               "workers) or device (Ray Data hands the JPEG bytes; the worker decodes with nvJPEG on its GPU "
               "and augments with torchvision.transforms.v2 ops)")
DECODE_CHOICES = ("cpu", "device")


@dataclass
class StageRecipe:
    """One training stage. Everything here is stored with each checkpoint (``meta.json``)."""

    name: str                                   # "stage1", "stage2", "dimensional", "lora", ...
    model: dict                                 # emotion_models.create_model kwargs, with "name"
    objective: dict                             # {"kind": "va", ...} or {"kind": "classify", ...}
    optimizer: dict                             # {"name", "lr", "weight_decay"[, "filter_bias_and_bn"]}
    scheduler: dict = field(default_factory=lambda: {"name": "cosine", "warmup_epochs": 0})
    epochs: int = 1
    batch_size: int = 32                        # per worker
    seed: int = 0
    early_stop: int = 0                         # patience in epochs, 0 = off
    monitor: str = "accuracy"                   # validation metric that selects the best epoch
    monitor_mode: str = "max"
    grad_clip: Optional[float] = None
    classes: list = field(default_factory=list)            # what the objective scores (predict, plots)
    head_classes: Optional[list] = None                    # the category head's classes, if other
    image_size: int = 224
    image: dict = field(default_factory=dict)              # preparation: mean, std (the normalisation on the
                                                           # device), interpolation, crop_pct, max_side
    augmentation: dict = field(default_factory=dict)       # training augmentation (sticker recipe)
    init_from: Optional[str] = None             # a checkpoint folder whose weights start the stage
    init_weights: Optional[str] = None          # or a weights file of another format (exact fit)
    freeze_until: Any = None                    # passed to model.freeze() after init
    freeze_bn: bool = False
    mix_categorical: bool = False               # stage-two multi: a categorical stream in every batch
    test_every_epoch: bool = False              # also score test each epoch (published SER30K figure)
    amp: Optional[bool] = None                  # None: bf16 autocast on GPUs
    compile: bool = False                       # torch.compile the (DDP-wrapped) training model
    decode: str = "cpu"                         # training images: "cpu" (Ray Data decodes, uint8 out) or
                                                # "device" (the stored JPEG bytes, decoded + augmented on the worker's device)

    def replace(self, **changes) -> "StageRecipe":
        return dataclasses.replace(self, **changes)

    def without_pretrained(self) -> "StageRecipe":
        """The recipe whose model is built with no pretrained file read (``model["weights"]`` dropped):
        for weights that come from a checkpoint loaded right after."""
        return self.replace(model={k: v for k, v in self.model.items() if k != "weights"})

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "StageRecipe":
        """From ``meta.json``; keys of older checkpoints that are not recipe fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class EvalSet:
    """A split scored with a stage's best checkpoint after training (``objective`` / ``classes``:
    when they differ from the recipe's, e.g. the categorical test split of a VA stage)."""

    dataset: Any                               # a Ray Dataset of tensors
    objective: Optional[dict] = None
    classes: Optional[list] = None


def build_model(recipe: StageRecipe):
    """The recipe's model, with its initial weights as the model kwargs say (no checkpoint)."""
    from emotion_models import create_model

    kwargs = dict(recipe.model)
    return create_model(kwargs.pop("name"), **kwargs)


def build_objective(recipe: StageRecipe, objective: Optional[dict] = None):
    """The recipe's objective (or ``objective``, e.g. a test split scored with other classes)."""
    from pipelines.objectives import ClassificationObjective, VAObjective

    cfg = dict(objective or recipe.objective)
    kind = cfg.pop("kind")
    cfg.pop("task", None)  # recorded by checkpoints written before 0.4; the model's task decides
    if kind == "va":
        anchors = cfg.pop("anchors", None)
        return VAObjective(anchors=None if anchors is None else np.asarray(anchors, dtype=np.float32), **cfg)
    if kind == "classify":
        return ClassificationObjective(**cfg)
    raise ValueError(f"unknown objective kind {kind!r}")


def read_meta(checkpoint_dir: str | Path) -> dict:
    """``meta.json`` of a checkpoint folder, its recipe as a :class:`StageRecipe` under ``"recipe"``."""
    path = Path(checkpoint_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an emotion-ray checkpoint (no {META_FILE})")
    from emotion_models.errors import ModelConfigError

    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
    stored = meta.pop("recipe", None) or meta.pop("spec", None)  # "spec": checkpoints written before 0.4
    if not isinstance(stored, dict):
        raise ModelConfigError(f"{path}: no stage recipe in it")
    return {**meta, "recipe": StageRecipe.from_dict(stored)}


def write_meta(checkpoint_dir: str | Path, recipe: StageRecipe, **fields) -> Path:
    path = Path(checkpoint_dir) / META_FILE
    path.write_text(json.dumps(jsonable({"recipe": recipe.to_dict(), **fields}), indent=1))
    return path


def checkpoint_state_path(checkpoint_dir: str | Path) -> Path:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint has no {STATE_FILE}")
    return path


def load_model_from_checkpoint(checkpoint_dir: str | Path):
    """Rebuild the model a checkpoint folder was trained as, with its weights. Returns (model, meta)."""
    from pipelines.core import load_checkpoint

    meta = read_meta(checkpoint_dir)
    recipe = meta["recipe"]
    # The weights come from the checkpoint: no pretrained file is read to build the model.
    model = build_model(recipe.without_pretrained())
    model.load_state_dict(load_checkpoint(checkpoint_state_path(checkpoint_dir))["model"])
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
