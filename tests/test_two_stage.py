"""End-to-end tests of pipelines/two_stage.py on tiny demo data with 2 Ray Train workers.

Each framework runs once (module-scoped) and the tests read what it left behind: result.json,
the run's state, checkpoints and MLflow. Sizes are tiny (32 px, a few images per class, one or
two epochs): these tests check wiring and bookkeeping, not accuracy — the README's demo run is
where accuracy is measured.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import two_stage

pytestmark = pytest.mark.slow

TINY = ["--demo-images-per-class", "6", "--image-size", "32", "--backbone", "resnet10t", "--batch-size", "8",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--seed", "3"]
METRICS = ("test_pearson_v", "test_pearson_a", "test_ccc_v", "test_ccc_a", "test_mse", "test_accuracy",
           "test_categorical_accuracy")


def _run(tmp: Path, name: str, *extra: str) -> dict:
    argv = [*TINY, "--storage-path", str(tmp / "runs"), "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--run-name", name, *extra]
    assert two_stage.main(argv) == 0
    return json.loads((tmp / "runs" / name / "result.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("two_stage")


# The four frameworks run in one parent run in tests/test_grid.py (sharing each task's stage one); the
# two-stage structure of a single run (parent, stage1, stage2, artifacts, the frozen cut) is checked on
# tests/test_e2e_proof.py's two_stage run. Here: a one_stage/single run whose worker is killed mid-run.
FAULTY_ARGS = ["--mode", "one_stage", "--task", "single", "--num-epochs", "2", "--early-stop", "0",
               "--max-failures", "1"]


@pytest.fixture(scope="module")
def faulty(ray_session, workdir):
    """Rank 1 is killed (os._exit) at epoch 2, step 1; Ray restarts the workers, which resume."""
    marker = workdir / "fault.marker"
    result = _run(workdir, "ft-faulty", *FAULTY_ARGS, "--fault", f"stage1:1:1:1:{marker}")
    assert marker.exists(), "the injected fault never fired"
    return result


def test_a_run_reports_every_metric_and_its_checkpoints(faulty):
    for key in METRICS:
        assert isinstance(faulty[key], float) and math.isfinite(faulty[key]), (key, faulty[key])
    assert -1.0 <= faulty["test_pearson_v"] <= 1.0
    assert 0.0 <= faulty["test_categorical_accuracy"] <= 1.0
    assert set(faulty["best_checkpoints"]) == {"stage1"}
    for path in faulty["best_checkpoints"].values():
        assert (Path(path) / "state.pt").exists() and (Path(path) / "meta.json").exists()


def test_fault_tolerance_resumes_from_checkpoint(faulty, workdir):
    """The restarted workers resume from the checkpoint written after epoch 1, with exactly its weights.

    No comparison with an uninterrupted twin: the resumed run is not bit-exact (Ray Data's streaming split
    does not fix which rows each worker gets in an epoch; README, Limits), so what is asserted is the
    resume itself: the epoch it restarts from and a digest of the weights the workers loaded.
    """
    import torch
    from mlflow import MlflowClient

    from pipelines.batches import weights_digest

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(faulty["mlflow_run_id"])
    (child,) = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.data.tags.get("resumed_from_epoch") == "1", child.data.tags
    epoch0 = next(m.parent for m in (workdir / "runs" / "ft-faulty" / "stage1").glob("*/meta.json")
                  if json.loads(m.read_text())["epoch"] == 0)
    model = torch.load(epoch0 / "state.pt", weights_only=True, map_location="cpu")["model"]
    assert child.data.tags["resume.1.weights_sha256"] == weights_digest(model)
    steps = sorted({m.step for m in client.get_metric_history(child.info.run_id, "val_pearson_mean")})
    assert steps == [0, 1]


def test_rerun_with_same_name_replays_the_finished_run(faulty, workdir):
    """The same command again (the fault's marker exists, so nothing fires): no training, same runs."""
    again = _run(workdir, "ft-faulty", *FAULTY_ARGS, "--fault", f"stage1:1:1:1:{workdir / 'fault.marker'}")
    assert again["mlflow_run_id"] == faulty["mlflow_run_id"]
    assert again["best_checkpoints"] == faulty["best_checkpoints"]
    assert again["test_categorical_accuracy"] == faulty["test_categorical_accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["--dataname", "NoSuchSet"], "unknown dataset 'NoSuchSet'"),
    (["--dataname", "/nonexistent/FI"], "/nonexistent/FI"),
    (["--dataname", "FI", "--mode", "one_stage"], "not ingested yet"),
    (["--dataname", "FI"], "--dimensional"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--stage2-lr", "0"], "--stage2-lr must be positive"),
])
def test_bad_configuration_fails_before_training_with_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "pipelines/two_stage.py", *argv, "--storage-path", str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
                          env={**__import__("os").environ, "EMOTION_RAY_DATA": str(tmp_path / "data")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not list(tmp_path.glob("*/pipeline_state.json")), "a run was started"


def test_mismatched_classes_fail_before_training(ray_session, tmp_path):
    """A categorical set whose folder names the lexicon does not know stops with the known names."""
    from PIL import Image

    root = tmp_path / "odd"
    for cls in ("joy", "grumpiness"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(root / cls / f"{i}.jpg")
    with pytest.raises(ValueError, match="grumpiness"):
        two_stage.main(["--dataname", str(root), "--mode", "one_stage", "--storage-path", str(tmp_path / "runs"),
                        "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"])


def test_stage_two_flags_default_to_stage_ones():
    from pipelines import cli, two_stage

    def parsed(*argv):
        return two_stage.apply_defaults(cli.parse_args(two_stage.build_parser(), list(argv)))

    args = parsed("--lr", "3e-3", "--decay", "0.01")
    assert (args.stage2_lr, args.stage2_decay) == (3e-3, 0.01)
    args = parsed("--lr", "3e-3", "--stage2-lr", "1e-4", "--stage2-decay", "0")
    assert (args.lr, args.stage2_lr, args.decay, args.stage2_decay) == (3e-3, 1e-4, 1e-4, 0.0)
