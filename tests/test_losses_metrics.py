"""Losses (masked, never NaN) and metrics (exactly scipy's / sklearn's), plus the DDP gather."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emotion_models import losses, metrics

ALPHA = 0.3


def _logits_and_va(n: int, num_classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g, requires_grad=True)
    va = torch.rand(n, 2, generator=g).mul(2).sub(1).requires_grad_()
    return logits, va


def _batch(n: int, *, va: bool, label: bool, dist: bool, num_classes: int = 4, seed: int = 1) -> dict:
    """A collated batch as the pipelines build it: NaN / -1 / zeros where a target is absent."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, 2, generator=g) * 2 - 1
    probs = torch.softmax(torch.randn(n, num_classes, generator=g), dim=1)
    probs[0, 0] = 0.0  # a zero entry exercises 0 * log 0
    probs = probs / probs.sum(dim=1, keepdim=True)
    return {
        "valence": values[:, 0] if va else torch.full((n,), float("nan")),
        "arousal": values[:, 1] if va else torch.full((n,), float("nan")),
        "has_va": torch.full((n,), va),
        "label": torch.randint(0, num_classes, (n,), generator=g) if label else torch.full((n,), -1),
        "has_label": torch.full((n,), label),
        "label_dist": probs if dist else torch.zeros(n, num_classes),
        "has_dist": torch.full((n,), dist),
    }


def _target(batch: dict) -> torch.Tensor:
    return torch.stack([batch["valence"], batch["arousal"]], dim=1)


# --------------------------------------------------------------------------------------- losses

def test_multitask_all_categorical_batch_is_pure_cross_entropy():
    logits, va = _logits_and_va(6)
    batch = _batch(6, va=False, label=True, dist=False)
    total, parts = losses.multitask_loss({"va": va, "logits": logits}, batch, alpha=ALPHA)
    total.backward()
    assert torch.isfinite(total) and parts["loss_va"] == 0.0 and parts["n_va"] == 0 and parts["n_cat"] == 6
    torch.testing.assert_close(total, (1 - ALPHA) * F.cross_entropy(logits, batch["label"]))
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.equal(va.grad, torch.zeros_like(va))  # connected, but no VA signal


def test_multitask_all_dimensional_batch_is_pure_va_loss():
    logits, va = _logits_and_va(5)
    batch = _batch(5, va=True, label=False, dist=False)
    total, parts = losses.multitask_loss({"va": va, "logits": logits}, batch, alpha=ALPHA, va_kind="mse+ccc")
    total.backward()
    expected = ALPHA * (F.mse_loss(va, _target(batch)) + losses.va_ccc_loss(va, _target(batch)))
    torch.testing.assert_close(total, expected)
    assert parts["loss_cat"] == 0.0 and parts["n_cat"] == 0 and parts["n_va"] == 5
    assert math.isclose(parts["loss"], expected.item(), rel_tol=1e-6)
    assert torch.isfinite(va.grad).all() and torch.equal(logits.grad, torch.zeros_like(logits))


def test_multitask_weights_distribution_and_label_rows_by_count():
    logits, va = _logits_and_va(5)
    ldl, hard = _batch(5, va=True, label=True, dist=True), _batch(5, va=True, label=True, dist=False, seed=2)
    batch = {k: torch.cat([ldl[k][:2], hard[k][2:]]) for k in ldl}  # 2 distribution rows, 3 label rows
    total, parts = losses.multitask_loss({"va": va, "logits": logits}, batch, alpha=ALPHA)
    kl = losses.distribution_loss(logits[:2], batch["label_dist"][:2])
    ce = F.cross_entropy(logits[2:], batch["label"][2:])
    expected_cat = (2 * kl + 3 * ce) / 5
    assert parts["n_cat"] == 5 and math.isclose(parts["loss_cat"], expected_cat.item(), rel_tol=1e-6)
    torch.testing.assert_close(total, (1 - ALPHA) * expected_cat + ALPHA * F.mse_loss(va, _target(batch)))


def test_single_task_outputs_give_the_plain_va_loss():
    _, va = _logits_and_va(4)
    batch = _batch(4, va=True, label=True, dist=False)
    total, parts = losses.multitask_loss({"va": va}, batch, alpha=ALPHA)
    torch.testing.assert_close(total, F.mse_loss(va, _target(batch)))  # not scaled by alpha
    assert parts["loss_cat"] == 0.0 and parts["n_cat"] == 0
    scaled, _ = losses.multitask_loss({"va": va}, batch, alpha=ALPHA, va_scale=losses.PUBLISHED_VA_SCALE)
    torch.testing.assert_close(scaled, 16 * F.mse_loss(va, _target(batch)))


def test_stage_two_batch_loss_equals_the_published_formula_by_hand():
    """Published: ``ce * (1 - alpha) + mse * alpha`` with VA on SAM 1..9; alpha = 0.9 in stage two.

    Two categorical rows (labels only) and two dimensional rows (VA only), numbers small enough to
    check by hand. Canonical VA v maps to SAM 4 v + 5.
    """
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, -5.0], [1.0, 2.0]], requires_grad=True)
    va = torch.tensor([[0.9, 0.9], [-0.9, 0.9], [0.5, 0.0], [0.0, -0.25]], requires_grad=True)
    batch = {"label": torch.tensor([0, 1, -1, -1]), "has_label": torch.tensor([True, True, False, False]),
             "valence": torch.tensor([0.0, 0.0, 0.25, 0.0]), "arousal": torch.tensor([0.0, 0.0, 0.0, 0.25]),
             "has_va": torch.tensor([False, False, True, True]),
             "label_dist": torch.zeros(4, 2), "has_dist": torch.zeros(4, dtype=torch.bool)}
    # CE of two rows with equal logits: ln 2 each. SAM-scale errors: (0.5 - 0.25) * 4 = 1 and
    # (-0.25 - 0.25) * 4 = -2 over 4 values with two zeros -> MSE_sam = (1 + 0 + 0 + 4) / 4 = 1.25.
    expected = math.log(2) * (1 - 0.9) + 1.25 * 0.9
    total, parts = losses.multitask_loss({"va": va, "logits": logits}, batch, alpha=0.9,
                                         va_scale=losses.PUBLISHED_VA_SCALE)
    assert math.isclose(total.item(), expected, rel_tol=1e-6)
    assert math.isclose(parts["loss_va"], 1.25 / 16, rel_tol=1e-6)  # reported on the canonical scale
    # The same with the published model's tensors on the SAM scale and torch's own losses.
    published = F.cross_entropy(logits[:2], batch["label"][:2]) * (1 - 0.9) + \
        F.mse_loss(va[2:] * 4 + 5, _target(batch)[2:] * 4 + 5) * 0.9
    torch.testing.assert_close(total, published)
    # alpha is the VA weight: raising it moves weight from the categories to VA.
    more_va, _ = losses.multitask_loss({"va": va, "logits": logits}, batch, alpha=0.99,
                                       va_scale=losses.PUBLISHED_VA_SCALE)
    assert more_va.item() > total.item()  # MSE_sam 1.25 > CE ln 2


def test_empty_masks_give_an_exact_zero_that_still_backpropagates():
    logits, va = _logits_and_va(3)
    nan_target = torch.full((3, 2), float("nan"))
    none = torch.zeros(3, dtype=torch.bool)
    one = torch.tensor([True, False, False])
    terms = [
        losses.va_mse(va, nan_target, none),
        losses.va_ccc_loss(va, nan_target, one),  # CCC needs two rows
        losses.va_loss(va, nan_target, none, kind="mse+ccc"),
        losses.category_loss(logits, torch.full((3,), -1)),
        losses.distribution_loss(logits, torch.zeros(3, 4), none),
    ]
    for term in terms:
        assert term.item() == 0.0 and term.requires_grad
    sum(terms).backward()
    assert torch.equal(va.grad, torch.zeros_like(va)) and torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_rows_with_nan_targets_do_not_leak():
    _, va = _logits_and_va(4)
    target = torch.tensor([[0.5, -0.5], [float("nan")] * 2, [0.1, 0.2], [float("nan")] * 2])
    mask = torch.tensor([True, False, True, False])
    loss = losses.va_loss(va, target, mask, kind="mse+ccc")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(va.grad).all()
    torch.testing.assert_close(losses.va_mse(va, target, mask), F.mse_loss(va[mask], target[mask]))


def test_distribution_loss_equals_a_hand_computed_kl():
    logits, _ = _logits_and_va(3)
    dist = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([True, False, True])
    q = torch.softmax(logits.detach(), dim=1)
    rows = [sum(p * math.log(p / q[i, c]) for c, p in enumerate(dist[i].tolist()) if p > 0) for i in (0, 2)]
    assert math.isclose(losses.distribution_loss(logits, dist, mask).item(), sum(rows) / 2, rel_tol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_category_loss_matches_torch_and_skips_unlabelled_rows(smoothing):
    logits, _ = _logits_and_va(6)
    labels = torch.tensor([0, -1, 3, 2, -1, 1])
    keep = labels >= 0
    expected = F.cross_entropy(logits[keep], labels[keep], label_smoothing=smoothing)
    torch.testing.assert_close(losses.category_loss(logits, labels, label_smoothing=smoothing), expected)
    mask = torch.tensor([True, True, False, True, True, True])  # also drops row 2
    expected = F.cross_entropy(logits[keep & mask], labels[keep & mask], label_smoothing=smoothing)
    torch.testing.assert_close(losses.category_loss(logits, labels, mask, smoothing), expected)


def test_ccc_loss_is_zero_for_a_perfect_fit_and_one_minus_mean_ccc_otherwise():
    pred = torch.tensor([[0.1, 0.9], [0.4, -0.2], [-0.7, 0.3], [0.2, 0.0]])
    assert losses.va_ccc_loss(pred, pred.clone()).abs().item() < 1e-6
    target = pred.flip(0)
    expected = 1 - (metrics.ccc(pred[:, 0], target[:, 0]) + metrics.ccc(pred[:, 1], target[:, 1])) / 2
    assert math.isclose(losses.va_ccc_loss(pred, target).item(), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="huber"):
        losses.va_loss(pred, target, kind="huber")


def test_nearest_anchor_agrees_with_brute_force_in_torch_and_numpy():
    rng = np.random.default_rng(0)
    anchors = rng.uniform(-1, 1, (8, 2))
    va = rng.uniform(-1, 1, (50, 2))
    brute = np.array([min(range(8), key=lambda c: np.hypot(*(v - anchors[c]))) for v in va])
    got_np = losses.nearest_anchor(va, anchors)
    got_torch = losses.nearest_anchor(torch.from_numpy(va).float(), anchors)
    assert isinstance(got_np, np.ndarray) and np.array_equal(got_np, brute)
    assert got_torch.dtype == torch.long and np.array_equal(got_torch.numpy(), brute)


# -------------------------------------------------------------------------------------- metrics

def _with_ties(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.round(rng.normal(size=n), 1)  # rounding creates many ties


def test_regression_metrics_match_scipy_and_sklearn():
    from scipy import stats

    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    true = np.stack([_with_ties(rng, 200), _with_ties(rng, 200)], axis=1)
    pred = true * 0.6 + np.stack([_with_ties(rng, 200), _with_ties(rng, 200)], axis=1) * 0.5
    out = metrics.regression_metrics(pred, true)
    for i, dim in enumerate("va"):
        p, t = pred[:, i], true[:, i]
        np.testing.assert_allclose(out[f"pearson_{dim}"], stats.pearsonr(p, t)[0], rtol=1e-6)
        np.testing.assert_allclose(out[f"spearman_{dim}"], stats.spearmanr(p, t)[0], rtol=1e-6)
        np.testing.assert_allclose(out[f"r2_{dim}"], skm.r2_score(t, p), rtol=1e-6)
        np.testing.assert_allclose(out[f"mse_{dim}"], skm.mean_squared_error(t, p), rtol=1e-6)
        # Lin's CCC, textbook form: 2 rho sx sy / (sx^2 + sy^2 + (mx - my)^2), population moments.
        rho = np.corrcoef(p, t)[0, 1]
        textbook = 2 * rho * p.std() * t.std() / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)
        np.testing.assert_allclose(out[f"ccc_{dim}"], textbook, rtol=1e-6)
    np.testing.assert_allclose(out["mse"], skm.mean_squared_error(true, pred), rtol=1e-6)


def test_rank_correlation_handles_ties_and_constant_input():
    from scipy import stats

    x = np.array([3, 1, 2, 2, 3, 3, 0, 1], dtype=float)
    y = np.array([1, 2, 2, 5, 5, 5, 0, 1], dtype=float)
    np.testing.assert_allclose(metrics.spearman(x, y), stats.spearmanr(x, y)[0], rtol=1e-6)
    constant = np.ones(8)
    assert metrics.pearson(x, constant) == 0.0 and metrics.spearman(constant, y) == 0.0
    assert metrics.ccc(constant, constant) == 0.0


def test_classification_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    num_classes = 7                                # class 6 appears nowhere: not in the macro mean
    y_true = rng.integers(0, 5, 300)               # class 5 never true ...
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 6, 300))  # ... but predicted
    y_pred[y_pred == 4] = 3                        # class 4 never predicted
    out = metrics.classification_metrics(torch.from_numpy(y_true), y_pred, num_classes)
    np.testing.assert_allclose(out["accuracy"], skm.accuracy_score(y_true, y_pred), rtol=1e-6)
    np.testing.assert_allclose(out["macro_f1"], skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
                               rtol=1e-6)
    assert np.array_equal(out["confusion"], skm.confusion_matrix(y_true, y_pred, labels=range(num_classes)))
    recall = skm.recall_score(y_true, y_pred, labels=range(5), average=None, zero_division=0)
    np.testing.assert_allclose(out["per_class_acc"][:5], recall, rtol=1e-6)
    assert out["per_class_acc"][5:] == [None, None]
    with pytest.raises(ValueError, match="y_pred"):
        metrics.classification_metrics(y_true, y_pred, num_classes=5)


def test_distribution_metrics_match_scipy():
    from scipy import stats
    from scipy.spatial import distance

    rng = np.random.default_rng(2)
    p, q = rng.dirichlet(np.ones(8), 20), rng.dirichlet(np.ones(8), 20)
    p[0] = np.eye(8)[3]  # one-hot row: 0 * log 0 terms
    out = metrics.distribution_metrics(p, q)
    np.testing.assert_allclose(out["kl"], np.mean([stats.entropy(a, b) for a, b in zip(p, q)]), rtol=1e-6)
    np.testing.assert_allclose(out["chebyshev"], np.mean([distance.chebyshev(a, b) for a, b in zip(p, q)]),
                               rtol=1e-6)


def test_ldl_jaccard_is_the_published_weighted_jaccard_of_dominant_labels():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    votes = rng.integers(0, 4, (60, 8)).astype(float)   # integer votes: ties between top emotions happen
    votes[votes.sum(axis=1) == 0, 0] = 1
    p = votes / votes.sum(axis=1, keepdims=True)
    q = rng.dirichlet(np.ones(8), 60)
    true_hot = metrics.dominant_labels(p)
    # The published labels: every emotion holding the maximum vote.
    np.testing.assert_array_equal(true_hot, (votes == votes.max(axis=1, keepdims=True)).astype(int))
    assert (true_hot.sum(axis=1) > 1).any(), "the fixture should contain ties"
    pred_hot = metrics.dominant_labels(q)
    expected = skm.jaccard_score(true_hot, pred_hot, average="weighted", zero_division=0)
    out = metrics.distribution_metrics(p, q)
    assert out["ldl_jaccard"] == pytest.approx(expected, rel=1e-9)
    assert metrics.distribution_metrics(p, p)["ldl_jaccard"] == pytest.approx(1.0)
    assert 0.0 <= out["ldl_jaccard"] < 1.0


def test_va_objective_reports_the_ldl_score_for_both_heads():
    """Multi-task: from the predicted distribution; single-task: from the nearest anchor of the VA."""
    skm = pytest.importorskip("sklearn.metrics")
    from emotion_models.losses import LossSpec
    from pipelines.objectives import VAObjective

    rng = np.random.default_rng(6)
    anchors = np.array([[0.8, 0.5], [-0.7, 0.6], [0.2, -0.6]], dtype=np.float32)
    dist = rng.dirichlet(np.ones(3), 40).astype(np.float32)
    va_pred = rng.uniform(-1, 1, (40, 2)).astype(np.float32)
    prob = rng.dirichlet(np.ones(3), 40).astype(np.float32)
    arrays = {"va_pred": va_pred, "va_true": np.zeros((40, 2), np.float32), "has_va": np.zeros(40, bool),
              "label": dist.argmax(1), "has_dist": np.ones(40, bool), "label_dist": dist}
    true_hot = metrics.dominant_labels(dist)
    single = VAObjective(LossSpec(), num_classes=3, anchors=anchors, accuracy_from="anchors").metrics(arrays)
    nearest = losses.nearest_anchor(va_pred, anchors)
    assert single["ldl_jaccard"] == pytest.approx(
        skm.jaccard_score(true_hot, np.eye(3, dtype=int)[nearest], average="weighted", zero_division=0))
    multi = VAObjective(LossSpec(), num_classes=3, anchors=anchors, accuracy_from="logits").metrics(
        {**arrays, "logit": np.log(prob)})
    assert multi["ldl_jaccard"] == pytest.approx(
        skm.jaccard_score(true_hot, metrics.dominant_labels(prob), average="weighted", zero_division=0))
    assert "kl" in multi and "kl" not in single


def test_accumulator_concatenates_torch_and_numpy_batches():
    acc = metrics.Accumulator()
    first = torch.tensor([[0.5, 0.1]], requires_grad=True) * 2
    acc.add(pred=first, label=torch.tensor([1]))
    acc.add(pred=np.array([[0.3, 0.4], [0.0, -1.0]]), label=np.array([0, 2]))
    arrays = acc.gather()  # no process group: the local arrays
    np.testing.assert_allclose(arrays["pred"], [[1.0, 0.2], [0.3, 0.4], [0.0, -1.0]], rtol=1e-6)
    assert arrays["label"].tolist() == [1, 0, 2]


# --------------------------------------------------------------------------- DDP gather (gloo)

SHARD_SIZES = (3, 5)  # uneven on purpose


def _shard(rank: int) -> dict[str, np.ndarray]:
    start = sum(SHARD_SIZES[:rank])
    ids = np.arange(start, start + SHARD_SIZES[rank])
    return {"id": ids, "va": np.stack([ids * 0.1, -ids * 0.1], axis=1)}


def _gather_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        acc = metrics.Accumulator()
        shard = _shard(rank)
        for i in range(len(shard["id"])):  # one row per batch
            acc.add(id=torch.from_numpy(shard["id"][i:i + 1]), va=shard["va"][i:i + 1])
        np.savez(f"{out_dir}/rank{rank}.npz", **acc.gather())
    finally:
        torch.distributed.destroy_process_group()


def test_accumulator_gathers_uneven_shards_from_every_rank(tmp_path):
    # A file rendezvous, not a TCP port picked in advance: the session's Ray processes open ports all the
    # time and could take it between the pick and the bind.
    world_size = len(SHARD_SIZES)
    init_method = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_gather_worker, args=(world_size, init_method, str(tmp_path)),
                                nprocs=world_size, join=True)
    whole = {k: np.concatenate([_shard(r)[k] for r in range(world_size)]) for k in ("id", "va")}
    for rank in range(world_size):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert np.array_equal(got["id"], whole["id"]) and np.allclose(got["va"], whole["va"])
