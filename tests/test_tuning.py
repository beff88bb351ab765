"""Tests of the ``tuning`` sweep CLI.

One tiny two_stage sweep runs once (module-scoped) and the slow tests read what it left behind:
stage one trained once (one epoch), then one stage-two trial (two epochs) per lr of the grid
[3e-3, 10, 1e-3], one at a time, under ASHA on ``val_mse``. lr = 10 wrecks the stage-one weights
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
import subprocess
import sys
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
GRID = [3e-3, 10.0, 1e-3]
WRECKING_LR = 10.0


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


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
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    return SimpleNamespace(tmp=tmp, dir=sweep_dir, uri=uri, argv=argv, stdout=out.getvalue(), rows=rows,
                           parent=state["parent_run_id"], state=state)


def _children(swept) -> dict:
    client = _client(swept.uri)
    parent = client.get_run(swept.parent)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{swept.parent}'")
    return {r.data.tags["sweep_trial"]: r for r in runs}


@pytest.mark.slow
def test_every_trial_is_a_child_run_with_lr_decay_alpha(swept):
    client = _client(swept.uri)
    parent = client.get_run(swept.parent)
    assert parent.data.tags["pipeline"] == "two_stage" and parent.data.tags["sweep"] == "true"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.lr"] == f"grid({', '.join(repr(v) for v in GRID)})"
    children = _children(swept)
    assert "stage1" in children                     # stage one trained once, as a child of the sweep
    trials = {k: r for k, r in children.items() if k != "stage1"}
    assert len(trials) == len(GRID)
    assert sorted(float(r.data.params["lr"]) for r in trials.values()) == sorted(GRID)
    for run in trials.values():
        assert run.info.status != "RUNNING"
        assert float(run.data.params["alpha"]) == 0.9       # --task single: alpha2 kept at its flag value
        assert 1e-5 <= float(run.data.params["decay"]) <= 1e-3  # a decade either side of the demo's 1e-4
        assert run.data.params["optimizer.lr"] == run.data.params["lr"]  # the stage-two spec the trial trained
        if run.info.status == "FINISHED":  # a stopped trial's worker may log an epoch Tune never saw
            assert run.data.metrics["best_val_mse"] == pytest.approx(
                min(m.value for m in client.get_metric_history(run.info.run_id, "val_mse")))
    # Every trial started from the one stage-one checkpoint of the sweep.
    for row in swept.rows:
        meta = json.loads((Path(row["checkpoint"]) / "meta.json").read_text())
        assert meta["spec"]["init_from"] == swept.state["stage1_checkpoint"]


@pytest.mark.slow
def test_asha_stops_the_wrecked_trial_and_frees_its_cpus(swept, ray_session):
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(swept.dir / "tune"))
    epochs = {t.config["lr"]: t.last_result["training_iteration"] for t in analysis.trials}
    assert epochs[WRECKING_LR] < 2, epochs                  # max_t = the trial's 2 epochs
    assert all(n == 2 for lr, n in epochs.items() if lr != WRECKING_LR), epochs
    stopped = next(r for r in _children(swept).values() if r.data.params.get("lr") == str(WRECKING_LR))
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped_by_scheduler"] == "true"
    assert stopped.data.metrics["last_val_mse"] > 0.5
    # The stopped trial's Ray Train workers gave their CPUs back.
    assert ray_session.available_resources().get("CPU") == ray_session.cluster_resources()["CPU"]


@pytest.mark.slow
def test_ranked_table_trials_csv_and_best_config(swept):
    mse = [float(r["val_mse"]) for r in swept.rows]
    assert mse == sorted(mse) and [r["rank"] for r in swept.rows] == ["1", "2", "3"]
    assert swept.rows[-1]["status"] == "stopped_by_scheduler" and float(swept.rows[-1]["lr"]) == WRECKING_LR
    lines = swept.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank  trial"))
    assert header and all(h in lines[header] for h in ("lr", "decay", "alpha", "val_mse", "epochs", "status"))
    printed = [line.split()[1] for line in lines[header + 1:header + 4]]
    assert printed == [r["trial_id"] for r in swept.rows]
    assert str(swept.dir / "best_config.yaml") in swept.stdout and swept.parent in swept.stdout
    best = yaml.safe_load((swept.dir / "best_config.yaml").read_text())
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
    assert "already finished" in out.getvalue()
    assert json.loads((swept.dir / "sweep_state.json").read_text())["parent_run_id"] == swept.parent
    assert len(_children(swept)) == len(GRID) + 1           # no new trials, no second stage one


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
    pytest.importorskip("optuna")
    from tuning.driver import _search_algorithm

    cfg = sweep.parse(["--search", "optuna", "--task", "multi", "--lr-range", "1e-4", "1e-3", "--seed", "5"])
    searcher = _search_algorithm(cfg, max_concurrent=2)
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
