"""Every trial an MLflow child run of the sweep's parent run, owned by the sweep through ``MlflowClient``.

:class:`TrialRuns` is a ``ray.tune.Callback`` on the sweep driver; it uses Tune's public hooks and
MLflow's public client only:

- ``on_trial_start``: the trial's run is created as a child of the parent (tag ``mlflow.parentRunId``),
  tagged ``sweep_trial=<trial id>``; its params are the trial's config (recipe field paths -> values);
- ``on_trial_result`` (one per epoch: the workers' ``ray.train.report``, forwarded by
  ``TuneReportCallback``): the ``val_*`` and ``train_*`` metrics at step ``epoch``;
- ``on_trial_complete`` / ``on_trial_error``: ``best_<metric>``, ``best_epoch``, ``last_<metric>``,
  ``epochs_run``, the ``sweep_outcome`` tag and the status: FINISHED (completed / early_stopped),
  FAILED (error) or KILLED with ``stopped_by_scheduler=true``. Tune marks a scheduler's stop by
  ``done=True`` on the result it stops at, which is how the stop is told apart from a trial that
  ended by itself (its own early stopping, or its last epoch).

Resume: the trial -> run map (and each trial's running best) is the callback's state
(``get_state`` / ``set_state``), which Tune checkpoints with the experiment and hands back on
``tune.Tuner.restore``; a restarted trial reopens its own run. A trial the state does not know yet is
looked up by its ``sweep_trial`` tag under the parent before a run is created, so a sweep killed
between the two checkpoints gets no duplicate either. Runs of trials left unfinished when a sweep is
interrupted end KILLED (tag ``sweep_interrupted=true``) until the resumed sweep reopens them.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Optional

from ray.tune import Callback

from pipelines.recipe import jsonable

TRIAL_TAG = "sweep_trial"       # the Tune trial id ("stage1" for the sweep's stage one)
OUTCOME_TAG = "sweep_outcome"   # completed | early_stopped | stopped_by_scheduler | error
INTERRUPTED_TAG = "sweep_interrupted"
STOPPED_TAG = "stopped_by_scheduler"
STATUS = {"completed": "FINISHED", "early_stopped": "FINISHED", "error": "FAILED",
          "stopped_by_scheduler": "KILLED"}
CURVES = ("val_", "train_")     # the per-epoch metrics a trial run keeps


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def summarize(history: Iterable[dict], metric: str, mode: str) -> dict[str, float]:
    """``best_<metric>``, its 0-based ``best_epoch``, ``last_<metric>`` and ``epochs_run`` of a run's
    per-epoch rows (the pipeline's history or Tune's results); missing values are skipped. Epochs are
    counted by the rows' own ``epoch`` (a resumed trial reports only its epochs since the restart)."""
    history = list(history)
    rows = [r for r in history if _number(r.get(metric))]
    epochs = [int(r["epoch"]) for r in history if _number(r.get("epoch"))]
    out: dict[str, float] = {"epochs_run": max(epochs) + 1 if epochs else len(history)}
    if rows:
        pick = max if mode == "max" else min
        best = pick(rows, key=lambda r: r[metric])
        out.update({f"best_{metric}": best[metric], "best_epoch": best.get("epoch", rows.index(best)),
                    f"last_{metric}": rows[-1][metric]})
    return out


def child_runs(client, experiment_id: str, parent_run_id: str, trial_id: Optional[str] = None) -> dict:
    """The sweep's child runs by their ``sweep_trial`` tag (trials and ``stage1``), or the one of ``trial_id``."""
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.{TRIAL_TAG} = '{trial_id}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=10000)
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}


class TrialRuns(Callback):
    """The sweep's trial runs (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, metric: str, mode: str,
                 max_t: int, tags: Optional[dict] = None):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.metric, self.mode, self.max_t = metric, mode, max_t
        self.tags = dict(tags or {})
        self.records: dict[str, dict] = {}   # trial id -> run_id, best, best_epoch, last, epochs, stopped, open
        self._client = None

    # Pickled with the Tuner's run config (restore): the MLflow client is made again where it is used.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # Tune checkpoints this with the experiment and hands it back on restore.
    def get_state(self) -> Optional[dict]:
        return {"records": {k: dict(v) for k, v in self.records.items()}}

    def set_state(self, state: dict) -> None:
        # A restored sweep: no run is open in this process yet (on_trial_start reopens the restarted ones).
        self.records = {k: {**v, "open": False} for k, v in state.get("records", {}).items()}

    def _record(self, trial) -> dict:
        record = self.records.get(trial.trial_id)
        if record is None:   # not started by this callback (a restored sweep whose state predates it)
            record = self._open(trial)
        return record

    def _open(self, trial) -> dict:
        """The trial's run: its own (reopened) if it has one, else a new child run with its params."""
        record = self.records.get(trial.trial_id)
        if record is None:
            found = child_runs(self.client, self.experiment_id, self.parent_run_id, trial.trial_id)
            run_id = found[trial.trial_id].info.run_id if trial.trial_id in found else None
            if run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=str(trial), tags={
                    **self.tags, "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial.trial_id})
                run_id = run.info.run_id
                self._log_params(run_id, trial.config or {})
            record = {"run_id": run_id, "best": None, "best_epoch": None, "last": None, "epochs": 0,
                      "stopped": False, "open": False}
            self.records[trial.trial_id] = record
        run = self.client.get_run(record["run_id"])
        if run.info.status != "RUNNING":
            self.client.update_run(record["run_id"], status="RUNNING")
        for tag in (INTERRUPTED_TAG, OUTCOME_TAG, STOPPED_TAG):   # a restarted trial has not ended yet
            if tag in run.data.tags:
                self.client.delete_tag(record["run_id"], tag)
        record["open"] = True
        return record

    def _log_params(self, run_id: str, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(str(k), str(v)[:6000]) for k, v in jsonable(dict(config)).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])

    # Tune's hooks.
    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        record = self._record(trial)
        epoch = result.get("epoch")
        epoch = int(epoch) if _number(epoch) else int(result.get("training_iteration", 1)) - 1
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, epoch) for key, value in result.items()
                   if key.startswith(CURVES) and _number(value)]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(record["run_id"], metrics=metrics[i:i + 500])
        record["epochs"] = max(record["epochs"], epoch + 1)
        value = result.get(self.metric)
        if _number(value):
            record["last"] = value
            best = record["best"]
            if best is None or (value > best if self.mode == "max" else value < best):
                record["best"], record["best_epoch"] = value, epoch
        # Tune sets done=True on the result at which the scheduler (or a stopper) stops the trial; a
        # trial that ends by itself reports its epochs without it.
        if result.get("done"):
            record["stopped"] = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, failed=True)

    def on_experiment_end(self, trials, **info):
        """An interrupted sweep: the runs of trials that did not end are KILLED until the resume reopens them."""
        for trial in trials:
            record = self.records.get(trial.trial_id)
            if record is not None and record["open"]:
                self.client.set_tag(record["run_id"], INTERRUPTED_TAG, "true")
                self.client.set_terminated(record["run_id"], status="KILLED")
                record["open"] = False

    def outcome(self, record: dict, failed: bool) -> str:
        if failed:
            return "error"
        if record["stopped"] and record["epochs"] < self.max_t:
            return "stopped_by_scheduler"
        return "early_stopped" if record["epochs"] < self.max_t else "completed"

    def _end(self, trial, failed: bool) -> None:
        record = self._record(trial)
        run_id, outcome = record["run_id"], self.outcome(record, failed)
        summary = {"epochs_run": record["epochs"]}
        if record["best"] is not None:
            summary.update({f"best_{self.metric}": record["best"], "best_epoch": record["best_epoch"],
                            f"last_{self.metric}": record["last"]})
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        self.client.set_tag(run_id, OUTCOME_TAG, outcome)
        if outcome == "stopped_by_scheduler":
            self.client.set_tag(run_id, STOPPED_TAG, "true")
        self.client.set_terminated(run_id, status=STATUS[outcome])
        record["open"] = False
