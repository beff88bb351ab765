"""`ray job submit` end to end on one separate head node (`ray start --head`, token auth on), shared by
the module's tests: the two-stage demo submitted with the project's runtime_env (result.json checked
afterwards); a job stopped with `ray job stop` in stage two and submitted again with the same command,
which resumes it (issue 22); and the Jobs API refusing clients without the cluster's token."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster_services import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


_free_port = free_port   # one set of taken ports for every service the tests start (tests/cluster_services.py)


def test_runtime_env_excludes_data_caches_and_mlruns():
    env = yaml.safe_load((REPO / "runtime_env.yaml").read_text())
    for pattern in ("data/", ".cache/", "mlruns/", "runs/", "*.db", "*.parquet", "*.pt"):
        assert pattern in env["excludes"], pattern


@dataclass
class Head:
    ray_bin: str
    address: str            # the Jobs API (dashboard), http://127.0.0.1:PORT
    env: dict               # the clients' environment: RAY_AUTH_MODE=token and the session's RAY_AUTH_TOKEN

    def ray(self, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([self.ray_bin, *args], env=self.env if env is None else env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One head node for the module (`ray start --head --block`, token auth, the dashboard on the loopback,
    ports of its own), up when its Jobs API answers; stopped with its process group at the end.

    `ray start` gives its raylet a fixed 30 s to register with the GCS and exits when it does not, which a
    heavily loaded machine can take: then the head is started again (fresh ports and temp folder), at most
    three times. Each wait ends when the node is up and its Jobs API answers, or the `ray start` process exits."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    home = tmp_path_factory.mktemp("job_submit_home")
    # RAY_JOB_STOP_WAIT_TIME_S: how long `ray job stop` lets the driver end on its SIGTERM before a SIGKILL
    # (Ray's default, 3 s, is short on a loaded 2-core machine: the driver closes its MLflow runs then).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "EMOTION_RAY_HOME": str(home), "RAY_JOB_STOP_WAIT_TIME_S": "60",
           "EMOTION_RAY_CACHE": os.environ.get("EMOTION_RAY_CACHE", str(home / "cache"))}  # the session's demo
    failures = []
    for attempt in range(3):
        gcs_port, dash_port = _free_port(), _free_port()
        ray_tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
        # Every port of its own: the test session's Ray (started by other tests) holds the defaults, e.g.
        # the dashboard agent's 52365, and a second agent on the same port never comes up.
        own_ports = [f"--{name}={_free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "ray-client-server-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
        log_path = home / f"head-{attempt}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--include-dashboard", "true",
                 "--min-worker-port", "20000", "--max-worker-port", "20999", *own_ports, "--temp-dir", ray_tmp],
                env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        head = Head(ray_bin, f"http://127.0.0.1:{dash_port}", env)
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            # Up: `ray start` says so (its node registered; the dashboard can answer before that and still
            # go down with a node that timed out) and the Jobs API answers.
            if "Ray runtime started" in log_path.read_text():
                probe = head.ray("job", "list", "--address", head.address, timeout=300)
                if probe.returncode == 0 and proc.poll() is None:
                    break
            time.sleep(2)
        else:
            _stop(proc)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            failures.append(f"attempt {attempt + 1}: {log_path.read_text()[-600:]}")
            continue
        try:
            yield head
        finally:
            _stop(proc)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        return
    pytest.fail("the head node's Jobs API never came up:\n" + "\n".join(failures))


def _submit(head: Head, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit` with the project's runtime_env and this checkout as the working dir (retried while
    the node's dashboard agent, which comes up a little after the Jobs API, is not there yet)."""
    command = ["job", "submit", "--address", head.address, "--runtime-env", str(REPO / "runtime_env.yaml"),
               "--working-dir", str(REPO), *args]
    for _ in range(30):
        job = head.ray(*command, timeout=1800)
        if "No available agent" not in job.stderr + job.stdout:
            break
        time.sleep(2)
    return job


def _demo(storage: Path, mlflow_db: Path, run_name: str, *extra: str) -> list[str]:
    return ["python", "pipelines/two_stage.py", "--demo-images-per-class", "6", "--image-size", "32",
            # --batch-size is the GLOBAL batch: 16 over 2 workers is 8 per worker.
            "--backbone", "resnet10t", "--batch-size", "16", "--num-workers", "2", "--cpus-per-worker", "0.5",
            "--run-name", run_name, "--storage-path", str(storage), "--mlflow-uri", f"sqlite:///{mlflow_db}", *extra]


def _job_status(head: Head, submission_id: str) -> str:
    status = head.ray("job", "status", "--address", head.address, submission_id)
    return status.stdout + status.stderr


def _runs(db: Path) -> dict:
    """{run name: (run_id, status, end_time)} of every run in the store (names are unique here)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("emotion-ray")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len({r.info.run_name for r in runs}) == len(runs), [r.info.run_name for r in runs]
    return {r.info.run_name: (r.info.run_id, r.info.status, r.info.end_time) for r in runs}


@pytest.fixture(scope="module")
def stopped_job(head, tmp_path_factory):
    """The two-stage demo submitted with --no-wait, stopped with `ray job stop` in stage two's second epoch
    (epoch 1's checkpoint registered), then the same command submitted again and waited for.

    Stage two's rank 0 is held (the --fault hook's ``hold:``, once) at the first step of its second epoch:
    the stop lands there whatever the machine's load; the second submission, whose marker exists, trains
    through. What each step left is recorded; the tests below assert on it."""
    from pipelines.batches import weights_digest

    tmp = tmp_path_factory.mktemp("job_stop")
    storage, db, held = tmp / "runs", tmp / "mlflow.db", tmp / "stage2.hold"
    demo = _demo(storage, db, "stopped", "--mode", "two_stage", "--task", "single", "--num-epochs", "1",
                 "--stage2-epochs", "2", "--early-stop", "0", "--fault", f"hold:stage2:1:0:0:{held}")
    seen: dict = {"seconds": {}}
    t0 = time.monotonic()
    first = _submit(head, "--no-wait", "--submission-id", "stopped-1", "--", *demo)
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-3000:])
    snapshot = storage / "stopped" / "stage2" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 1200      # a heavily loaded 2-core machine; the job's status is checked too
    while not (held.exists() and snapshot.exists() and '"epoch_0000"' in snapshot.read_text()):
        status = _job_status(head, "stopped-1")
        assert not any(s in status.lower() for s in ("succeeded", "failed", "was stopped")), \
            status + head.ray("job", "logs", "--address", head.address, "stopped-1").stdout[-3000:]
        assert time.monotonic() < deadline, "stage two never reached its second epoch"
        time.sleep(2)
    checkpoints = {json.loads(m.read_text())["epoch"]: m.parent
                   for m in (storage / "stopped" / "stage2").glob("*/meta.json")}
    seen["stage2_epochs_at_stop"] = sorted(checkpoints)
    import torch

    seen["resume_digest"] = weights_digest(torch.load(checkpoints[0] / "state.pt", weights_only=True,
                                                      map_location="cpu")["model"])
    seen["before_stop"] = _runs(db)
    seen["stop"] = head.ray("job", "stop", "--address", head.address, "stopped-1")
    seen["status_after_stop"] = _job_status(head, "stopped-1")
    seen["after_stop"] = _runs(db)
    seen["result_after_stop"] = (storage / "stopped" / "result.json").exists()
    seen["seconds"]["submit to stopped"] = time.monotonic() - t0

    t0 = time.monotonic()
    seen["resubmitted_ms"] = int(time.time() * 1000)
    seen["again"] = _submit(head, "--submission-id", "stopped-2", "--", *demo)
    seen["seconds"]["resubmission"] = time.monotonic() - t0
    seen["after"] = _runs(db)
    seen["db"], seen["storage"] = db, storage
    print("\ntest_job_submit stop/resubmit timings (s):", {k: round(v, 1) for k, v in seen["seconds"].items()})
    return seen


def test_ray_job_submit_runs_the_pipeline(stopped_job):
    """The resubmitted job (the module's one finished pipeline job) through `ray job submit`: it succeeds,
    writes result.json, and the driver's summary table reaches the client."""
    job = stopped_job["again"]
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    assert "succeeded" in (job.stdout + job.stderr).lower()
    result = json.loads((stopped_job["storage"] / "stopped" / "result.json").read_text())
    assert isinstance(result["test_pearson_v"], float)
    assert "two_stage two_stage / single" in job.stdout


def test_ray_job_stop_closes_the_runs_it_interrupts_as_killed(stopped_job):
    """`ray job stop` in stage two: the job is STOPPED, no result, and the runs it left open are closed as
    KILLED (not left RUNNING); stage one's finished run is untouched."""
    stop = stopped_job["stop"]
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "was stopped" in stopped_job["status_after_stop"].lower(), stopped_job["status_after_stop"]
    assert not stopped_job["result_after_stop"]
    assert stopped_job["stage2_epochs_at_stop"] == [0]
    before, after = stopped_job["before_stop"], stopped_job["after_stop"]
    assert {k: v[1] for k, v in before.items()} == {"stopped": "RUNNING", "stage1": "FINISHED", "stage2": "RUNNING"}
    assert {k: v[1] for k, v in after.items()} == {"stopped": "KILLED", "stage1": "FINISHED", "stage2": "KILLED"}
    assert after["stage1"] == before["stage1"]
    assert all(after[k][2] for k in ("stopped", "stage2")), after


def test_the_same_submission_resumes_the_stopped_run(stopped_job):
    """Submitted again with the same command and --run-name: stage one skipped, stage two resumed from
    epoch 1's checkpoint (the weights it loaded are that checkpoint's), only epoch 2 trained."""
    job = stopped_job["again"]
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert "[stage1] already finished in this run" in out and "[stage1] training" not in out, out[-4000:]
    assert "[stage2] worker group (re)started: resumed from the checkpoint of epoch 1, continuing at epoch 2" \
        in out, out[-4000:]
    assert "epoch 1/2" not in out and "epoch 2/2" in out, out[-4000:]
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=f"sqlite:///{stopped_job['db']}").get_run(stopped_job["after"]["stage2"][0]).data.tags
    assert tags["resumed_from_epoch"] == "1" and tags["resume.1.weights_sha256"] == stopped_job["resume_digest"]


def test_the_resubmission_reuses_the_mlflow_runs_and_ends_each_once(stopped_job):
    """The same three MLflow runs (no new parent, no second stage run); stage one's end untouched (no finished
    run marked twice); the two the stop closed as KILLED reopened and FINISHED by the resubmission; each of
    stage two's epochs logged once."""
    before, after = stopped_job["before_stop"], stopped_job["after"]
    assert set(after) == {"stopped", "stage1", "stage2"}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    result = json.loads((stopped_job["storage"] / "stopped" / "result.json").read_text())
    assert result["mlflow_run_id"] == after["stopped"][0]
    assert after["stage1"] == before["stage1"]
    for name in ("stopped", "stage2"):
        assert after[name][1] == "FINISHED" and after[name][2] >= stopped_job["resubmitted_ms"], (name, after[name])
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=f"sqlite:///{stopped_job['db']}").get_metric_history(
        after["stage2"][0], "val_pearson_mean")
    assert sorted(m.step for m in history) == [0, 1], [(m.step, m.value) for m in history]


def _no_token_clients(head: Head, tmp_path: Path) -> dict:
    """Client environments without the cluster's token: none at all (auth mode left at Ray's default, no
    token in the environment, the token path an empty file, a home of its own without ~/.ray/auth_token),
    and a wrong one."""
    empty = tmp_path / "empty_token"
    empty.write_text("")
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    return {"no token": {**base, "RAY_AUTH_TOKEN_PATH": str(empty), "HOME": str(home)},
            "wrong token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                            "HOME": str(home)}}


def test_the_jobs_api_refuses_a_submission_without_the_clusters_token(head, tmp_path):
    """`ray job submit` without the token (or with a wrong one) exits non-zero with an authentication error
    and creates no job (the cluster's job list, read with the token, has none of theirs); `ray job list`
    and a plain HTTP request to the Jobs API are refused too."""
    ran = tmp_path / "ran"
    for name, env in _no_token_clients(head, tmp_path).items():
        sid = f"refused-{name.replace(' ', '-')}"
        submitted = head.ray("job", "submit", "--address", head.address, "--submission-id", sid, "--",
                             "python", "-c", f"open({str(ran)!r}, 'w')", env=env, timeout=180)
        text = submitted.stdout + submitted.stderr
        assert submitted.returncode != 0, (name, text[-2000:])
        # Ray's client raises AuthenticationError (a wrong token: "...the authentication token is invalid or
        # incorrect"); a missing one is refused by the Jobs API (401, unauthenticated).
        assert any(w in text.lower() for w in ("unauthenticated", "unauthorized", "401", "403", "authenticationerror",
                                               "authentication token is invalid")), (name, text[-2000:])
        if name == "no token":
            listed = head.ray("job", "list", "--address", head.address, env=env, timeout=180)
            assert listed.returncode != 0, listed.stdout[-1500:] + listed.stderr[-1500:]
    # Read with the token: none of the refused submissions exists, and nothing they sent ran.
    listed = head.ray("job", "list", "--address", head.address)
    assert listed.returncode == 0, listed.stderr[-1500:]
    assert "refused-" not in listed.stdout, listed.stdout[-3000:]
    for sid in ("refused-no-token", "refused-wrong-token"):
        status = head.ray("job", "status", "--address", head.address, sid)
        assert status.returncode != 0 and "does not exist" in (status.stdout + status.stderr), status
    assert not ran.exists()
    for headers in ({}, {"Authorization": f"Bearer {secrets.token_hex(32)}"}):
        request = urllib.request.Request(f"{head.address}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code in (401, 403), headers


def test_the_dashboards_the_product_starts_bind_the_loopback_unless_asked_otherwise(monkeypatch):
    """Where the product starts Ray's dashboard itself. A local Ray (pipelines.cli.init_ray) is started with
    no dashboard host: Ray's default, the loopback (tests/test_driver_kill.py checks the listening socket of
    the one a pipeline's driver starts). cluster.yaml's head asks otherwise on purpose (README, Security:
    actors on worker nodes, e.g. Ray Train's placement-group cleaner, reach the State API through it): there
    the dashboard may leave the loopback only with token auth on in the same command and its port closed to
    the outside (tests/test_cluster_config.py checks every ingress rule and listener in depth)."""
    import inspect
    import shlex

    import ray

    from pipelines import cli, console

    default_host = inspect.signature(ray.init).parameters["dashboard_host"].default
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(console, "start_relay", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_DASHBOARD_HOST", raising=False)
    cli.init_ray(None)
    assert len(calls) == 1 and calls[0].get("address") is None        # a local Ray is started...
    host = calls[0].get("dashboard_host", default_host)
    assert host in ("127.0.0.1", "localhost", "::1"), calls[0]         # ...with its dashboard on the loopback

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    heads = [c for c in config["head_start_ray_commands"] if "ray start" in c and "--head" in c]
    assert len(heads) == 1
    words = shlex.split(heads[0].replace("\n", " "))
    hosts = [w.split("=", 1)[1] for w in words if w.startswith("--dashboard-host=")]
    hosts += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--dashboard-host"]
    host = hosts[-1] if hosts else "localhost"      # `ray start`'s default
    if host not in ("127.0.0.1", "localhost", "::1"):
        assert "RAY_AUTH_MODE=token" in heads[0], heads[0]
        port = next((w.split("=", 1)[1] for w in words if w.startswith("--dashboard-port=")), "8265")
        ingress = config["provider"].get("security_group", {}).get("IpPermissions", [])
        for rule in ingress:
            low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
            if rule.get("IpProtocol") == "-1" or low <= int(port) <= high:
                sources = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                          [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
                assert not any(s in ("0.0.0.0/0", "::/0") for s in sources), rule
