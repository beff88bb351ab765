"""MLflow for every pipeline: one parent run per invocation, a child run per stage.

The driver creates the runs and logs what exists only at the end (artifacts, the model, plots);
rank 0 of the Ray Train workers logs the per-epoch curves into the child run by its id
(:class:`EpochLogger`). The default store is a local sqlite file;
``--mlflow-uri`` or ``MLFLOW_TRACKING_URI`` point elsewhere (an MLflow server on a cluster's head).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from datasets_io import storage
from datasets_io.paths import home_dir
from datasets_io.records import SHARD_SCHEMA
from pipelines.recipe import jsonable

EXPERIMENT = "emotion-ray"
MODEL_CHECKPOINT = "checkpoint"  # = pipelines.mlflow_model.CHECKPOINT: the pyfunc's artifact


def default_tracking_uri() -> str:
    return f"sqlite:///{home_dir() / 'mlflow.db'}"


def resolve_tracking_uri(arg: Optional[str]) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


class TrackingServerUnreachable(ConnectionError):
    """The MLflow tracking server (``--mlflow-uri http://...``) cannot be reached; the message is one line."""


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_reachable(uri: str, timeout: float = 5.0) -> bool:
    """True when the tracking server answers HTTP at all (its ``/health``; any HTTP status counts, e.g.
    behind a proxy); False on a refused connection, a timeout or a name that does not resolve.
    Always True for a non-HTTP store (sqlite, a folder)."""
    if not is_server_uri(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def require_server(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingServerUnreachable` (one line) when ``uri`` is a tracking server that
    does not answer within ``timeout`` seconds; nothing for a local store."""
    if not server_reachable(uri, timeout):
        raise TrackingServerUnreachable(
            f"the MLflow tracking server {uri} is not reachable (no answer within {timeout:.0f} s); "
            f"start it or pass another --mlflow-uri")


def quick_http_failures(retries: int = 1, timeout: int = 20) -> None:
    """Make MLflow's HTTP client give up quickly in this process (MLflow's defaults retry a refused
    connection for about two minutes, with a 120 s timeout): the project retries itself, around the
    whole step, and keeps training meanwhile. Values the user set win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one experiment.

    With a tracking server (``http://...``) it first checks that the server answers (one request,
    a few seconds) and raises :class:`TrackingServerUnreachable` with one line when it does not,
    before anything else happens. Later, :meth:`retrying` runs a logging step again while the server
    is down (backoff up to ``outage_wait_s``) and gives up with a note instead of failing the run.
    """

    def __init__(self, tracking_uri: str, experiment: str = EXPERIMENT, *, outage_wait_s: Optional[float] = None,
                 probe_timeout_s: float = 5.0):
        import mlflow
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.probe_timeout_s = probe_timeout_s
        self.outage_wait_s = float(os.environ.get("EMOTION_RAY_MLFLOW_OUTAGE_WAIT_S", 60)) \
            if outage_wait_s is None else outage_wait_s
        self.unlogged: list[str] = []   # what could not be logged because the server stayed down
        self._down = False               # gave up once: later steps try once, without the backoff
        if is_server_uri(tracking_uri):
            require_server(tracking_uri, probe_timeout_s)
            quick_http_failures()
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # With a local database the artifacts live beside it, not in the current directory.
            location = None
            if tracking_uri.startswith("sqlite:///"):
                location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    def start_run(self, name: str, *, parent_id: Optional[str] = None, tags: Optional[dict] = None,
                  params: Optional[dict] = None) -> str:
        run_tags = dict(tags or {})
        if parent_id:
            run_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def run_exists(self, run_id: str) -> bool:
        """Whether the run is in the store (an unreachable server raises; it is not a missing run)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST" or server_reachable(self.uri, self.probe_timeout_s):
                return False
            raise

    def reachable(self) -> bool:
        return server_reachable(self.uri, self.probe_timeout_s)

    def retrying(self, what: str, fn: Callable[[], Any], *, required: bool = False, default: Any = None) -> Any:
        """Run one logging step; while the server is unreachable, run it again with backoff (2, 4, 8, ...
        seconds, ``outage_wait_s`` in all). An error with the server up is a real error and is raised.
        If the server stays down: ``required`` steps raise :class:`TrackingServerUnreachable`; the
        others are noted in :attr:`unlogged` and ``default`` is returned (the run goes on).
        After one give-up, later steps try once (then every step would wait again) until one succeeds."""
        deadline = time.monotonic() + (0 if self._down and not required else self.outage_wait_s)
        delay = 2.0
        while True:
            try:
                out = fn()
                self._down = False
                return out
            except Exception as e:  # noqa: BLE001 - decided below: outage or real error
                if self.reachable():
                    raise
                error = e
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        self._down = True
        if required:
            raise TrackingServerUnreachable(
                f"the MLflow tracking server {self.uri} went down and stayed down: could not {what} "
                f"({type(error).__name__})") from error
        self.unlogged.append(what)
        return default

    def backfill_history(self, run_id: str, history: list[dict]) -> int:
        """Log the epochs of ``history`` (``core.fit``'s rows, step = epoch) that the run lacks, e.g.
        because the server was down when the worker logged them and stayed down to the stage's end.
        Returns how many metric values were added."""
        from mlflow.entities import Metric

        keys = sorted({k for row in history for k, v in row.items()
                       if k != "epoch" and isinstance(v, (int, float)) and v == v})
        now = int(time.time() * 1000)
        missing = []
        for key in keys:
            have = {m.step for m in self.client.get_metric_history(run_id, key)}
            missing += [Metric(key, float(row[key]), now, int(row["epoch"])) for row in history
                        if int(row["epoch"]) not in have and isinstance(row.get(key), (int, float))
                        and row[key] == row[key]]
        for i in range(0, len(missing), 1000):
            self.client.log_batch(run_id, metrics=missing[i:i + 1000])
        return len(missing)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in flat.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and value == value:
                self.client.log_metric(run_id, key, float(value), step=step)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, jsonable(data), artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)

    def log_model(self, run_id: str, checkpoint_dir: str, name: str = "model",
                  registered_model_name: Optional[str] = None):
        """Log a checkpoint as the code-based pyfunc of :mod:`pipelines.mlflow_model` (weights as a
        state dict plus the recipe that rebuilds the model; no pickle); returns MLflow's ModelInfo.
        With ``registered_model_name`` it is also registered (a new version)."""
        # Logged into the run by id, without making it the active run: `with mlflow.start_run(run_id)`
        # would end the stage's run here, before its last metrics, and it would be ended twice.
        return log_pyfunc_model(checkpoint_dir, name=name, registered_model_name=registered_model_name,
                                run_id=run_id)

    def log_dataset_inputs(self, run_id: str, manifests: dict) -> None:
        """Record each ingested dataset a stage read as an MLflow dataset input (the run page's
        Datasets, the runs table's Dataset column): name, the manifest's digest, source (the
        shard folder), schema (the shards' Parquet columns) and profile (images per split)."""
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(manifest_dataset(role, manifest), tags=[InputTag("mlflow.data.context", role)])
                  for role, manifest in manifests.items()]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """A run resumed by a rerun is RUNNING again when an earlier driver ended it KILLED or FAILED (a
        stopped job, a stage out of retries); its end time is set anew when it ends."""
        if self.client.get_run(run_id).info.status in ("KILLED", "FAILED"):
            self.client.update_run(run_id, status="RUNNING")


class MetricBuffer:
    """Metrics for one run, sent with ``log_batch``; while the server cannot be reached they stay in
    memory (up to ``limit`` values, the oldest dropped beyond) and go with the next :meth:`flush`.
    Never raises: what training logs must not stop training."""

    def __init__(self, tracking_uri: str, run_id: str, limit: int = 200_000):
        from mlflow import MlflowClient

        if is_server_uri(tracking_uri):
            quick_http_failures()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.uri, self.run_id, self.limit = tracking_uri, run_id, limit
        self.pending: list = []
        self.failures = 0          # consecutive failed flushes
        self.dropped = 0
        self.last_error = ""
        self._lock = threading.Lock()

    def add(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self.pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
            if len(self.pending) > self.limit:
                self.dropped += len(self.pending) - self.limit
                del self.pending[:len(self.pending) - self.limit]

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left."""
        with self._lock:
            try:
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                    del self.pending[:1000]
            except Exception as e:  # noqa: BLE001 - kept for the next flush
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                return False
            self.failures = 0
            return True

    def flush_patiently(self, wait_s: float) -> bool:
        """Flush, trying again with backoff for up to ``wait_s`` seconds (the end of a stage)."""
        deadline, delay = time.monotonic() + wait_s, 1.0
        while not self.flush():
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        return True


def log_pyfunc_model(checkpoint_dir: str, *, name: str = "model", registered_model_name: str | None = None,
                     run_id: str | None = None):
    """Log the checkpoint's model as the code-based pyfunc of run ``run_id`` (default: the active run),
    through ``mlflow.models.Model.log`` (what ``mlflow.pyfunc.log_model`` calls, with a run id); returns
    the ModelInfo."""
    import json
    import tempfile

    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    import mlflow

    from pipelines.checkpoints import META_FILE, STATE_FILE, load_state, state_path

    # The model's code file, not imported here (importing it registers the model with set_model).
    code = Path(__file__).resolve().with_name("mlflow_model.py")
    repo = code.parents[1]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image"),
                                              ColSpec("string", "text", required=False)]))
    import warnings

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No input example: it would load and run the model once more at logging time.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        ckpt = Path(tmp) / MODEL_CHECKPOINT
        ckpt.mkdir()
        # Only the weights (not the optimizer's state) and the recipe.
        state = load_state(state_path(checkpoint_dir))
        torch.save({"model": state["model"]}, ckpt / STATE_FILE)
        meta = json.loads(storage.read_text(storage.join(checkpoint_dir, META_FILE)))
        (ckpt / META_FILE).write_text(json.dumps(meta, indent=1))
        if run_id is not None:
            # Model.log files the logged model under the current experiment: the run's own, as an active
            # run would have made it.
            mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
        return Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, python_model=str(code), artifacts={MODEL_CHECKPOINT: str(ckpt)},
            code_paths=[str(repo / pkg) for pkg in ("pipelines", "emotion_models", "datasets_io")],
            signature=signature, registered_model_name=registered_model_name,
            pip_requirements=["torch", "timm", "pillow", "numpy", "pandas", "pyarrow", "mlflow"])


def manifest_digest(manifest: dict) -> str:
    """A short content hash of an ingest manifest (its counts, classes, params, columns, ...)."""
    import hashlib

    content = {k: v for k, v in manifest.items() if k not in ("created", "shards")}
    return hashlib.sha256(json.dumps(jsonable(content), sort_keys=True).encode()).hexdigest()[:12]


def manifest_dataset(role: str, manifest: dict):
    """The MLflow dataset entity (``mlflow.entities.Dataset``) describing an ingested shard folder:
    name, the manifest's digest, a local source, the shards' column schema, the split counts."""
    from mlflow.entities import Dataset

    source_path = str(manifest.get("shards") or manifest.get("root") or "")
    counts = {k: int(v) for k, v in (manifest.get("counts") or {}).items()}
    profile = {"counts": counts, "num_rows": sum(counts.values()), "layout": manifest.get("layout"),
               "classes": manifest.get("classes"), "num_skipped": manifest.get("num_skipped", 0)}
    schema = _shard_schema()
    return Dataset(name=f"{role}:{storage.name(source_path) or manifest.get('layout', role)}",
                   digest=manifest_digest(manifest),
                   source_type=source_path.split("://", 1)[0] if storage.is_uri(source_path) else "local",
                   source=json.dumps({"uri": source_path}),
                   schema=json.dumps({"mlflow_colspec": schema.to_dict()}) if schema is not None else None,
                   profile=json.dumps(jsonable(profile)))


def _shard_schema():
    """The MLflow column schema of the shards (:data:`datasets_io.records.SHARD_SCHEMA`, every ingest's)."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    def to_mlflow(t):
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return DataType.binary
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return DataType.string
        if pa.types.is_boolean(t):
            return DataType.boolean
        if pa.types.is_int64(t) or pa.types.is_uint32(t):
            return DataType.long
        if pa.types.is_integer(t):
            return DataType.integer
        if pa.types.is_float32(t):
            return DataType.float
        if pa.types.is_floating(t):
            return DataType.double
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            inner = to_mlflow(t.value_type)
            return Array(inner) if inner is not None else None
        return None

    arrow = SHARD_SCHEMA
    cols = [ColSpec(to_mlflow(f.type), f.name) for f in arrow if to_mlflow(f.type) is not None]
    return Schema(cols) if cols else None


def _flatten(params: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and len(value) > 16:
            flat[name] = json.dumps(jsonable(value))[:500]
        else:
            flat[name] = value
    return flat


# ----------------------------------------------------------------------------- figures

def va_scatter(pred: np.ndarray, true: np.ndarray, title: str = ""):
    """Predicted against true valence and arousal, with the identity line and Pearson's r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emotion_models.metrics import pearson

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for i, (ax, dim) in enumerate(zip(axes, ("valence", "arousal"))):
        ax.scatter(true[:, i], pred[:, i], s=10, alpha=0.6)
        lo, hi = -1.05, 1.05
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"true {dim} (canonical scale)")
        ax.set_ylabel(f"predicted {dim}")
        ax.set_title(f"{dim}: r = {pearson(true[:, i], pred[:, i]):.3f} (n = {len(true)})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: np.ndarray, classes: list[str], title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (r, c), v in np.ndenumerate(confusion):
        ax.text(c, r, str(int(v)), ha="center", va="center",
                color="white" if v > confusion.max() / 2 else "black", fontsize=8)
    ax.set_title(title or "confusion matrix (test)")
    fig.tight_layout()
    return fig


def log_stage_artifacts(tracker: Tracker, run_id: str, *, checkpoint_dir: Optional[str], log_model: bool = True,
                        register: Optional[str] = None,
                        manifests: Optional[dict] = None, tests: Optional[dict] = None) -> Optional[str]:
    """What a finished stage leaves in its child run: best checkpoint, model, manifests, and per test
    split (``tests``: name -> {"metrics", "arrays", "classes"}) its metrics, VA scatter, confusion matrix
    and raw predictions. Returns the logged model's URI (``models:/<model id>``), or None."""
    model_uri = None
    if checkpoint_dir:
        with storage.LocalCopy(checkpoint_dir) as local_dir:   # the checkpoint may be on object storage
            tracker.log_artifacts(run_id, local_dir, "best_checkpoint")
    if log_model and checkpoint_dir:
        model_uri = tracker.log_model(run_id, checkpoint_dir, registered_model_name=register).model_uri
    for name, manifest in (manifests or {}).items():
        tracker.log_dict(run_id, manifest, f"manifests/{name}.json")
    for name, test in (tests or {}).items():
        metrics, arrays = test["metrics"], test.get("arrays", {})
        tracker.log_metrics(run_id, {f"{name}_{k}": v for k, v in metrics.items()})
        has_va = arrays.get("has_va")
        if "va_pred" in arrays and has_va is not None and has_va.sum() >= 2:
            rows = has_va.astype(bool)
            tracker.log_figure(run_id, va_scatter(arrays["va_pred"][rows], arrays["va_true"][rows], name),
                               f"plots/va_scatter_{name}.png")
        if "confusion" in metrics and test.get("classes"):
            tracker.log_figure(run_id, confusion_figure(metrics["confusion"], test["classes"], f"confusion ({name})"),
                               f"plots/confusion_{name}.png")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"predictions_{name}.npz"
            np.savez_compressed(path, **arrays)
            tracker.client.log_artifact(run_id, str(path), "predictions")
    return model_uri


class EpochLogger:
    """Rank 0 logs each epoch's curves to the stage's MLflow run (created by the driver).

    When the tracking server does not answer, an epoch's metrics stay in memory and go with the next
    epoch's, or at :meth:`close` (the stage's end); training neither waits for the server nor fails
    because of it (and the driver logs what is still missing from the stage's history afterwards).
    :func:`pipelines.system_metrics.for_stage` samples the node's system metrics for the same run.
    """

    def __init__(self, cfg: Optional[dict], log=None):
        self.buffer = None
        self.log = log or (lambda *_: None)
        if cfg and cfg.get("run_id"):
            self.buffer = MetricBuffer(cfg["tracking_uri"], cfg["run_id"])
            self.client = self.buffer.client
            self.run_id = cfg["run_id"]

    def tags(self, tags: dict) -> None:
        if self.buffer is not None:
            try:
                for key, value in tags.items():
                    self.client.set_tag(self.run_id, key, value)
            except Exception as e:  # noqa: BLE001 - a tag is not worth a failed stage
                self.log(f"MLflow: could not set the tags {sorted(tags)} ({type(e).__name__}); training goes on")

    def __call__(self, row: dict) -> None:
        """Log one epoch's row (``core.fit``'s history row: ``epoch``, ``lr``, ``train_*``, ``val_*``, ...)."""
        if self.buffer is None:
            return
        self.buffer.add({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))
        failed_before = self.buffer.failures
        if self.buffer.flush():
            if failed_before:
                self.log("MLflow server answers again: the buffered epochs' metrics are logged")
        elif self.buffer.failures == 1:
            self.log(f"MLflow server {self.buffer.uri} unreachable ({self.buffer.last_error}): epoch "
                     f"{int(row['epoch']) + 1}'s metrics kept in memory and sent when it answers; training goes on")

    def close(self, wait_s: float = 20.0) -> None:
        """The stage's end: send what is still buffered, trying for up to ``wait_s`` seconds."""
        if self.buffer is not None and self.buffer.pending and not self.buffer.flush_patiently(wait_s):
            self.log(f"MLflow server still unreachable: {len(self.buffer.pending)} metric values not logged "
                     f"by the worker (the driver logs the stage's history once the server answers)")

    @staticmethod
    def finish(epoch_logger: Optional["EpochLogger"], system_metrics) -> None:
        if epoch_logger is not None:
            epoch_logger.close()
        if system_metrics is not None:
            system_metrics.stop()
