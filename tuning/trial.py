"""One trial: a Ray Tune function that builds the pipeline's stage and fits it on Ray Train.

Tune runs :func:`run_trial` in a small actor that only drives: it reserves no CPU of its own (only
some memory), the ``TorchTrainer`` it starts takes ``num_workers x cpus_per_worker``, and
``TuneReportCallback`` forwards every epoch's ``ray.train.report`` to Tune (one Tune iteration per
epoch, which is what ASHA counts). Every trial (and the sweep's stage one) is an MLflow child
run of the sweep's parent run, found again by a tag when a resumed sweep restarts it.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

from pipelines.tracking import Tracker
from pipelines.train_loop import RunOptions, StageOutcome, run_stage
from tuning.targets import Target

TRIAL_TAG = "sweep_trial"       # child-run tag holding the Tune trial id ("stage1" for stage one)
OUTCOME_TAG = "sweep_outcome"   # completed | early_stopped | stopped_by_scheduler | error
SWEPT = ("lr", "decay", "alpha")


@dataclass
class TrialContext:
    """What every trial needs besides its sampled config (sent once through the object store)."""

    target: Target
    base_args: argparse.Namespace
    sweep_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    metric: str
    mode: str
    run: RunOptions
    init_from: Optional[str] = None


def trial_params(config: dict) -> dict:
    """lr, decay and alpha first (top-level MLflow params for the parallel-coordinates view), then extras."""
    return {**{k: config[k] for k in SWEPT if k in config}, **{k: v for k, v in config.items() if k not in SWEPT}}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


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


def find_child_run(tracker: Tracker, parent_id: str, key: str) -> Optional[Any]:
    """The child run of ``parent_id`` tagged ``sweep_trial=key``, if any."""
    found = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.{TRIAL_TAG} = '{key}'", max_results=1)
    return found[0] if found else None


def start_child_run(tracker: Tracker, parent_id: str, key: str, name: str, params: dict, tags: dict) -> str:
    """Find (and reopen) or create the child run of ``key``; a restarted trial keeps its run."""
    run = find_child_run(tracker, parent_id, key)
    if run is not None:
        if run.info.status != "RUNNING":
            tracker.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return tracker.start_run(name, parent_id=parent_id, tags={TRIAL_TAG: key, **tags}, params=params)


def close_child_run(tracker: Tracker, run_id: str, summary: dict, outcome: str) -> None:
    status = {"completed": "FINISHED", "early_stopped": "FINISHED", "error": "FAILED"}.get(outcome, "KILLED")
    tracker.log_metrics(run_id, summary)
    tracker.client.set_tag(run_id, OUTCOME_TAG, outcome)
    if outcome == "stopped_by_scheduler":
        tracker.client.set_tag(run_id, "stopped_by_scheduler", "true")
    tracker.end_run(run_id, status=status)


def train_tracked(tracker: Tracker, parent_id: str, key: str, spec: dict, datasets: dict, run: RunOptions, *,
                  params: dict, tags: dict, metric: str, mode: str) -> StageOutcome:
    """Fit one stage as an MLflow child run: per-epoch curves from the workers, then the best
    ``metric`` and epoch, and the run closed. Used for every trial and for the sweep's stage one."""
    spec_params = {k: v for k, v in spec.items() if k not in ("mlflow", "fault")}
    run_id = start_child_run(tracker, parent_id, key, key if key == "stage1" else f"trial-{key}",
                             {**params, **spec_params}, tags)
    outcome = run_stage({**spec, "mlflow": {"tracking_uri": tracker.uri, "run_id": run_id}}, datasets, run)
    close_child_run(tracker, run_id, summarize(outcome.history, metric, mode),
                    "early_stopped" if outcome.info.get("stopped_early") else "completed")
    return outcome


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune trainable: the base flags with this trial's values, the pipeline's own stage, one fit."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    args = ctx.target.trial_args(ctx.base_args, config)
    spec, datasets = ctx.target.trial_stage(ctx.target.make_plan(args), ctx.init_from)
    # The trial keeps (and stops early on) the best epoch by the sweep's metric.
    spec = {**spec, "monitor": ctx.metric[len("val_"):], "monitor_mode": ctx.mode}
    run = replace(ctx.run, storage_path=str(Path(ctx.sweep_dir) / "trials" / trial_id),
                  callbacks=[TuneReportCallback()])
    tracker = Tracker(ctx.tracking_uri, ctx.experiment)
    train_tracked(tracker, ctx.parent_run_id, trial_id, spec, datasets, run, params=trial_params(config),
                  tags={"pipeline": ctx.target.name}, metric=ctx.metric, mode=ctx.mode)
