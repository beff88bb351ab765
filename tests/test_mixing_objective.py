"""Fast unit tests: stage-two multi's mixed batches with the masked multi-task loss, and VA accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emotion_models import losses
from emotion_models.losses import LossSpec
from pipelines.objectives import VAObjective
from pipelines.batches import mix_batches

ANCHORS = np.array([[-0.8, 0.5], [0.0, -0.5], [0.8, 0.5]])


def _dim(n=3):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 4, 4, generator=g), "valence": torch.tensor([0.5, -0.2, 0.1][:n]),
            "arousal": torch.tensor([0.3, 0.4, -0.6][:n]), "has_va": torch.ones(n, dtype=torch.bool),
            "label": torch.full((n,), -1), "has_label": torch.zeros(n, dtype=torch.bool)}


def _cat(n=2, classes=3):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 4, 4, generator=g), "valence": torch.tensor([0.9, -0.9][:n]),
            "arousal": torch.tensor([0.9, 0.9][:n]), "has_va": torch.ones(n, dtype=torch.bool),
            "label": torch.tensor([2, 0][:n]), "has_label": torch.ones(n, dtype=torch.bool),
            "label_dist": torch.zeros(n, classes), "has_dist": torch.zeros(n, dtype=torch.bool)}


def test_mix_batches_keeps_each_rows_role():
    dim, cat = _dim(), _cat()
    mixed = mix_batches(dim, cat)
    assert mixed["image"].shape[0] == 5
    torch.testing.assert_close(mixed["image"], torch.cat([dim["image"], cat["image"]]))
    # Dimensional rows: VA only. Categorical rows: label only (their lexicon VA is not a VA target).
    assert mixed["has_va"].tolist() == [True, True, True, False, False]
    assert mixed["has_label"].tolist() == [False, False, False, True, True]
    assert mixed["label"].tolist() == [-1, -1, -1, 2, 0]
    assert mixed["has_dist"].tolist() == [False] * 5
    assert mixed["label_dist"].shape == (5, 3)
    assert mixed["has_va"].dtype == torch.bool and mixed["label"].dtype == torch.int64


def test_masked_loss_on_a_mixed_batch_counts_and_weights_each_part():
    mixed = mix_batches(_dim(), _cat())
    va = torch.tensor([[0.0, 0.0], [0.1, 0.1], [0.2, 0.2], [5.0, 5.0], [-5.0, -5.0]])
    logits = torch.tensor([[9.0, 0, 0]] * 3 + [[0.0, 0, 1.0], [1.0, 0, 0]])
    total, parts = losses.multitask_loss({"va": va, "logits": logits}, mixed, alpha=0.9, va_scale=16.0)
    assert parts["n_va"] == 3 and parts["n_cat"] == 2
    target = torch.stack([mixed["valence"][:3], mixed["arousal"][:3]], 1)
    va_mse = F.mse_loss(va[:3], target)                    # the categorical rows' huge VA errors are masked
    ce = F.cross_entropy(logits[3:], mixed["label"][3:])   # the dimensional rows' confident logits too
    assert parts["loss_va"] == pytest.approx(float(va_mse), rel=1e-6)
    assert parts["loss_cat"] == pytest.approx(float(ce), rel=1e-6)
    assert float(total) == pytest.approx(0.1 * float(ce) + 0.9 * 16.0 * float(va_mse), rel=1e-6)
    # Gradients reach only what each row trains.
    va.requires_grad_(True)
    logits.requires_grad_(True)
    losses.multitask_loss({"va": va, "logits": logits}, mixed, alpha=0.9)[0].backward()
    assert va.grad[3:].abs().sum() == 0 and va.grad[:3].abs().sum() > 0
    assert logits.grad[:3].abs().sum() == 0 and logits.grad[3:].abs().sum() > 0


def _arrays():
    # Row 3 has no VA target (a categorical row): excluded from the regression metrics, kept for accuracy.
    va_pred = np.array([[-0.7, 0.4], [0.1, -0.4], [0.7, 0.6], [0.75, 0.45]])
    return {"va_pred": va_pred, "va_true": np.array([[-0.8, 0.5], [0.0, -0.5], [0.8, 0.5], [0.0, 0.0]]),
            "has_va": np.array([1, 1, 1, 0]), "label": np.array([0, 1, 1, 0]),
            # The head disagrees with the anchors on rows 1 and 2 (logits: log-probabilities).
            "logit": np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]]))}


def test_va_accuracy_by_nearest_anchor():
    obj = VAObjective(LossSpec(), num_classes=3, anchors=ANCHORS, accuracy_from="anchors")
    m = obj.metrics(_arrays())
    # Nearest anchors: 0, 1, 2, 2 against labels 0, 1, 1, 0.
    assert np.asarray(losses.nearest_anchor(_arrays()["va_pred"], ANCHORS)).tolist() == [0, 1, 2, 2]
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["n"] == 4
    # Regression metrics use only the 3 rows with VA.
    assert m["mse"] == pytest.approx(float(np.mean((_arrays()["va_pred"][:3] - _arrays()["va_true"][:3]) ** 2)))


def test_va_accuracy_from_the_category_head():
    obj = VAObjective(LossSpec(), num_classes=3, anchors=ANCHORS, accuracy_from="logits")
    m = obj.metrics(_arrays())
    # Head argmax: 0, 2, 1, 0 against labels 0, 1, 1, 0.
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert np.asarray(m["confusion"]).sum() == 4


def test_va_accuracy_needs_anchors_and_a_known_mode():
    with pytest.raises(ValueError, match="anchors"):
        VAObjective(LossSpec(), accuracy_from="anchors")
    with pytest.raises(ValueError, match="accuracy_from"):
        VAObjective(LossSpec(), accuracy_from="argmax")
    m = VAObjective(LossSpec(), num_classes=3, accuracy_from=None).metrics(_arrays())
    assert "accuracy" not in m and "pearson_v" in m
