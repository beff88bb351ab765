"""Thin Ray Train glue around :mod:`pipelines.core`: fit a stage on Ray Train, score a checkpoint with a Ray task.

``run_stage`` trains one :class:`~pipelines.recipe.StageRecipe` with a ``TorchTrainer`` (DDP over
``num_workers``): :func:`fit_worker` reports a checkpoint every epoch, Ray keeps the best by the
validation metric, and after training the workers score the best checkpoint on the test splits
(read only there, once; or, with the recipe's ``test_every_epoch``, also after every epoch to
record the published SER30K protocol's figure, never to select). ``evaluate_splits`` scores a
finished checkpoint in one plain Ray task (no trainer, no process group). Everything the workers
do besides getting shards, wrapping the model and reporting is the plain-PyTorch core.

Data: the driver passes Ray Datasets already mapped to uint8 pixels (``datasets_io.shards.ImageTransform``;
normalised on the worker's device by ``core.Precision.to_device``), or with ``decode="device"`` the
training rows' JPEG bytes, decoded and augmented on the worker (``datasets_io.pixels``). A worker keeps
its validation shard in memory after the first epoch when it is small (:class:`pipelines.batches.EvalCache`).
``recipe.compile``: the training model is ``torch.compile``d after DDP wrapping; evaluation stays eager.
``train`` is split evenly across workers (DDP needs equal batch counts); ``val``/``test`` are split
unevenly so every row is seen exactly once, evaluated on the unwrapped model (no collectives in
the forward), and gathered before metrics are computed.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines import console, core
from pipelines.batches import EvalCache, MixedBatches, device_pipeline, iter_batches, weights_digest
from pipelines.tracking import EpochLogger
from pipelines.recipe import (MIX_KEY, STATE_FILE, TRAIN_KEY, EvalSet, StageRecipe, build_model, build_objective,
                              checkpoint_state_path, jsonable, write_meta)

# Per-epoch test accuracy (recipe.test_every_epoch): the published SER30K protocol reports its maximum.
EPOCH_TEST_KEY = "epoch_test_accuracy"
logger = logging.getLogger("emotion_ray.train")


@dataclass
class RunOptions:
    """Where and how stages run on Ray (never stored with a checkpoint)."""

    storage_path: str
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    keep_checkpoints: int = 2
    callbacks: list = field(default_factory=list)   # Ray Train UserCallbacks, e.g. Tune's TuneReportCallback


@dataclass
class StageContext:
    """What one run of a stage needs besides its recipe; sent to the workers, never persisted."""

    checkpoint_root: str                      # where Ray Train keeps this stage's checkpoints
    mlflow: Optional[dict] = None             # {"tracking_uri", "run_id"}: rank 0 logs epochs there
    fault: Optional[dict] = None              # {"epoch", "step", "rank", "marker"}: kill a worker once
    tests: dict = field(default_factory=dict)  # split name -> objective override (or None)


@dataclass
class StageOutcome:
    name: str
    path: str                           # the Ray Train run folder
    best_checkpoint: Optional[str]      # folder of the best checkpoint (by the monitored metric)
    best_metrics: dict
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)   # the rank-0 worker's return value


class EvalSplitDataConfig(DataConfig):
    """Split ``train`` evenly across workers, evaluation sets (``val``, ``test``, ...) unevenly
    (every row exactly once).

    A categorical stream mixed into stage two (``train_categorical``) is not split: each worker
    reads it whole and takes every ``world_size``-th batch, so it can be abandoned mid-epoch.
    """

    def __init__(self):
        # Explicit execution options: Ray's defaults (DataConfig.default_ingest_options) pass the
        # deprecated ExecutionOptions.exclude_resources and warn in every run. These are the same
        # values, read from the driver's DataContext, without it.
        from ray.data import DataContext, ExecutionOptions

        current = DataContext.get_current().execution_options
        self._options = ExecutionOptions(resource_limits=current.resource_limits,
                                         preserve_order=current.preserve_order,
                                         verbose_progress=current.verbose_progress)
        super().__init__(datasets_to_split=[TRAIN_KEY], execution_options=self._options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k in (TRAIN_KEY, MIX_KEY)}
        evals = {k: v for k, v in datasets.items() if k not in rest}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in evals.items():
            ds = ds.copy(ds)
            ds.context.execution_options = copy.deepcopy(self._options)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


# ----------------------------------------------------------------------------- worker side

def _maybe_inject_fault(fault: Optional[dict], epoch: int, step: int) -> None:
    """Kill this worker once at (epoch, step) — the fault-tolerance test's injected failure."""
    if not fault or epoch != fault["epoch"] or step != fault["step"]:
        return
    if ray.train.get_context().get_world_rank() != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed at epoch {epoch} step {step}\n")
    # Ray Train V2's controller collects reports by polling the workers every health-check interval
    # (2 s by default); a report still queued in a dying worker is lost, and the run would resume from
    # the checkpoint before it. Dying a few intervals after the last report makes the test measure the
    # resume from that report's checkpoint, whatever the machine's load.
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
    os._exit(1)


def build_for_device(recipe: StageRecipe, device: torch.device):
    """Model (initial weights, frozen layers, memory format), objective and precision of a recipe."""
    core.seed_everything(recipe.seed)
    model = build_model(recipe)
    if recipe.init_from:
        model.load_state_dict(core.load_checkpoint(checkpoint_state_path(recipe.init_from))["model"])
    if recipe.init_weights:  # a weights file in another format (a published checkpoint.pth): exact fit
        from emotion_models.weights import load_weights

        load_weights(model, recipe.init_weights)
    if recipe.freeze_until is not None:
        model.freeze(recipe.freeze_until, freeze_bn=recipe.freeze_bn)
    # Images reach the device as uint8 and are normalised there with the recipe's mean/std.
    precision = core.Precision.for_device(device, amp=recipe.amp, image=recipe.image)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), build_objective(recipe), precision


def fit_worker(config: dict) -> dict:
    """What every Ray Train worker runs: fit the recipe, checkpoint each epoch, score the best on the tests."""
    recipe = StageRecipe.from_dict(config["recipe"])
    context = StageContext(**config["context"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # Rank 0's lines reach the driver's console (pipelines.console: through the relay when quiet).
    log = console.emitter(logger) if rank == 0 else (lambda *_: None)
    device = ray.train.torch.get_device()
    model, objective, precision = build_for_device(recipe, device)
    if ctx.get_world_size() > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    # Validation and test run the eager module (same parameters): compiling it too would add a second
    # warm-up and a recompile for the last, smaller batch of every split.
    eval_model = core.unwrap(model)
    if recipe.compile:
        # After DDP wrapping, as Ray Train's own guide does (DDP's optimizer splits graphs at buckets).
        # Checkpoints save core.unwrap(model).state_dict(): no "_orig_mod." prefixes.
        model = torch.compile(model)
    device_images = device_pipeline(recipe, device)
    batch_size, seed = recipe.batch_size, recipe.seed

    if recipe.optimizer.get("filter_bias_and_bn"):  # timm's param groups need the unwrapped module
        optimizer = core.build_optimizer(eval_model, **recipe.optimizer)
    else:
        trainable = eval_model.trainable_parameters() if hasattr(eval_model, "trainable_parameters") \
            else eval_model.parameters()
        optimizer = core.build_optimizer(trainable, **recipe.optimizer)
    scheduler = core.build_scheduler(optimizer, epochs=recipe.epochs, **recipe.scheduler)
    state = core.TrainState(model, optimizer, scheduler, core.EarlyStopping(recipe.early_stop, recipe.monitor_mode))
    mlflow_log = EpochLogger(context.mlflow, log) if rank == 0 else None
    system_metrics = EpochLogger.system_metrics(  # each node's local rank 0
        context.mlflow, local_rank=ctx.get_local_rank(), node_rank=ctx.get_node_rank(),
        multi_node=ctx.get_local_world_size() < ctx.get_world_size())
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state.load_state_dict(core.load_checkpoint(Path(ckpt_dir) / STATE_FILE))
        resumed_from = state.epoch
        log(f"[{recipe.name}] resumed from checkpoint: continuing at epoch {state.epoch + 1}")
        if mlflow_log is not None:
            # Recorded on the stage's MLflow run: which epoch a resume continued from, and a digest of
            # the weights it loaded (equal to the checkpoint's weights_digest when the restore is exact).
            mlflow_log.tags({f"resume.{state.epoch}.weights_sha256": weights_digest(eval_model.state_dict()),
                             "resumed_from_epoch": str(state.epoch)})

    train_shard = ray.train.get_dataset_shard(TRAIN_KEY)
    val_shard = ray.train.get_dataset_shard("val")
    if recipe.mix_categorical:
        cat_shard = ray.train.get_dataset_shard(MIX_KEY)
        world = ctx.get_world_size()
        train_batches = lambda epoch: MixedBatches(train_shard, cat_shard, batch_size, seed, epoch,  # noqa: E731
                                                   rank=rank, world=world, device_images=device_images)
    else:
        train_batches = lambda epoch: iter_batches(train_shard, batch_size, train=True, seed=seed,  # noqa: E731
                                                    epoch=epoch, device_images=device_images)
    val_batches = EvalCache(lambda epoch: iter_batches(val_shard, batch_size, train=False, seed=seed, epoch=epoch),
                            device)
    epochs_run: list[int] = []

    def on_epoch_end(result: core.EpochResult, st: core.TrainState) -> None:
        epochs_run.append(result.epoch)
        if recipe.test_every_epoch and "test" in context.tests:
            # The published protocol's figure (best test accuracy over epochs), recorded beside the
            # val-selected model, never used to select it. Every rank takes part (gathered metrics).
            test_metrics, _ = core.evaluate(eval_model, iter_batches(ray.train.get_dataset_shard("test"), batch_size,
                                                                      train=False, seed=seed, epoch=result.epoch),
                                            objective, precision)
            st.history[-1][EPOCH_TEST_KEY] = test_metrics["accuracy"]
            log(f"[{recipe.name}] epoch {result.epoch + 1}: test accuracy {test_metrics['accuracy']:.4f} "
                f"(published protocol, not used for selection)")
        if mlflow_log is not None:
            mlflow_log(st.history[-1])
        metrics = {**st.history[-1], "improved": int(result.improved), "best_epoch": st.early_stopping.best_epoch}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                core.save_checkpoint(Path(tmp) / STATE_FILE, st.state_dict())
                write_meta(tmp, recipe, epoch=result.epoch, val=result.val)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(jsonable(metrics), checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(result.epoch))

    progress = console.EpochProgress(recipe.name, recipe.epochs, log) if rank == 0 else None

    def on_batch(epoch: int, step: int) -> None:
        if progress is not None:
            progress(epoch, step)
        _maybe_inject_fault(context.fault, epoch, step)

    core.fit(state, objective, precision, train_batches=train_batches, val_batches=val_batches,
             epochs=recipe.epochs, monitor=recipe.monitor, eval_model=eval_model,
             on_epoch_end=on_epoch_end, grad_clip=recipe.grad_clip, log=log, on_batch=on_batch)
    stopped_early = state.early_stopping.should_stop and state.epoch < recipe.epochs
    if stopped_early:
        log(f"[{recipe.name}] early stop after epoch {state.epoch}: no improvement of {recipe.monitor} "
            f"for {state.early_stopping.patience} epochs (best epoch {state.early_stopping.best_epoch + 1})")
    tests = _test_best(recipe, context, eval_model, state.early_stopping.best_epoch, precision, log)
    EpochLogger.finish(mlflow_log, system_metrics)  # on a failure Ray ends this worker, and its sampler
    return {"history": state.history, "best_epoch": state.early_stopping.best_epoch,
            "best": state.early_stopping.best, "resumed_from": resumed_from, "epochs_run": epochs_run,
            "stopped_early": stopped_early, "tests": tests if rank == 0 else {}}


def _test_best(recipe: StageRecipe, context: StageContext, model, best_epoch: int, precision, log) -> dict:
    """Score the best epoch's weights on each test split, once, after training.

    The best checkpoint is read back from the run folder (kept by ``CheckpointConfig``), so this
    also holds after a restart, when the best weights are no longer in memory.
    """
    if not context.tests:
        return {}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Rank 0 reaches this only after its last report() returned, i.e. its checkpoint is persisted.
        torch.distributed.barrier()
    best_dir = Path(context.checkpoint_root) / checkpoint_name(best_epoch)
    core.unwrap(model).load_state_dict(core.load_checkpoint(checkpoint_state_path(best_dir))["model"])
    results = {}
    for name, objective in context.tests.items():
        shard = ray.train.get_dataset_shard(name)
        metrics, arrays = core.evaluate(model, iter_batches(shard, recipe.batch_size, train=False, seed=recipe.seed,
                                                             epoch=0),
                                        build_objective(recipe, objective), precision)
        log(f"[{recipe.name}] {name} (best epoch {best_epoch + 1}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        results[name] = {"metrics": metrics, "arrays": arrays}
    return results


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


# ----------------------------------------------------------------------------- driver side

def run_stage(recipe: StageRecipe, datasets: dict, run: RunOptions, *, tests: Optional[dict[str, EvalSet]] = None,
              mlflow: Optional[dict] = None, fault: Optional[dict] = None) -> StageOutcome:
    """Train one stage; returns where its best checkpoint is. Re-running resumes an unfinished run.

    ``tests`` maps a split name to an :class:`EvalSet`: after training, the workers score the best
    checkpoint on each (the test splits are read only then); results land in ``outcome.info["tests"]``.
    """
    name = recipe.name
    missing = [k for k in (TRAIN_KEY, "val") if k not in datasets]
    if missing:
        raise ValueError(f"stage {name}: datasets {missing} are missing")
    tests = tests or {}
    context = StageContext(checkpoint_root=str(Path(run.storage_path) / name), mlflow=mlflow, fault=fault,
                           tests={k: t.objective for k, t in tests.items()})
    resources = {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})}
    # Retention follows early stopping exactly: checkpoints are ranked by "improved" (1 when the epoch
    # set a new best), and Ray breaks ties in favour of later reports, so the latest improvement — the
    # early-stopping best — is never deleted (the latest checkpoint is always kept too, for resuming).
    # Ranking by the raw metric instead could keep a later epoch that merely tied it.
    trainer = TorchTrainer(
        fit_worker,
        train_loop_config={"recipe": recipe.to_dict(), "context": dataclasses.asdict(context)},
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker=resources),
        datasets={**datasets, **{k: t.dataset for k, t in tests.items()}},
        dataset_config=EvalSplitDataConfig(),
        run_config=RunConfig(name=name, storage_path=run.storage_path,
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints,
                                                                checkpoint_score_attribute="improved",
                                                                checkpoint_score_order="max"),
                             callbacks=list(run.callbacks) or None))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"stage {name} failed: {result.error}")
    info = result.return_value or {}
    best_epoch = info.get("best_epoch", -1)
    best = Path(context.checkpoint_root) / checkpoint_name(best_epoch) if best_epoch >= 0 else None
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if best and Path(c.path) == best), {})
    return StageOutcome(name=name, path=str(result.path), best_checkpoint=str(best) if best else None,
                        best_metrics=best_metrics, history=info.get("history", []), info=info)


def evaluate_splits(recipe: StageRecipe, datasets: dict, run: RunOptions, *, checkpoint_dir: Optional[str] = None,
                    weights: Optional[str] = None) -> dict:
    """Score one model on several splits in one Ray task; returns ``{split: {metrics, arrays}}``.

    The weights come from a project checkpoint folder (``checkpoint_dir``) or from a weights file
    in another format, e.g. a published ``checkpoint.pth`` (``weights``: loaded by
    ``emotion_models.weights.load_weights`` and required to fit the model exactly).
    """
    if (checkpoint_dir is None) == (weights is None):
        raise ValueError("evaluate_splits needs exactly one of checkpoint_dir and weights")
    recipe = recipe.without_pretrained().replace(init_from=checkpoint_dir, init_weights=weights, freeze_until=None)
    task = ray.remote(num_cpus=max(run.cpus_per_worker, 1e-4), num_gpus=1 if run.use_gpu else 0)(_evaluate_task)
    return ray.get(task.remote(recipe.to_dict(), datasets))


def _evaluate_task(recipe: dict, datasets: dict) -> dict:
    recipe = StageRecipe.from_dict(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, objective, precision = build_for_device(recipe, device)
    out = {}
    for split, ds in datasets.items():
        metrics, arrays = core.evaluate(model, iter_batches(ds, recipe.batch_size, train=False, seed=recipe.seed,
                                                            epoch=0), objective, precision)
        out[split] = {"metrics": metrics, "arrays": arrays}
    return out
