"""One pipeline invocation: its folder, its MLflow parent run, its stages, its result.json.

State lives in ``<storage>/<run-name>/pipeline_state.json``: the MLflow run ids and every finished
stage's outcome. Re-running the same command with the same ``--run-name`` after the driver died
reuses the parent run, skips finished stages and lets Ray Train resume the unfinished one from its
last checkpoint (same run folder, same stage name).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from pipelines import console
from pipelines.recipe import RESULT_FILE, RUN_STATE_FILE, StageRecipe, jsonable
from pipelines.tracking import Tracker, log_stage_artifacts, system_metrics_interval
from pipelines.train_loop import EvalSet, RunOptions, StageOutcome, run_stage


def require_tracking(args) -> None:
    """Stop in one line when ``--mlflow-uri`` is a tracking server that does not answer. Each entry point
    calls it first, before any data is read or Ray starts (building the Ray Datasets starts Ray)."""
    from pipelines.tracking import require_server, resolve_tracking_uri

    require_server(resolve_tracking_uri(args.mlflow_uri))


class PipelineRun:
    def __init__(self, *, run_dir: Path, run: RunOptions, tracking_uri: str, experiment: str, run_name: str,
                 tags: dict, params: dict, register: Optional[str] = None, fault: Optional[str] = None):
        self.register = register
        self.fault = fault  # tests: "stage:epoch:step:rank:marker" kills one worker of that stage once
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = RunOptions(**{**run.__dict__, "storage_path": str(run_dir)})
        self.tracker = Tracker(tracking_uri, experiment)
        self.state_path = run_dir / RUN_STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}
        self.started = time.time()
        parent = self.state.get("parent_run_id")
        if parent and self.tracker.retrying("find the parent run", lambda: self.tracker.run_exists(parent),
                                            required=True):
            print(f"resuming run {run_name!r} (MLflow run {parent}); finished stages: "
                  f"{', '.join(self.state['stages']) or 'none'}")
        else:
            parent = self.tracker.retrying("start the parent run",
                                           lambda: self.tracker.start_run(run_name, tags=tags, params=params),
                                           required=True)
            self.state["parent_run_id"] = parent
        self.parent_id = parent
        self._save()

    @classmethod
    def from_args(cls, args, *, pipeline: str, run_name_prefix: str, tags: dict) -> "PipelineRun":
        """The run folder, Ray options and MLflow parent run from the shared CLI flags."""
        from pipelines import cli
        from pipelines.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(args.mlflow_uri)   # checked already: require_tracking
        cli.init_ray(args.address)
        run_name = args.run_name or cli.default_run_name(run_name_prefix)
        run_dir = cli.storage_root(args.storage_path) / run_name
        run = RunOptions(storage_path=str(run_dir), num_workers=args.num_workers, use_gpu=args.use_gpu,
                         cpus_per_worker=cli.cpus_per_worker(args), max_failures=args.max_failures)
        params = {k: v for k, v in vars(args).items() if k not in ("explicit", "fault")}
        return cls(run_dir=run_dir, run=run, tracking_uri=tracking_uri,
                   experiment=args.experiment, run_name=run_name, params=params,
                   register=getattr(args, "register", None), fault=getattr(args, "fault", None),
                   tags={"pipeline": pipeline, **tags})

    def print_summary(self, result: dict, path: Path, title: str) -> None:
        from pipelines import cli

        rows = [(k, cli.fmt(v)) for k, v in result.items() if k.startswith("test_") and not isinstance(v, list)]
        rows += [("mlflow run", self.parent_id),
                 ("mlflow ui", f"mlflow ui --backend-store-uri {self.tracker.uri}"),
                 ("result", str(path)), ("wall time", f"{time.time() - self.started:.0f} s")]
        cli.print_table(rows, title)

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(jsonable(self.state), indent=1))
        tmp.replace(self.state_path)

    def _fault(self, stage: str) -> Optional[dict]:
        if not self.fault:
            return None
        name, epoch, step, rank, marker = self.fault.split(":", 4)
        return {"epoch": int(epoch), "step": int(step), "rank": int(rank), "marker": marker} if name == stage else None

    def stage(self, recipe: StageRecipe, datasets: dict, *, manifests: dict,
              tests: Optional[dict[str, EvalSet]] = None) -> dict:
        """Train one stage (or reuse it when finished) and score its best checkpoint on ``tests``.

        Returns ``{"outcome": StageOutcome fields, "tests": {name: metrics}, "mlflow_run_id": ...}``.
        """
        name = recipe.name
        done = self.state["stages"].get(name)
        if done:
            print(f"[{name}] already finished in this run: best checkpoint {done['outcome']['best_checkpoint']}")
            return done
        child = self.state.setdefault("child_runs", {}).get(name)
        # A stage starts only with its MLflow run (the server may have gone down since the last stage,
        # whose results are saved: the error says how to continue).
        resume_hint = f"start {name}'s MLflow run; the finished stages are saved, rerun the same command " \
                      f"with --run-name {self.run_dir.name} to continue"
        if not child or not self.tracker.retrying(resume_hint, lambda: self.tracker.run_exists(child), required=True):
            child = self.tracker.retrying(resume_hint, lambda: self.tracker.start_run(
                name, parent_id=self.parent_id, params=recipe.to_dict()), required=True)
            self.state["child_runs"][name] = child
            self._save()
            self.tracker.retrying(f"{name}: dataset inputs", lambda: self.tracker.log_dataset_inputs(child, manifests))
        print(f"[{name}] training: {recipe.epochs} epochs max, monitor val_{recipe.monitor} "
              f"({recipe.monitor_mode}), {self.run.num_workers} workers")
        tests = tests or {}
        try:
            outcome: StageOutcome = run_stage(recipe, datasets, self.run, tests=tests, fault=self._fault(name),
                                              mlflow={"tracking_uri": self.tracker.uri, "run_id": child,
                                                      "system_metrics": system_metrics_interval()})
        finally:
            console.flush()  # the stage's last worker lines before the driver's own
        if not outcome.best_checkpoint:
            raise RuntimeError(f"stage {name} reported no checkpoint")
        test_results = outcome.info.pop("tests", {})
        # The checkpoints are on the storage path already; from here on an MLflow server that is down
        # (and stays down through the retries) costs only what could not be logged, named in one line.
        unlogged_before = len(self.tracker.unlogged)
        track = self.tracker.retrying
        track(f"{name}: per-epoch metrics", lambda: self.tracker.backfill_history(child, outcome.history))
        model_uri = track(f"{name}: best checkpoint, model, test metrics and plots",
                          lambda: log_stage_artifacts(self.tracker, child, checkpoint_dir=outcome.best_checkpoint,
                                                      manifests=manifests,
                                                      tests={k: {**v, "classes": tests[k].classes or recipe.classes}
                                                             for k, v in test_results.items()}))
        track(f"{name}: best_epoch", lambda: self.tracker.log_metrics(
            child, {"best_epoch": outcome.info.get("best_epoch", -1)}))
        track(f"{name}: end of its run", lambda: self.tracker.end_run(child))
        unlogged = self.tracker.unlogged[unlogged_before:]
        if unlogged:
            print(f"[{name}] MLflow server {self.tracker.uri} unreachable: not logged: {'; '.join(unlogged)} "
                  f"(the stage is finished and saved: checkpoints in {outcome.path})")
        record = {"outcome": asdict(outcome), "tests": {k: v["metrics"] for k, v in test_results.items()},
                  "mlflow_run_id": child, "model_uri": model_uri, "mlflow_unlogged": unlogged}
        self.state["stages"][name] = jsonable(record)
        self._save()
        return self.state["stages"][name]

    def register_final_model(self, name: str, alias: str = "candidate") -> dict:
        """Register the last stage's logged model as a new version of ``name`` and point ``alias``
        at it; ``models:/<name>@<alias>`` then loads it (``python -m pipelines.predict --model``)."""
        import mlflow

        stage, record = list(self.state["stages"].items())[-1]
        version = mlflow.register_model(record.get("model_uri") or f"runs:/{record['mlflow_run_id']}/model", name)
        self.tracker.client.set_registered_model_alias(name, alias, version.version)
        uri = f"models:/{name}@{alias}"
        print(f"registered {stage}'s model as {name} version {version.version} ({uri})")
        return {"name": name, "version": int(version.version), "alias": alias, "uri": uri, "stage": stage}

    def finish(self, result: dict) -> Path:
        result = {**result, "mlflow_run_id": self.parent_id, "tracking_uri": self.tracker.uri,
                  "run_dir": str(self.run_dir), "seconds": round(time.time() - self.started, 1)}
        unlogged_before = len(self.tracker.unlogged)
        if self.register and self.state["stages"]:
            registered = self.tracker.retrying(f"register the model as {self.register}",
                                               lambda: self.register_final_model(self.register))
            if registered:
                result["registered_model"] = registered
        path = self.run_dir / RESULT_FILE
        path.write_text(json.dumps(jsonable(result), indent=2))
        track = self.tracker.retrying
        track("the parent run's test metrics", lambda: self.tracker.log_metrics(
            self.parent_id, {k: v for k, v in result.items() if k.startswith("test_")}))
        track("result.json", lambda: self.tracker.client.log_artifact(self.parent_id, str(path)))
        track("the end of the parent run", lambda: self.tracker.end_run(self.parent_id))
        unlogged = self.tracker.unlogged[unlogged_before:]
        if unlogged:
            print(f"MLflow server {self.tracker.uri} unreachable: not logged: {'; '.join(unlogged)} "
                  f"(result.json is written: {path})")
        if self.tracker.unlogged:
            result["mlflow_unlogged"] = list(self.tracker.unlogged)
            path.write_text(json.dumps(jsonable(result), indent=2))
        return path

