"""The plain-PyTorch training core, without Ray: early stopping, schedule, exact resume, learning."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emotion_models.registry import ModelSpec, build_model
from pipelines import core
from pipelines.objectives import build_objective
from pipelines.recipe import StageRecipe

SPEC = StageRecipe(name="core", model=ModelSpec(backbone="resnet10t", weights="none",
                                                options={"task": "multi", "num_classes": 3}),
                   classes=("a", "b", "c"), head_classes=("a", "b", "c"),
                   anchors=((-0.8, 0.5), (0.0, -0.5), (0.8, 0.5)))


def _lr_spec(lr: float) -> core.OptimizerSpec:
    return core.OptimizerSpec(name="adamw", lr=lr)


def test_early_stopping_keeps_the_first_of_tied_bests_and_stops_on_patience():
    es = core.EarlyStopping(patience=2, mode="max")
    assert es.step(0.5, 0) and es.step(0.7, 1)
    assert not es.step(0.7, 2)            # a tie is not an improvement: the best stays epoch 1
    assert not es.step(float("nan"), 3)
    assert es.best_epoch == 1 and es.best == 0.7 and es.should_stop
    clone = core.EarlyStopping(patience=2)
    clone.load_state_dict(es.state_dict())
    assert clone == es
    low = core.EarlyStopping(patience=0, mode="min")
    assert low.step(3.0, 0) and low.step(2.0, 1) and not low.step(2.5, 2) and not low.should_stop


def _trained_lrs(sched_kwargs: dict, epochs: int, lr: float = 1.0) -> list[float]:
    """The lr each epoch trains at, stepped as ``fit`` steps it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = core.Schedule(opt, core.ScheduleSpec(**sched_kwargs), epochs)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.after_epoch(epoch)
    return lrs


def test_scheduler_warms_up_then_follows_a_cosine_per_epoch():
    lrs = _trained_lrs({"warmup_epochs": 2, "min_lr_ratio": 0.0}, epochs=6)
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs == sorted(lrs[:3]) + sorted(lrs[3:], reverse=True) and lrs[5] < lrs[3]


def _lambda_lr_factor(epoch: int, epochs: int, warmup: int, name: str, ratio: float) -> float:
    """The schedule as the project wrote it by hand before it used timm's (a torch LambdaLR factor)."""
    if warmup and epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    progress = min((epoch - warmup) / max(epochs - warmup, 1), 1.0)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("name", ["cosine_after_warmup", "constant"])
@pytest.mark.parametrize("epochs, warmup", [(6, 0), (10, 2), (3, 5)])
def test_timm_schedule_trains_each_epoch_at_the_hand_written_lambda_lr_value(name, epochs, warmup):
    lr, ratio = 2e-3, 0.01
    lrs = _trained_lrs({"warmup_epochs": warmup, "name": name, "min_lr_ratio": ratio}, epochs, lr=lr)
    expected = [lr * _lambda_lr_factor(e, epochs, warmup, name, ratio) for e in range(epochs)]
    np.testing.assert_allclose(lrs, expected, rtol=0, atol=1e-12 * lr)
    # The same numbers as the torch LambdaLR itself produced.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    reference = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lambda_lr_factor(e, epochs, warmup, name, ratio))
    torch_lrs = []
    for _ in range(epochs):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    np.testing.assert_allclose(lrs, torch_lrs, rtol=0, atol=1e-12 * lr)


def test_cosine_schedule_needs_one_lr_for_all_groups():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=1.0)
    with pytest.raises(ValueError, match="one lr"):
        core.Schedule(opt, core.ScheduleSpec(), 4)


@pytest.mark.parametrize("name, reference", [
    ("adamw", lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd)),
    ("adam", lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd)),
    ("sgd", lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=0.9, nesterov=True)),
])
def test_plain_optimizer_is_torchs_own_with_its_defaults_and_one_identical_step(name, reference):
    """timm's factory on the plain path: torch's class, torch's defaults, frozen parameters left out."""
    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
        net[0].requires_grad_(False)
        return net

    ours_net, ref_net = model(), model()
    ours = core.build_optimizer(ours_net, core.OptimizerSpec(name=name, lr=0.1, weight_decay=0.05), global_batch=1)
    ref = reference([p for p in ref_net.parameters() if p.requires_grad], 0.1, 0.05)
    assert type(ours) is type(ref)
    assert len(ours.param_groups) == len(ref.param_groups) == 1
    strip = lambda group: {k: v for k, v in group.items() if k != "params"}  # noqa: E731
    assert strip(ours.param_groups[0]) == strip(ref.param_groups[0])
    assert [id(p) for p in ours.param_groups[0]["params"]] == [id(p) for p in ours_net.parameters() if p.requires_grad]
    # The plain path takes the trainable parameters only, in one group.
    assert len(ours.param_groups[0]["params"]) == 4

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for net, opt in ((ours_net, ours), (ref_net, ref)):
        for _ in range(2):  # the second step uses the momentum / moment buffers
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (pname, a), b in zip(ours_net.state_dict().items(), ref_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{pname} differs from torch's {name}")


def test_plain_optimizer_refuses_a_fully_frozen_model():
    net = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        core.build_optimizer(net, core.OptimizerSpec(), global_batch=1)
    from pipelines.recipe import RecipeError, build

    with pytest.raises(RecipeError, match="lamb"):
        build(core.OptimizerSpec, {"name": "lamb"}, "optimizer")


def _toy_batches(seed: int, n_batches: int = 4, size: int = 16):
    """Images whose mean red/blue balance is the valence and brightness the arousal (a learnable signal)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        va = torch.rand(8, 2, generator=g) * 2 - 1
        img = torch.rand(8, 3, size, size, generator=g) * 0.2
        img[:, 0] += (va[:, 0:1, None] + 1) / 2 * (va[:, 1:2, None] + 1) / 2
        img[:, 2] += (1 - va[:, 0:1, None]) / 2
        label = torch.bucketize(va[:, 0].contiguous(), torch.tensor([-0.33, 0.33]))
        batches.append({"image": img, "valence": va[:, 0], "arousal": va[:, 1], "has_va": torch.ones(8, dtype=bool),
                        "label": label, "has_label": torch.ones(8, dtype=bool),
                        "label_dist": torch.zeros(8, 3), "has_dist": torch.zeros(8, dtype=bool)})
    return batches


def _state(seed: int = 0) -> core.TrainState:
    core.seed_everything(seed)
    model = build_model(SPEC.model)
    opt = core.build_optimizer(model, _lr_spec(3e-3), global_batch=8)
    return core.TrainState(model, opt, core.Schedule(opt, core.ScheduleSpec(), 4), core.EarlyStopping(patience=0))


def _fit(state, epochs: int):
    train, val = _toy_batches(1), _toy_batches(2, n_batches=3)

    def shuffled(epoch):  # the order depends on torch's RNG, which the state carries
        return [train[i] for i in torch.randperm(len(train))]

    return core.fit(state, build_objective(SPEC), core.Precision.for_device("cpu"), train_batches=shuffled,
                    val_batches=lambda epoch: val, epochs=epochs, monitor="pearson_mean", log=lambda *_: None)


def test_resume_from_a_saved_state_equals_an_uninterrupted_run(tmp_path):
    straight = _fit(_state(), epochs=3)

    first = _fit(_state(), epochs=1)
    from pipelines.checkpoints import load_state, save_state

    save_state(tmp_path / "state.pt", first.state_dict())
    resumed = _state(seed=123)                   # fresh objects, different RNG: everything must come back
    resumed.load_state_dict(load_state(tmp_path / "state.pt"))
    assert resumed.epoch == 1
    resumed = _fit(resumed, epochs=3)

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")
    assert [h["val_pearson_mean"] for h in straight.history] == [h["val_pearson_mean"] for h in resumed.history]


def test_fit_learns_the_signal_without_ray():
    state = _fit(_state(), epochs=4)
    first, last = state.history[0], state.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_pearson_v"] > 0.5, state.history
    assert state.early_stopping.best_epoch >= 0 and np.isfinite(state.early_stopping.best)


def _uneven_worker(rank: int, world_size: int, init_method: str, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(SPEC.model))
        opt = core.build_optimizer(core.unwrap(model), _lr_spec(3e-3), global_batch=8)
        batches = _toy_batches(rank, n_batches=3 - rank)   # rank 1 runs out one step early
        stats = core.train_one_epoch(model, batches, opt, build_objective(SPEC), core.Precision.for_device("cpu"))
        torch.save({"samples": stats["samples"], "weights": core.unwrap(model).state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_step_counts_finish_the_epoch_in_step(tmp_path):
    """Under DDP a rank with fewer batches (``--decode device`` drops an all-unreadable batch) does not
    leave the others waiting for its gradients: the epoch ends on every rank, weights identical."""
    import time

    ctx = torch.multiprocessing.spawn(_uneven_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
                                      nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank waited for ever: the epoch did not end on both ranks")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["samples"], r1["samples"]) == (24.0, 16.0)
    for name, value in r0["weights"].items():
        torch.testing.assert_close(value, r1["weights"][name], rtol=0, atol=0, msg=name)
