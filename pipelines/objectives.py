"""Objectives: what a model takes from a batch, how it is scored, which metrics come out.

The training core (:mod:`pipelines.core`) is the same for every pipeline; an objective is
the small part that differs. Losses and metrics themselves live in :mod:`emotion_models`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from emotion_models import losses, metrics
from emotion_models.metrics import Accumulator


@dataclass
class VAObjective:
    """Valence-arousal regression, optionally with a category head (the two-stage paper).

    The loss follows the model's outputs: a single-task model (no ``logits``) gets the VA loss on
    the rows that carry VA; a multi-task one ``(1 - alpha) * category + alpha * va_scale * VA`` over masks
    (``alpha`` is the VA weight, as published; ``va_scale`` 16 gives the published balance, see
    :data:`emotion_models.losses.PUBLISHED_VA_SCALE`; rows
    with a label distribution train the category head with KL, rows with a hard label with
    cross-entropy). Accuracy (``accuracy_from``): ``"logits"`` scores the category head; ``"anchors"`` decodes the
    predicted VA to the nearest of ``anchors`` (C x 2, canonical scale) — how a single-task model,
    or any model on a dataset whose classes differ from its head's (Emotion6), is scored.
    """

    alpha: float = 0.5
    va_loss: str = "mse"
    va_scale: float = 1.0
    num_classes: int = 0
    anchors: Optional[np.ndarray] = None
    label_smoothing: float = 0.0
    accuracy_from: Optional[str] = None

    def __post_init__(self):
        if self.accuracy_from not in (None, "logits", "anchors"):
            raise ValueError(f"accuracy_from must be 'logits' or 'anchors', not {self.accuracy_from!r}")
        if self.accuracy_from == "anchors" and self.anchors is None:
            raise ValueError("accuracy_from='anchors' needs the class anchors")

    def inputs(self, batch):
        return (batch["image"],), {}

    def loss(self, outputs, batch):
        # Single-task models have no "logits": multitask_loss is then the plain masked VA loss.
        return losses.multitask_loss(outputs, batch, alpha=self.alpha, va_kind=self.va_loss,
                                     label_smoothing=self.label_smoothing, va_scale=self.va_scale)

    def collect(self, acc: Accumulator, outputs, batch):
        va = outputs["va"]
        arrays = {
            "va_pred": va,
            "va_true": losses.va_targets(batch),
            "has_va": losses.batch_mask(batch, "has_va", va.shape[0], va.device),
            "label": batch["label"],
        }
        if "logits" in outputs:
            arrays["prob"] = torch.softmax(outputs["logits"], dim=1)
        if "has_dist" in batch and "label_dist" in batch:
            arrays["has_dist"] = batch["has_dist"].bool()
            arrays["label_dist"] = batch["label_dist"].float()
        acc.add(**arrays)

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        has_va = arrays["has_va"].astype(bool)
        if has_va.sum() >= 2:
            out.update(metrics.regression_metrics(arrays["va_pred"][has_va], arrays["va_true"][has_va]))
            out["pearson_mean"] = (out["pearson_v"] + out["pearson_a"]) / 2
            out["ccc_mean"] = (out["ccc_v"] + out["ccc_a"]) / 2
        labelled = arrays["label"] >= 0
        if labelled.any() and self.num_classes:
            pred = None
            if self.accuracy_from == "logits" and "prob" in arrays:
                pred = arrays["prob"].argmax(axis=1)
            elif self.accuracy_from == "anchors":
                pred = losses.nearest_anchor(arrays["va_pred"], self.anchors)
            if pred is not None:
                cls = metrics.classification_metrics(arrays["label"][labelled], np.asarray(pred)[labelled],
                                                     self.num_classes)
                out.update(cls)
        if "prob" in arrays and "has_dist" in arrays and arrays["has_dist"].any():
            rows = arrays["has_dist"].astype(bool)
            if arrays["label_dist"].shape[1] == arrays["prob"].shape[1]:
                out.update(metrics.distribution_metrics(arrays["label_dist"][rows], arrays["prob"][rows]))
        elif self.accuracy_from == "anchors" and "has_dist" in arrays and arrays["has_dist"].any():
            # A VA-only model on an LDL set: the published score with the nearest anchor as the prediction.
            rows = arrays["has_dist"].astype(bool)
            dist = arrays["label_dist"][rows]
            if dist.shape[1] == len(self.anchors):
                nearest = np.asarray(losses.nearest_anchor(arrays["va_pred"][rows], self.anchors))
                out["ldl_jaccard"] = metrics.weighted_jaccard(metrics.dominant_labels(dist),
                                                              np.eye(dist.shape[1], dtype=np.int64)[nearest])
        out["n"] = int(len(arrays["label"]))
        return out


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
