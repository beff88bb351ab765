"""Objectives: what a model takes from a batch, how it is scored, which metrics come out.

The training core (:mod:`pipelines.core`) is the same for every pipeline; an objective is
the small part that differs. Losses and metrics themselves live in :mod:`emotion_models`;
:func:`build_objective` makes the objective a stage recipe's ``loss`` section describes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch

from emotion_models import losses, metrics
from emotion_models.losses import LossSpec
from emotion_models.metrics import Accumulator


@dataclass
class VAObjective:
    """Valence-arousal regression, optionally with a category head (the two-stage paper).

    The loss follows the model's outputs: a single-task model (no ``logits``) gets the VA loss on
    the rows that carry VA; a multi-task one :func:`emotion_models.losses.multitask_loss` with the
    ``spec``'s weights and LDL choices. Accuracy (``accuracy_from``): ``"logits"`` scores the category
    head; ``"anchors"`` decodes the predicted VA with the spec's ``anchor_decode`` (nearest anchor,
    or the published cosine on the SAM scale) over ``anchors`` (C x 2, canonical scale): how a
    single-task model, or any model on a dataset whose classes differ from its head's (Emotion6), is
    scored. ``global_batch``: normalise the loss terms by the global batch's row counts (stage two's
    pool batching; one small all-reduce per step under DDP).
    """

    spec: LossSpec
    num_classes: int = 0
    anchors: Optional[np.ndarray] = None
    accuracy_from: Optional[str] = None
    global_batch: bool = False

    def __post_init__(self):
        if self.accuracy_from not in (None, "logits", "anchors"):
            raise ValueError(f"accuracy_from must be 'logits' or 'anchors', not {self.accuracy_from!r}")
        if self.accuracy_from == "anchors" and self.anchors is None:
            raise ValueError("accuracy_from='anchors' needs the class anchors")
        self._anchor_tensor = None if self.anchors is None else torch.as_tensor(np.asarray(self.anchors),
                                                                                dtype=torch.float32)

    def inputs(self, batch):
        return (batch["image"],), {}

    def loss(self, outputs, batch):
        s = self.spec
        return losses.multitask_loss(outputs, batch, alpha=s.va_weight, va_kind=s.va_loss,
                                     label_smoothing=s.label_smoothing, va_scale=s.va_scale,
                                     ldl_va_target=s.ldl_va_target, ldl_category_loss=s.ldl_category_loss,
                                     anchors=self._anchor_tensor,
                                     global_counts=global_counts(batch) if self.global_batch else None)

    def collect(self, acc: Accumulator, outputs, batch):
        va = outputs["va"]
        arrays = {
            "va_pred": va,
            "va_true": losses.va_targets(batch, self.spec.ldl_va_target, self._anchor_tensor),
            "has_va": losses.batch_mask(batch, "has_va", va.shape[0], va.device),
            "label": batch["label"],
        }
        if "logits" in outputs:
            arrays["logit"] = outputs["logits"]
        if "has_dist" in batch and "label_dist" in batch:
            arrays["has_dist"] = batch["has_dist"].bool()
            arrays["label_dist"] = batch["label_dist"].float()
        acc.add(**arrays)

    def _decode(self, va: np.ndarray, multi_label: bool = False):
        if self.spec.anchor_decode == "cosine_sam":
            return losses.cosine_anchor(va, self.anchors, multi_label=multi_label)
        nearest = np.asarray(losses.nearest_anchor(va, self.anchors))
        return np.eye(len(self.anchors), dtype=np.int64)[nearest] if multi_label else nearest

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        has_va = arrays["has_va"].astype(bool)
        if has_va.sum() >= 2:
            out.update(metrics.regression_metrics(arrays["va_pred"][has_va], arrays["va_true"][has_va]))
            out["pearson_mean"] = (out["pearson_v"] + out["pearson_a"]) / 2
            out["ccc_mean"] = (out["ccc_v"] + out["ccc_a"]) / 2
        labelled = arrays["label"] >= 0
        logit = arrays.get("logit")
        if labelled.any() and self.num_classes:
            pred = None
            if self.accuracy_from == "logits" and logit is not None:
                pred = logit.argmax(axis=1)
            elif self.accuracy_from == "anchors":
                pred = self._decode(arrays["va_pred"])
            if pred is not None:
                out.update(metrics.classification_metrics(arrays["label"][labelled], np.asarray(pred)[labelled],
                                                          self.num_classes))
        rows = arrays["has_dist"].astype(bool) if "has_dist" in arrays else np.zeros(0, bool)
        if rows.any():
            dist = arrays["label_dist"][rows]
            if logit is not None and logit.shape[1] == dist.shape[1]:
                if self.spec.ldl_category_loss == "bce_top_votes":
                    # The published multi-label head: sigmoid > 0.5 against the top-vote multi-hot.
                    predicted = (1 / (1 + np.exp(-logit[rows])) > 0.5).astype(np.int64)
                    out["ldl_jaccard"] = metrics.weighted_jaccard(metrics.dominant_labels(dist), predicted)
                else:
                    prob = _softmax(logit[rows])
                    out.update(metrics.distribution_metrics(dist, prob))
            elif self.accuracy_from == "anchors" and dist.shape[1] == len(self.anchors):
                # A VA-only model on an LDL set: the published score with the decoded VA as the prediction.
                out["ldl_jaccard"] = metrics.weighted_jaccard(
                    metrics.dominant_labels(dist), self._decode(arrays["va_pred"][rows], multi_label=True))
        out["n"] = int(len(arrays["label"]))
        return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def global_counts(batch) -> tuple[float, float, int]:
    """``(VA rows, category rows, world size)`` of the global batch: this rank's counts summed over the
    DDP ranks (one all-reduce of two numbers), for :func:`emotion_models.losses.multitask_loss`."""
    has_va = batch["has_va"].bool()
    has_cat = batch["has_dist"].bool() | (batch["has_label"].bool() & (batch["label"] >= 0))
    counts = torch.tensor([float(has_va.sum()), float(has_cat.sum())], device=has_va.device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        torch.distributed.all_reduce(counts)
    return float(counts[0]), float(counts[1]), world


@dataclass
class ClassificationObjective:
    """Single-label classification (sticker emotion): label-smoothed cross-entropy, accuracy, macro-F1.

    ``use_text`` feeds the tokenised sticker text (``text_ids`` / ``text_mask``) to the model.
    """

    num_classes: int
    label_smoothing: float = 0.0
    use_text: bool = False

    def inputs(self, batch):
        if self.use_text:  # positional: LORA's forward(image, word_id, word_mask)
            return (batch["image"], batch["text_ids"], batch["text_mask"]), {}
        return (batch["image"],), {}

    def loss(self, outputs, batch):
        loss = losses.category_loss(outputs["logits"], batch["label"], label_smoothing=self.label_smoothing)
        return loss, {"loss": float(loss.detach()), "n_cat": float((batch["label"] >= 0).sum())}

    def collect(self, acc: Accumulator, outputs, batch):
        acc.add(prob=torch.softmax(outputs["logits"], dim=1), label=batch["label"])

    def metrics(self, arrays):
        labelled = arrays["label"] >= 0
        pred = arrays["prob"].argmax(axis=1)
        out = metrics.classification_metrics(arrays["label"][labelled], pred[labelled], self.num_classes)
        out["n"] = int(labelled.sum())
        return out


def build_objective(recipe, classes=None, anchors=None):
    """The objective of a :class:`~pipelines.recipe.StageRecipe`, scoring ``classes`` / ``anchors`` (by
    default the recipe's own; another split's, e.g. the categorical test split of a VA stage)."""
    spec: LossSpec = recipe.loss
    classes = tuple(classes if classes is not None else recipe.classes)
    if spec.kind == "classify":
        return ClassificationObjective(num_classes=len(classes), label_smoothing=spec.label_smoothing,
                                       use_text=recipe.model.name == "lora")
    anchors = anchors if anchors is not None else recipe.anchors
    anchors = None if anchors is None else np.asarray(anchors, dtype=np.float32)
    # A multi-task model's head scores its own classes; any other split decodes VA to the split's anchors.
    own_head = recipe.model.options.get("task", None) == "multi" and recipe.head_classes is not None \
        and tuple(recipe.head_classes) == classes
    return VAObjective(spec=spec, num_classes=len(classes), anchors=anchors,
                       accuracy_from="logits" if own_head else ("anchors" if anchors is not None else None),
                       global_batch=recipe.batching == "pool")


def with_spec(objective: VAObjective, **changes) -> VAObjective:
    return replace(objective, spec=replace(objective.spec, **changes))
