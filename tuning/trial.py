"""One trial: a Ray Tune function that builds the pipeline's trial stage and fits it on Ray Train.

A trial's config maps recipe field paths to values. :func:`run_trial` applies them to a copy of the
sweep's plan (``plan.recipe.with_overrides(config)``), asks the pipeline for the stage a trial trains
(``Pipeline.trial(plan, init_from)``: the recipe and its data, exactly as ``python pipelines/<name>.py``
would build them), makes the recipe select (and stop early) on the sweep's metric, and fits it with
``run_stage(..., test=False)``: trials never score the test splits.

Tune runs :func:`run_trial` in a small actor that only drives: it reserves no CPU of its own (only
some memory), the ``TorchTrainer`` it starts takes ``num_workers x cpus_per_worker``, and
``TuneReportCallback`` forwards every epoch's ``ray.train.report`` to Tune (one Tune iteration per
epoch, which is what ASHA counts). The driver's :class:`tuning.runs.TrialRuns` makes every trial an
MLflow child run of the sweep's parent run from those results; the sweep's stage one, trained once
by the driver outside Tune (:func:`fit_stage_one`), is a child run made here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from pipelines.recipe import StageRecipe
from pipelines.tracking import Tracker
from pipelines.train_loop import RunOptions, StageData, StageOutcome, run_stage
from tuning.runs import OUTCOME_TAG, TRIAL_TAG, summarize
from tuning.sweep import trial_overrides


@dataclass
class TrialContext:
    """What every trial needs besides its sampled config (sent once through the object store)."""

    pipeline: str                   # the registry name
    plan: Any                       # the sweep's plan: the base of every trial
    sweep_dir: str
    metric: str
    mode: str
    init_from: Optional[str] = None


def for_sweep(recipe: StageRecipe, metric: str, mode: str) -> StageRecipe:
    """The trial's recipe: it keeps (and stops early on) the best epoch by the sweep's ``metric`` / ``mode``.

    The recipe's ``floor`` belongs to its own metric and direction: it is kept only when they are the
    sweep's."""
    select = recipe.select
    name = metric[len("val_"):]
    floor = select.floor if (select.metric, select.mode) == (name, mode) else None
    return recipe.replace(select=dataclasses.replace(select, metric=name, mode=mode, floor=floor))


def trial_plan(plan, config: dict):
    """A copy of the plan whose recipe has the trial's values."""
    return replace(plan, recipe=plan.recipe.with_overrides(trial_overrides(config)))


def fit_stage_one(tracker: Tracker, parent_id: str, recipe: StageRecipe, data: StageData, run: RunOptions, *,
                  tags: dict, run_id: Optional[str] = None, on_run=None) -> StageOutcome:
    """The sweep's stage one (two_stage), trained once by the driver outside Tune: an MLflow child run
    of ``parent_id`` tagged ``sweep_trial=stage1`` (``run_id``, reopened, when a resumed sweep trains it
    again; ``on_run`` is told a new run's id), per-epoch curves logged by the rank-0 worker, then the
    best epoch and the run closed. Its test splits are not scored: the sweep selects on validation."""
    print(f"[stage1] training stage one once for the sweep ({recipe.epochs} epochs, the recipe's stage one)")
    if run_id is None:
        run_id = tracker.start_run("stage1", parent_id=parent_id, tags={TRIAL_TAG: "stage1", **tags},
                                   params=recipe.to_dict())
        if on_run is not None:
            on_run(run_id)
    else:
        tracker.client.update_run(run_id, status="RUNNING")
    try:
        outcome = run_stage(recipe, data, run, mlflow={"tracking_uri": tracker.uri, "run_id": run_id}, test=False)
    except KeyboardInterrupt:   # reopened by the resumed sweep
        tracker.end_run(run_id, status="KILLED")
        raise
    select = recipe.select
    tracker.log_metrics(run_id, summarize(outcome.history, f"val_{select.metric}", select.mode))
    early = bool(outcome.info.get("stopped_early"))
    tracker.client.set_tag(run_id, OUTCOME_TAG, "early_stopped" if early else "completed")
    tracker.end_run(run_id)
    return outcome


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune trainable: the sweep's plan with this trial's values, the pipeline's own stage, one fit."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.registry import get_pipeline

    trial_id = tune.get_context().get_trial_id()
    plan = trial_plan(ctx.plan, config)
    recipe, data = get_pipeline(ctx.pipeline).trial(plan, ctx.init_from)
    # Its MLflow run is the driver's (tuning.runs.TrialRuns, from the results Tune gets): the workers log
    # nothing themselves.
    run = replace(plan.run, storage_path=str(Path(ctx.sweep_dir) / "trials" / trial_id),
                  callbacks=[TuneReportCallback()])
    run_stage(for_sweep(recipe, ctx.metric, ctx.mode), data, run, test=False)
