"""Losses shared by every pipeline: VA regression, categories, label distributions, multi-task.

Datasets are mixed (a categorical set has no measured VA, a dimensional set no label), so every
term takes a boolean row mask (N,). Rows are *selected* by the mask rather than multiplied by it,
so NaN placeholders in unused targets never leak into the loss; a term over an empty selection
is an exact zero that stays connected to the graph (``pred.sum() * 0``), never a NaN from a
mean over nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LossSpec", "va_mse", "ccc", "va_ccc_loss", "va_loss", "category_loss", "distribution_loss",
           "top_votes", "top_vote_va", "multilabel_loss", "multitask_loss", "nearest_anchor", "cosine_anchor",
           "VA_LOSSES", "PUBLISHED_VA_SCALE"]

VA_LOSSES = ("mse", "ccc", "mse+ccc")


@dataclass(frozen=True)
class LossSpec:
    """What a stage optimises and how its predictions are scored (a recipe's ``loss`` section).

    ``kind``: ``"va"`` (valence-arousal, with a category head for multi-task models) or
    ``"classify"`` (the sticker models). ``va_weight`` is the published ``alpha``:
    ``(1 - alpha) * category + alpha * va_scale * VA``. ``va_scale`` 16 makes the canonical-scale MSE
    the published SAM 1..9 MSE (:data:`PUBLISHED_VA_SCALE`). LDL sets (a vote distribution, lexicon
    VA): ``ldl_va_target`` is the ``distribution``-weighted mean of the anchors or the mean of the
    ``top_votes`` emotions' anchors (published ``src/dataset.py``); ``ldl_category_loss`` is ``kl`` to
    the distribution or the published ``bce_top_votes`` (BCE on the multi-hot of the top votes, decoded
    with sigmoid > 0.5). ``anchor_decode``: how predicted VA becomes a category, the ``nearest``
    anchor or the published ``cosine_sam`` (cosine similarity on the SAM 1..9 scale, ``src/utils.py``).
    """

    kind: Literal["va", "classify"] = "va"
    va_weight: float = 0.5
    va_loss: Literal["mse", "ccc", "mse+ccc"] = "mse"
    va_scale: float = 16.0
    label_smoothing: float = 0.0
    ldl_va_target: Literal["distribution", "top_votes"] = "distribution"
    ldl_category_loss: Literal["kl", "bce_top_votes"] = "kl"
    anchor_decode: Literal["nearest", "cosine_sam"] = "nearest"

    def __post_init__(self):
        if not 0.0 <= self.va_weight <= 1.0:
            raise ValueError(f"va_weight must lie in [0, 1], not {self.va_weight}")
        if self.va_scale <= 0:
            raise ValueError(f"va_scale must be positive, not {self.va_scale}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), not {self.label_smoothing}")


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


def top_votes(dist: torch.Tensor) -> torch.Tensor:
    """Multi-hot (float) of each row's top-voted classes, every tie included: the published LDL label
    (``np.where(votes == votes.max())``). Exact ties survive normalisation, so a distribution works as
    well as the vote counts."""
    return (dist == dist.max(dim=1, keepdim=True).values).to(dist.dtype)


def top_vote_va(dist: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The mean of the top-voted classes' anchors, ``(N, 2)``: the published LDL VA target."""
    hot = top_votes(dist)
    return hot @ anchors.to(hot.dtype) / hot.sum(dim=1, keepdim=True)


def multilabel_loss(logits: torch.Tensor, dist: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` against the top-vote multi-hot, over the masked rows:
    the published ``BCELoss()(sigmoid(logits), labels)`` in its numerically stable form."""
    rows = _rows(mask, logits.shape[0], logits.device)
    if not rows.any():
        return _zero(logits)
    return F.binary_cross_entropy_with_logits(logits[rows], top_votes(dist[rows].to(logits.dtype)))


def batch_mask(batch: Mapping[str, Any], key: str, n: int, device: torch.device) -> torch.Tensor:
    """The boolean presence mask ``batch[key]`` (e.g. ``has_va``), all False when the key is absent."""
    value = batch.get(key)
    if value is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return value.to(device=device, dtype=torch.bool)


def va_targets(batch: Mapping[str, Any], ldl_va_target: str = "distribution",
               anchors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(N, 2)`` float targets (valence, arousal) of a batch.

    With ``ldl_va_target="top_votes"`` the rows whose VA comes from the lexicon and that carry a
    distribution (LDL sets, ``va_lexicon``) take the mean of their top-voted classes' ``anchors``
    instead of the stored distribution-weighted mean; measured VA (Emotion6) is never replaced.
    """
    target = torch.stack([batch["valence"], batch["arousal"]], dim=1).float()
    if ldl_va_target == "distribution":
        return target
    if ldl_va_target != "top_votes":
        raise ValueError(f"unknown ldl_va_target {ldl_va_target!r}")
    rows = batch_mask(batch, "va_lexicon", target.shape[0], target.device) & \
        batch_mask(batch, "has_dist", target.shape[0], target.device)
    if rows.any():
        if anchors is None:
            raise ValueError("top-vote VA targets need the class anchors")
        dist = batch["label_dist"].to(target.device)
        anchors = torch.as_tensor(anchors, dtype=target.dtype, device=target.device)
        if dist.shape[1] == anchors.shape[0]:
            target = torch.where(rows[:, None], top_vote_va(dist.float(), anchors), target)
    return target


# The published code takes its VA MSE on the SAM 1..9 scale; the project keeps VA on [-1, 1]. The
# scales differ by a factor (9 - 1) / (1 - (-1)) = 4, so an MSE on 1..9 is 16 x the MSE on [-1, 1].
# Multiplying the canonical VA term by this factor reproduces the published balance of the terms.
PUBLISHED_VA_SCALE = ((9.0 - 1.0) / (1.0 - (-1.0))) ** 2


def multitask_loss(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any], alpha: float = 0.5,
                   va_kind: str = "mse", label_smoothing: float = 0.0, va_scale: float = 1.0, *,
                   ldl_va_target: str = "distribution", ldl_category_loss: str = "kl",
                   anchors: Optional[torch.Tensor] = None,
                   global_counts: Optional[tuple[float, float, int]] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 - alpha) * category + alpha * va_scale * VA`` over a mixed batch; returns ``(total, parts)``.

    ``alpha`` is the **VA weight**, as in the published code (``ce * (1 - alpha) + mse * alpha``;
    0.5 in stage one, 0.9 in stage two). ``va_scale`` multiplies the VA term:
    :data:`PUBLISHED_VA_SCALE` (16) makes a canonical-scale MSE equal the published 1..9-scale MSE,
    1 keeps the canonical MSE.

    VA term: rows with ``has_va`` (targets by :func:`va_targets`). Category term: rows with
    ``has_dist`` use :func:`distribution_loss` (``ldl_category_loss="kl"``) or
    :func:`multilabel_loss` (``"bce_top_votes"``), rows with a label but no distribution use
    :func:`category_loss`; the two are averaged weighted by their row counts. Without ``"logits"`` in
    ``outputs`` (single task) the total is ``va_scale * VA`` (the published single-task loss: the MSE
    alone). A term with no rows is an exact 0: the published code's mean over an empty selection is
    NaN, but its input is empty, so it passes no gradient either, and the step is a category-only (or
    VA-only) step with the same gradient.

    ``global_counts=(n_va, n_cat, world)``: the rows of the *global* batch across ``world`` DDP ranks.
    Each term is then this rank's sum over its rows divided by the global count, times ``world`` (DDP
    averages gradients over ranks), so the gradient equals that of the published per-batch means over
    the whole global batch even when the ranks' batches mix the two kinds of rows differently (stage
    two's pool batching). MSE terms only.

    ``parts`` holds floats: ``loss`` (the total), ``loss_va`` (the unscaled, canonical-scale VA term),
    ``loss_cat``, ``n_va``, ``n_cat``.
    """
    va = outputs["va"]
    n, device = va.shape[0], va.device
    target = va_targets(batch, ldl_va_target, anchors).to(device)
    has_va = batch_mask(batch, "has_va", n, device)
    n_va_local = int(has_va.sum())
    loss_va = va_loss(va, target, has_va, kind=va_kind)
    if global_counts is not None:
        if va_kind != "mse":
            raise ValueError("global-batch normalisation takes the MSE VA loss only")
        n_va_global, n_cat_global, world = global_counts
        loss_va = _rescale(loss_va, n_va_local, n_va_global, world)

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
            dist = batch["label_dist"].to(device)
            if ldl_category_loss == "bce_top_votes":
                part = multilabel_loss(logits, dist, has_dist)
            elif ldl_category_loss == "kl":
                part = distribution_loss(logits, dist, has_dist)
            else:
                raise ValueError(f"unknown ldl_category_loss {ldl_category_loss!r}")
            loss_cat = loss_cat + n_dist / n_cat * part
        if n_label:
            loss_cat = loss_cat + n_label / n_cat * category_loss(logits, labels, has_label, label_smoothing)
        if global_counts is not None:
            loss_cat = _rescale(loss_cat, n_cat, n_cat_global, world)
        total = (1 - alpha) * loss_cat + alpha * va_scale * loss_va

    parts = {"loss": float(total.detach()), "loss_va": float(loss_va.detach()),
             "loss_cat": float(loss_cat.detach()), "n_va": float(has_va.sum()), "n_cat": float(n_cat)}
    return total, parts


def _rescale(mean: torch.Tensor, n_local: int, n_global: float, world: int) -> torch.Tensor:
    """A rank's mean over its ``n_local`` rows as its share of the global batch's mean (see multitask_loss)."""
    if n_global <= 0:
        return mean
    return mean * (n_local * world / n_global)


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


def cosine_anchor(va, anchors, multi_label: bool = False):
    """Decode VA to categories as the published code does (``src/utils.py``, ``ConvertLogitsToClasses``):
    both mapped to the SAM 1..9 scale, the cosine similarity of the prediction to each anchor; the class
    of the largest, or (``multi_label``, LDL sets) a multi-hot of every class above 0.5. numpy in, numpy out.
    """
    va = np.asarray(va, dtype=np.float64).reshape(-1, 2) * 4.0 + 5.0
    anchors = np.asarray(anchors, dtype=np.float64).reshape(-1, 2) * 4.0 + 5.0
    eps = 1e-6   # torch.nn.CosineSimilarity's default, as published
    cos = (va @ anchors.T) / np.maximum(np.linalg.norm(va, axis=1, keepdims=True) *
                                        np.linalg.norm(anchors, axis=1)[None, :], eps)
    if multi_label:
        return (cos > 0.5).astype(np.int64)
    return cos.argmax(axis=1)
