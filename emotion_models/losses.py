"""Losses shared by every pipeline: VA regression, categories, label distributions, multi-task.

Datasets are mixed (a categorical set has no measured VA, a dimensional set no label), so every
term takes a boolean row mask (N,). Rows are *selected* by the mask rather than multiplied by it,
so NaN placeholders in unused targets never leak into the loss; a term over an empty selection
is an exact zero that stays connected to the graph (``pred.sum() * 0``), never a NaN from a
mean over nothing.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["va_mse", "ccc", "va_ccc_loss", "va_loss", "category_loss", "distribution_loss",
           "multitask_loss", "nearest_anchor", "VA_LOSSES",
           "PUBLISHED_VA_SCALE"]

VA_LOSSES = ("mse", "ccc", "mse+ccc")


def _zero(like: torch.Tensor) -> torch.Tensor:
    """An exact 0 with a grad path to ``like`` (keeps DDP and ``backward`` happy on empty batches)."""
    return like.sum() * 0.0


def _rows(mask: Optional[torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def ccc(x, y, eps: float = 1e-8):
    """Lin's concordance correlation coefficient of two 1-d tensors (or numpy arrays).

    ``2 cov(x, y) / (var x + var y + (mean x - mean y)^2)`` with population (1/N) moments.
    Written with ``mean`` only so the same code serves torch (differentiable) and numpy;
    ``eps`` keeps the degenerate case (both constant and equal) at 0 instead of NaN.
    """
    mx, my = x.mean(), y.mean()
    dx, dy = x - mx, y - my
    return 2 * (dx * dy).mean() / ((dx * dx).mean() + (dy * dy).mean() + (mx - my) ** 2 + eps)


def va_mse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error over the masked rows and both VA dimensions."""
    rows = _rows(mask, pred.shape[0], pred.device)
    if not rows.any():
        return _zero(pred)
    return F.mse_loss(pred[rows], target[rows].to(pred.dtype))


def va_ccc_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 - mean(CCC_valence, CCC_arousal)`` over the masked rows; a zero term below 2 rows."""
    rows = _rows(mask, pred.shape[0], pred.device)
    if int(rows.sum()) < 2:
        return _zero(pred)
    p, t = pred[rows], target[rows].to(pred.dtype)
    return 1 - (ccc(p[:, 0], t[:, 0]) + ccc(p[:, 1], t[:, 1])) / 2


def va_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
            kind: str = "mse") -> torch.Tensor:
    """The VA loss named by ``kind``: ``"mse"``, ``"ccc"`` or their sum ``"mse+ccc"``."""
    if kind not in VA_LOSSES:
        raise ValueError(f"unknown VA loss {kind!r}; expected one of {VA_LOSSES}")
    loss = _zero(pred)
    if "mse" in kind:
        loss = loss + va_mse(pred, target, mask)
    if "ccc" in kind:
        loss = loss + va_ccc_loss(pred, target, mask)
    return loss


def category_loss(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the masked rows that carry a label (``labels >= 0``)."""
    labels = labels.to(logits.device).long()
    rows = _rows(mask, logits.shape[0], logits.device) & (labels >= 0)
    if not rows.any():
        return _zero(logits)
    return F.cross_entropy(logits[rows], labels[rows], label_smoothing=label_smoothing)


def distribution_loss(logits: torch.Tensor, dist: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``KL(dist || softmax(logits))`` averaged over the masked rows (rows of ``dist`` sum to 1).

    ``0 * log 0`` counts as 0 (``xlogy``), so one-hot and sparse distributions are fine.
    """
    rows = _rows(mask, logits.shape[0], logits.device)
    if not rows.any():
        return _zero(logits)
    logp = F.log_softmax(logits[rows], dim=1)
    target = dist[rows].to(logp.dtype)
    return (torch.special.xlogy(target, target) - target * logp).sum(dim=1).mean()


def batch_mask(batch: Mapping[str, Any], key: str, n: int, device: torch.device) -> torch.Tensor:
    """The boolean presence mask ``batch[key]`` (e.g. ``has_va``), all False when the key is absent."""
    value = batch.get(key)
    if value is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return value.to(device=device, dtype=torch.bool)


def va_targets(batch: Mapping[str, Any]) -> torch.Tensor:
    """``(N, 2)`` float targets (valence, arousal) of a batch."""
    return torch.stack([batch["valence"], batch["arousal"]], dim=1).float()


# The published code takes its VA MSE on the SAM 1..9 scale; the project keeps VA on [-1, 1]. The
# scales differ by a factor (9 - 1) / (1 - (-1)) = 4, so an MSE on 1..9 is 16 x the MSE on [-1, 1].
# Multiplying the canonical VA term by this factor reproduces the published balance of the terms.
PUBLISHED_VA_SCALE = ((9.0 - 1.0) / (1.0 - (-1.0))) ** 2


def multitask_loss(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any], alpha: float = 0.5,
                   va_kind: str = "mse", label_smoothing: float = 0.0,
                   va_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 - alpha) * category + alpha * va_scale * VA`` over a mixed batch; returns ``(total, parts)``.

    ``alpha`` is the **VA weight**, as in the published code (``ce * (1 - alpha) + mse * alpha``;
    0.5 in stage one, 0.9 in stage two). ``va_scale`` multiplies the VA term:
    :data:`PUBLISHED_VA_SCALE` (16) makes a canonical-scale MSE equal the published 1..9-scale MSE,
    1 keeps the canonical MSE.

    VA term: rows with ``has_va``. Category term: rows with ``has_dist`` use
    :func:`distribution_loss` (LDL sets train the category head on the distribution), rows with a
    label but no distribution use :func:`category_loss`; the two are averaged weighted by their
    row counts. Without ``"logits"`` in ``outputs`` (single task) the total is ``va_scale * VA``
    (the published single-task loss: the MSE alone). ``parts`` holds floats: ``loss`` (the total),
    ``loss_va`` (the unscaled, canonical-scale VA term), ``loss_cat``, ``n_va``, ``n_cat``.
    """
    va = outputs["va"]
    n, device = va.shape[0], va.device
    target = va_targets(batch).to(device)
    has_va = batch_mask(batch, "has_va", n, device)
    loss_va = va_loss(va, target, has_va, kind=va_kind)

    logits = outputs.get("logits")
    if logits is None:
        total, loss_cat, n_cat = va_scale * loss_va, _zero(va), 0
    else:
        labels = batch["label"].to(device).long()
        has_dist = batch_mask(batch, "has_dist", n, device)
        has_label = (batch_mask(batch, "has_label", n, device) if "has_label" in batch
                     else torch.ones_like(has_dist)) & (labels >= 0) & ~has_dist
        n_dist, n_label = int(has_dist.sum()), int(has_label.sum())
        n_cat = n_dist + n_label
        loss_cat = _zero(logits)
        if n_dist:
            loss_cat = loss_cat + n_dist / n_cat * distribution_loss(logits, batch["label_dist"].to(device), has_dist)
        if n_label:
            loss_cat = loss_cat + n_label / n_cat * category_loss(logits, labels, has_label, label_smoothing)
        total = (1 - alpha) * loss_cat + alpha * va_scale * loss_va

    parts = {"loss": float(total.detach()), "loss_va": float(loss_va.detach()),
             "loss_cat": float(loss_cat.detach()), "n_va": float(has_va.sum()), "n_cat": float(n_cat)}
    return total, parts


def nearest_anchor(va, anchors):
    """Index of the nearest anchor (Euclidean, canonical VA scale) for each row of ``va`` (N, 2).

    Works on torch tensors (returns a LongTensor) and on numpy arrays (returns int64 array).
    """
    if isinstance(va, torch.Tensor):
        anchors = torch.as_tensor(anchors, dtype=va.dtype, device=va.device)
    else:
        va, anchors = np.asarray(va, dtype=np.float64), np.asarray(anchors, dtype=np.float64)
    va, anchors = va.reshape(-1, 2), anchors.reshape(-1, 2)
    return ((va[:, None, :] - anchors[None, :, :]) ** 2).sum(-1).argmin(1)
