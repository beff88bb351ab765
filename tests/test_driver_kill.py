"""A lost driver (issue 22): the two-stage demo's driver process is SIGKILLed in the middle of stage two's
third epoch; the same command with the same ``--run-name`` resumes stage two from its latest checkpoint,
reuses the MLflow runs and closes the ones the dead driver left RUNNING, and (``--deterministic``) ends
with the test metrics of an uninterrupted run of the same command.

The same killed run also loses a worker earlier in stage two (rank 1 SIGKILLed in the second epoch,
``--max-failures 1``): Ray Train restarts the worker group from the first epoch's checkpoint, and the
epochs trained after that restart are the ones the rerun continues from, so the equality covers both
recoveries. One uninterrupted run is the reference for both.

How both kills are timed (no sleeps, no wall-time race): the product's test hook ``--fault`` holds rank 1
at the first step of stage two's second epoch and rank 0 at the second step of its third (``hold:``, each
once: its marker file says it fired, with the held worker's pid, so the rerun with the same command trains
through). The test kills the held rank 1 once its marker exists and Ray Train has registered the first
epoch's checkpoint, and the driver once rank 0's marker exists and the second epoch's checkpoint is
registered (Ray Train's checkpoint manager snapshot in the stage's storage folder names them): each kill
then lands inside the epoch after a registered checkpoint, whatever the machine's load.

Epochs are counted from 1 in the console ("epoch 3/3", "resumed from the checkpoint of epoch 2": two
epochs done) and from 0 in ``meta.json`` and the checkpoint folders (``epoch_0001`` holds epoch 2).

Runs: the reference in this process (the session's Ray) while the killed run and its rerun run as
separate driver processes with their own local Ray (``RAY_TMPDIR`` of their own, which also names their
processes: every Ray process inherits it).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ARGS = ["--demo-images-per-class", "12", "--image-size", "32", "--backbone", "resnet10t", "--batch-size", "16",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--seed", "3", "--mode", "two_stage", "--task", "single",
        "--num-epochs", "1", "--stage2-epochs", "3", "--early-stop", "0", "--deterministic", "--max-failures", "1"]
DEADLINE_S = 1200            # a heavily loaded 2-core machine; every wait also checks that the run is alive
RESUME_LINE = "[stage2] worker group (re)started: resumed from the checkpoint of epoch {}, continuing at epoch {}"


def _argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return [*ARGS, "--storage-path", str(tmp / "runs"), "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--run-name", name, *extra]


def _driver_env(ray_tmp: str) -> dict:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp,
           # this checkout's code, not whichever copy of the project is installed
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RAY_ADDRESS", None)      # the driver starts its own local Ray, never the test session's
    return env


def _ray_processes(ray_tmp: str) -> list:
    """The live processes of the Ray instance whose temp folder is ``ray_tmp`` (they inherit RAY_TMPDIR)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("RAY_TMPDIR") == ray_tmp and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _dashboard_listeners(ray_tmp: str) -> list[str]:
    """host:port of every listening socket of that Ray instance's dashboard process."""
    import psutil

    addresses = []
    for proc in _ray_processes(ray_tmp):
        try:
            if any("dashboard/dashboard.py" in part for part in proc.cmdline()):
                addresses += [f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return addresses


def _client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def _runs(tmp: Path, name: str) -> dict:
    """{"parent": Run, "<child name>": [Run, ...]} of the pipeline run called ``name``."""
    client = _client(tmp)
    exp = client.get_experiment_by_name("emotion-ray")
    parents = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(parents) == 1, [(p.info.run_name, p.info.run_id) for p in parents]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    by_name: dict = {}
    for child in children:
        by_name.setdefault(child.info.run_name, []).append(child)
    return {"parent": parents[0], **by_name}


def _weights(ckpt: Path) -> dict:
    import torch

    return torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")["model"]


class _NoLocalRay(Exception):
    """The driver's local Ray did not start (see :func:`_local_ray_did_not_start`): the driver is started again."""


def _local_ray_did_not_start(output: str) -> bool:
    """Ray's local start (``ray.init`` without an address) gives the raylet a fixed 30 s to register with the
    GCS and raises this when it does not: a heavily loaded machine, before the pipeline did anything. The
    test starts such a driver again (at most twice); any other early end fails it."""
    return "The current node timed out during startup" in output and "[stage1] training" not in output


def _wait(what: str, done, *alive) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        for check in alive:
            check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("driver_kill")


@pytest.fixture(scope="module")
def runs(ray_session, workdir):
    """The reference (uninterrupted, in this process) alongside the killed run and its rerun (driver processes).
    Returns what was observed; every wait is on an event, never on wall time."""
    from pipelines import two_stage
    from pipelines.batches import weights_digest

    seen: dict = {"seconds": {}}
    started = time.monotonic()
    reference: dict = {}

    def run_reference():
        t0 = time.monotonic()
        try:
            reference["rc"] = two_stage.main(_argv(workdir, "reference"))
        except BaseException as e:  # noqa: BLE001 - reported by the equality test
            reference["error"] = repr(e)
        reference["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run_reference, daemon=True)
    thread.start()
    # The killed run starts once the reference has its data (the demo is generated and ingested once, into
    # the session's cache; two processes must not build it at the same time).
    _wait("the reference run to start", (workdir / "runs" / "reference" / "pipeline_state.json").exists,
          lambda: (thread.is_alive() or pytest.fail(f"the reference run ended early: {reference}")))

    run_dir, held, worker_killed = workdir / "runs" / "killed", workdir / "stage2.hold", workdir / "stage2.kill"
    # Rank 1 holds at the first step of stage two's 2nd epoch (killed there: Ray Train restarts the group from
    # epoch 1's checkpoint), rank 0 at the second step of its 3rd epoch (the driver is killed there).
    command = [sys.executable, "pipelines/two_stage.py",
               *_argv(workdir, "killed", "--fault", f"hold:stage2:1:0:1:{worker_killed},hold:stage2:2:1:0:{held}")]
    seen["command"] = command
    log_path = workdir / "killed.log"
    snapshot = run_dir / "stage2" / "checkpoint_manager_snapshot.json"

    def reached(marker: Path, checkpoint: str):
        return lambda: (marker.exists() and "pid" in marker.read_text() and snapshot.exists()
                        and f'"{checkpoint}"' in snapshot.read_text())

    t0 = time.monotonic()
    for attempt in range(3):
        ray_tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        with open(log_path, "w") as log:
            driver = subprocess.Popen(command, cwd=REPO, env=_driver_env(ray_tmp), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def driver_alive():
                if driver.poll() is not None:
                    text = log_path.read_text()
                    if _local_ray_did_not_start(text) and attempt < 2:
                        raise _NoLocalRay()
                    pytest.fail(f"the driver ended before it was killed (rc {driver.returncode}):\n{text[-4000:]}")

            _wait("rank 1 held in stage two's second epoch, with epoch 1's checkpoint registered",
                  reached(worker_killed, "epoch_0000"), driver_alive)
            os.kill(int(re.search(r"pid (\d+)", worker_killed.read_text()).group(1)), signal.SIGKILL)
            _wait("stage two's third epoch, with epoch 2's checkpoint registered", reached(held, "epoch_0001"),
                  driver_alive)
            # What the driver leaves: the checkpoints and MLflow runs as they are now.
            checkpoints = {json.loads(m.read_text())["epoch"]: m.parent
                           for m in (run_dir / "stage2").glob("*/meta.json")}
            seen["stage2_epochs_at_kill"] = sorted(checkpoints)
            seen["resume_digest"] = weights_digest(_weights(checkpoints[1]))
            seen["dashboard"] = _dashboard_listeners(ray_tmp)
            seen["ray_processes_at_kill"] = len(_ray_processes(ray_tmp))
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()
        except _NoLocalRay:
            seen.setdefault("local Ray start retries", []).append("killed run")
            continue
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
            # The local Ray the driver started shares its fate (Ray's own processes die with their parent, the
            # workers with their raylet). Whatever is still there after a while (generous: a loaded machine) is
            # a stray: recorded, then ended.
            deadline = time.monotonic() + 300
            while _ray_processes(ray_tmp) and time.monotonic() < deadline:
                time.sleep(0.5)
            strays = _ray_processes(ray_tmp)
            seen["strays"] = [f"{p.pid} {p.name()}" for p in strays]
            for proc in strays:
                try:
                    proc.kill()
                except Exception:  # noqa: BLE001 - gone already
                    pass
        break
    seen["seconds"]["killed run"] = time.monotonic() - t0
    seen["killed_log"] = log_path.read_text()
    seen["worker_killed"] = worker_killed.exists()
    before = _runs(workdir, "killed")
    seen["before"] = {k: ([(r.info.run_id, r.info.status, r.info.end_time) for r in v] if isinstance(v, list)
                          else (v.info.run_id, v.info.status, v.info.end_time)) for k, v in before.items()}

    # The same command again, same --run-name: a new driver, a new local Ray.
    t0 = time.monotonic()
    seen["rerun_started_ms"] = int(time.time() * 1000)
    for attempt in range(3):
        ray_tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")
        rerun = subprocess.run(command, cwd=REPO, env=_driver_env(ray_tmp), capture_output=True, text=True,
                               timeout=DEADLINE_S, start_new_session=True)
        if rerun.returncode == 0 or not _local_ray_did_not_start(rerun.stdout + rerun.stderr):
            break
        seen.setdefault("local Ray start retries", []).append("rerun")
    seen["seconds"]["rerun"] = time.monotonic() - t0
    seen["rerun"] = rerun
    thread.join(timeout=DEADLINE_S)
    seen["seconds"]["reference (concurrent)"] = reference.get("seconds")
    seen["seconds"]["fixture"] = time.monotonic() - started
    seen["reference"] = reference
    print("\ntest_driver_kill timings (s):", {k: round(v or -1, 1) for k, v in seen["seconds"].items()},
          "local Ray start retries:", seen.get("local Ray start retries", []))
    return seen


def _result(workdir: Path, name: str) -> dict:
    return json.loads((workdir / "runs" / name / "result.json").read_text())


def test_the_rerun_resumes_stage_two_from_its_latest_checkpoint(runs, workdir):
    rerun = runs["rerun"]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert runs["stage2_epochs_at_kill"][-1] == 1, runs["stage2_epochs_at_kill"]   # killed inside epoch 3
    out = rerun.stdout
    assert "[stage1] already finished in this run" in out and "[stage1] training" not in out
    assert RESUME_LINE.format(2, 3) in out, out
    # Only the third epoch is trained again.
    assert "epoch 3/3" in out and "epoch 1/3" not in out and "epoch 2/3" not in out, out
    # Exactly the weights of epoch 2's checkpoint were loaded (the worker's digest of what it loaded).
    tags = _runs(workdir, "killed")["stage2"][0].data.tags
    assert tags["resumed_from_epoch"] == "2" and tags["resume.2.weights_sha256"] == runs["resume_digest"]
    result = _result(workdir, "killed")
    assert set(result["best_checkpoints"]) == {"stage1", "stage2"}


def test_a_worker_lost_earlier_in_the_killed_run_was_resumed_by_ray_train(runs):
    assert runs["worker_killed"], "the worker fault never fired"
    assert RESUME_LINE.format(1, 2) in runs["killed_log"], runs["killed_log"][-3000:]


def test_the_rerun_reuses_the_mlflow_runs_and_ends_each_once(runs, workdir):
    before = runs["before"]
    after = _runs(workdir, "killed")
    assert set(after) == {"parent", "stage1", "stage2"}
    assert len(after["stage1"]) == 1 and len(after["stage2"]) == 1, {k: len(v) for k, v in after.items() if k != "parent"}
    parent, stage1, stage2 = after["parent"], after["stage1"][0], after["stage2"][0]
    # The same runs: one parent named after --run-name, one child per stage.
    assert parent.info.run_id == before["parent"][0] == _result(workdir, "killed")["mlflow_run_id"]
    assert stage1.info.run_id == before["stage1"][0][0] and stage2.info.run_id == before["stage2"][0][0]
    # Stage one was finished before the kill and ended once: its end time is still the one it got then.
    assert [s for _, s, _ in before["stage1"]] == ["FINISHED"]
    assert (stage1.info.status, stage1.info.end_time) == ("FINISHED", before["stage1"][0][2])
    for run in (parent, stage1, stage2):
        assert run.info.end_time >= run.info.start_time, run.info
    # Each epoch of stage two logged once, none twice (neither the worker's restart nor the rerun repeats one).
    history = _client(workdir).get_metric_history(stage2.info.run_id, "val_pearson_mean")
    assert sorted(m.step for m in history) == [0, 1, 2], [(m.step, m.value) for m in history]


def test_the_rerun_closes_the_runs_the_dead_driver_left_running(runs, workdir):
    before = runs["before"]
    # What the dead driver left: stage two and the parent RUNNING.
    assert before["parent"][1] == "RUNNING" and before["parent"][2] is None, before
    assert [s for _, s, _ in before["stage2"]] == ["RUNNING"], before
    after = _runs(workdir, "killed")
    for run in (after["parent"], *after["stage2"]):
        assert run.info.status == "FINISHED" and run.info.end_time >= runs["rerun_started_ms"], run.info
    # Nothing in the experiment is left RUNNING (the reference's runs included).
    client = _client(workdir)
    exp = client.get_experiment_by_name("emotion-ray")
    running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert running == [], [(r.info.run_name, r.info.run_id) for r in running]


def test_no_ray_process_outlives_the_killed_driver(runs):
    assert runs["ray_processes_at_kill"] > 3      # the driver's own local Ray was found (raylet, GCS, workers...)
    assert runs["strays"] == []


def test_the_local_ray_the_driver_started_serves_its_dashboard_on_loopback_only(runs):
    """pipelines.cli.init_ray starts a local Ray without naming a dashboard host: Ray's default, the loopback."""
    assert runs["dashboard"], "the driver's local Ray had no dashboard listening"
    assert all(a.startswith(("127.", "::1:")) for a in runs["dashboard"]), runs["dashboard"]


def test_the_resumed_run_ends_where_the_uninterrupted_one_does(runs, workdir):
    assert runs["reference"].get("rc") == 0, runs["reference"]
    assert runs["rerun"].returncode == 0
    resumed, reference = _result(workdir, "killed"), _result(workdir, "reference")
    keys = sorted(k for k in reference if k.startswith("test_"))
    assert keys and keys == sorted(k for k in resumed if k.startswith("test_"))
    differ = {k: (reference[k], resumed[k]) for k in keys if abs(reference[k] - resumed[k]) > 1e-6}
    assert differ == {}
    # Every epoch's validation curve and the selected weights, too.
    client = _client(workdir)
    curves = [[m.value for m in sorted(client.get_metric_history(_runs(workdir, n)["stage2"][0].info.run_id,
                                                                  "val_pearson_mean"), key=lambda m: m.step)]
              for n in ("reference", "killed")]
    assert curves[0] == pytest.approx(curves[1], abs=1e-6)
    w_ref = _weights(Path(reference["best_checkpoints"]["stage2"]))
    w_res = _weights(Path(resumed["best_checkpoints"]["stage2"]))
    assert w_ref.keys() == w_res.keys()
    worst = max(float((w_ref[k].double() - w_res[k].double()).abs().max()) for k in w_ref if w_ref[k].numel())
    assert worst <= 1e-6
