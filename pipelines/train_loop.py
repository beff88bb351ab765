"""Thin Ray Train glue around :mod:`pipelines.core`: fit a stage on Ray Train, score a checkpoint with a Ray task.

``run_stage`` trains one :class:`~pipelines.recipe.StageRecipe` with a ``TorchTrainer`` (DDP over
``num_workers``): :func:`fit_worker` reports a checkpoint every epoch, Ray keeps the best by the
validation metric, and after training the workers score the best checkpoint on the test splits
(read only there, once; or, with the recipe's ``test_every_epoch``, also after every epoch to
record the published SER30K protocol's figure, never to select). ``evaluate_splits`` scores a
finished checkpoint in one plain Ray task (no trainer, no process group). Everything the workers
do besides getting shards, wrapping the model and reporting is the plain-PyTorch core.

Data: the driver passes Ray Datasets already mapped to uint8 pixels (``datasets_io.prep.ImageTransform``;
normalised on the worker's device by ``core.Precision.to_device``), or with ``prep.decode="device"`` the
training rows' stored bytes, decoded and augmented on the worker (``datasets_io.prep.DeviceImagePipeline``).
A worker keeps its validation shard in memory after the first epoch when it is small and not augmented
(:class:`pipelines.batches.EvalCache`). ``recipe.compile``: the training model is compiled in place
after DDP wrapping (``nn.Module.compile``); evaluation runs the inner module.
``train`` (and stage two's pool) is split evenly across workers (DDP needs equal batch counts);
``val``/``test`` are split unevenly so every row is seen exactly once, evaluated on the unwrapped
model (no collectives in the forward), and gathered before metrics are computed. ``recipe.batch_size``
is the global batch: each worker takes ``batch_size / num_workers``.
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

from datasets_io import storage
from pipelines import console, core, system_metrics
from pipelines.batches import EvalCache, MixedBatches, PoolBatches, iter_batches, weights_digest
from pipelines.checkpoints import STATE_FILE, build_stage_model, load_state, save_state, state_path, write_meta
from pipelines.objectives import build_objective
from pipelines.recipe import StageRecipe, jsonable
from pipelines.tracking import EpochLogger

# The datasets a stage trains on, by name: ``train`` split evenly across workers (DDP); stage two's
# categorical stream, read whole by every worker (``joined``) or split evenly too (``pool``).
TRAIN_KEY = "train"
JOIN_KEY = "train_categorical"
POOL_KEY = "train_pool_categorical"
# Per-epoch test accuracy (recipe.test_every_epoch): the published SER30K protocol reports its maximum.
EPOCH_TEST_KEY = "epoch_test_accuracy"
logger = logging.getLogger("emotion_ray.train")


@dataclass
class RunOptions:
    """Where and how a pipeline runs (never stored with a checkpoint): the Ray cluster and workers,
    the storage, the MLflow tracking server, and the run's name."""

    storage_path: str
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    keep_checkpoints: int = 2
    placement_strategy: str = "PACK"               # Ray Train's placement of the workers: PACK, SPREAD, ...
    callbacks: list = field(default_factory=list)   # Ray Train UserCallbacks, e.g. Tune's TuneReportCallback
    address: Optional[str] = None
    run_name: Optional[str] = None
    mlflow_uri: Optional[str] = None
    experiment: str = "emotion-ray"
    register: Optional[str] = None
    fault: Optional[str] = None                     # tests: "[hold:]stage:epoch:step:rank:marker[,...]", see PipelineRun._fault


@dataclass
class StageContext:
    """What one run of a stage needs besides its recipe; sent to the workers, never persisted."""

    checkpoint_root: str                      # where Ray Train keeps this stage's checkpoints
    mlflow: Optional[dict] = None             # {"tracking_uri", "run_id"}: rank 0 logs epochs there
    fault: Optional[list] = None              # [{"epoch", "step", "rank", "marker", "action"}]: kill (or hold) a worker once
    tests: dict = field(default_factory=dict)  # split name -> (classes, anchors) it is scored with (or None)
    rows: dict = field(default_factory=dict)   # training dataset name -> rows (pool batching's counts)
    val_augmented: bool = False                # validation takes the training transform: never cached
    val_scoring: Optional[tuple] = None        # (classes, anchors) the validation split is scored with
    local: dict = field(default_factory=dict)  # training splits the workers read themselves (deterministic)


def _workers_lost(error: BaseException) -> bool:
    """Whether Ray Train failed because workers died (a killed process, a lost node, a preemption), not
    because the training code raised.

    A lost rank reaches the controller as a dead actor, or wrapped in Ray Train's health-check failure
    (its ``health_check_failure``); the ranks that survive it may fail too, in a collective whose peer
    vanished (a ``torch.distributed`` error). At least one lost worker and nothing but such consequences
    besides it count as a loss; any other exception is the code's."""
    from ray.exceptions import NodeDiedError, RayActorError
    from ray.train import PreemptionError, WorkerGroupError

    if isinstance(error, PreemptionError):
        return True
    failures = getattr(error, "worker_failures", {}) if isinstance(error, WorkerGroupError) else {}
    causes = [_root_failure(e) for e in failures.values()]
    lost = [isinstance(e, (RayActorError, NodeDiedError)) for e in causes]
    return any(lost) and all(was_lost or _peer_vanished(e) for was_lost, e in zip(lost, causes))


def _root_failure(error: BaseException) -> BaseException:
    """The failure a wrapper carries (Ray Train's health-check error keeps it as ``health_check_failure``)."""
    inner = getattr(error, "health_check_failure", None)
    return inner if isinstance(inner, BaseException) else error


_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed")


def _peer_vanished(error: BaseException) -> bool:
    """A collective's error on a rank whose peer died (gloo's, NCCL's): a consequence of a lost worker."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    if isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _PEER_GONE):
        return True
    # A worker's exception as Ray Train hands it back: a wrapper whose text is the worker's traceback, the
    # exception itself on its last line.
    lines = str(error).strip().splitlines()
    last = lines[-1].lower() if lines else ""
    return last.startswith(("runtimeerror:", "torch.distributed.distbackenderror:")) and \
        any(text in last for text in _PEER_GONE)


class StageFailed(RuntimeError):
    """A stage that Ray Train could not finish (its workers failed more often than ``--max-failures``
    allows); its checkpoints are kept, so the same command continues it. One line for the user."""


@dataclass
class StageData:
    """The data of one stage: its training datasets (``train``, ``val``, and stage two's categorical
    stream), the test splits scored after training, the training rows per dataset (from the ingest
    manifests: the pool's counts; counting a mapped Ray Dataset would decode it), and whether the
    validation split takes the training transform."""

    datasets: dict
    tests: dict = field(default_factory=dict)       # split name -> EvalSet
    rows: dict = field(default_factory=dict)
    val_augmented: bool = False
    val_scoring: Optional[tuple] = None             # (classes, anchors) of a validation set of other classes
    local: dict = field(default_factory=dict)       # training dataset name -> LocalSplit (deterministic: true)


@dataclass
class StageOutcome:
    name: str
    path: str                           # the Ray Train run folder
    best_checkpoint: Optional[str]      # folder of the best checkpoint (by the monitored metric)
    best_metrics: dict
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)   # the rank-0 worker's return value


class EvalSplitDataConfig(DataConfig):
    """Split ``train`` (and the pool's categorical set) evenly across workers, evaluation sets (``val``,
    ``test``, ...) unevenly (every row exactly once).

    The categorical stream joined to stage two's batches (``train_categorical``) is not split: each
    worker reads it whole and takes every ``world_size``-th batch, so it can be abandoned mid-epoch.
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
        super().__init__(datasets_to_split=[TRAIN_KEY, POOL_KEY], execution_options=self._options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k in (TRAIN_KEY, JOIN_KEY, POOL_KEY)}
        evals = {k: v for k, v in datasets.items() if k not in rest}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in evals.items():
            ds = ds.copy(ds)
            ds.context.execution_options = copy.deepcopy(self._options)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


# ----------------------------------------------------------------------------- worker side

def _maybe_inject_fault(faults: Optional[list], epoch: int, step: int) -> None:
    """Kill this worker once at (epoch, step) — the fault-tolerance tests' injected failure. With the action
    ``hold`` the worker stops there instead, once, until ``<marker>.release`` appears (at most 10 minutes):
    the driver-loss test kills the driver while a stage is held in the middle of an epoch, or kills the held
    worker itself (its pid is in the marker) once the checkpoint before it is registered."""
    for fault in faults or ():
        if epoch != fault["epoch"] or step != fault["step"]:
            continue
        if ray.train.get_context().get_world_rank() != fault.get("rank", 0):
            continue
        marker = Path(fault["marker"])
        if marker.exists():
            continue
        if fault.get("action") == "hold":
            marker.write_text(f"held at epoch {epoch} step {step}, pid {os.getpid()}\n")
            release, deadline = Path(f"{marker}.release"), time.monotonic() + 600
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            continue
        marker.write_text(f"killed at epoch {epoch} step {step}\n")
        # Ray Train V2's controller collects reports by polling the workers every health-check interval
        # (2 s by default); a report still queued in a dying worker is lost, and the run would resume from
        # the checkpoint before it. Dying a few intervals after the last report makes the test measure the
        # resume from that report's checkpoint, whatever the machine's load.
        time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
        os._exit(1)


def build_for_device(recipe: StageRecipe, device: torch.device):
    """Model (starting weights, frozen layers, memory format), objective and precision of a recipe."""
    core.seed_everything(recipe.seed)
    model = build_stage_model(recipe)
    precision = core.Precision.for_device(device, recipe.precision, recipe.prep.norm(), recipe.grad_scaler)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), build_objective(recipe), precision


def _train_batches(recipe: StageRecipe, context: StageContext, batch_size: int, device_images, rank: int,
                   world: int):
    """``epoch -> batches`` of the stage's training data, by its ``batching``. With ``deterministic`` the
    training splits are :class:`pipelines.batches.LocalSplit`s the worker reads itself, each epoch's rows
    and augmentations fixed by the seed and the epoch; else Ray Data's shards."""
    seed = recipe.seed

    def shard(key: str, epoch: int, whole: bool = False):
        if key in context.local:
            return context.local[key].for_epoch(epoch, 0 if whole else rank, 1 if whole else world)
        return ray.train.get_dataset_shard(key)

    if recipe.batching == "joined":
        return lambda epoch: MixedBatches(shard(TRAIN_KEY, epoch), shard(JOIN_KEY, epoch, whole=True), batch_size,
                                          seed, epoch, rank=rank, world=world, device_images=device_images)
    if recipe.batching == "pool":
        n_dim, n_cat = context.rows[TRAIN_KEY] // world, context.rows[POOL_KEY] // world  # equal splits
        return lambda epoch: PoolBatches(shard(TRAIN_KEY, epoch), shard(POOL_KEY, epoch), batch_size, seed, epoch,
                                         n_dim=n_dim, n_cat=n_cat, rank=rank, device_images=device_images)
    return lambda epoch: iter_batches(shard(TRAIN_KEY, epoch), batch_size, train=True, seed=seed, epoch=epoch,
                                      device_images=device_images)


def _node_ids(world: int) -> list[str]:
    """Every rank's Ray node id, in rank order (one all-gather of a string under DDP)."""
    node = ray.get_runtime_context().get_node_id()
    if world < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [node]
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def deterministic_kernels() -> None:
    """torch's deterministic algorithms where it has them (cuDNN autotuning off; cuBLAS's workspace fixed)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def fit_worker(config: dict) -> dict:
    """What every Ray Train worker runs: fit the recipe, checkpoint each epoch, score the selected epoch on the tests."""
    recipe = StageRecipe.from_dict(config["recipe"])
    context = StageContext(**config["context"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Rank 0's lines reach the driver's console (pipelines.console: through the relay when quiet).
    log = console.emitter(logger) if rank == 0 else (lambda *_: None)
    if recipe.deterministic:
        deterministic_kernels()
    device = ray.train.torch.get_device()
    model, objective, precision = build_for_device(recipe, device)
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    # Validation and test run the inner module (same parameters): compiling it too would add a second
    # warm-up and a recompile for the last, smaller batch of every split.
    eval_model = core.unwrap(model)
    if recipe.compile:
        # In place (no wrapper: checkpoints carry no prefix), after DDP wrapping as Ray Train's guide does.
        model.compile()
    device_images = recipe.prep.device_pipeline(device, recipe.seed)
    batch_size, seed = recipe.per_worker_batch(world), recipe.seed
    optimizer = core.build_optimizer(eval_model, recipe.optimizer, recipe.batch_size)
    schedule = core.Schedule(optimizer, recipe.schedule, recipe.epochs)
    state = core.TrainState(model, optimizer, schedule, core.EarlyStopping.from_spec(recipe.select),
                            precision=precision)
    mlflow_log = EpochLogger(context.mlflow, log) if rank == 0 else None
    sampler = system_metrics.for_stage(  # each node's local rank 0
        context.mlflow, local_rank=ctx.get_local_rank(), node_rank=ctx.get_node_rank(),
        multi_node=ctx.get_local_world_size() < world)
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state.load_state_dict(load_state(Path(ckpt_dir) / STATE_FILE))
        resumed_from = state.epoch
        log(f"[{recipe.name}] worker group (re)started: resumed from the checkpoint of epoch {state.epoch}, "
            f"continuing at epoch {state.epoch + 1}")
        if mlflow_log is not None:
            # Recorded on the stage's MLflow run: which epoch a resume continued from, and a digest of
            # the weights it loaded (equal to the checkpoint's weights_digest when the restore is exact).
            mlflow_log.tags({f"resume.{state.epoch}.weights_sha256": weights_digest(eval_model.state_dict()),
                             "resumed_from_epoch": str(state.epoch)})

    nodes = _node_ids(world)
    if mlflow_log is not None:
        mlflow_log.tags({"worker_nodes": ",".join(nodes)})
    if len(set(nodes)) > 1:
        log(f"[{recipe.name}] {world} workers on {len(set(nodes))} nodes")
    train_batches = _train_batches(recipe, context, batch_size, device_images, rank, world)
    val_shard = ray.train.get_dataset_shard("val")
    val_batches = EvalCache(lambda epoch: iter_batches(val_shard, batch_size, train=False, seed=seed, epoch=epoch),
                            device, budget_mb=0 if context.val_augmented else None)
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
                save_state(Path(tmp) / STATE_FILE, st.state_dict())
                write_meta(tmp, recipe, epoch=result.epoch, val=result.val)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(jsonable(metrics), checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(result.epoch))

    progress = console.EpochProgress(recipe.name, recipe.epochs, log) if rank == 0 else None

    def on_batch(epoch: int, step: int) -> None:
        if progress is not None:
            progress(epoch, step)
        _maybe_inject_fault(context.fault, epoch, step)

    val_objective = build_objective(recipe, *context.val_scoring) if context.val_scoring else objective
    core.fit(state, objective, precision, train_batches=train_batches, val_batches=val_batches,
             val_objective=val_objective, epochs=recipe.epochs, monitor=recipe.select.metric, eval_model=eval_model,
             on_epoch_end=on_epoch_end, grad_clip=recipe.grad_clip or None, log=log, on_batch=on_batch)
    es = state.early_stopping
    stopped_early = es.should_stop and state.epoch < recipe.epochs
    selected = es.selected_epoch
    if stopped_early:
        kept = "the last epoch's model is kept (select.keep: last_on_stop)" if selected != es.best_epoch else \
            f"best epoch {es.best_epoch + 1}"
        log(f"[{recipe.name}] early stop after epoch {state.epoch}: no improvement of {recipe.select.metric} "
            f"for {es.bad_epochs} epochs; {kept}")
    tests = _test_selected(recipe, context, eval_model, selected, batch_size, precision, log)
    EpochLogger.finish(mlflow_log, sampler)  # on a failure Ray ends this worker, and its sampler
    return {"history": state.history, "best_epoch": es.best_epoch, "selected_epoch": selected, "best": es.best,
            "resumed_from": resumed_from, "epochs_run": epochs_run, "stopped_early": stopped_early,
            "tests": tests if rank == 0 else {}}


def _test_selected(recipe: StageRecipe, context: StageContext, model, epoch: int, batch_size: int, precision,
                   log) -> dict:
    """Score the selected epoch's weights on each test split, once, after training.

    The checkpoint is read back from the run folder (kept by ``CheckpointConfig``), so this also
    holds after a restart, when the selected weights are no longer in memory.
    """
    if not context.tests:
        return {}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Rank 0 reaches this only after its last report() returned, i.e. its checkpoint is persisted.
        torch.distributed.barrier()
    selected_dir = storage.join(context.checkpoint_root, checkpoint_name(epoch))
    core.unwrap(model).load_state_dict(load_state(state_path(selected_dir))["model"])
    results = {}
    for name, scored in context.tests.items():
        classes, anchors = scored or (None, None)
        shard = ray.train.get_dataset_shard(name)
        metrics, arrays = core.evaluate(model, iter_batches(shard, batch_size, train=False, seed=recipe.seed, epoch=0),
                                        build_objective(recipe, classes, anchors), precision)
        log(f"[{recipe.name}] {name} (epoch {epoch + 1}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        results[name] = {"metrics": metrics, "arrays": arrays}
    return results


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


# ----------------------------------------------------------------------------- driver side

def run_stage(recipe: StageRecipe, data: StageData, run: RunOptions, *, mlflow: Optional[dict] = None,
              fault: Optional[list] = None, test: bool = True) -> StageOutcome:
    """Train one stage; returns where its selected checkpoint is. Re-running resumes an unfinished run.

    After training, the workers score the selected checkpoint on each of ``data.tests`` (the test splits
    are read only then; ``test=False`` skips them, as sweep trials do); results land in
    ``outcome.info["tests"]``.
    """
    name = recipe.name
    datasets = data.datasets
    missing = [k for k in (TRAIN_KEY, "val") if k not in datasets]
    if missing:
        raise ValueError(f"stage {name}: datasets {missing} are missing")
    tests = data.tests if test else {}
    recipe.per_worker_batch(run.num_workers)   # a global batch that does not divide stops here, in one line
    local = dict(data.local) if recipe.deterministic else {}
    datasets = {k: v for k, v in datasets.items() if k not in local}
    context = StageContext(checkpoint_root=storage.join(run.storage_path, name), mlflow=mlflow, fault=fault,
                           tests={k: (t.classes, t.anchors) for k, t in tests.items()}, rows=dict(data.rows),
                           val_augmented=data.val_augmented, val_scoring=data.val_scoring, local=local)
    resources = {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})}
    # Retention follows early stopping exactly: checkpoints are ranked by "improved" (1 when the epoch
    # set a new best), and Ray breaks ties in favour of later reports, so the latest improvement — the
    # early-stopping best — is never deleted (the latest checkpoint is always kept too, for resuming).
    # Ranking by the raw metric instead could keep a later epoch that merely tied it.
    trainer = TorchTrainer(
        fit_worker,
        train_loop_config={"recipe": recipe.to_dict(), "context": dataclasses.asdict(context)},
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker=resources,
                                     placement_strategy=run.placement_strategy),
        datasets={**datasets, **{k: t.dataset for k, t in tests.items()}},
        dataset_config=EvalSplitDataConfig(),
        run_config=RunConfig(name=name, storage_path=run.storage_path,
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints,
                                                                checkpoint_score_attribute="improved",
                                                                checkpoint_score_order="max"),
                             callbacks=list(run.callbacks) or None))
    # Ray Train V2's fit() raises the run's error (it also sits in Result.error for a returned result).
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - told apart just below; anything not a worker loss is re-raised
        error = exc
    else:
        error = result.error
    if error:
        if not _workers_lost(error):
            raise error         # an exception in the training code: a bug, reported with its traceback
        raise StageFailed(f"stage {name} failed: its workers' processes or nodes were lost more often than "
                          f"--max-failures {run.max_failures} allows; its checkpoints are kept in "
                          f"{context.checkpoint_root}")
    info = result.return_value or {}
    selected_epoch = info.get("selected_epoch", -1)
    selected = storage.join(context.checkpoint_root, checkpoint_name(selected_epoch)) if selected_epoch >= 0 else None
    metrics = next((m for c, m in (result.best_checkpoints or [])
                    if selected and checkpoint_name(selected_epoch) == storage.name(c.path)), {})
    return StageOutcome(name=name, path=str(result.path), best_checkpoint=selected, best_metrics=metrics,
                        history=info.get("history", []), info=info)


def evaluate_splits(recipe: StageRecipe, datasets: dict, run: RunOptions, *, checkpoint_dir: Optional[str] = None,
                    weights: Optional[str] = None) -> dict:
    """Score one model on several splits in one Ray task; returns ``{split: {metrics, arrays}}``.

    The weights come from a project checkpoint folder (``checkpoint_dir``) or from a weights file
    in another format, e.g. a published ``checkpoint.pth`` (``weights``: loaded by
    ``emotion_models.weights.load_weights`` and required to fit the model exactly).
    """
    if (checkpoint_dir is None) == (weights is None):
        raise ValueError("evaluate_splits needs exactly one of checkpoint_dir and weights")
    recipe = recipe.replace(init_from=checkpoint_dir, init_weights=weights, freeze=None)
    task = ray.remote(num_cpus=max(run.cpus_per_worker, 1e-4), num_gpus=1 if run.use_gpu else 0)(_evaluate_task)
    return ray.get(task.remote(recipe.to_dict(), datasets, recipe.per_worker_batch(run.num_workers)))


def _evaluate_task(recipe: dict, datasets: dict, batch_size: int) -> dict:
    recipe = StageRecipe.from_dict(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, objective, precision = build_for_device(recipe, device)
    out = {}
    for split, ds in datasets.items():
        metrics, arrays = core.evaluate(model, iter_batches(ds, batch_size, train=False, seed=recipe.seed, epoch=0),
                                        objective, precision)
        out[split] = {"metrics": metrics, "arrays": arrays}
    return out
