"""The product runs Ray Train V2 on its own (not through tests/conftest.py), and .[dev] declares what the
suite imports."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import pipelines.train_loop
from pipelines import cli
from ray.train.v2._internal.constants import is_v2_enabled
from pipelines.train_loop import TorchTrainer
print(is_v2_enabled(), TorchTrainer.__module__)
try:
    cli.init_ray(None) if {init} else None
except ValueError as exc:
    print("refused:", exc)
"""


def _probe(env_value, init=False):
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_V2_ENABLED"}
    if env_value is not None:
        env["RAY_TRAIN_V2_ENABLED"] = env_value
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(init=init)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_product_selects_train_v2_without_the_test_conftest():
    out = _probe(None)
    enabled, trainer_module = out.split()[:2]
    assert enabled == "True"
    assert trainer_module.startswith("ray.train.v2."), out


def test_a_disabled_train_v2_is_refused_before_ray_starts():
    out = _probe("0", init=True)
    assert "refused: these pipelines need Ray Train V2" in out, out


def test_pinned_ray_has_train_v2_by_default_and_dev_declares_the_suites_imports():
    import tomllib

    import ray
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_req = next(d for d in project["dependencies"] if d.startswith("ray["))
    assert ray_req.split(">=")[1] == "2.60"
    assert Version(ray.__version__) >= Version("2.60")
    dev = {d.split(">=")[0] for d in project["optional-dependencies"]["dev"]}
    assert {"pytest", "optuna", "boto3", "transformers", "jsonschema", "scikit-learn"} <= dev
