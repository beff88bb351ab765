"""Every trial an MLflow child run of the sweep's parent run, through Ray's MLflow integration.

:class:`TrialRuns` is Ray Tune's ``MLflowLoggerCallback`` (on the sweep driver) with the sweep's
layout on top:

- the run is a child of the parent (tag ``mlflow.parentRunId``), tagged ``sweep_trial=<trial id>``;
  its params are the trial's config (lr, decay, alpha and any ``--space`` extras);
- every Tune result (one per epoch: the workers' ``ray.train.report`` of ``val_*``, ``train_*``,
  ``epoch``, forwarded by ``TuneReportCallback``) is logged at step ``epoch``;
- at the end the run gets ``best_<metric>``, ``best_epoch``, ``last_<metric>``, ``epochs_run`` and a
  ``sweep_outcome`` tag, and its status: FINISHED (completed / early_stopped), FAILED (error) or
  KILLED with ``stopped_by_scheduler=true`` (ASHA stopped it). The integration alone ends every run
  FINISHED or FAILED; Tune marks a scheduler's stop by ``done=True`` on the result it stops at,
  which is how the stop is told apart from a trial that ran to its end.

Resume: the integration keeps its trial -> run map in memory only, so a restored experiment
(``tune.Tuner.restore``) would start a second run for every restarted trial and leave the first
RUNNING. This callback saves the map (and the running best) as Tune callback state, which Tune
checkpoints with the experiment and restores, and reopens the trial's own run instead.
"""
from __future__ import annotations

import math
from typing import Optional

from ray.air.integrations.mlflow import MLflowLoggerCallback

TRIAL_TAG = "sweep_trial"       # the Tune trial id ("stage1" for the sweep's stage one)
OUTCOME_TAG = "sweep_outcome"   # completed | early_stopped | stopped_by_scheduler | error
STATUS = {"completed": "FINISHED", "early_stopped": "FINISHED", "error": "FAILED",
          "stopped_by_scheduler": "KILLED"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class TrialRuns(MLflowLoggerCallback):
    """``MLflowLoggerCallback`` for a sweep: child runs of ``parent_run_id`` (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, metric: str, mode: str,
                 max_t: int, tags: Optional[dict] = None):
        super().__init__(tracking_uri, experiment_name=experiment, save_artifact=False,
                         tags={**(tags or {}), "mlflow.parentRunId": parent_run_id})
        self.metric, self.mode, self.max_t = metric, mode, max_t
        self.records: dict[str, dict] = {}   # trial id -> run_id, best, best_epoch, last, epochs, stopped

    # Tune checkpoints this with the experiment and hands it back on restore.
    def get_state(self) -> Optional[dict]:
        return {"records": {k: dict(v) for k, v in self.records.items()}}

    def set_state(self, state: dict) -> None:
        self.records = {k: dict(v) for k, v in state.get("records", {}).items()}

    def _client(self):
        return self.mlflow_util._get_client()

    def log_trial_start(self, trial) -> None:
        record = self.records.get(trial.trial_id)
        if record is not None and trial not in self._trial_runs:
            # A restarted trial (resumed sweep): its own run, reopened.
            self._trial_runs[trial] = record["run_id"]
            self._client().update_run(record["run_id"], status="RUNNING")
        super().log_trial_start(trial)
        if record is None:
            run_id = self._trial_runs[trial]
            self._client().set_tag(run_id, TRIAL_TAG, trial.trial_id)
            self.records[trial.trial_id] = {"run_id": run_id, "best": None, "best_epoch": None, "last": None,
                                            "epochs": 0, "stopped": False}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        record = self.records[trial.trial_id]
        epoch = result.get("epoch")
        epoch = int(epoch) if _number(epoch) else int(result.get("training_iteration", 1)) - 1
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result, step=epoch)
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

    def log_trial_end(self, trial, failed: bool = False) -> None:
        record = self.records[trial.trial_id]
        run_id = self._trial_runs[trial]
        if failed:
            outcome = "error"
        elif record["stopped"] and record["epochs"] < self.max_t:
            outcome = "stopped_by_scheduler"
        else:
            outcome = "early_stopped" if record["epochs"] < self.max_t else "completed"
        summary = {"epochs_run": record["epochs"]}
        if record["best"] is not None:
            summary.update({f"best_{self.metric}": record["best"], "best_epoch": record["best_epoch"],
                            f"last_{self.metric}": record["last"]})
        self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=summary, step=record["epochs"])
        client = self._client()
        client.set_tag(run_id, OUTCOME_TAG, outcome)
        if outcome == "stopped_by_scheduler":
            client.set_tag(run_id, "stopped_by_scheduler", "true")
        self.mlflow_util.end_run(run_id=run_id, status=STATUS[outcome])


def child_runs(client, experiment_id: str, parent_run_id: str) -> dict:
    """The sweep's child runs by their ``sweep_trial`` tag (trials and ``stage1``)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10000)
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}
