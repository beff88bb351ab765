"""Object storage and several nodes, against real services on the loopback (tests/cluster_services.py):
a moto S3 server, a real ``mlflow server`` whose artifacts go to that S3, and a Ray cluster of a head with
no CPUs and worker nodes of their own (``ray start`` processes, each its own raylet and object store).

Every run here is a subprocess driver attached to that cluster (``--address``): the test session's own
Ray (``ray_session``) is never used. One cluster and two pipeline runs are shared by all tests (module
scope), which keeps the module to a few runs:

- ``spread``: the demo data ingested to ``s3://`` by a Ray Data job on the cluster, then the two-stage
  demo with ``--placement-strategy SPREAD``, checkpoints on S3 (``--storage-path s3://...``), shards read
  from S3, MLflow on the server; stage two's rank 0 is held at the first step of its second epoch (the
  ``--fault`` test hook: it writes a marker, waits three health-check intervals, then would exit) and,
  once Ray Train has registered the first epoch's checkpoint, that worker's node is lost (its processes
  killed) and a fresh node added, with ``--max-failures 1``. Then ``pipelines.predict`` from the run's S3
  folder.
- ``lost0``: one stage, ``--max-failures 0``, a node lost the same way; then the same command again.

Endpoints and credentials reach every process through the standard environment only (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ..., MLFLOW_S3_ENDPOINT_URL for the MLflow server); the nodes inherit it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_services import BUCKET, REPO, S3, MlflowServer, RayNodes, stop, wait_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 1500          # one pipeline run, on a shared 2-core machine
SHARDS = f"s3://{BUCKET}/shards"
RUNS = f"s3://{BUCKET}/runs"
# The demo recipe, shrunk: 32 px, 2 workers x 8, half a CPU each; stage two has room for an epoch boundary.
TRAIN = ["--recipe", "demo", "--dataname", f"{SHARDS}/fi", "--dimensional", f"{SHARDS}/emotion6",
         "--image-size", "32", "--batch-size", "16", "--num-workers", "2", "--cpus-per-worker", "0.5",
         "--early-stop", "0", "--storage-path", RUNS]
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; the --fault hook holds
# a worker for 3 intervals before it exits, the window in which the test loses that worker's node.
HEALTH_CHECK_S = 3.0
HOLD_S = 3 * HEALTH_CHECK_S
RESTART_LINE = re.compile(r"\[(\w+)\] worker group \(re\)started: resumed from the checkpoint of epoch (\d+), "
                          r"continuing at epoch (\d+)")


class Driver:
    """A pipeline command run as its own process, stdout and stderr kept in files."""

    def __init__(self, tmp: Path, name: str, argv: list[str], env: dict):
        self.name, self.argv, self.env = name, argv, env
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=self.out.open("w"),
                                     stderr=self.err.open("w"), start_new_session=True)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            raise AssertionError(f"{self.name}: not finished within {timeout:.0f} s\n{self.tail()}") from None

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def tail(self, n: int = 4000) -> str:
        return f"--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"


class Cluster:
    """The services, the environment every driver runs with, and helpers that read S3 and MLflow."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.s3 = S3(tmp)
        self.mlflow = MlflowServer(tmp, self.s3)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # PYTHONPATH: this checkout's packages in every process (`python pipelines/two_stage.py` puts
        # pipelines/ first on sys.path, and an editable install of another checkout would win otherwise).
        path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.env = {**env, **self.s3.env, "RAY_AUTH_MODE": "token", "EMOTION_RAY_HOME": str(tmp / "home"),
                    "PYTHONPATH": path, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(HEALTH_CHECK_S)}
        self.nodes = RayNodes(tmp, self.env)
        self.s3.ready()
        self.nodes.ready()
        self.first_workers = self.nodes.add_workers(2)
        self.mlflow.ready()

    def run(self, name: str, argv: list[str]) -> Driver:
        return Driver(self.tmp, name, argv, self.env)

    def train(self, name: str, *extra: str, label: str = "") -> Driver:
        """``--run-name name``; ``label`` names its output files when the same run is started again."""
        return self.run(label or name, ["pipelines/two_stage.py", *TRAIN, "--address", self.nodes.address,
                                        "--mlflow-uri", self.mlflow.uri, "--run-name", name, *extra])

    def json(self, key: str):
        return json.loads(self.s3.read(key))

    def registered(self, run: str, stage: str) -> list[str]:
        """The checkpoints Ray Train has registered for ``stage`` (its checkpoint manager's snapshot on S3,
        written when the controller takes a worker's report), oldest report first."""
        try:
            snapshot = self.json(f"runs/{run}/{stage}/checkpoint_manager_snapshot.json")
        except self.s3.client().exceptions.NoSuchKey:
            return []
        return sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"])

    def held_fault(self, run: str, stage: str) -> tuple[list[str], Path]:
        """``--fault`` arguments that hold ``stage``'s rank 0 at the first step of its second epoch (after
        its first report) for ``HOLD_S``, the other rank waiting on it, before that worker exits by itself;
        and the marker file it writes when the hold starts."""
        marker = self.tmp / f"{run}-{stage}.hold"
        return ["--fault", f"{stage}:1:0:0:{marker}"], marker

    def lose_node_in_hold(self, driver: Driver, run: str, stage: str, marker: Path) -> dict:
        """While ``stage``'s rank 0 is held (see :meth:`held_fault`) and once Ray Train has registered the
        first epoch's checkpoint, kill that worker's node. Returns what was seen: the stage's worker nodes,
        the node killed, the checkpoints registered and their weights' digests (read at once: retention
        may delete a checkpoint later), where the console relay runs."""
        client = self.mlflow.client()
        wait_for(marker.exists, f"{run}: {stage}'s rank 0 reaching its second epoch", RUN_TIMEOUT,
                 alive=driver.proc, log=driver.err)
        held = time.time()
        wait_for(lambda: self.registered(run, stage), f"{run}: {stage}'s first registered checkpoint", HOLD_S,
                 poll=0.1, alive=driver.proc, log=driver.err)
        state = self.json(f"runs/{run}/pipeline_state.json")
        workers = client.get_run(state["child_runs"][stage]).data.tags["worker_nodes"].split(",")
        killed = self.nodes.kill(workers[0])
        waited = time.time() - held
        # Killed within the hold: the worker group failed by the node's loss, not by the fault's own exit.
        assert waited < HOLD_S - 1, f"{run}: the node was killed {waited:.1f} s into a {HOLD_S:.0f} s hold"
        registered = self.registered(run, stage)
        digests = {name: weights_sha256(self.s3.read(f"runs/{run}/{stage}/{name}/state.pt")) for name in registered}
        relays = [a.node_id for a in self.nodes.actors("emotion-ray-console")]
        return {"workers": workers, "killed": killed, "killed_id": workers[0], "registered": registered,
                "digests": digests, "relays": relays, "stage_run": state["child_runs"][stage]}

    def runs(self, name: str) -> dict:
        """``{"parent": Run, "<stage>": [Run, ...]}``: the pipeline run ``name`` and its child runs, from
        the MLflow server."""
        client = self.mlflow.client()
        exp = client.get_experiment_by_name("emotion-ray")
        parents = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
        assert len(parents) == 1, [p.info.run_id for p in parents]
        children = client.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        out: dict = {"parent": parents[0]}
        for child in children:
            out.setdefault(child.info.run_name, []).append(child)
        return out

    def close(self) -> None:
        for service in (self.nodes, self.mlflow, self.s3):
            service.close()


def weights_sha256(state_pt: bytes) -> str:
    """The digest the run tags a resume with (``resume.<epoch>.weights_sha256``), computed here from a
    checkpoint file's bytes: SHA-256 over the model's tensors in key order (name, dtype, shape, bytes)."""
    import torch

    model = torch.load(io.BytesIO(state_pt), weights_only=True, map_location="cpu")["model"]
    h = hashlib.sha256()
    for key, value in model.items():
        flat = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{flat.dtype}|{tuple(flat.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    services = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield services
    finally:
        services.close()


@pytest.fixture(scope="module")
def shards(cluster):
    """The demo's FI-like and Emotion6-like folders ingested to S3 by Ray Data jobs on the cluster."""
    from datasets_io.demo import make_demo

    raw = make_demo(cluster.tmp / "raw", images_per_class=6, image_size=32, which=("fi", "emotion6"))
    jobs = [cluster.run(f"ingest-{key}", ["-m", "datasets_io", "ingest", "--layout", layout, *options,
                                          "--root", str(raw[key]), "--out", f"{SHARDS}/{key}", "--max-side", "64",
                                          "--address", cluster.nodes.address])
            for key, layout, options in (("fi", "folder", ["--categories", "FI"]), ("emotion6", "emotion6", []))]
    for job in jobs:
        assert job.finish(600) == 0, job.tail()
    return {"raw": raw, "jobs": jobs}


@pytest.fixture(scope="module")
def spread(cluster, shards):
    """The two-stage demo on S3 and two nodes (SPREAD); stage two loses rank 0's node after its first
    registered checkpoint, a fresh node joins, and one retry is allowed."""
    fault, marker = cluster.held_fault("spread", "stage2")
    driver = cluster.train("spread", "--mode", "two_stage", "--task", "single", "--num-epochs", "1",
                           "--stage2-epochs", "2", "--placement-strategy", "SPREAD", "--max-failures", "1", *fault)
    lost = cluster.lose_node_in_hold(driver, "spread", "stage2", marker)
    cluster.nodes.add_workers(1)
    assert driver.finish() == 0, driver.tail()
    return {"driver": driver, "lost": lost}


@pytest.fixture(scope="module")
def lost_without_retries(cluster, shards):
    """One stage, no retries: a node lost after the stage's first registered checkpoint ends the run; then
    the same command again."""
    argv = ["--mode", "one_stage", "--task", "single", "--num-epochs", "2", "--placement-strategy", "SPREAD",
            "--max-failures", "0"]
    fault, marker = cluster.held_fault("lost0", "stage1")
    failed = cluster.train("lost0", *argv, *fault)
    lost = cluster.lose_node_in_hold(failed, "lost0", "stage1", marker)
    rc = failed.finish()
    runs_after_failure = cluster.runs("lost0")
    state_after_failure = cluster.json("runs/lost0/pipeline_state.json")
    rerun = cluster.train("lost0", *argv, *fault, label="lost0-rerun")  # the same command (the marker is spent)
    return {"failed": failed, "rc": rc, "lost": lost, "runs_after_failure": runs_after_failure,
            "state_after_failure": state_after_failure,
            "rerun": rerun, "rerun_rc": rerun.finish()}


# ----------------------------------------------------------------------------- S3 end to end

def test_ingest_writes_shards_and_manifest_to_s3(cluster, shards):
    for key in ("fi", "emotion6"):
        keys = cluster.s3.keys(f"shards/{key}/")
        manifest = cluster.json(f"shards/{key}/manifest.json")
        for split in ("train", "val", "test"):
            parts = [k for k in keys if k.startswith(f"shards/{key}/{split}/") and k.endswith(".parquet")]
            assert parts, (split, keys)
            assert manifest["counts"][split] > 0, manifest["counts"]
    everything = cluster.s3.keys("shards/")
    assert not [k for k in everything if ".tmp-" in k], "a temporary ingest folder was left on S3"
    assert not (REPO / "s3:").exists(), "an s3:// --out made a local folder"
    for job in shards["jobs"]:
        assert f"-> s3://{BUCKET}/shards/" in job.stdout.replace("\u2192", "->"), job.tail()


def test_s3_holds_checkpoints_run_folder_and_mlflow_artifacts(cluster, spread):
    keys = set(cluster.s3.keys())
    run = "runs/spread"
    assert {f"{run}/pipeline_state.json", f"{run}/result.json"} <= keys
    state = cluster.json(f"{run}/pipeline_state.json")
    assert set(state["stages"]) == {"stage1", "stage2"}
    for stage, last in (("stage1", 0), ("stage2", 1)):
        # Ray Train's run folder: its checkpoint manager's snapshot and the checkpoints it kept.
        assert f"{run}/{stage}/checkpoint_manager_snapshot.json" in keys
        best = state["stages"][stage]["outcome"]["best_checkpoint"]
        assert best.startswith(f"{RUNS}/spread/{stage}/epoch_"), best
        for epoch in {last, int(best.rsplit("_", 1)[1])}:
            assert {f"{run}/{stage}/epoch_{epoch:04d}/{f}" for f in ("state.pt", "meta.json")} <= keys, stage
    result = cluster.json(f"{run}/result.json")
    assert result["run_dir"] == f"{RUNS}/spread" and isinstance(result["test_pearson_v"], float)
    # Every artifact MLflow lists for the parent and stage runs is an object under s3://<bucket>/mlflow/.
    client = cluster.mlflow.client()
    runs = cluster.runs("spread")
    mlflow_keys = {k for k in keys if k.startswith("mlflow/")}
    for name, run_id in [("parent", runs["parent"].info.run_id)] + [(s, runs[s][0].info.run_id)
                                                                    for s in ("stage1", "stage2")]:
        files = _artifact_files(client, run_id)
        assert "recipe.yaml" in files, (name, files)
        if name != "parent":
            assert {"best_checkpoint/state.pt", "best_checkpoint/meta.json"} <= set(files), (name, files)
        missing = [f for f in files if not any(k.endswith(f"/{run_id}/artifacts/{f}") for k in mlflow_keys)]
        assert not missing, (name, missing)
    # The stages' logged models too (MLflow 3 keeps them beside the runs).
    assert any(k.endswith("/MLmodel") for k in mlflow_keys), sorted(mlflow_keys)[:20]
    # Nothing of the run landed on the driver's disk instead.
    assert not (REPO / "s3:").exists() and not (cluster.tmp / "home" / "runs").exists()


def _artifact_files(client, run_id: str, path: str = "") -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path or None):
        files += _artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def test_predict_reads_the_checkpoint_from_s3(cluster, spread, shards):
    image = next(shards["raw"]["emotion6"].rglob("*.jpg"))
    proc = subprocess.run([sys.executable, "-m", "pipelines.predict", "--checkpoint", f"{RUNS}/spread", str(image)],
                          cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"image={image}" in proc.stdout and "valence=" in proc.stdout, proc.stdout
    assert "1 images predicted, 0 unreadable skipped" in proc.stderr


# ----------------------------------------------------------------------------- several nodes

def test_workers_run_on_two_nodes_with_a_one_node_mlflow_layout(cluster, spread):
    runs = cluster.runs("spread")
    # The same layout as a one-node run (tests/test_e2e_proof.py): one parent, one run per stage.
    assert {k: len(v) for k, v in runs.items() if k != "parent"} == {"stage1": 1, "stage2": 1}
    parent, stage1, stage2 = runs["parent"], runs["stage1"][0], runs["stage2"][0]
    assert [r.info.status for r in (parent, stage1, stage2)] == ["FINISHED"] * 3
    assert cluster.json("runs/spread/result.json")["mlflow_run_id"] == parent.info.run_id
    history = cluster.mlflow.client().get_metric_history(stage1.info.run_id, "val_pearson_mean")
    assert [m.step for m in history] == [0]
    # Stage one (never disturbed): its two workers on the two worker nodes, none on the head (no CPUs).
    nodes = stage1.data.tags["worker_nodes"].split(",")
    first = spread["lost"]["workers"]      # stage two's, before the node was lost
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert set(nodes) == set(first), (nodes, first)
    assert "[stage1] 2 workers on 2 nodes" in spread["driver"].stdout
    # The shards were read from S3 (the stage's dataset inputs name their source).
    sources = {json.loads(d.dataset.source)["uri"] for d in stage1.inputs.dataset_inputs}
    assert sources == {f"{SHARDS}/fi", f"{SHARDS}/emotion6"}, sources
    # The console relay runs on the driver's node (the head), not on a worker node that can be lost.
    head = cluster.nodes.alive()["head"]
    assert spread["lost"]["relays"] == [head], (spread["lost"]["relays"], head)


def test_lost_node_restarts_the_worker_group_once_from_its_checkpoint(cluster, spread):
    lost, driver = spread["lost"], spread["driver"]
    lines = [m for m in RESTART_LINE.finditer(driver.stdout + driver.stderr)]
    assert len(lines) == 1, driver.tail()
    stage, epoch = lines[0].group(1), int(lines[0].group(2))
    # It resumed from the checkpoint Ray Train had registered when the node was lost (the first epoch's:
    # the node was lost in the second), with exactly that checkpoint's weights (digest computed here).
    assert lost["registered"] == ["epoch_0000"], lost["registered"]
    assert (stage, epoch) == ("stage2", 1), lines[0].group(0)
    checkpoint = "epoch_0000"
    runs = cluster.runs("spread")
    assert {k: len(v) for k, v in runs.items() if k != "parent"} == {"stage1": 1, "stage2": 1}, "duplicate runs"
    stage2 = runs["stage2"][0]
    assert stage2.info.run_id == lost["stage_run"]
    tags = stage2.data.tags
    assert tags[f"resume.{epoch}.weights_sha256"] == lost["digests"][checkpoint]
    assert tags["resumed_from_epoch"] == str(epoch)
    # The restarted workers are on live nodes, not on the one lost.
    assert lost["killed_id"] not in tags["worker_nodes"].split(","), tags["worker_nodes"]
    # Each stage run ended once, FINISHED; every epoch of stage two has its validation metric.
    assert stage2.info.status == "FINISHED" and stage2.info.end_time
    steps = [m.step for m in cluster.mlflow.client().get_metric_history(stage2.info.run_id, "val_pearson_mean")]
    assert sorted(set(steps)) == [0, 1], steps
    assert not re.search(r"Traceback|WorkerGroupError|RayActorError", driver.stdout + driver.stderr), driver.tail()


def test_lost_node_without_retries_ends_in_one_line_and_the_rerun_finishes(cluster, lost_without_retries):
    seen = lost_without_retries
    failed, rerun = seen["failed"], seen["rerun"]
    console = failed.stdout + failed.stderr
    assert seen["rc"] == 2, failed.tail()
    errors = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, failed.tail()
    assert "stage stage1 failed: its workers' processes or nodes were lost" in errors[0]
    assert "--run-name lost0" in errors[0] and "--max-failures 0" in errors[0]
    assert not re.search(r"Traceback|WorkerGroupError|RayActorError|ActorDiedError", console), failed.tail()
    assert "stage1" not in seen["state_after_failure"]["stages"]   # the failed stage is not recorded as done
    before = seen["runs_after_failure"]
    assert before["stage1"][0].info.status == "FAILED"
    # The same command again: it finishes, in the same MLflow runs.
    assert seen["rerun_rc"] == 0, rerun.tail()
    assert "resuming run 'lost0'" in rerun.stdout
    after = cluster.runs("lost0")
    assert after["parent"].info.run_id == before["parent"].info.run_id
    assert [r.info.run_id for r in after["stage1"]] == [before["stage1"][0].info.run_id]
    assert after["stage1"][0].info.status == "FINISHED" and after["parent"].info.status == "FINISHED"
    result = cluster.json("runs/lost0/result.json")
    assert result["mlflow_run_id"] == before["parent"].info.run_id
