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
from typing import Optional, Sequence

from datasets_io import storage
from pipelines import console
from pipelines.checkpoints import RESULT_FILE, RUN_STATE_FILE
from pipelines.recipe import Recipe, StageRecipe, jsonable
from pipelines import system_metrics
from pipelines.tracking import Tracker, is_server_uri, log_stage_artifacts
from pipelines.train_loop import RunOptions, StageData, StageFailed, StageOutcome, run_stage
from pipelines.versions import version_params


def require_tracking(run: RunOptions) -> None:
    """Stop in one line when ``--mlflow-uri`` is a tracking server that does not answer. Each entry point
    calls it first, before any data is read or Ray starts (building the Ray Datasets starts Ray)."""
    from pipelines.tracking import require_server, resolve_tracking_uri

    require_server(resolve_tracking_uri(run.mlflow_uri))


def require_weights(*recipes: StageRecipe) -> None:
    """Before Ray starts or any data is read: every recipe's starting weights can be had (a local file
    exists; hub weights are in the local cache or download now; LORA has no hub weights), else one line
    naming the ways out. A start from scratch is said once, here and (as a tag) in MLflow."""
    from emotion_models.registry import HUB
    from emotion_models.weights import require_hub_weights

    said = set()
    for recipe in recipes:
        spec = recipe.model
        key = (spec.name, spec.backbone, spec.weights)
        if key in said:
            continue
        said.add(key)
        if spec.from_scratch:
            print(f"training from scratch: {spec.backbone or spec.name} starts from random weights (--weights none)")
        elif spec.weights == HUB:
            if spec.name != "va":
                from emotion_models.errors import ModelConfigError

                raise ModelConfigError(f"{spec.name} has no weights on the timm hub: pass --weights PATH (a local "
                                       "file, e.g. the published pvt_small.pth) or --weights none (train from scratch)")
            path = require_hub_weights(spec.backbone)
            print(f"pretrained weights: {spec.backbone} from the hub cache ({path})")
        elif not Path(spec.weights).expanduser().is_file():
            raise FileNotFoundError(f"{spec.weights}: no such weights file (--weights)")


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's page in the MLflow UI, in its model-training view (``workflowType=machine_learning``;
    MLflow 3's experiment tag ``mlflow.experimentKind`` alone did not switch the view). A tracking server
    serves the UI itself; a local store is opened with ``mlflow ui``, which listens on 127.0.0.1:5000."""
    base = tracking_uri.rstrip("/") if is_server_uri(tracking_uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


class PipelineRun:
    def __init__(self, *, run: RunOptions, run_name: str, tags: dict, recipe: Recipe):
        from pipelines.tracking import resolve_tracking_uri
        self.register = run.register
        self.fault = run.fault  # tests: "[hold:]stage:epoch:step:rank:marker[,...]" (see _fault)
        self.run_name = run_name
        self.run_dir = storage.join(run.storage_path, run_name)     # a folder, or a URI on object storage
        storage.makedirs(self.run_dir)
        self.run = RunOptions(**{**run.__dict__, "storage_path": self.run_dir})
        self.tracker = Tracker(resolve_tracking_uri(run.mlflow_uri), run.experiment)
        self.state_path = storage.join(self.run_dir, RUN_STATE_FILE)
        self.state = json.loads(storage.read_text(self.state_path)) if storage.is_file(self.state_path) \
            else {"stages": {}}
        self.started = time.time()
        parent = self.state.get("parent_run_id")
        if parent and self.tracker.retrying("find the parent run", lambda: self.tracker.run_exists(parent),
                                            required=True):
            print(f"resuming run {run_name!r} (MLflow run {parent}); finished stages: "
                  f"{', '.join(self.state['stages']) or 'none'}")
            self.tracker.retrying("reopen the parent run", lambda: self.tracker.reopen(parent))
        else:
            params = {"recipe": recipe.name, "num_workers": run.num_workers, "use_gpu": run.use_gpu,
                      **version_params()}
            parent = self.tracker.retrying("start the parent run", lambda: self.tracker.start_run(
                run_name, tags={**tags, "recipe": recipe.name}, params=params), required=True)
            self.tracker.retrying("the recipe", lambda: self.tracker.client.log_text(parent, recipe.to_yaml(),
                                                                                     "recipe.yaml"))
            self.state["parent_run_id"] = parent
        self.parent_id = parent
        self._save()

    @classmethod
    def start(cls, run: RunOptions, *, pipeline: str, run_name_prefix: str, tags: dict, recipe: Recipe) -> "PipelineRun":
        """Ray started, the run folder and the MLflow parent run (reused when ``--run-name`` names an
        earlier run) made."""
        from pipelines import cli

        cli.init_ray(run.address)
        return cls(run=run, run_name=run.run_name or cli.default_run_name(run_name_prefix),
                   tags={"pipeline": pipeline, **tags}, recipe=recipe)

    def print_summary(self, result: dict, path: str, title: str, keys: Sequence[str] = ()) -> None:
        """The run's headline test metrics (``keys``; every ``test_*`` metric is in result.json and MLflow),
        where its results are, how to open them, and how long it took."""
        from pipelines import cli

        rows = [(k, cli.fmt(result[k])) for k in keys if isinstance(result.get(k), (int, float))]
        rows += [("mlflow run", self.parent_id)]
        if not is_server_uri(self.tracker.uri):   # a tracking server serves its own UI
            rows += [("mlflow ui", f"mlflow ui --backend-store-uri {self.tracker.uri}")]
        rows += [("experiment", experiment_url(self.tracker.uri, self.tracker.experiment_id)),
                 ("result", str(path)), ("wall time", f"{time.time() - self.started:.0f} s")]
        cli.print_table(rows, title)

    def _end_open_runs(self, child: str, status: str) -> None:
        for run_id in (child, self.parent_id):
            try:
                self.tracker.end_run(run_id, status)
            except Exception as e:  # noqa: BLE001 - best effort on the way out; the rerun reopens them anyway
                print(f"could not mark MLflow run {run_id} {status}: {type(e).__name__}: {e}")

    def _save(self) -> None:
        storage.write_text(self.state_path, json.dumps(jsonable(self.state), indent=1))   # atomic: whole or old

    def _fault(self, stage: str) -> Optional[list]:
        """Tests: ``stage:epoch:step:rank:marker`` kills that worker once (the marker file says it fired);
        ``hold:stage:epoch:step:rank:marker`` stops it there once instead (see ``train_loop._maybe_inject_fault``);
        several, comma-separated, each fire once."""
        faults = []
        for item in (self.fault or "").split(","):
            if not item:
                continue
            action, spec = ("hold", item[len("hold:"):]) if item.startswith("hold:") else ("kill", item)
            name, epoch, step, rank, marker = spec.split(":", 4)
            if name == stage:
                faults.append({"epoch": int(epoch), "step": int(step), "rank": int(rank), "marker": marker,
                               "action": action})
        return faults or None

    def stage(self, recipe: StageRecipe, data: StageData, *, manifests: dict) -> dict:
        """Train one stage (or reuse it when finished) and score its selected checkpoint on ``data.tests``.

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
                      f"with --run-name {self.run_name} to continue"
        per_worker = recipe.per_worker_batch(self.run.num_workers)

        if child and self.tracker.retrying(resume_hint, lambda: self.tracker.run_exists(child), required=True):
            self.tracker.retrying(f"reopen {name}'s run", lambda: self.tracker.reopen(child))
        else:
            child = self.tracker.retrying(resume_hint, lambda: self.tracker.start_run(
                name, parent_id=self.parent_id, tags={"recipe": recipe.source, "pretrained": recipe.model.weights},
                params={**recipe.to_dict(), "per_worker_batch_size": per_worker,
                                                       **version_params()}), required=True)
            self.state["child_runs"][name] = child
            self._save()
            self.tracker.retrying(f"{name}: recipe and dataset inputs", lambda: (
                self.tracker.client.log_text(child, _yaml(recipe.to_dict()), "recipe.yaml"),
                self.tracker.log_dataset_inputs(child, manifests)))
        select = recipe.select
        print(f"[{name}] training: {recipe.epochs} epochs max, select val_{select.metric} ({select.mode}, keep "
              f"{select.keep}), batch {recipe.batch_size} = {self.run.num_workers} workers x {per_worker}")
        tests = data.tests
        try:
            outcome: StageOutcome = run_stage(recipe, data, self.run, fault=self._fault(name),
                                              mlflow={"tracking_uri": self.tracker.uri, "run_id": child,
                                                      "system_metrics": system_metrics.interval()})
        except StageFailed as exc:
            self.tracker.retrying(f"{name}: its failed status", lambda: self.tracker.end_run(child, "FAILED"))
            raise StageFailed(f"{exc}: rerun the same command with --run-name {self.run_name} to resume it "
                              f"(--max-failures {self.run.max_failures} retries were allowed)") from None
        except (KeyboardInterrupt, SystemExit):
            # Stopped from outside: Ctrl-C, or `ray job stop`, whose SIGTERM Ray's driver turns into SystemExit.
            # The stage's and the parent's runs end as KILLED (no longer RUNNING), once, without the outage
            # retries: the stop waits a few seconds only. The same command resumes them.
            self._end_open_runs(child, "KILLED")
            raise
        except Exception:
            # Anything else (a bug, or Ray losing one of its own actors to its memory monitor) keeps its
            # traceback, and the stage's and the parent's runs end FAILED rather than staying RUNNING.
            self._end_open_runs(child, "FAILED")
            raise
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
        track(f"{name}: best and selected epoch", lambda: self.tracker.log_metrics(
            child, {"best_epoch": outcome.info.get("best_epoch", -1),
                    "selected_epoch": outcome.info.get("selected_epoch", -1)}))
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

    def finish(self, result: dict) -> str:
        result = {**result, "mlflow_run_id": self.parent_id, "tracking_uri": self.tracker.uri,
                  "run_dir": self.run_dir, "seconds": round(time.time() - self.started, 1)}
        unlogged_before = len(self.tracker.unlogged)
        if self.register and self.state["stages"]:
            registered = self.tracker.retrying(f"register the model as {self.register}",
                                               lambda: self.register_final_model(self.register))
            if registered:
                result["registered_model"] = registered
        path = storage.join(self.run_dir, RESULT_FILE)
        storage.write_text(path, json.dumps(jsonable(result), indent=2))
        track = self.tracker.retrying
        track("the parent run's test metrics", lambda: self.tracker.log_metrics(
            self.parent_id, {k: v for k, v in result.items() if k.startswith("test_")}))
        track("result.json", lambda: self.tracker.client.log_text(self.parent_id, storage.read_text(path), RESULT_FILE))
        track("the end of the parent run", lambda: self.tracker.end_run(self.parent_id))
        unlogged = self.tracker.unlogged[unlogged_before:]
        if unlogged:
            print(f"MLflow server {self.tracker.uri} unreachable: not logged: {'; '.join(unlogged)} "
                  f"(result.json is written: {path})")
        if self.tracker.unlogged:
            result["mlflow_unlogged"] = list(self.tracker.unlogged)
            storage.write_text(path, json.dumps(jsonable(result), indent=2))
        return path



def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(jsonable(data), sort_keys=False)
