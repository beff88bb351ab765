"""Tests of the ``tuning`` sweep CLI, through what it leaves behind: its exit code and stdout,
``trials.csv``, ``best_recipe.yaml`` / ``best_config.yaml``, the checkpoints' ``meta.json`` and the MLflow runs.

Two tiny sweeps run once each (module-scoped) and the slow tests read what they left behind:

- ``swept``: two_stage, stage one trained once (one epoch), then one stage-two trial (two epochs) per
  ``stage2.optimizer.lr`` of the grid [3e-3, 10], one at a time, under ASHA on ``val_mse``. lr = 10
  wrecks the stage-one weights within its first epoch (saturated, constant VA: a validation MSE far
  above the others'), so ASHA, which has the first trial's epoch-one MSE on its rung, stops it there.
  (lr = 1e-9 is not reliably worse here: stage one is already good and batch-norm statistics still adapt.)
- ``resumed``: two_stage ``--mode one_stage --task multi`` (a trial is stage one: its lr, decay and VA
  weight are ``stage1``'s fields), two Optuna trials of one epoch under FIFO, started in a child
  process that gets SIGINT once the second trial is training; the same command run again resumes it.

The flag and search-space tests need no Ray.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines import cli
from tuning import sweep
from tuning.__main__ import main
from tuning.space import Dim

REPO = Path(__file__).resolve().parents[1]
TINY = ["--demo-images-per-class", "6", "--image-size", "32", "--backbone", "resnet10t", "--batch-size", "8",
        "--num-workers", "1", "--seed", "3"]
SMALL_DEMO = ["--demo-images-per-class", "6"]     # the flag tests: the small demo set, already ingested
GRID = [3e-3, 10.0]      # a good trial, then one ASHA stops at its first rung (cut: the first's value)
WRECKING_LR = 10.0
LR, DECAY = "stage2.optimizer.lr", "stage2.optimizer.weight_decay"   # what a two-stage trial searches
CPU_RETURN_S = 60       # how long the stopped trial's CPUs may take to come back


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sweep_runs(uri: str, name: str):
    """(parent run, {sweep_trial tag: child run}) of the sweep called ``name``; no tag twice."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"tags.sweep = 'true' and tags.mlflow.runName = '{name}'")
    assert len(parents) == 1, parents
    parent = parents[0]
    children = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    tags = [r.data.tags["sweep_trial"] for r in children]
    assert len(tags) == len(set(tags)), tags       # one run per trial
    return parent, {r.data.tags["sweep_trial"]: r for r in children}


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _cpus_back(ray, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _run(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuning")
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({LR: {"grid": GRID}}))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = [*TINY, "--num-epochs", "1", "--stage2-epochs", "2", "--num-samples", "1", "--max-concurrent", "1",
            "--metric", "val_mse", "--mode", "min", "--space", str(space), "--storage-path", str(tmp / "runs"),
            "--mlflow-uri", uri, "--sweep-name", "tiny"]
    code, stdout = _run(argv)
    assert code == 0
    sweep_dir = tmp / "runs" / "tiny"
    parent, children = _sweep_runs(uri, "tiny")
    return SimpleNamespace(tmp=tmp, dir=sweep_dir, uri=uri, argv=argv, stdout=stdout,
                           rows=_rows(sweep_dir / "trials.csv"), parent=parent, children=children)


@pytest.mark.slow
def test_every_trial_is_a_child_run_with_its_fields(swept):
    client = _client(swept.uri)
    parent = swept.parent
    assert parent.data.tags["pipeline"] == "two_stage" and parent.info.status == "FINISHED"
    assert parent.data.params[f"space.{LR}"] == f"grid({', '.join(repr(v) for v in GRID)})"
    assert parent.data.metrics["best_val_mse"] == pytest.approx(float(swept.rows[0]["val_mse"]))
    stage1 = swept.children.pop("stage1")           # stage one trained once, as a child of the sweep
    assert stage1.info.status == "FINISHED" and len(client.get_metric_history(stage1.info.run_id, "val_mse")) == 1
    trials = swept.children
    assert sorted(trials) == sorted(r["trial_id"] for r in swept.rows)
    assert sorted(float(r.data.params[LR]) for r in trials.values()) == sorted(GRID)
    by_id = {r["trial_id"]: r for r in swept.rows}
    for trial_id, run in trials.items():
        row = by_id[trial_id]
        assert row["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["pipeline"] == "two_stage"
        # The params are the trial's config, by field path: --task single has no VA weight to search.
        assert set(run.data.params) == {LR, DECAY}
        assert 1e-5 <= float(run.data.params[DECAY]) <= 1e-3  # a decade either side of the demo's 1e-4
        # Per-epoch curves at step = epoch: one point per epoch Tune got, training and validation.
        history = client.get_metric_history(run.info.run_id, "val_mse")
        assert [m.step for m in history] == list(range(int(row["epochs_run"])))
        assert any(k.startswith("train_") for k in run.data.metrics)
        assert run.data.metrics["best_val_mse"] == pytest.approx(min(m.value for m in history))
        assert run.data.metrics["best_val_mse"] == pytest.approx(float(row["val_mse"]))
        assert run.data.metrics["best_epoch"] == int(row["best_epoch"])
        # The stage-two recipe the trial trained, from the one stage-one checkpoint of the sweep,
        # selecting on the sweep's metric.
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        assert meta["recipe"]["optimizer"]["lr"] == pytest.approx(float(run.data.params[LR]))
        assert meta["recipe"]["optimizer"]["weight_decay"] == pytest.approx(float(run.data.params[DECAY]))
        assert (meta["recipe"]["select"]["metric"], meta["recipe"]["select"]["mode"]) == ("mse", "min")
    inits = {json.loads((Path(r["checkpoint"]) / "meta.json").read_text())["recipe"]["init_from"] for r in swept.rows}
    assert len(inits) == 1 and Path(next(iter(inits))).is_relative_to(swept.dir)


@pytest.mark.slow
def test_asha_stops_the_wrecked_trial_and_its_cpus_come_back(swept, ray_session):
    epochs = {float(r[LR]): int(r["epochs_run"]) for r in swept.rows}
    assert len(swept.rows) == len(GRID) and set(epochs) == set(GRID)   # the sweep ran every trial
    assert epochs[WRECKING_LR] < 2, epochs                  # max_t = the trial's 2 epochs
    assert all(n == 2 for lr, n in epochs.items() if lr != WRECKING_LR), epochs
    statuses = {float(r[LR]): r["status"] for r in swept.rows}
    assert statuses == {lr: "stopped_by_scheduler" if lr == WRECKING_LR else "completed" for lr in GRID}
    runs = {float(r.data.params[LR]): r for r in swept.children.values() if LR in r.data.params}
    stopped = runs[WRECKING_LR]
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped_by_scheduler"] == "true"
    assert stopped.data.tags["sweep_outcome"] == "stopped_by_scheduler"
    assert stopped.data.metrics["last_val_mse"] > 0.5
    assert all(runs[lr].info.status == "FINISHED" for lr in GRID if lr != WRECKING_LR)
    # The stopped trial's Ray Train workers give their CPUs back (Ray Train's own placement-group
    # cleaner removes their placement group once the trial's controller is gone).
    assert _cpus_back(ray_session, CPU_RETURN_S), ray_session.available_resources()


@pytest.mark.slow
def test_ranked_table_trials_csv_and_best_config(swept):
    from pipelines.recipe import Recipe
    from pipelines.two_stage import SECTIONS

    mse = [float(r["val_mse"]) for r in swept.rows]
    assert mse == sorted(mse) and [r["rank"] for r in swept.rows] == [str(i + 1) for i in range(len(GRID))]
    assert swept.rows[-1]["status"] == "stopped_by_scheduler" and float(swept.rows[-1][LR]) == WRECKING_LR
    out = swept.stdout
    table = out[out.index("trials ranked by val_mse (min)"):]
    assert all(h in table for h in (LR, DECAY, "val_mse", "epochs", "status"))
    positions = [table.index(r["trial_id"]) for r in swept.rows]   # the table lists the trials best first
    assert positions == sorted(positions)
    best_config, best_recipe = swept.dir / "best_config.yaml", swept.dir / "best_recipe.yaml"
    assert str(best_config) in out and str(best_recipe) in out and swept.parent.info.run_id in out
    assert f"pipelines/two_stage.py --config {best_config}" in out
    # best_config.yaml: the recipe file and the sweep's data and run flags, no recipe flag twice.
    config = yaml.safe_load(best_config.read_text())
    assert config["recipe"] == str(best_recipe)
    assert (config["demo_images_per_class"], config["num_workers"], config["mlflow_uri"]) == (6, 1, swept.uri)
    assert not {"lr", "stage2_lr", "decay", "image_size", "batch_size", "backbone", "seed"} & set(config)
    # best_recipe.yaml: a recipe file --recipe reads, the sweep's recipe with the best trial's values.
    recipe = Recipe.load("two_stage", str(best_recipe), SECTIONS)
    best = swept.rows[0]
    stage2 = recipe.stage("stage2")
    assert stage2.optimizer.lr == pytest.approx(float(best[LR]))
    assert stage2.optimizer.weight_decay == pytest.approx(float(best[DECAY]))
    assert stage2.epochs == 2
    stage1 = recipe.stage("stage1")   # the demo's lr and decay, which trained the sweep's stage one
    assert (stage1.optimizer.lr, stage1.optimizer.weight_decay, stage1.epochs) == (2e-3, 1e-4, 1)
    assert (stage1.prep.size, stage1.batch_size, stage1.model.backbone, stage1.seed) == (32, 8, "resnet10t", 3)


@pytest.mark.slow
def test_best_config_retrains(swept):
    from pipelines import two_stage

    best_config, best_recipe = swept.dir / "best_config.yaml", swept.dir / "best_recipe.yaml"
    argv = ["--config", str(best_config), "--num-epochs", "1", "--stage2-epochs", "1", "--run-name", "retrain"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert two_stage.main(argv) == 0
    result = json.loads((swept.tmp / "runs" / "retrain" / "result.json").read_text())
    client = _client(swept.uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["recipe"] == str(best_recipe)
    stages = {r.data.tags["mlflow.runName"]: r.data.params for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    # What each stage trained with: the best trial's lr and decay for stage two, the base ones for stage one.
    assert float(stages["stage2"]["optimizer.lr"]) == pytest.approx(float(swept.rows[0][LR]))
    assert float(stages["stage2"]["optimizer.weight_decay"]) == pytest.approx(float(swept.rows[0][DECAY]))
    assert float(stages["stage1"]["optimizer.lr"]) == pytest.approx(2e-3)
    assert int(stages["stage1"]["prep.size"]) == 32 and stages["stage1"]["model.backbone"] == "resnet10t"


@pytest.mark.slow
def test_same_command_reports_the_finished_sweep_again(swept):
    code, out = _run(swept.argv)
    assert code == 0
    assert "already finished" in out and swept.parent.info.run_id in out
    parent, children = _sweep_runs(swept.uri, "tiny")      # no second parent, no new trials or stage one
    assert parent.info.run_id == swept.parent.info.run_id and len(children) == len(GRID) + 1
    assert _rows(swept.dir / "trials.csv") == swept.rows


# ----------------------------------------------------------------------------- an interrupted Optuna sweep

RESUMED_LR = (1e-3, 1e-2)
ALPHA = "stage1.loss.va_weight"


def _wait_for(condition, proc, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout_s} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def resumed(ray_session, tmp_path_factory):
    """An Optuna sweep started in a child process (on this session's Ray), interrupted with SIGINT while
    its second trial trains, then resumed by the same command."""
    tmp = tmp_path_factory.mktemp("resumed")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = [*TINY, "--mode", "one_stage", "--task", "multi", "--num-epochs", "1", "--num-samples", "2",
            "--max-concurrent", "1", "--search", "optuna", "--scheduler", "fifo",
            "--lr-range", *map(str, RESUMED_LR), "--storage-path", str(tmp / "runs"), "--mlflow-uri", uri,
            "--sweep-name", "resumed", "--address", ray_session.get_runtime_context().gcs_address]
    sweep_dir = tmp / "runs" / "resumed"
    trials = sweep_dir / "trials"
    log = tmp / "interrupted.log"     # a file, not a pipe: Tune's tables would fill a pipe nobody reads yet
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuning", *argv], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            # The second trial's Ray Train run folder: the first trial has finished (one at a time).
            _wait_for(lambda: trials.is_dir() and len(list(trials.iterdir())) == 2, proc, log, 400, "second trial")
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    first_out = log.read_text()
    parent, runs = _sweep_runs(uri, "resumed")
    interrupted = SimpleNamespace(code=proc.returncode, stdout=first_out, csv_written=(sweep_dir / "trials.csv").exists(),
                                  parent=parent, runs=runs)
    code, out = _run(argv)
    parent, children = _sweep_runs(uri, "resumed")
    return SimpleNamespace(dir=sweep_dir, uri=uri, argv=argv, interrupted=interrupted, code=code, stdout=out,
                           rows=_rows(sweep_dir / "trials.csv") if code == 0 else [], parent=parent,
                           children=children)


@pytest.mark.slow
def test_an_optuna_sweep_runs_its_trials_inside_the_ranges(resumed):
    assert resumed.code == 0
    parent = resumed.parent
    assert parent.info.status == "FINISHED" and parent.data.params["search"] == "optuna"
    assert parent.data.params[f"space.{ALPHA}"] == "uniform(0.1, 0.9)"
    assert len(resumed.rows) == 2 and {r["status"] for r in resumed.rows} == {"completed"}
    assert sorted(resumed.children) == sorted(r["trial_id"] for r in resumed.rows)
    configs = []
    for run in resumed.children.values():
        params = {k: float(v) for k, v in run.data.params.items()}
        assert set(params) == {"stage1.optimizer.lr", "stage1.optimizer.weight_decay", ALPHA}
        assert RESUMED_LR[0] <= params["stage1.optimizer.lr"] <= RESUMED_LR[1]
        assert 1e-5 <= params["stage1.optimizer.weight_decay"] <= 1e-3
        assert 0.1 <= params[ALPHA] <= 0.9
        assert run.info.status == "FINISHED" and run.data.metrics["epochs_run"] == 1
        configs.append(params)
    assert configs[0] != configs[1]
    # Optuna sampled them: the sweep's TPE sampler (seeded with the recipe's seed, --seed 3), asked again,
    # suggests exactly these two configs.
    from tuning.driver import search_algorithm

    cfg = sweep.parse(resumed.argv)
    searcher = search_algorithm(cfg, max_concurrent=1)
    assert searcher.set_search_properties(cfg.metric, cfg.mode, cfg.param_space())
    first = searcher.suggest("first")
    searcher.on_trial_complete("first", result={cfg.metric: 0.5})
    second = searcher.suggest("second")
    assert sorted(sorted(c.items()) for c in (first, second)) == sorted(sorted(c.items()) for c in configs)
    for row in resumed.rows:       # the trial trained its sampled VA weight, on stage one's sections
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        assert meta["recipe"]["loss"]["va_weight"] == pytest.approx(float(row[ALPHA]))
        assert meta["recipe"]["name"] == "stage1" and meta["recipe"]["model"]["options"]["task"] == "multi"


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped(resumed):
    first = resumed.interrupted
    assert first.code == 130 and "interrupted: run the same command again" in first.stdout, first.stdout[-3000:]
    assert not first.csv_written and first.parent.info.status == "KILLED"
    # When it stopped: the first trial finished, the second's run was left open (KILLED, until the resume).
    done = [t for t, r in first.runs.items() if r.info.status == "FINISHED"]
    assert len(done) == 1 and len(first.runs) == 2, {t: r.info.status for t, r in first.runs.items()}
    (cut,) = set(first.runs) - set(done)
    assert first.runs[cut].info.status == "KILLED" and first.runs[cut].data.tags["sweep_interrupted"] == "true"
    # The same command resumed it: the same parent run, the same two trial runs (no duplicate, none open).
    assert resumed.code == 0 and "resuming sweep 'resumed'" in resumed.stdout
    assert resumed.parent.info.run_id == first.parent.info.run_id and resumed.parent.info.status == "FINISHED"
    assert sorted(resumed.children) == sorted(first.runs) == sorted(r["trial_id"] for r in resumed.rows)
    assert all(r.info.run_id == first.runs[t].info.run_id for t, r in resumed.children.items())
    assert {r.info.status for r in resumed.children.values()} == {"FINISHED"}
    assert "sweep_interrupted" not in resumed.children[cut].data.tags
    # The finished trial was not trained again: its run was not reopened and has its one epoch only.
    (finished,) = done
    client = _client(resumed.uri)
    assert resumed.children[finished].info.end_time == first.runs[finished].info.end_time
    assert len(client.get_metric_history(resumed.children[finished].info.run_id, "val_pearson_mean")) == 1
    assert [p.name for p in (resumed.dir / "trials" / finished / "stage1").glob("epoch_*")] == ["epoch_0000"]
    assert resumed.children[cut].data.metrics["epochs_run"] == 1


# ----------------------------------------------------------------------------- placement groups, trial runs

def test_release_removes_only_placement_groups_whose_train_workers_died(ray_session):
    """What an ASHA stop leaves: the trial's Ray Train controller is gone, its workers with it, their
    placement group still holds the CPUs. A run whose workers live keeps its placement group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tuning.cleanup import Releaser

    # Named as Ray Train's worker actors are.
    worker_cls = ray.remote(num_cpus=0.5)(type("RayTrainWorker", (), {"ping": lambda self: 1}))

    @ray.remote(num_cpus=0)
    class Controller:
        def start(self):
            self.pg = placement_group([{"CPU": 0.5}])
            ray.get(self.pg.ready())
            self.worker = worker_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg)).remote()
            ray.get(self.worker.ping.remote())
            return self.pg.id.hex()

    assert _cpus_back(ray_session, CPU_RETURN_S)
    total = ray.cluster_resources()["CPU"]
    live, stopped = Controller.remote(), Controller.remote()
    live_pg = ray.get(live.start.remote())
    ray.get(stopped.start.remote())
    ray.kill(stopped)
    release, deadline = Releaser(), time.monotonic() + CPU_RETURN_S
    while ray.available_resources().get("CPU", 0.0) < total - 0.5 and time.monotonic() < deadline:
        release()
        time.sleep(1.0)
    assert ray.available_resources().get("CPU", 0.0) == total - 0.5          # the live run's 0.5 CPU only
    assert ray.util.placement_group_table()[live_pg]["state"] == "CREATED"
    ray.kill(live)
    remove_placement_group(_pg(live_pg))
    assert _cpus_back(ray_session, CPU_RETURN_S)


def _pg(hex_id: str):
    import ray
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))


class _Trial:
    """What Tune's callbacks read of a trial."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config

    def __str__(self):
        return f"run_trial_{self.trial_id}"


def test_trial_runs_survive_a_restored_sweep(tmp_path):
    """Tune checkpoints the callback's state with the experiment and hands it back on ``Tuner.restore``
    (the callback itself comes back pickled with the run config): a restarted trial goes on in its own
    child run (reopened), not a second one, and an interrupted one is not left RUNNING meanwhile."""
    from pipelines.tracking import Tracker
    from tuning.runs import TrialRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "sweeps")
    parent = tracker.start_run("sweep", tags={"sweep": "true"})

    def callback():
        return TrialRuns(uri, tracker.experiment_id, parent, "val_mse", "min", max_t=3, tags={"pipeline": "two_stage"})

    def report(runs, trial, epoch, value, **extra):
        runs.on_trial_result(0, [], trial, {"epoch": epoch, "val_mse": value, "train_loss": value, "lr": 0.1,
                                            "training_iteration": epoch + 1, **extra})

    config = {"stage2.optimizer.lr": 1e-3, "stage2.loss.va_weight": 0.5}
    first = callback()
    resumed, stopped = _Trial("a_00000", config), _Trial("a_00001", {**config, "stage2.optimizer.lr": 10.0})
    first.on_trial_start(0, [], resumed)
    report(first, resumed, 0, 0.5)
    first.on_trial_start(0, [], stopped)
    report(first, stopped, 0, 2.0, done=True)             # Tune marks the result a scheduler stops at
    first.on_trial_complete(0, [], stopped)
    state = pickle.loads(pickle.dumps(first.get_state()))  # the sweep is interrupted here
    first.on_experiment_end([resumed, stopped])
    _, children = _sweep_runs(uri, "sweep")
    assert children["a_00000"].info.status == "KILLED" and children["a_00001"].info.status == "KILLED"

    second = pickle.loads(pickle.dumps(callback()))        # as Tuner.restore brings it back
    second.set_state(state)
    restarted = _Trial("a_00000", config)
    second.on_trial_start(0, [], restarted)
    _, children = _sweep_runs(uri, "sweep")
    assert len(children) == 2 and children["a_00000"].info.status == "RUNNING"
    report(second, restarted, 1, 0.3)
    report(second, restarted, 2, 0.4)
    second.on_trial_complete(0, [], restarted)

    _, children = _sweep_runs(uri, "sweep")
    assert sorted(children) == ["a_00000", "a_00001"]
    done, killed = children["a_00000"], children["a_00001"]
    assert done.info.status == "FINISHED" and done.data.tags["sweep_outcome"] == "completed"
    assert "sweep_interrupted" not in done.data.tags
    assert done.data.params == {"stage2.optimizer.lr": "0.001", "stage2.loss.va_weight": "0.5"}
    assert [m.value for m in tracker.client.get_metric_history(done.info.run_id, "val_mse")] == [0.5, 0.3, 0.4]
    assert [m.step for m in tracker.client.get_metric_history(done.info.run_id, "val_mse")] == [0, 1, 2]
    assert "lr" not in done.data.metrics                   # the curves are the val_* and train_* metrics
    assert (done.data.metrics["best_val_mse"], done.data.metrics["best_epoch"]) == (0.3, 1)
    assert done.data.metrics["epochs_run"] == 3
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by_scheduler"] == "true"
    assert killed.data.tags["sweep_outcome"] == "stopped_by_scheduler" and killed.data.metrics["last_val_mse"] == 2.0

    # A trial the restored state does not know (killed between two experiment checkpoints) finds its run,
    # which is open again until the trial ends anew.
    third = callback()
    third.on_trial_start(0, [], _Trial("a_00001", config))
    _, children = _sweep_runs(uri, "sweep")
    assert len(children) == 2 and children["a_00001"].info.run_id == killed.info.run_id
    assert children["a_00001"].info.status == "RUNNING"
    assert not {"sweep_outcome", "stopped_by_scheduler"} & set(children["a_00001"].data.tags)


# ----------------------------------------------------------------------------- flags and search space

def _error(argv, capsys) -> str:
    assert cli.run_main(lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["--search", "grid"], "invalid choice: 'grid'"),
    (["--pipeline", "nosuch"], "invalid choice: 'nosuch'"),
    (["--lr-range", "1e-2", "1e-4"], "--lr-range: needs LO < HI"),
    (["--decay-range", "0", "1e-3"], "--decay-range: 0.0 must be positive"),
    (["--task", "multi", "--alpha-range", "0.2", "1.5"], "--alpha-range: 1.5 lies outside"),
    (["--alpha-range", "0.2", "0.4"], "--alpha-range: two_stage (--mode two_stage --task single) has no alpha"),
    (["--pipeline", "sticker", "--alpha-range", "2.5", "8"], "--alpha-range: 2.5 must be an integer"),
    (["--bogus-flag"], "two_stage.py: unrecognized arguments: --bogus-flag"),
    (["--metric", "train_loss"], "validation metrics"),
    (["--num-epochs", "2", "--stage2-epochs", "2", "--grace-period", "3"], "exceeds a trial's 2 epochs"),
    (["--pipeline", "sticker", "--stage1-checkpoint", "x"], "sticker has no stage one"),
    (["--frameworks", "all"], "a sweep trial is one"),
])
def test_bad_flags_are_one_error_line(argv, message, capsys):
    assert message in _error([*SMALL_DEMO, *argv], capsys)


def test_a_stage_one_checkpoint_needs_a_trial_that_starts_from_one(ray_session, tmp_path, capsys):
    """--mode one_stage: a trial is stage one, it starts from no checkpoint (told once the pipeline is asked)."""
    line = _error([*SMALL_DEMO, "--mode", "one_stage", "--stage1-checkpoint", str(tmp_path),
                   "--storage-path", str(tmp_path / "runs"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                  capsys)
    assert "--stage1-checkpoint: a two_stage trial of this plan starts from no stage one" in line
    assert not (tmp_path / "mlflow.db").exists()        # before any MLflow run


@pytest.mark.parametrize("space, extra, message", [
    ({LR: {"grid": [1e-3, 1e-2]}}, ["--search", "optuna"], "need --search random"),
    ({LR: {"normal": [0, 1]}}, [], "expected one of loguniform"),
    ({LR: {"loguniform": [0, 1e-2]}}, [], f"{LR}: 0 must be positive"),
    ({"stage2.loss.va_weight": {"choice": [0.5, 2.0]}}, ["--task", "multi"], "2.0 lies outside [0.0, 1.0]"),
    ({"stage2.epochs": {"choice": [2, 4]}}, [], "stage2.epochs: cannot be searched (epochs are ASHA's budget"),
    ({"stage.model.backbone": {"choice": ["resnet18"]}}, [], "stage.model.backbone: cannot be searched"),
    ({"num_workers": 4}, [], "num_workers: not a field path of the two_stage recipe"),
    ({"lr": {"loguniform": [1e-4, 1e-2]}}, [], "lr: not a field path of the two_stage recipe"),
    ({"stage.optimizer.momentum": 0.8}, [], "stage.optimizer.momentum: cannot be searched (two_stage does not"),
    ({"stage.optimizer.bogus": 0.9}, [], "stage.optimizer.bogus: not a field of the two_stage recipe"),
    ({"stage.batch_size": {"choice": []}}, [], "choice needs a non-empty list"),
    ({"stage.optimizer.name": {"choice": ["adamw", "lion"]}}, [], "'lion' does not fit the recipe"),
])
def test_bad_space_files_name_the_file(tmp_path, capsys, space, extra, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    line = _error(["--space", str(path), *SMALL_DEMO, *extra], capsys)
    assert str(path) in line and message in line


def test_the_module_entry_point_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "tuning", "--scheduler", "hyperband"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "invalid choice" in proc.stderr
    # No circle: the command line is parsed without the driver (nor Ray).
    probe = ("import sys, tuning.sweep; "
             "print(sorted(m for m in ('tuning.driver', 'tuning.trial', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_spaces_name_recipe_fields_explicitly(tmp_path, capsys):
    from ray.tune.search.sample import Integer

    from tuning.trial import trial_plan

    # two_stage --mode two_stage --task multi: a trial is stage two, its VA weight is stage two's.
    multi = sweep.parse([*SMALL_DEMO, "--task", "multi"])
    assert multi.roles == {"lr": LR, "decay": DECAY, "alpha": "stage2.loss.va_weight"}
    assert multi.dims["stage2.loss.va_weight"] == Dim("stage2.loss.va_weight", "uniform", (0.1, 0.9))
    trial = trial_plan(multi.plan, {"stage2.loss.va_weight": 0.3}).recipe
    assert trial.stage("stage2").loss.va_weight == 0.3
    assert trial.stage("stage1").loss.va_weight == multi.plan.recipe.stage("stage1").loss.va_weight != 0.3
    # --mode one_stage --task multi: a trial is stage one.
    one_stage = sweep.parse([*SMALL_DEMO, "--mode", "one_stage", "--task", "multi", "--alpha-range", "0.2", "0.4"])
    assert one_stage.plan.mode == "one_stage" and one_stage.mode == "max"
    assert set(one_stage.dims) == {"stage1.optimizer.lr", "stage1.optimizer.weight_decay", "stage1.loss.va_weight"}
    assert one_stage.dims["stage1.loss.va_weight"] == Dim("stage1.loss.va_weight", "uniform", (0.2, 0.4))
    # --task single: the VA weight weighs a loss term that is off, so it is not searched.
    single = sweep.parse([*SMALL_DEMO, "--mode", "min"])
    assert single.mode == "min" and single.plan.mode == "two_stage" and set(single.dims) == {LR, DECAY}
    # sticker: alpha is LORA's integer token multiplier.
    sticker = sweep.parse([*SMALL_DEMO, "--pipeline", "sticker"])
    assert sticker.metric == "val_accuracy" and sticker.max_t == 4  # the sweep's demo preset
    lora_alpha = sticker.param_space()["stage.model.options.alpha"]
    # On the 64 px demo at most alpha 4 fits (alpha * sr^2 tokens per head); randint's upper bound is exclusive.
    assert isinstance(lora_alpha, Integer) and (lora_alpha.lower, lora_alpha.upper) == (1, 5)
    assert trial_plan(sticker.plan, {"stage.model.options.alpha": 3}).recipe.stage().model.options["alpha"] == 3
    # A --space key that is no sweepable field: one line naming the file.
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"alpha": {"uniform": [0.1, 0.9]}}))
    line = _error([*SMALL_DEMO, "--task", "multi", "--space", str(path)], capsys)
    assert str(path) in line and "alpha: not a field path of the two_stage recipe" in line


def test_space_file_adds_and_overrides_dimensions(tmp_path):
    from tuning.trial import trial_plan

    path = tmp_path / "space.json"
    path.write_text(json.dumps({LR: {"loguniform": [1e-4, 1e-2]}, "stage.batch_size": {"choice": [8, 16]},
                                "stage.schedule.warmup_epochs": {"int": [0, 2]}, DECAY: {"grid": [0.0, 1e-4]},
                                "stage.optimizer.name": "sgd"}))
    cfg = sweep.parse(["--space", str(path), *SMALL_DEMO, "--num-epochs", "3", "--lr-range", "1e-6", "1e-5"])
    assert cfg.dims[LR] == Dim(LR, "loguniform", (1e-4, 1e-2))   # the file wins over --lr-range
    assert cfg.dims["stage.batch_size"].kind == "choice"
    assert cfg.dims["stage.schedule.warmup_epochs"] == Dim("stage.schedule.warmup_epochs", "int", (0, 2))
    space = cfg.param_space()
    assert space[DECAY] == {"grid_search": [0.0, 1e-4]} and space["stage.optimizer.name"] == "sgd"
    # The explicit flag wins over the demo preset; the flag left out gets it.
    assert (cfg.plan.recipe.stage().epochs, cfg.plan.recipe.stage("stage2").epochs, cfg.max_t) == (3, 4, 4)
    recipe = trial_plan(cfg.plan, {LR: 3e-3, "stage.batch_size": 16, "stage.optimizer.name": "sgd"}).recipe
    assert (recipe.stage("stage2").optimizer.lr, recipe.stage("stage2").batch_size) == (3e-3, 16)
    assert recipe.stage("stage2").optimizer.name == "sgd"
    assert recipe.stage("stage1").optimizer.lr == cfg.plan.recipe.stage("stage1").optimizer.lr == 2e-3  # stage one's


def test_default_concurrency_leaves_half_the_cpus_to_ray_data():
    assert sweep.default_concurrency({"CPU": 2}, 2, 0.5, False) == 1
    assert sweep.default_concurrency({"CPU": 16}, 2, 1.0, False) == 4
    assert sweep.default_concurrency({"CPU": 16, "GPU": 4}, 2, 1.0, True) == 2
    assert sweep.default_concurrency({"CPU": 1}, 4, 1.0, False) == 1


def test_sweep_name_follows_the_command():
    a = sweep.default_sweep_name("two_stage", ["--num-samples", "4"])
    assert a == sweep.default_sweep_name("two_stage", ["--num-samples", "4"])
    assert a != sweep.default_sweep_name("two_stage", ["--num-samples", "5"])


def test_optuna_samples_inside_the_ranges_two_trials_at_a_time():
    from tuning.driver import search_algorithm

    cfg = sweep.parse([*SMALL_DEMO, "--search", "optuna", "--task", "multi", "--lr-range", "1e-4", "1e-3",
                       "--seed", "5"])
    assert cfg.seed == 5
    searcher = search_algorithm(cfg, max_concurrent=2)
    assert searcher.set_search_properties(cfg.metric, cfg.mode, cfg.param_space())
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert third is None                              # the concurrency limit holds the third back
    for config in (first, second):
        assert set(config) == {LR, DECAY, "stage2.loss.va_weight"}
        assert 1e-4 <= config[LR] <= 1e-3 and 1e-5 <= config[DECAY] <= 1e-3
        assert 0.1 <= config["stage2.loss.va_weight"] <= 0.9
    assert first != second


def test_summary_counts_epochs_by_their_number_and_skips_missing_values():
    from tuning.runs import summarize

    # A trial resumed after an interruption reports epochs 1 and 2 only; epoch 2 has no value.
    resumed = [{"epoch": 1, "val_mse": 0.3}, {"epoch": 2, "val_mse": float("nan")}]
    assert summarize(resumed, "val_mse", "min") == {"epochs_run": 3, "best_val_mse": 0.3, "best_epoch": 1,
                                                    "last_val_mse": 0.3}
    rows = [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.7}, {"epoch": 2, "val_acc": 0.6}]
    assert summarize(rows, "val_acc", "max")["best_epoch"] == 1
    assert summarize(rows, "val_acc", "min")["best_epoch"] == 0
    assert summarize([], "val_acc", "max") == {"epochs_run": 0}
