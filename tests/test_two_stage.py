"""pipelines/two_stage.py's flags and its errors before training (one line, exit 2, no run started).

The framework runs are elsewhere: one task's frameworks sharing a stage one in tests/test_grid.py; a
two_stage run (its MLflow layout, the frozen cut, a failed stage two re-run, a worker killed and
restarted) and a one_stage run (learning, early stopping) in tests/test_e2e_proof.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import two_stage

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("argv, message", [
    (["--dataname", "NoSuchSet"], "unknown dataset 'NoSuchSet'"),
    (["--dataname", "/nonexistent/FI"], "/nonexistent/FI"),
    (["--dataname", "FI", "--mode", "one_stage", "--weights", "none"], "not ingested yet"),
    (["--dataname", "FI"], "--dimensional"),
    (["--lr", "-1"], "--lr: "),
    (["--stage2-lr", "0"], "--stage2-lr: "),
    (["--batch-size", "9"], "--batch-size 9 (the global batch) does not divide among 2 workers"),
    (["--recipe", "nosuch"], "--recipe nosuch: no such recipe for two_stage"),
    (["--head", "sigmoid"], "invalid choice: 'sigmoid'"),
])
def test_bad_configuration_fails_before_training_with_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "pipelines/two_stage.py", *argv, "--storage-path", str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
                          env={**__import__("os").environ, "EMOTION_RAY_DATA": str(tmp_path / "data")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "data"], "a run folder was made"


def test_mismatched_classes_fail_before_training(ray_session, tmp_path):
    """A categorical set whose folder names the lexicon does not know stops with the known names."""
    from PIL import Image

    root = tmp_path / "odd"
    for cls in ("joy", "grumpiness"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(root / cls / f"{i}.jpg")
    with pytest.raises(ValueError, match="grumpiness"):
        two_stage.main(["--dataname", str(root), "--mode", "one_stage", "--weights", "none",
                        "--storage-path", str(tmp_path / "runs"),
                        "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"])


def test_stage_two_flags_default_to_stage_ones():
    from pipelines import cli, two_stage

    def stage2(*argv):
        plan = two_stage.configure(cli.parse_args(two_stage.build_parser(), list(argv)))
        return plan.recipe.stage("stage2", "stage2_single")

    recipe = stage2("--lr", "3e-3", "--decay", "0.01")
    assert (recipe.optimizer.lr, recipe.optimizer.weight_decay) == (3e-3, 0.01)
    recipe = stage2("--lr", "3e-3", "--stage2-lr", "1e-4", "--stage2-decay", "0")
    assert (recipe.optimizer.lr, recipe.optimizer.weight_decay) == (1e-4, 0.0)
