"""`ray job submit` end to end: a separate head node (`ray start --head`, token auth on), the
two-stage demo submitted to it with the project's runtime_env, result.json checked afterwards."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


_taken: set[int] = set()


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999; this test's head uses 20000-20999): ports that bind(0) hands out are ephemeral, so
    any process's next outgoing connection could take one before the head binds it."""
    rng = random.Random()
    while True:
        port = rng.randint(21000, 32000)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port


def test_runtime_env_excludes_data_caches_and_mlruns():
    env = yaml.safe_load((REPO / "runtime_env.yaml").read_text())
    for pattern in ("data/", ".cache/", "mlruns/", "runs/", "*.db", "*.parquet", "*.pt"):
        assert pattern in env["excludes"], pattern


def test_ray_job_submit_runs_the_pipeline(tmp_path):
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    gcs_port, dash_port = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "EMOTION_RAY_HOME": str(tmp_path / "home"),
           "EMOTION_RAY_CACHE": os.environ.get("EMOTION_RAY_CACHE", str(tmp_path / "cache"))}  # the session's demo
    # Every port of its own: the test session's Ray (started by other tests) holds the defaults, e.g.
    # the dashboard agent's 52365, and a second agent on the same port never comes up.
    own_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--include-dashboard", "true",
         "--min-worker-port", "20000", "--max-worker-port", "20999", *own_ports, "--temp-dir", ray_tmp],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([ray_bin, "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            head.terminate()
            pytest.fail(f"the head node's Jobs API never came up: {probe.stderr[-800:]}\n"
                        f"head output: {head.communicate(timeout=30)[0][-1500:]}")
        storage = tmp_path / "runs"
        submit = [ray_bin, "job", "submit", "--address", address, "--runtime-env", str(REPO / "runtime_env.yaml"),
                  "--working-dir", str(REPO), "--",
                  "python", "pipelines/two_stage.py", "--demo-images-per-class", "6", "--image-size", "32",
                  # --batch-size is the GLOBAL batch now: 16 over 2 workers is the 8 per worker used before.
                  "--backbone", "resnet10t", "--batch-size", "16", "--num-epochs", "1", "--mode", "one_stage",
                  "--num-workers", "2", "--cpus-per-worker", "0.5", "--run-name", "submitted",
                  "--storage-path", str(storage), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
        for _ in range(30):  # the node's dashboard agent comes up a little after the Jobs API
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
        assert "succeeded" in (job.stdout + job.stderr).lower()
        result = json.loads((storage / "submitted" / "result.json").read_text())
        assert isinstance(result["test_pearson_v"], float)
        assert "two_stage one_stage / single" in job.stdout  # the driver's summary table reached the client
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
