"""Run a sweep: MLflow parent run, stage one (two_stage), the Tune experiment (new or restored), reports.

:func:`run_sweep` takes the :class:`tuning.sweep.SweepConfig` that :func:`tuning.sweep.parse` made
(this module imports :mod:`tuning.sweep`, never the other way round).

Re-running the same command resumes: the sweep folder's ``sweep_state.json`` keeps the MLflow parent
run id and stage one's checkpoint (and MLflow run), and ``tune.Tuner.restore(..., resume_errored=True)``
picks the Tune experiment up (unfinished trials restart, their Ray Train runs resume from their last
checkpoint, and :class:`tuning.runs.TrialRuns`, restored with its state, reopens their MLflow runs).
A sweep that already finished only reports again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines import cli
from pipelines.checkpoints import read_meta
from pipelines.tracking import Tracker, resolve_tracking_uri
from pipelines.train_loop import RunOptions
from tuning import report
from tuning.cleanup import ReleaseStoppedTrials, settle
from tuning.report import recipe_file_text
from tuning.runs import OUTCOME_TAG, TrialRuns, child_runs
from tuning.sweep import STATE_FILE, SweepConfig, default_concurrency
from tuning.trial import TrialContext, fit_stage_one, run_trial

TRIAL_DRIVER_MEMORY = 256 * 1024 ** 2  # bytes
RECIPE_ARTIFACT = "recipe.yaml"         # the sweep's resolved recipe, on the parent run


@dataclass
class SweepOutcome:
    sweep_dir: Path
    parent_run_id: str
    rows: list                      # report.TrialRow, best first
    best_recipe: Path
    best_config: Path
    trials_csv: Path


class SweepState:
    """``sweep_state.json``: what a resumed sweep must find again."""

    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def set(self, **values) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _parent_run(cfg: SweepConfig, tracker: Tracker, state: SweepState) -> str:
    parent = state.get("parent_run_id")
    if parent and tracker.run_exists(parent):
        print(f"resuming sweep {cfg.name!r} (MLflow parent run {parent})")
        if not state.get("finished"):
            tracker.client.update_run(parent, status="RUNNING")   # KILLED when the sweep was interrupted
        return parent
    flags = report.retrain_flags(cfg.pipeline, cfg.args)
    params = {**{f"space.{path}": d.describe() for path, d in cfg.dims.items()},
              **{f"base.{k}": v for k, v in flags.items()},
              "recipe": cfg.plan.recipe.name, "search": cfg.search, "scheduler": cfg.scheduler,
              "num_samples": cfg.num_samples, "metric": cfg.metric, "mode": cfg.mode,
              "grace_period": cfg.grace_period, "max_t": cfg.max_t}
    parent = tracker.start_run(cfg.name, tags={"pipeline": cfg.pipeline.name, "sweep": "true"}, params=params)
    tracker.client.log_text(parent, recipe_file_text(cfg.plan.recipe), RECIPE_ARTIFACT)
    state.set(parent_run_id=parent)
    return parent


def _stage_one(cfg: SweepConfig, stage, tracker: Tracker, parent: str, state: SweepState,
               run: RunOptions) -> str:
    """Stage one's selected checkpoint: the one given, the one trained earlier in this sweep, or a new one."""
    if cfg.stage1_checkpoint:
        path = Path(cfg.stage1_checkpoint).expanduser().resolve()
        read_meta(path)  # one line if it is not a checkpoint folder
        return str(path)
    done = state.get("stage1_checkpoint")
    if done and Path(done).is_dir():
        print(f"[stage1] reusing this sweep's stage one: {done}")
        return done
    recipe, data = stage
    run_id = state.get("stage1_run_id")
    outcome = fit_stage_one(tracker, parent, recipe, data, run, tags={"pipeline": cfg.pipeline.name},
                            run_id=run_id if run_id and tracker.run_exists(run_id) else None,
                            on_run=lambda new: state.set(stage1_run_id=new))
    if not outcome.best_checkpoint:
        raise RuntimeError("stage one reported no checkpoint")
    state.set(stage1_checkpoint=outcome.best_checkpoint)
    return outcome.best_checkpoint


def _trial_dirname(trial) -> str:
    return trial.trial_id


def search_algorithm(cfg: SweepConfig, max_concurrent: int):
    """The searcher, with the concurrency limit built in (Tune ignores ``max_concurrent_trials`` for a
    ``BasicVariantGenerator`` instance, so it gets its own ``max_concurrent``)."""
    if cfg.search == "optuna":
        try:
            from optuna.samplers import TPESampler
        except ImportError:
            raise cli.UsageError("--search optuna needs optuna: pip install 'emotion-ray[optuna]'") from None
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=cfg.seed)), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.seed)


def _tuner(cfg: SweepConfig, ctx: TrialContext, sweep_dir: Path, max_concurrent: int, trial_runs: TrialRuns):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # The trial function only drives Ray Train: the trainer's workers hold the CPUs. Tune refuses an
    # empty request and any CPU share would leave Ray Data less than the whole core its tasks need,
    # so the trial reserves only some memory.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"memory": TRIAL_DRIVER_MEMORY})
    tune_dir = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(tune_dir)):
        # The run config (with its TrialRuns) comes back from the experiment, and TrialRuns's state
        # (trial -> MLflow run) from Tune's callback checkpoint: restarted trials keep their runs.
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    # stop_last_trials=False: a trial that reaches max_t ends by itself (its MLflow run FINISHED)
    # instead of being stopped at its last report (KILLED, stopped_by_scheduler).
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.max_t, grace_period=cfg.grace_period,
                              reduction_factor=2, stop_last_trials=False) if cfg.scheduler == "asha" \
        else FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=cfg.param_space(),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                    search_alg=search_algorithm(cfg, max_concurrent), num_samples=cfg.num_samples,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                  callbacks=[trial_runs, ReleaseStoppedTrials()]))


def run_sweep(cfg: SweepConfig) -> Optional[SweepOutcome]:
    """The whole sweep; ``None`` when it was interrupted (its state is kept for a resume)."""
    import ray

    run: RunOptions = cfg.plan.run
    sweep_dir = Path(run.storage_path) / cfg.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = SweepState(sweep_dir)
    cli.init_ray(run.address)
    max_concurrent = cfg.max_concurrent or default_concurrency(ray.cluster_resources(), run.num_workers,
                                                               run.cpus_per_worker, run.use_gpu)
    stage = cfg.pipeline.stage_one(cfg.plan)   # (recipe, data) of the stage trials start from, or None
    if cfg.stage1_checkpoint and stage is None:
        raise cli.UsageError(f"--stage1-checkpoint: a {cfg.pipeline.name} trial of this plan starts from no "
                             "stage one (it applies to two_stage --mode two_stage only)")
    tracker = Tracker(resolve_tracking_uri(run.mlflow_uri), run.experiment)
    parent = _parent_run(cfg, tracker, state)
    print(f"sweep {cfg.name}: {sweep_dir} ({cfg.num_samples} samples, {cfg.search} search, {cfg.scheduler}, "
          f"{cfg.max_t} epochs a trial, {max_concurrent} trial(s) at once x {run.num_workers} workers x "
          f"{run.cpus_per_worker} CPU)")
    stage_run = RunOptions(storage_path=str(sweep_dir), num_workers=run.num_workers, use_gpu=run.use_gpu,
                           cpus_per_worker=run.cpus_per_worker, max_failures=run.max_failures)
    try:
        init_from = _stage_one(cfg, stage, tracker, parent, state, stage_run) if stage is not None else None
    except KeyboardInterrupt:  # Ctrl+C while the driver trains stage one (Tune's own handler is not set yet)
        print(f"\nsweep {cfg.name!r} interrupted in stage one: run the same command again to resume it")
        tracker.end_run(parent, status="KILLED")
        return None
    ctx = TrialContext(pipeline=cfg.pipeline.name, plan=cfg.plan, sweep_dir=str(sweep_dir), metric=cfg.metric,
                       mode=cfg.mode, init_from=init_from)
    trial_runs = TrialRuns(tracker.uri, tracker.experiment_id, parent, cfg.metric, cfg.mode, cfg.max_t,
                           tags={"pipeline": cfg.pipeline.name})
    tuner = _tuner(cfg, ctx, sweep_dir, max_concurrent, trial_runs)
    if state.get("finished"):
        print(f"sweep {cfg.name!r} already finished; reporting its results (a new --sweep-name starts another)")
        results = tuner.get_results()
    else:
        results = tuner.fit()
        if _interrupted(cfg, results, child_runs(tracker.client, tracker.experiment_id, parent)):
            # Ctrl+C: Tune saved its state and returned early
            print(f"sweep {cfg.name!r} interrupted: run the same command again to resume it")
            tracker.end_run(parent, status="KILLED")
            return None
        settle()
    return _report(cfg, tracker, parent, state, sweep_dir, results)


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name   # the trial's folder is its id


def _interrupted(cfg: SweepConfig, results, runs: dict) -> bool:
    """Fewer trials than the search makes (``num_samples`` x grid points), or a trial that did not end.

    A trial ended when :class:`tuning.runs.TrialRuns` closed its run with a ``sweep_outcome``. Tune's
    own record does not tell: it ends the trials it is still running when it is interrupted and reports
    them TERMINATED, and the ``done`` mark of a trial's last result is not always in its saved state."""
    expected = cfg.num_samples * math.prod(len(d.values) for d in cfg.dims.values() if d.kind == "grid")
    ended = [r for r in results if _trial_id(r) in runs and OUTCOME_TAG in runs[_trial_id(r)].data.tags]
    return len(results) < expected or len(ended) < len(results)


def _report(cfg: SweepConfig, tracker: Tracker, parent: str, state: SweepState, sweep_dir: Path,
            results) -> SweepOutcome:
    runs = child_runs(tracker.client, tracker.experiment_id, parent)
    rows = report.rank([report.trial_row(r, runs, cfg.metric, cfg.mode, cfg.max_t) for r in results], cfg.mode)
    if not rows or rows[0].best is None:
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error]
        raise RuntimeError(f"no trial reported {cfg.metric}" + (f": {errors[0]}" if errors else ""))
    best = rows[0]
    dims = list(cfg.dims)
    csv_path = sweep_dir / "trials.csv"
    recipe_path, config_path = sweep_dir / "best_recipe.yaml", sweep_dir / "best_config.yaml"
    report.write_csv(rows, cfg.metric, csv_path, dims)
    report.write_best_recipe(cfg.plan.recipe, best, cfg.metric, recipe_path)
    given_storage = cfg.plan.run.storage_path if getattr(cfg.args, "storage_path", None) else None
    report.write_best_config(cfg.pipeline, cfg.args, recipe_path, best, cfg.metric, config_path, given_storage)
    tracker.log_metrics(parent, {f"best_{cfg.metric}": best.best})
    tracker.client.set_tag(parent, "best_trial", best.trial_id)
    for path in (csv_path, recipe_path, config_path):
        tracker.client.log_artifact(parent, str(path))
    tracker.end_run(parent)
    state.set(finished=True)
    print(f"\ntrials ranked by {cfg.metric} ({cfg.mode}):")
    print(report.table(rows, cfg.metric, dims))
    cli.print_table([("best trial", f"{best.trial_id} ({cfg.metric} {best.best:.4f})"),
                     ("best recipe", str(recipe_path)),
                     ("best config", str(config_path)),
                     ("retrain", f"python {cfg.pipeline.script} --config {config_path}"),
                     ("trials", str(csv_path)),
                     ("mlflow parent run", parent),
                     ("mlflow ui", f"mlflow ui --backend-store-uri {tracker.uri}")], f"sweep {cfg.name}")
    return SweepOutcome(sweep_dir=sweep_dir, parent_run_id=parent, rows=rows, best_recipe=recipe_path,
                        best_config=config_path, trials_csv=csv_path)
