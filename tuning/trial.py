"""One trial: a Ray Tune function that builds the pipeline's stage and fits it on Ray Train.

Tune runs :func:`run_trial` in a small actor that only drives: it reserves no CPU of its own (only
some memory), the ``TorchTrainer`` it starts takes ``num_workers x cpus_per_worker``, and
``TuneReportCallback`` forwards every epoch's ``ray.train.report`` to Tune (one Tune iteration per
epoch, which is what ASHA counts). The driver's :class:`tuning.runs.TrialRuns` (Ray's MLflow
integration) makes every trial an MLflow child run of the sweep's parent run from those results;
the sweep's stage one, trained once by the driver outside Tune, is a child run made here.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

from pipelines.recipe import StageRecipe
from pipelines.tracking import Tracker
from pipelines.train_loop import RunOptions, StageOutcome, run_stage
from tuning.runs import OUTCOME_TAG, TRIAL_TAG
from tuning.targets import Target

SWEPT = ("lr", "decay", "alpha")


@dataclass
class TrialContext:
    """What every trial needs besides its sampled config (sent once through the object store)."""

    target: Target
    base_args: argparse.Namespace
    sweep_dir: str
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


def _for_trial(recipe: StageRecipe, metric: Optional[str] = None, mode: Optional[str] = None) -> StageRecipe:
    """The trial's recipe: it keeps (and stops early on) the best epoch by ``metric`` / ``mode``."""
    if metric is None:
        return recipe
    return recipe.replace(monitor=metric[len("val_"):], monitor_mode=mode)


def fit_stage_one(tracker: Tracker, parent_id: str, recipe: StageRecipe, datasets: dict, run: RunOptions, *,
                  tags: dict, run_id: Optional[str] = None, on_run=None) -> StageOutcome:
    """The sweep's stage one (two_stage), trained once by the driver outside Tune: an MLflow child run
    of ``parent_id`` (``run_id``, reopened, when a resumed sweep trains it again; ``on_run`` is told a
    new run's id), per-epoch curves logged by the rank-0 worker, then the best epoch and the run closed."""
    print(f"[stage1] training stage one once for the sweep ({recipe.epochs} epochs, base flags)")
    if run_id is None:
        run_id = tracker.start_run("stage1", parent_id=parent_id, tags={TRIAL_TAG: "stage1", **tags},
                                   params=recipe.to_dict())
        if on_run is not None:
            on_run(run_id)
    else:
        tracker.client.update_run(run_id, status="RUNNING")
    outcome = run_stage(recipe, datasets, run, mlflow={"tracking_uri": tracker.uri, "run_id": run_id})
    tracker.log_metrics(run_id, summarize(outcome.history, f"val_{recipe.monitor}", recipe.monitor_mode))
    early = bool(outcome.info.get("stopped_early"))
    tracker.client.set_tag(run_id, OUTCOME_TAG, "early_stopped" if early else "completed")
    tracker.end_run(run_id)
    return outcome


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune trainable: the base flags with this trial's values, the pipeline's own stage, one fit."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    args = ctx.target.trial_args(ctx.base_args, config)
    recipe, datasets = ctx.target.trial_stage(ctx.target.make_plan(args), ctx.init_from)
    # The trial keeps (and stops early on) the best epoch by the sweep's metric. Its MLflow run is the
    # driver's (tuning.runs.TrialRuns, from the results Tune gets): the workers log nothing themselves.
    run = replace(ctx.run, storage_path=str(Path(ctx.sweep_dir) / "trials" / trial_id),
                  callbacks=[TuneReportCallback()])
    run_stage(_for_trial(recipe, ctx.metric, ctx.mode), datasets, run)
