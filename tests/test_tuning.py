"""Tests of the ``tuning`` sweep CLI, through what it leaves behind: its exit code and stdout,
``trials.csv``, ``best_config.yaml``, the checkpoints' ``meta.json`` and the MLflow runs.

One tiny two_stage sweep runs once (module-scoped) and the slow tests read what it left behind:
stage one trained once (one epoch), then one stage-two trial (two epochs) per lr of the grid
[3e-3, 10], one at a time, under ASHA on ``val_mse``. lr = 10 wrecks the stage-one weights
within its first epoch (saturated, constant VA: a validation MSE far above the others'), so ASHA,
which has the first trial's epoch-one MSE on its rung, stops it there. (lr = 1e-9 is not reliably
worse here: stage one is already good and batch-norm statistics still adapt.) The flag and
search-space tests need no Ray.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines import cli
from tuning import sweep
from tuning.space import Dim

REPO = Path(__file__).resolve().parents[1]
TINY = ["--demo-images-per-class", "6", "--image-size", "32", "--backbone", "resnet10t", "--batch-size", "8",
        "--num-workers", "1", "--seed", "3"]
GRID = [3e-3, 10.0]      # a good trial, then one ASHA stops at its first rung (cut: the first's value)
WRECKING_LR = 10.0
CPU_RETURN_S = 60       # how long the stopped trial's CPUs may take to come back


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sweep_runs(uri: str, name: str):
    """(parent run, {sweep_trial tag: child run}) of the sweep called ``name``."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"tags.sweep = 'true' and tags.mlflow.runName = '{name}'")
    assert len(parents) == 1, parents
    parent = parents[0]
    children = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
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


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuning")
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"grid": GRID}}))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = [*TINY, "--num-epochs", "1", "--stage2-epochs", "2", "--num-samples", "1", "--max-concurrent", "1",
            "--metric", "val_mse", "--mode", "min", "--space", str(space), "--storage-path", str(tmp / "runs"),
            "--mlflow-uri", uri, "--sweep-name", "tiny"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sweep.main(argv) == 0
    sweep_dir = tmp / "runs" / "tiny"
    parent, children = _sweep_runs(uri, "tiny")
    return SimpleNamespace(tmp=tmp, dir=sweep_dir, uri=uri, argv=argv, stdout=out.getvalue(),
                           rows=_rows(sweep_dir / "trials.csv"), parent=parent, children=children)


@pytest.mark.slow
def test_every_trial_is_a_child_run_with_lr_decay_alpha(swept):
    client = _client(swept.uri)
    parent = swept.parent
    assert parent.data.tags["pipeline"] == "two_stage" and parent.info.status == "FINISHED"
    assert parent.data.params["space.lr"] == f"grid({', '.join(repr(v) for v in GRID)})"
    assert parent.data.metrics["best_val_mse"] == pytest.approx(float(swept.rows[0]["val_mse"]))
    stage1 = swept.children.pop("stage1")           # stage one trained once, as a child of the sweep
    assert stage1.info.status == "FINISHED" and len(client.get_metric_history(stage1.info.run_id, "val_mse")) == 1
    trials = swept.children
    assert sorted(trials) == sorted(r["trial_id"] for r in swept.rows)
    assert sorted(float(r.data.params["lr"]) for r in trials.values()) == sorted(GRID)
    by_id = {r["trial_id"]: r for r in swept.rows}
    for trial_id, run in trials.items():
        row = by_id[trial_id]
        assert row["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["pipeline"] == "two_stage"
        assert float(run.data.params["alpha"]) == 0.9       # --task single: alpha2 kept at its flag value
        assert 1e-5 <= float(run.data.params["decay"]) <= 1e-3  # a decade either side of the demo's 1e-4
        # Per-epoch curves at step = epoch: one point per epoch Tune got, training and validation.
        history = client.get_metric_history(run.info.run_id, "val_mse")
        assert [m.step for m in history] == list(range(int(row["epochs_run"])))
        assert any(k.startswith("train_") for k in run.data.metrics)
        assert run.data.metrics["best_val_mse"] == pytest.approx(min(m.value for m in history))
        assert run.data.metrics["best_val_mse"] == pytest.approx(float(row["val_mse"]))
        assert run.data.metrics["best_epoch"] == int(row["best_epoch"])
        # The stage-two recipe the trial trained, from the one stage-one checkpoint of the sweep.
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        assert meta["recipe"]["optimizer"]["lr"] == pytest.approx(float(run.data.params["lr"]))
    inits = {json.loads((Path(r["checkpoint"]) / "meta.json").read_text())["recipe"]["init_from"] for r in swept.rows}
    assert len(inits) == 1 and Path(next(iter(inits))).is_relative_to(swept.dir)


@pytest.mark.slow
def test_asha_stops_the_wrecked_trial_and_its_cpus_come_back(swept, ray_session):
    epochs = {float(r["lr"]): int(r["epochs_run"]) for r in swept.rows}
    assert len(swept.rows) == len(GRID) and set(epochs) == set(GRID)   # the sweep ran every trial
    assert epochs[WRECKING_LR] < 2, epochs                  # max_t = the trial's 2 epochs
    assert all(n == 2 for lr, n in epochs.items() if lr != WRECKING_LR), epochs
    statuses = {float(r["lr"]): r["status"] for r in swept.rows}
    assert statuses == {lr: "stopped_by_scheduler" if lr == WRECKING_LR else "completed" for lr in GRID}
    runs = {float(r.data.params["lr"]): r for r in swept.children.values() if "lr" in r.data.params}
    stopped = runs[WRECKING_LR]
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped_by_scheduler"] == "true"
    assert stopped.data.metrics["last_val_mse"] > 0.5
    assert all(runs[lr].info.status == "FINISHED" for lr in GRID if lr != WRECKING_LR)
    # The stopped trial's Ray Train workers give their CPUs back (Ray Train's own placement-group
    # cleaner removes their placement group once the trial's controller is gone).
    assert _cpus_back(ray_session, CPU_RETURN_S), ray_session.available_resources()


@pytest.mark.slow
def test_ranked_table_trials_csv_and_best_config(swept):
    mse = [float(r["val_mse"]) for r in swept.rows]
    assert mse == sorted(mse) and [r["rank"] for r in swept.rows] == [str(i + 1) for i in range(len(GRID))]
    assert swept.rows[-1]["status"] == "stopped_by_scheduler" and float(swept.rows[-1]["lr"]) == WRECKING_LR
    out = swept.stdout
    table = out[out.index("trials ranked by val_mse (min)"):]
    assert all(h in table for h in ("lr", "decay", "alpha", "val_mse", "epochs", "status"))
    positions = [table.index(r["trial_id"]) for r in swept.rows]   # the table lists the trials best first
    assert positions == sorted(positions)
    best_config = swept.dir / "best_config.yaml"
    assert str(best_config) in out and swept.parent.info.run_id in out
    assert f"pipelines/two_stage.py --config {best_config}" in out
    best = yaml.safe_load(best_config.read_text())
    # A trial is stage two: the searched lr and decay are stage two's; stage one keeps the base flags.
    assert best["stage2_lr"] == pytest.approx(float(swept.rows[0]["lr"]))
    assert best["stage2_decay"] == pytest.approx(float(swept.rows[0]["decay"]))
    assert (best["lr"], best["decay"]) == (2e-3, 1e-4)  # the demo's, which trained the sweep's stage one
    assert (best["image_size"], best["batch_size"], best["backbone"]) == (32, 8, "resnet10t")


@pytest.mark.slow
def test_best_config_retrains(swept):
    from pipelines import two_stage

    best = swept.dir / "best_config.yaml"
    argv = ["--config", str(best), "--num-epochs", "1", "--stage2-epochs", "1", "--run-name", "retrain"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert two_stage.main(argv) == 0
    result = json.loads((swept.tmp / "runs" / "retrain" / "result.json").read_text())
    client = _client(swept.uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert float(parent.data.params["stage2_lr"]) == pytest.approx(float(swept.rows[0]["lr"]))
    stages = {r.data.tags["mlflow.runName"]: r.data.params for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    # What each stage trained with: the best trial's lr for stage two, the base lr for stage one.
    assert float(stages["stage2"]["optimizer.lr"]) == pytest.approx(float(swept.rows[0]["lr"]))
    assert float(stages["stage1"]["optimizer.lr"]) == pytest.approx(2e-3)


@pytest.mark.slow
def test_same_command_reports_the_finished_sweep_again(swept):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sweep.main(swept.argv) == 0
    assert "already finished" in out.getvalue() and swept.parent.info.run_id in out.getvalue()
    parent, children = _sweep_runs(swept.uri, "tiny")      # no second parent, no new trials or stage one
    assert parent.info.run_id == swept.parent.info.run_id and len(children) == len(GRID) + 1
    assert _rows(swept.dir / "trials.csv") == swept.rows


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
    """What Tune's logger callbacks read of a trial."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config

    def __str__(self):
        return f"run_trial_{self.trial_id}"


def test_trial_runs_survive_a_restored_sweep(tmp_path):
    """Tune checkpoints the MLflow callback's state with the experiment and hands it back on
    ``Tuner.restore``: a restarted trial goes on in its own child run (reopened), not a second one."""
    from pipelines.tracking import Tracker
    from tuning.runs import TrialRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "sweeps")
    parent = tracker.start_run("sweep", tags={"sweep": "true"})

    def callback():
        runs = TrialRuns(uri, "sweeps", parent, "val_mse", "min", max_t=3, tags={"pipeline": "two_stage"})
        runs.setup()
        return runs

    def report(runs, trial, epoch, value, **extra):
        runs.on_trial_result(0, [], trial, {"epoch": epoch, "val_mse": value, "train_loss": value,
                                            "training_iteration": epoch + 1, **extra})

    first = callback()
    resumed, stopped = _Trial("a_00000", {"lr": 1e-3, "alpha": 0.5}), _Trial("a_00001", {"lr": 10.0, "alpha": 0.5})
    first.on_trial_start(0, [], resumed)
    report(first, resumed, 0, 0.5)
    first.on_trial_start(0, [], stopped)
    report(first, stopped, 0, 2.0, done=True)             # Tune marks the result a scheduler stops at
    first.on_trial_complete(0, [], stopped)
    state = pickle.loads(pickle.dumps(first.get_state()))  # the sweep is interrupted here

    second = callback()
    second.set_state(state)
    restarted = _Trial("a_00000", {"lr": 1e-3, "alpha": 0.5})
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
    assert done.data.params == {"lr": "0.001", "alpha": "0.5"}
    assert [m.value for m in tracker.client.get_metric_history(done.info.run_id, "val_mse")] == [0.5, 0.3, 0.4]
    assert (done.data.metrics["best_val_mse"], done.data.metrics["best_epoch"]) == (0.3, 1)
    assert done.data.metrics["epochs_run"] == 3
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by_scheduler"] == "true"
    assert killed.data.tags["sweep_outcome"] == "stopped_by_scheduler" and killed.data.metrics["last_val_mse"] == 2.0


# ----------------------------------------------------------------------------- flags and search space

def _error(argv, capsys) -> str:
    assert cli.run_main(lambda: sweep.main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["--search", "grid"], "invalid choice: 'grid'"),
    (["--lr-range", "1e-2", "1e-4"], "--lr-range: needs LO < HI"),
    (["--decay-range", "0", "1e-3"], "--decay-range: 0.0 must be positive"),
    (["--task", "multi", "--alpha-range", "0.2", "1.5"], "--alpha-range: 1.5 lies outside"),
    (["--pipeline", "sticker", "--alpha-range", "2.5", "8"], "--alpha-range: 2.5 must be an integer"),
    (["--bogus-flag"], "two_stage.py: unrecognized arguments: --bogus-flag"),
    (["--metric", "train_loss"], "validation metrics"),
    (["--num-epochs", "2", "--stage2-epochs", "2", "--grace-period", "3"], "exceeds a trial's 2 epochs"),
    (["--pipeline", "sticker", "--stage1-checkpoint", "x"], "two_stage --mode two_stage only"),
])
def test_bad_flags_are_one_error_line(argv, message, capsys):
    assert message in _error(argv, capsys)


@pytest.mark.parametrize("space, extra, message", [
    ({"lr": {"grid": [1e-3, 1e-2]}}, ["--search", "optuna"], "need --search random"),
    ({"lr": {"normal": [0, 1]}}, [], "expected one of loguniform"),
    ({"lr": {"loguniform": [0, 1e-2]}}, [], "lr: 0 must be positive"),
    ({"alpha": {"choice": [0.5, 2.0]}}, ["--task", "multi"], "alpha: 2.0 lies outside [0.0, 1.0]"),
    ({"stage2_epochs": {"choice": [2, 4]}}, [], "stage2_epochs cannot be searched"),
    ({"num_workers": 4}, [], "num_workers cannot be searched"),
    ({"batch_size": {"choice": []}}, [], "choice needs a non-empty list"),
])
def test_bad_space_files_name_the_file(tmp_path, capsys, space, extra, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    line = _error(["--space", str(path), *extra], capsys)
    assert str(path) in line and message in line


def test_the_module_entry_point_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "tuning", "--scheduler", "hyperband"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "invalid choice" in proc.stderr


def test_alpha_is_the_pipelines_own_alpha():
    from ray.tune.search.sample import Integer

    multi = sweep.parse(["--task", "multi"])
    assert multi.dims["alpha"] == Dim("alpha", "uniform", (0.1, 0.9))
    assert multi.target.trial_args(multi.args, {"alpha": 0.3}).alpha2 == 0.3  # stage two's weight
    one_stage = sweep.parse(["--mode", "one_stage", "--task", "multi", "--alpha-range", "0.2", "0.4"])
    assert one_stage.args.mode == "one_stage" and one_stage.mode == "max"
    assert one_stage.target.trial_args(one_stage.args, {"alpha": 0.3}).alpha == 0.3
    single = sweep.parse(["--mode", "min"])  # --task single: the alpha term is off, alpha is not searched
    assert single.mode == "min" and single.args.mode == "two_stage"
    assert single.dims["alpha"] == Dim("alpha", "const", (single.args.alpha2,))
    sticker = sweep.parse(["--pipeline", "sticker"])
    assert sticker.metric == "val_accuracy" and sticker.max_t == 4  # the sweep's demo preset
    lora_alpha = sticker.param_space()["alpha"]
    # On the 64 px demo at most alpha 4 fits (alpha * sr^2 tokens per head); randint's upper bound is exclusive.
    assert isinstance(lora_alpha, Integer) and (lora_alpha.lower, lora_alpha.upper) == (1, 5)


def test_space_file_adds_and_overrides_dimensions(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [8, 16]},
                                "warmup_epochs": {"int": [0, 2]}, "decay": {"grid": [0.0, 1e-4]},
                                "optimizer": "sgd"}))
    cfg = sweep.parse(["--space", str(path), "--num-epochs", "3", "--lr-range", "1e-6", "1e-5"])
    assert cfg.dims["lr"] == Dim("lr", "loguniform", (1e-4, 1e-2))   # the file wins over --lr-range
    assert cfg.dims["batch_size"].kind == "choice" and cfg.dims["warmup_epochs"] == Dim("warmup_epochs", "int", (0, 2))
    space = cfg.param_space()
    assert space["decay"] == {"grid_search": [0.0, 1e-4]} and space["optimizer"] == "sgd"
    assert cfg.args.num_epochs == 3 and cfg.args.stage2_epochs == 4  # explicit flag wins over the demo preset
    flags = cfg.target.config_flags(cfg.args, {"lr": 3e-3, "batch_size": 16, "alpha": 0.7})
    assert (flags["stage2_lr"], flags["batch_size"], flags["alpha2"], flags["num_epochs"]) == (3e-3, 16, 0.7, 3)
    assert flags["lr"] == cfg.args.lr == 2e-3  # stage one's, which a two-stage trial does not train
    assert set(flags) <= set(cfg.target.flag_dests())


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

    cfg = sweep.parse(["--search", "optuna", "--task", "multi", "--lr-range", "1e-4", "1e-3", "--seed", "5"])
    searcher = search_algorithm(cfg, max_concurrent=2)
    assert searcher.set_search_properties(cfg.metric, cfg.mode, cfg.param_space())
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert third is None                              # the concurrency limit holds the third back
    for config in (first, second):
        assert 1e-4 <= config["lr"] <= 1e-3 and 1e-5 <= config["decay"] <= 1e-3 and 0.1 <= config["alpha"] <= 0.9
    assert first != second


def test_summary_counts_epochs_by_their_number_and_skips_missing_values():
    from tuning.trial import summarize

    # A trial resumed after an interruption reports epochs 1 and 2 only; epoch 2 has no value.
    resumed = [{"epoch": 1, "val_mse": 0.3}, {"epoch": 2, "val_mse": float("nan")}]
    assert summarize(resumed, "val_mse", "min") == {"epochs_run": 3, "best_val_mse": 0.3, "best_epoch": 1,
                                                    "last_val_mse": 0.3}
    rows = [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1, "val_acc": 0.7}, {"epoch": 2, "val_acc": 0.6}]
    assert summarize(rows, "val_acc", "max")["best_epoch"] == 1
    assert summarize(rows, "val_acc", "min")["best_epoch"] == 0
    assert summarize([], "val_acc", "max") == {"epochs_run": 0}
