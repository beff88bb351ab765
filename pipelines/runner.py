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
from pipelines.tracking import Tracker, log_stage_artifacts
from pipelines.train_loop import EvalSet, RunOptions, StageOutcome, run_stage


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
        if parent and self.tracker.run_exists(parent):
            print(f"resuming run {run_name!r} (MLflow run {parent}); finished stages: "
                  f"{', '.join(self.state['stages']) or 'none'}")
        else:
            parent = self.tracker.start_run(run_name, tags=tags, params=params)
            self.state["parent_run_id"] = parent
        self.parent_id = parent
        self._save()

    @classmethod
    def from_args(cls, args, *, pipeline: str, run_name_prefix: str, tags: dict) -> "PipelineRun":
        """The run folder, Ray options and MLflow parent run from the shared CLI flags."""
        from pipelines import cli
        from pipelines.tracking import resolve_tracking_uri

        cli.init_ray(args.address)
        run_name = args.run_name or cli.default_run_name(run_name_prefix)
        run_dir = cli.storage_root(args.storage_path) / run_name
        run = RunOptions(storage_path=str(run_dir), num_workers=args.num_workers, use_gpu=args.use_gpu,
                         cpus_per_worker=cli.cpus_per_worker(args), max_failures=args.max_failures)
        params = {k: v for k, v in vars(args).items() if k not in ("explicit", "fault")}
        return cls(run_dir=run_dir, run=run, tracking_uri=resolve_tracking_uri(args.mlflow_uri),
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
        if not child or not self.tracker.run_exists(child):
            child = self.tracker.start_run(name, parent_id=self.parent_id, params=recipe.params())
            self.state["child_runs"][name] = child
            self._save()
            self.tracker.log_dataset_inputs(child, manifests)
        print(f"[{name}] training: {recipe.epochs} epochs max, monitor val_{recipe.monitor} "
              f"({recipe.monitor_mode}), {self.run.num_workers} workers")
        tests = tests or {}
        try:
            outcome: StageOutcome = run_stage(recipe, datasets, self.run, tests=tests, fault=self._fault(name),
                                              mlflow={"tracking_uri": self.tracker.uri, "run_id": child})
        finally:
            console.flush()  # the stage's last worker lines before the driver's own
        if not outcome.best_checkpoint:
            raise RuntimeError(f"stage {name} reported no checkpoint")
        test_results = outcome.info.pop("tests", {})
        model_uri = log_stage_artifacts(self.tracker, child, checkpoint_dir=outcome.best_checkpoint,
                                        manifests=manifests,
                                        tests={k: {**v, "classes": tests[k].classes or recipe.classes}
                                               for k, v in test_results.items()})
        self.tracker.log_metrics(child, {"best_epoch": outcome.info.get("best_epoch", -1)})
        self.tracker.end_run(child)
        record = {"outcome": asdict(outcome), "tests": {k: v["metrics"] for k, v in test_results.items()},
                  "mlflow_run_id": child, "model_uri": model_uri}
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
        if self.register and self.state["stages"]:
            result["registered_model"] = self.register_final_model(self.register)
        path = self.run_dir / RESULT_FILE
        path.write_text(json.dumps(jsonable(result), indent=2))
        self.tracker.log_metrics(self.parent_id, {k: v for k, v in result.items() if k.startswith("test_")})
        self.tracker.client.log_artifact(self.parent_id, str(path))
        self.tracker.end_run(self.parent_id)
        return path

