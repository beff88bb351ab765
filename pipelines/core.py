"""The one training core: plain PyTorch, no Ray, no MLflow.

Shaped like torchvision's ``references/classification/train.py``: ``train_one_epoch`` and
``evaluate`` over any iterable of batches, plus the bookkeeping a run needs to stop early and
to resume exactly where it was (``TrainState``). Both pipelines, the Ray Train glue
(:mod:`pipelines.train_loop`) and the benchmarks call these functions; nothing here knows where
the batches come from (Ray Data shards or a local Parquet reader).

The recipe sections this core reads are defined here, beside their use: :class:`OptimizerSpec`,
:class:`ScheduleSpec` and :class:`SelectSpec` (:mod:`pipelines.recipe` composes them).

A batch is a ``dict[str, Tensor]``; what a model takes from it, and how its outputs are scored,
is the job of an *objective* (:mod:`pipelines.objectives`).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn

from datasets_io.prep import ImageNorm
from emotion_models.metrics import Accumulator


# ----------------------------------------------------------------------------- the recipe's sections

@dataclass(frozen=True)
class OptimizerSpec:
    """The optimiser (a recipe's ``optimizer`` section): torch's Adam / AdamW / SGD through timm.

    ``lr``: the learning rate; when None, ``base_lr x global batch / lr_batch`` (DeiT's linear
    scaling, the SER30K rule). ``decay_exempt``: which parameters get no weight decay: ``none``
    (the two-stage code: one group), ``bias_norm`` (biases and 1-D parameters: what timm 0.4.12 did
    for the published LORA, which defines no ``no_weight_decay``) or ``bias_norm_tokens`` (also the
    model's ``no_weight_decay()`` names: position embeddings and cls tokens).
    """

    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: Optional[float] = 1e-3
    base_lr: Optional[float] = None
    lr_batch: int = 512
    weight_decay: float = 0.0
    decay_exempt: Literal["none", "bias_norm", "bias_norm_tokens"] = "none"
    momentum: float = 0.9

    def __post_init__(self):
        if (self.lr is None) == (self.base_lr is None):
            raise ValueError("give exactly one of lr and base_lr (lr = base_lr x global batch / lr_batch)")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if self.base_lr is not None and self.base_lr <= 0:
            raise ValueError(f"base_lr must be positive, not {self.base_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, not {self.weight_decay}")

    def effective_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / self.lr_batch


@dataclass(frozen=True)
class ScheduleSpec:
    """The learning-rate schedule (a recipe's ``schedule`` section).

    - ``cosine_after_warmup``: ``warmup_epochs`` of linear warm-up to lr, then a cosine over the
      remaining epochs down to ``min_lr_ratio x lr``; stepped per epoch.
    - ``deit_cosine``: DeiT's (the SER30K recipe): a cosine over all epochs from lr to ``min_lr``,
      its first ``warmup_epochs`` replaced by a linear warm-up from ``warmup_lr``; stepped per epoch.
    - ``constant``: lr throughout (after any warm-up).
    - ``multistep_per_batch``: the two-stage code's ``MultiStepLR(milestones, gamma)`` stepped after
      every optimiser step, so the milestones count *batches* (the published rate falls to 1/32 of
      the base after 50 batches and stays there).

    ``step_arg`` (per-epoch schedules): after epoch e, step the scheduler to ``e + 1`` (timm's own
    ``train.py``: epoch e trains at the schedule's value for e) or to ``e`` (``finished_epoch``: the
    published SER30K loop's ``lr_scheduler.step(epoch)``, one epoch behind).
    """

    name: Literal["cosine_after_warmup", "deit_cosine", "constant", "multistep_per_batch"] = "cosine_after_warmup"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    min_lr_ratio: float = 0.01
    milestones: tuple[int, ...] = (10, 20, 30, 40, 50)
    gamma: float = 0.5
    step_arg: Literal["next_epoch", "finished_epoch"] = "next_epoch"

    def __post_init__(self):
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, not {self.warmup_epochs}")

    @property
    def per_batch(self) -> bool:
        return self.name == "multistep_per_batch"


@dataclass(frozen=True)
class SelectSpec:
    """Which epoch's model a stage keeps, and when it stops (a recipe's ``select`` section).

    ``metric`` (a validation metric, ``mode`` max or min) is monitored each epoch. ``keep``: the
    ``best`` epoch's model, or the published two-stage rule ``last_on_stop``: the best while training
    runs, but when it stops early the *last* epoch's model overwrites it. ``patience`` bad epochs in a
    row stop training (0: never, with ``stop="patience_reached"``); ``stop="patience_exceeded"`` stops
    only after ``patience + 1`` (the published ``patience > early_stop``). ``floor``: an epoch improves
    only beyond it (the published ``best_v = 0``: a model whose validation Pearson never exceeds 0
    never counts as better).
    """

    metric: str = "pearson_mean"
    mode: Literal["max", "min"] = "max"
    keep: Literal["best", "last_on_stop"] = "best"
    patience: int = 0
    stop: Literal["patience_reached", "patience_exceeded"] = "patience_reached"
    floor: Optional[float] = None

    def __post_init__(self):
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, not {self.patience}")


# Named selection rules (--select): the published two-stage one and the project's.
SELECT_PRESETS = {
    "val_pearson_v_last_on_stop": {"metric": "pearson_v", "mode": "max", "keep": "last_on_stop",
                                   "stop": "patience_exceeded", "floor": 0.0},
    "val_pearson_mean_best": {"metric": "pearson_mean", "mode": "max", "keep": "best",
                              "stop": "patience_reached", "floor": None},
    "val_accuracy_best": {"metric": "accuracy", "mode": "max", "keep": "best", "stop": "patience_reached",
                          "floor": None},
}


class Objective(Protocol):
    """What differs between pipelines: model inputs, loss, and metrics."""

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]: ...

    def loss(self, outputs: dict, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...

    def collect(self, acc: Accumulator, outputs: dict, batch: dict[str, torch.Tensor]) -> None: ...

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]: ...


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Precision:
    """Where and how the math runs, and how image batches are prepared once on the device.

    ``precision`` (a recipe's): ``auto`` (bf16 autocast + channels_last on a GPU, fp32 elsewhere),
    ``fp32``, ``bf16`` (autocast), or ``fp16`` (autocast with a ``GradScaler``, the SER30K code's
    mixed precision; evaluation runs under the same autocast). ``grad_scaler="epoch"``: a fresh
    scaler every epoch (the published ``main.py`` makes a new one at each epoch's start), else one
    for the run. ``norm``: uint8 pixels -> normalised float32 on the device.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    norm: ImageNorm = field(default_factory=ImageNorm)
    scaler: Optional[torch.amp.GradScaler] = None
    scaler_per_epoch: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, precision: str = "auto", norm: Optional[ImageNorm] = None,
                   grad_scaler: str = "run") -> "Precision":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        dtype = {"auto": torch.bfloat16 if on_gpu else None, "fp32": None, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[precision]
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return cls(device=device, amp_dtype=dtype, channels_last=on_gpu, norm=norm or ImageNorm(), scaler=scaler,
                   scaler_per_epoch=scaler is not None and grad_scaler == "epoch")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def new_epoch(self) -> None:
        """At an epoch's start: a fresh ``GradScaler`` when the recipe says so (published SER30K)."""
        if self.scaler_per_epoch:
            self.scaler = torch.amp.GradScaler(self.device.type)

    def backward_step(self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                      grad_clip: Optional[float]) -> None:
        """``backward`` + optional gradient-norm clipping + ``optimizer.step``, through the scaler in fp16."""
        scale = self.scaler
        (scale.scale(loss) if scale else loss).backward()
        if grad_clip:
            if scale:
                scale.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scale:
            scale.step(optimizer)
            scale.update()
        else:
            optimizer.step()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch to the device; ``image`` arrives as uint8 pixels (4x less to copy) and is
        normalised there (float32, channels_last on GPU; autocast takes it to bf16 in the model)."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key == "image":
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
    schedule: Optional["Schedule"] = None,
    grad_clip: Optional[float] = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the sample-weighted mean of the loss parts (and ``skipped``,
    when ``batches`` counts images it could not decode). A per-batch ``schedule`` steps after every
    optimiser step."""
    model.train()
    precision.new_epoch()
    totals: dict[str, float] = {}
    start = time.perf_counter()
    with uneven_inputs(model):
        seen = _train_steps(model, batches, optimizer, objective, precision, totals, schedule=schedule,
                            grad_clip=grad_clip, log_every=log_every, log=log, on_batch=on_batch)
    elapsed = time.perf_counter() - start
    means = {k: (v if k.startswith("n_") else v / max(seen, 1)) for k, v in totals.items()}
    skipped = getattr(batches, "skipped", None)  # images the device decoder could not read (decode="device")
    if skipped is not None:
        means["skipped"] = float(skipped)
    means["samples"] = float(seen)
    means["samples_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    return means


def uneven_inputs(model: nn.Module):
    """DDP's ``join()`` context when ``model`` is a DDP module, else a no-op.

    Ranks may run different numbers of steps in an epoch (``decode="device"`` drops a batch whose
    images all fail to decode); without ``join`` the rank with more steps would wait for its peers'
    gradients forever. Inside it, a rank that ran out shadows the others' collectives."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.join()
    return contextlib.nullcontext()


def _train_steps(model, batches, optimizer, objective, precision, totals: dict, *, schedule, grad_clip,
                 log_every, log, on_batch) -> int:
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
        precision.backward_step(loss, model, optimizer, grad_clip)
        if schedule is not None:
            schedule.after_step()
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
    # Losses and metrics are computed in fp32 even when the forward ran under autocast.
    if isinstance(outputs, torch.Tensor):  # a classifier that returns bare logits
        outputs = {"logits": outputs}
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in outputs.items()}


@dataclass
class EarlyStopping:
    """Patience on a validation metric, and which epoch's model the stage keeps (see :class:`SelectSpec`)."""

    patience: int
    mode: str = "max"
    keep: str = "best"
    stop: str = "patience_reached"
    floor: Optional[float] = None
    best: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0
    last_epoch: int = -1

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"early-stopping mode must be 'max' or 'min', not {self.mode!r}")

    @classmethod
    def from_spec(cls, spec: SelectSpec) -> "EarlyStopping":
        return cls(patience=spec.patience, mode=spec.mode, keep=spec.keep, stop=spec.stop, floor=spec.floor)

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; returns True when it is the best so far."""
        self.last_epoch = epoch
        reference = self.best if self.best is not None else self.floor
        if value is None or (isinstance(value, float) and math.isnan(value)):
            improved = False
        elif reference is None:
            improved = True
        else:
            improved = value > reference if self.mode == "max" else value < reference
        if improved:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        if self.stop == "patience_exceeded":
            return self.bad_epochs > self.patience
        return self.patience > 0 and self.bad_epochs >= self.patience

    @property
    def selected_epoch(self) -> int:
        """The epoch whose model the stage keeps: the best, or with ``keep="last_on_stop"`` the last
        epoch when training stopped early; the last epoch when none ever improved (the published
        code would have no saved model to load then)."""
        if (self.keep == "last_on_stop" and self.should_stop) or self.best_epoch < 0:
            return self.last_epoch
        return self.best_epoch

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def build_optimizer(model: nn.Module, spec: OptimizerSpec, global_batch: int) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over the *unwrapped* model's trainable parameters.

    ``adamw`` / ``adam`` are torch's ``AdamW`` / ``Adam`` with their default betas and eps; ``sgd`` is
    torch's ``SGD`` with Nesterov momentum (timm's ``sgd``). Decay groups follow ``spec.decay_exempt``.
    """
    if hasattr(model, "module"):
        raise TypeError("pass the unwrapped model (core.unwrap), not its DDP wrapper: "
                        "no_weight_decay() names are matched against its named_parameters()")
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: every layer is frozen")
    if spec.decay_exempt == "none":
        params = trainable
    else:
        tokens = getattr(model, "no_weight_decay", None)
        names = tokens() if spec.decay_exempt == "bias_norm_tokens" and callable(tokens) else ()
        params = param_groups_weight_decay(model, spec.weight_decay, no_weight_decay_list=names)
    return create_optimizer_v2(params, opt=spec.name, lr=spec.effective_lr(global_batch),
                               weight_decay=spec.weight_decay, momentum=spec.momentum, filter_bias_and_bn=False)


class Schedule:
    """A :class:`ScheduleSpec` on an optimiser: stepped after every optimiser step (``after_step``) or at
    every epoch's end (``after_epoch``), as the spec says; its state is checkpointed with the run's."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, epochs: int):
        self.spec = spec
        if spec.per_batch:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(spec.milestones),
                                                                  gamma=spec.gamma)
            return
        from timm.scheduler import create_scheduler_v2

        if spec.name == "deit_cosine":
            self.scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, min_lr=spec.min_lr,
                                                    warmup_lr=spec.warmup_lr, warmup_epochs=spec.warmup_epochs)
            return
        base = {group.get("initial_lr", group["lr"]) for group in optimizer.param_groups}
        if len(base) != 1:
            raise ValueError(f"the {spec.name!r} schedule needs one lr for every param group, got {sorted(base)}")
        lr, warmup = base.pop(), spec.warmup_epochs
        sched = "cosine" if spec.name == "cosine_after_warmup" else "constant"
        self.scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=max(epochs - warmup, 1),
                                                min_lr=spec.min_lr_ratio * lr, warmup_lr=lr / (warmup + 1),
                                                warmup_epochs=warmup, warmup_prefix=True)

    def after_step(self) -> None:
        if self.spec.per_batch:
            self.scheduler.step()

    def after_epoch(self, epoch: int) -> None:
        """After epoch ``epoch``: timm's schedulers are told the epoch to take the lr of (see ``step_arg``)."""
        if not self.spec.per_batch:
            self.scheduler.step(epoch + 1 if self.spec.step_arg == "next_epoch" else epoch)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


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
    schedule: Schedule
    early_stopping: EarlyStopping
    epoch: int = 0                        # the next epoch to run
    history: list = field(default_factory=list)
    precision: Optional[Precision] = None   # its GradScaler's state travels with the run's

    def state_dict(self) -> dict:
        scaler = self.precision.scaler if self.precision is not None else None
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "rng": rng_state(),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        if "scaler" in state and self.precision is not None and self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(state["scaler"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers (``.module``, in any nesting): its ``state_dict``
    names carry no ``module.`` prefix. (Compiling is done in place, ``nn.Module.compile``, so it
    wraps nothing.)"""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


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
    val_objective: Optional[Objective] = None,
    eval_model: Optional[nn.Module] = None,
    on_epoch_end: Optional[Callable[[EpochResult, TrainState], None]] = None,
    grad_clip: Optional[float] = None,
    log: Callable[[str], None] = print,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> TrainState:
    """The epoch loop: train, validate, step the schedule, track the selected epoch, stop early.

    ``train_batches(epoch)`` / ``val_batches(epoch)`` return fresh iterables each epoch.
    ``eval_model`` is the module used for validation (the unwrapped model under DDP, so that
    ranks with uneven validation shards never wait on each other); defaults to ``state.model``.
    ``on_epoch_end`` runs after the state is advanced (the Ray glue reports and checkpoints there).
    ``val_objective`` scores validation when its classes differ from training's (default: ``objective``).
    """
    eval_model = eval_model or state.model
    val_objective = val_objective or objective
    while state.epoch < epochs and not state.early_stopping.should_stop:
        epoch = state.epoch
        start = time.perf_counter()
        lr = state.optimizer.param_groups[0]["lr"]
        hook = (lambda step: on_batch(epoch, step)) if on_batch else None
        train_stats = train_one_epoch(state.model, train_batches(epoch), state.optimizer, objective, precision,
                                      schedule=state.schedule, grad_clip=grad_clip, on_batch=hook)
        val_metrics, _ = evaluate(eval_model, val_batches(epoch), val_objective, precision)
        if monitor not in val_metrics:
            raise KeyError(f"monitored metric {monitor!r} is not among the validation metrics "
                           f"{sorted(val_metrics)}")
        improved = state.early_stopping.step(val_metrics[monitor], epoch)
        state.schedule.after_epoch(epoch)
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
