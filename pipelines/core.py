"""The one training core: plain PyTorch, no Ray, no MLflow.

Shaped like torchvision's ``references/classification/train.py``: ``train_one_epoch`` and
``evaluate`` over any iterable of batches, plus the bookkeeping a run needs to stop early and
to resume exactly where it was (``TrainState``). Both pipelines, the Ray Train glue
(:mod:`pipelines.train_loop`) and the benchmarks call these functions; nothing here knows where
the batches come from (Ray Data shards or a local Parquet reader).

A batch is a ``dict[str, Tensor]``; what a model takes from it, and how its outputs are scored,
is the job of an *objective* (:mod:`pipelines.objectives`).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn

from datasets_io.pixels import ImageNorm
from emotion_models.metrics import Accumulator


class Objective(Protocol):
    """What differs between pipelines: model inputs, loss, and metrics."""

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]: ...

    def loss(self, outputs: dict, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...

    def collect(self, acc: Accumulator, outputs: dict, batch: dict[str, torch.Tensor]) -> None: ...

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]: ...


@dataclass
class Precision:
    """Where and how the math runs: bf16 autocast and channels_last on GPU, fp32 on CPU; and how
    image batches are prepared once on the device (``norm``: uint8 pixels -> normalised float32)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    norm: Optional[ImageNorm] = None      # None: timm's ImageNet mean/std

    @classmethod
    def for_device(cls, device: torch.device | str, amp: Optional[bool] = None,
                   image: Optional[dict] = None) -> "Precision":
        """``image``: a recipe's ``image`` dict; its ``mean`` / ``std`` normalise the uint8 batches."""
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        use_amp = on_gpu if amp is None else amp
        return cls(device=device, amp_dtype=torch.bfloat16 if use_amp else None, channels_last=on_gpu,
                   norm=ImageNorm.from_image_cfg(image))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch to the device; ``image`` arrives as uint8 pixels (4x less to copy) and is
        normalised there (float32, channels_last on GPU; autocast takes it to bf16 in the model)."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key == "image":
                    if self.norm is None:
                        self.norm = ImageNorm()
                    value = self.norm(value, channels_last=self.channels_last)
            out[key] = value
        return out


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    precision: Precision,
    *,
    grad_clip: Optional[float] = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the sample-weighted mean of the loss parts (and ``skipped``,
    when ``batches`` counts images it could not decode)."""
    model.train()
    totals: dict[str, float] = {}
    start = time.perf_counter()
    with uneven_inputs(model):
        seen = _train_steps(model, batches, optimizer, objective, precision, totals, grad_clip=grad_clip,
                            log_every=log_every, log=log, on_batch=on_batch)
    elapsed = time.perf_counter() - start
    means = {k: (v if k.startswith("n_") else v / max(seen, 1)) for k, v in totals.items()}
    skipped = getattr(batches, "skipped", None)  # images the device decoder could not read (--decode device)
    if skipped is not None:
        means["skipped"] = float(skipped)
    means["samples"] = float(seen)
    means["samples_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    return means


def uneven_inputs(model: nn.Module):
    """DDP's ``join()`` context when ``model`` is (or wraps) a DDP module, else a no-op.

    Ranks may run different numbers of steps in an epoch (``--decode device`` drops a batch whose
    images all fail to decode); without ``join`` the rank with more steps would wait for its peers'
    gradients forever. Inside it, a rank that ran out shadows the others' collectives."""
    m = model
    while m is not None:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return m.join()
        m = getattr(m, "_orig_mod", None)
    return contextlib.nullcontext()


def _train_steps(model, batches, optimizer, objective, precision, totals: dict, *, grad_clip, log_every, log,
                 on_batch) -> int:
    seen = 0
    for step, batch in enumerate(batches):
        if on_batch is not None:
            on_batch(step)
        batch = precision.to_device(batch)
        args, kwargs = objective.inputs(batch)
        with precision.autocast():
            outputs = model(*args, **kwargs)
        loss, parts = objective.loss(_float_outputs(outputs), batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; parts {parts}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        n = int(batch["image"].shape[0])
        seen += n
        for key, value in parts.items():
            if key.startswith("n_"):
                totals[key] = totals.get(key, 0.0) + float(value)
            else:
                totals[key] = totals.get(key, 0.0) + float(value) * n
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}: loss {parts.get('loss', float(loss)):.4f}")
    return seen


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    objective: Objective,
    precision: Precision,
) -> dict[str, np.ndarray]:
    """Run ``model`` over every batch and return the objective's accumulated arrays.

    Under DDP every rank passes its own shard; the arrays are gathered from all ranks before
    they are returned, so metrics are computed on the whole split, not averaged per batch.
    """
    model.eval()
    acc = Accumulator()
    for batch in batches:
        batch = precision.to_device(batch)
        args, kwargs = objective.inputs(batch)
        with precision.autocast():
            outputs = model(*args, **kwargs)
        objective.collect(acc, _float_outputs(outputs), batch)
    return acc.gather()


def evaluate(model, batches, objective, precision) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Predictions over a split, then the objective's metrics on all of them."""
    arrays = predict(model, batches, objective, precision)
    return objective.metrics(arrays), arrays


def _float_outputs(outputs) -> dict:
    # Losses and metrics are computed in fp32 even when the forward ran under bf16 autocast.
    if isinstance(outputs, torch.Tensor):  # a classifier that returns bare logits
        outputs = {"logits": outputs}
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in outputs.items()}


@dataclass
class EarlyStopping:
    """Patience on a validation metric; remembers the best epoch, never forgets it."""

    patience: int
    mode: str = "max"
    best: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"early-stopping mode must be 'max' or 'min', not {self.mode!r}")

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; returns True when it is the best so far."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            improved = False
        elif self.best is None:
            improved = True
        else:
            improved = value > self.best if self.mode == "max" else value < self.best
        if improved:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def build_optimizer(params, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                    momentum: float = 0.9, filter_bias_and_bn: bool = False) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``params`` (an iterable of parameters, or a module).

    ``"adamw"`` / ``"adam"`` are torch's ``AdamW`` / ``Adam`` with their default betas and eps;
    ``"sgd"`` is torch's ``SGD`` with Nesterov momentum (timm's ``"sgd"``).

    ``filter_bias_and_bn=True`` (the DeiT/PVT recipe) needs the *unwrapped* module: timm then
    exempts biases, every 1-D parameter (norm weights) and the names the model's
    ``no_weight_decay()`` returns (position embeddings, cls/query tokens) from weight decay, and
    skips frozen parameters. Otherwise every trainable parameter decays, in one group (the plain
    path the two-stage pipeline has always used): timm gets the list of trainable parameters, not
    the module, since given a module it would apply ``no_weight_decay()`` even then.
    """
    name = name.lower()
    if name not in ("adamw", "adam", "sgd"):
        raise ValueError(f"unknown optimizer {name!r}; known: adamw, adam, sgd")
    if filter_bias_and_bn:
        if not isinstance(params, nn.Module):
            raise TypeError("filter_bias_and_bn=True needs the model (an nn.Module), not a parameter list")
        if hasattr(params, "module"):
            raise TypeError("pass the unwrapped model (core.unwrap), not its DDP wrapper: "
                            "no_weight_decay() names are matched against its named_parameters()")
        trainable = any(p.requires_grad for p in params.parameters())
    else:
        params = [p for p in (params.parameters() if isinstance(params, nn.Module) else params) if p.requires_grad]
        trainable = bool(params)
    if not trainable:
        raise ValueError("no trainable parameters: every layer is frozen")
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               filter_bias_and_bn=filter_bias_and_bn)


def linear_scaled_lr(base_lr: float, batch_size: int, world_size: int, reference: int = 512) -> float:
    """DeiT's linear scaling rule: ``base_lr x batch_size x world_size / reference``."""
    return base_lr * batch_size * world_size / reference


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int = 0,
                    name: str = "cosine", min_lr_ratio: float = 0.01, min_lr: float = 1e-5,
                    warmup_lr: float = 1e-5):
    """A per-epoch timm scheduler (``create_scheduler_v2``); :func:`step_scheduler` advances it.

    Epoch ``e`` trains at the schedule's value at ``e``: it is stepped with ``step(e + 1)`` after
    epoch ``e`` (timm's own train.py; the published DeiT/PVT/LORA loop calls ``step(e)``, which
    trains epochs 0 and 1 both at the warm-up start).

    ``"cosine"`` / ``"constant"`` (the two-stage pipeline): epoch ``e < warmup_epochs`` trains at
    ``lr * (e + 1) / (warmup_epochs + 1)`` (timm's linear warm-up from ``lr / (warmup_epochs + 1)``),
    then a cosine over the remaining ``epochs - warmup_epochs`` epochs down to ``min_lr_ratio * lr``
    (``warmup_prefix``), or the constant lr. ``lr`` is the optimizer's (one lr for all groups).
    ``"timm_cosine"`` (the DeiT/PVT recipe): warm-up from ``warmup_lr`` over ``warmup_epochs``
    epochs, then cosine over ``epochs`` (warm-up included) down to ``min_lr`` (absolute values;
    ``min_lr_ratio`` is not used).
    """
    from timm.scheduler import create_scheduler_v2

    if name == "timm_cosine":
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, min_lr=min_lr,
                                           warmup_lr=warmup_lr, warmup_epochs=warmup_epochs)
        return scheduler
    if name not in ("cosine", "constant"):
        raise ValueError(f"unknown scheduler {name!r}; known: cosine, constant, timm_cosine")
    base = {group.get("initial_lr", group["lr"]) for group in optimizer.param_groups}
    if len(base) != 1:
        raise ValueError(f"the {name!r} schedule needs one lr for every param group, got {sorted(base)}")
    lr = base.pop()
    scheduler, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=max(epochs - warmup_epochs, 1),
                                       min_lr=min_lr_ratio * lr, warmup_lr=lr / (warmup_epochs + 1),
                                       warmup_epochs=warmup_epochs, warmup_prefix=True)
    return scheduler


def step_scheduler(scheduler, next_epoch: int) -> None:
    """End-of-epoch step of a :func:`build_scheduler` schedule: timm's schedulers are told the epoch
    about to start (and set every param group's lr to its value there)."""
    scheduler.step(next_epoch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


@dataclass
class TrainState:
    """Everything needed to continue a run as if it had never stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    early_stopping: EarlyStopping
    epoch: int = 0                        # the next epoch to run
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DDP / DataParallel wrappers (in any nesting): its
    ``state_dict`` names carry no ``_orig_mod.`` / ``module.`` prefixes."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(model, "module"):
            model = model.module
        else:
            return model


def save_checkpoint(path, payload: dict) -> None:
    """Write atomically: a crash never leaves a half-written file under ``path``."""
    import os

    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class EpochResult:
    epoch: int
    train: dict
    val: dict
    improved: bool
    lr: float
    seconds: float


def fit(
    state: TrainState,
    objective: Objective,
    precision: Precision,
    *,
    train_batches: Callable[[int], Iterable[dict]],
    val_batches: Callable[[int], Iterable[dict]],
    epochs: int,
    monitor: str,
    eval_model: Optional[nn.Module] = None,
    on_epoch_end: Optional[Callable[[EpochResult, TrainState], None]] = None,
    grad_clip: Optional[float] = None,
    log: Callable[[str], None] = print,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> TrainState:
    """The epoch loop: train, validate, step the schedule, track the best epoch, stop early.

    ``train_batches(epoch)`` / ``val_batches(epoch)`` return fresh iterables each epoch.
    ``eval_model`` is the module used for validation (the unwrapped model under DDP, so that
    ranks with uneven validation shards never wait on each other); defaults to ``state.model``.
    ``on_epoch_end`` runs after the state is advanced (the Ray glue reports and checkpoints there).
    """
    eval_model = eval_model or state.model
    while state.epoch < epochs and not state.early_stopping.should_stop:
        epoch = state.epoch
        start = time.perf_counter()
        lr = state.optimizer.param_groups[0]["lr"]
        hook = (lambda step: on_batch(epoch, step)) if on_batch else None
        train_stats = train_one_epoch(state.model, train_batches(epoch), state.optimizer, objective,
                                      precision, grad_clip=grad_clip, on_batch=hook)
        val_metrics, _ = evaluate(eval_model, val_batches(epoch), objective, precision)
        if monitor not in val_metrics:
            raise KeyError(f"monitored metric {monitor!r} is not among the validation metrics "
                           f"{sorted(val_metrics)}")
        improved = state.early_stopping.step(val_metrics[monitor], epoch)
        step_scheduler(state.scheduler, epoch + 1)
        state.epoch = epoch + 1
        scalar_val = {k: v for k, v in val_metrics.items() if isinstance(v, (int, float))}
        seconds = time.perf_counter() - start
        # The one place the train_ / val_ prefixes are made: Ray reports, MLflow curves and Tune use these rows.
        state.history.append({"epoch": epoch, "lr": lr, "epoch_seconds": seconds,
                              **{f"train_{k}": v for k, v in train_stats.items()},
                              **{f"val_{k}": v for k, v in scalar_val.items()}})
        result = EpochResult(epoch, train_stats, val_metrics, improved, lr, seconds)
        log(format_epoch(result, monitor, epochs))
        if on_epoch_end is not None:
            on_epoch_end(result, state)
    return state


def format_epoch(result: EpochResult, monitor: str, epochs: int) -> str:
    """The per-epoch progress line."""
    val = result.val
    shown = [monitor] + [k for k in ("pearson_v", "pearson_a", "accuracy", "mse") if k in val and k != monitor]
    parts = " ".join(f"{k} {val[k]:.4f}" for k in shown if isinstance(val.get(k), (int, float)))
    star = " *" if result.improved else ""
    return (f"epoch {result.epoch + 1}/{epochs}  loss {result.train.get('loss', float('nan')):.4f}  "
            f"val {parts}  lr {result.lr:.2e}  {result.train.get('samples_per_s', 0):.0f} img/s  "
            f"{result.seconds:.1f}s{star}")
