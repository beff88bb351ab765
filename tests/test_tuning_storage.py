"""A sweep on object storage: ``python -m tuning --storage-path s3://bucket/sweeps`` against moto's S3
server on loopback, checked through what it leaves in the bucket, in MLflow and (nothing) on the local disk.

One tiny sweep (two_stage ``--mode one_stage --task multi``: a trial is stage one, two trials of one
epoch under FIFO) runs once in a child process: a new Ray job on the session's Ray (``--address``),
like ``python -m tuning`` on a cluster. The session's Ray was started before the S3 settings were in
the environment, so its processes never saw them: the Tune trials, Ray Train controllers and workers
reach the bucket only because the sweep hands the driver's settings to its job's runtime env
(:func:`pipelines.cli.storage_runtime_env`).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bucket"
PREFIX = "sweeps"
STORAGE = f"s3://{BUCKET}/{PREFIX}"
NAME = "s3-sweep"
TINY = ["--demo-images-per-class", "6", "--image-size", "32", "--backbone", "resnet10t", "--batch-size", "8",
        "--num-workers", "1", "--seed", "3"]
SWEEP_TIMEOUT_S = 900    # a shared 2-core machine took 394 s at a load average of 50


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, its endpoint and test credentials in the environment
    (restored afterwards), and an empty bucket; yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _text(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _local_traces(root: Path) -> list[str]:
    """Paths under ``root`` named like the sweep, or like a URI taken for a local path (``s3:``)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        found += [os.path.join(folder, n) for n in dirs + files if NAME in n or n.startswith("s3:")]
    return found


@pytest.fixture(scope="module")
def swept(ray_session, s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = [*TINY, "--mode", "one_stage", "--task", "multi", "--num-epochs", "1", "--num-samples", "2",
            "--max-concurrent", "1", "--scheduler", "fifo", "--storage-path", STORAGE, "--mlflow-uri", uri,
            "--sweep-name", NAME, "--address", ray_session.get_runtime_context().gcs_address]
    # cwd: the repository, as for the other sweeps (Ray adds the driver's folder to its workers' path).
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tuning", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=SWEEP_TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.monotonic() - started
    print(f"\nthe S3 sweep took {seconds:.0f} s (load average {os.getloadavg()[0]:.1f})")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return SimpleNamespace(client=s3, uri=uri, stdout=proc.stdout, seconds=seconds,
                           keys=_keys(s3, f"{PREFIX}/{NAME}/"))


def test_a_sweep_on_s3_keeps_everything_in_the_bucket(swept):
    from mlflow import MlflowClient

    client, root = swept.client, f"{PREFIX}/{NAME}"
    keys = set(swept.keys)
    # The sweep's own files, Tune's experiment state and each trial's Ray Train run, all in the bucket.
    for name in ("sweep_state.json", "trials.csv", "best_recipe.yaml", "best_config.yaml", "tune/tuner.pkl"):
        assert f"{root}/{name}" in keys, sorted(keys)
    assert any(k.startswith(f"{root}/tune/experiment_state") for k in keys), sorted(keys)
    state = json.loads(_text(client, f"{root}/sweep_state.json"))
    assert state.get("finished") is True and state.get("parent_run_id")
    rows = list(csv.DictReader(_text(client, f"{root}/trials.csv").splitlines()))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["val_pearson_mean"] for r in rows), rows
    for row in rows:   # every trial's checkpoints went to the bucket (by its workers, on the session's Ray)
        assert any(k.startswith(f"{root}/trials/{row['trial_id']}/") and k.endswith("meta.json") for k in keys), \
            (row["trial_id"], sorted(keys))
    # The parent MLflow run holds the same three files, read back from the bucket.
    mlflow = MlflowClient(tracking_uri=swept.uri)
    parent = state["parent_run_id"]
    logged = {a.path for a in mlflow.list_artifacts(parent)}
    assert {"trials.csv", "best_recipe.yaml", "best_config.yaml"} <= logged, logged
    local = mlflow.download_artifacts(parent, "best_config.yaml", str(Path(swept.uri[len("sqlite:///"):]).parent))
    assert Path(local).read_text() == _text(client, f"{root}/best_config.yaml")
    # The printed paths are the bucket's.
    assert f"{STORAGE}/{NAME}/best_config.yaml" in swept.stdout


def test_every_trial_is_an_mlflow_run_of_the_sweep(swept):
    from mlflow import MlflowClient

    root = f"{PREFIX}/{NAME}"
    rows = list(csv.DictReader(_text(swept.client, f"{root}/trials.csv").splitlines()))
    parent = json.loads(_text(swept.client, f"{root}/sweep_state.json"))["parent_run_id"]
    mlflow = MlflowClient(tracking_uri=swept.uri)
    run = mlflow.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["sweep"] == "true"
    children = {r.data.tags["sweep_trial"]: r for r in mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
    assert sorted(children) == sorted(r["trial_id"] for r in rows)     # one run per trial, no stage one
    for row in rows:
        child = children[row["trial_id"]]
        assert child.info.run_id == row["mlflow_run_id"] and child.info.status == "FINISHED"
        assert [m.step for m in mlflow.get_metric_history(child.info.run_id, "val_pearson_mean")] == [0]
        assert child.data.metrics["best_val_pearson_mean"] == pytest.approx(float(row["val_pearson_mean"]))
    # The summary ends with the experiment's page in the MLflow UI.
    assert swept.stdout.rstrip().splitlines()[-1].split() == [
        "experiment", f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}?workflowType=machine_learning"]


def test_the_best_trials_checkpoint_reads_back_from_the_bucket(swept, tmp_path):
    """trials.csv names the best trial's checkpoint by its URI; ``python -m pipelines.predict --checkpoint``
    loads it from there and predicts."""
    from PIL import Image

    from pipelines import predict
    from pipelines.checkpoints import read_meta

    best = list(csv.DictReader(_text(swept.client, f"{PREFIX}/{NAME}/trials.csv").splitlines()))[0]
    checkpoint = best["checkpoint"]
    assert checkpoint.startswith(f"{STORAGE}/{NAME}/trials/{best['trial_id']}/"), checkpoint
    assert f"{checkpoint[len(f's3://{BUCKET}/'):]}/meta.json" in swept.keys
    meta = read_meta(checkpoint)
    assert meta["recipe"].optimizer.lr == pytest.approx(float(best["stage1.optimizer.lr"]))
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "navy")):
        Image.new("RGB", (40, 40), colour).save(images / f"{i}.png")
    out = tmp_path / "predictions.csv"
    assert predict.main(["--checkpoint", checkpoint, str(images), "--out", str(out)]) == 0
    with out.open() as f:
        predictions = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in predictions] == ["0.png", "1.png"]
    assert all(math.isfinite(float(r[k])) for r in predictions for k in ("valence", "arousal")), predictions
    assert {r["nearest_category"] for r in predictions} <= set(meta["recipe"].classes), predictions


def test_nothing_named_like_the_sweep_is_written_locally(swept):
    for root in (REPO, Path(os.environ["EMOTION_RAY_HOME"])):
        assert _local_traces(root) == []


def test_the_best_config_retrains_on_the_same_storage(swept):
    """``python pipelines/two_stage.py --config s3://.../best_config.yaml``, the retrain command the sweep
    prints, reads the file and its recipe from the bucket and writes its run to the sweep's storage."""
    from pipelines import cli, two_stage
    from pipelines.registry import get_pipeline

    config_uri, recipe_uri = f"{STORAGE}/{NAME}/best_config.yaml", f"{STORAGE}/{NAME}/best_recipe.yaml"
    assert f"pipelines/two_stage.py --config {config_uri}" in swept.stdout
    config = yaml.safe_load(_text(swept.client, f"{PREFIX}/{NAME}/best_config.yaml"))
    assert config["storage_path"] == STORAGE and config["recipe"] == recipe_uri
    args = cli.parse_args(get_pipeline("two_stage").build_parser(), ["--config", config_uri])
    plan = two_stage.configure(args)
    assert plan.run.storage_path == STORAGE
    best = list(csv.DictReader(_text(swept.client, f"{PREFIX}/{NAME}/trials.csv").splitlines()))[0]
    stage1 = plan.recipe.stage("stage1")
    assert stage1.optimizer.lr == pytest.approx(float(best["stage1.optimizer.lr"]))
    assert (stage1.epochs, stage1.prep.size, stage1.model.backbone) == (1, 32, "resnet10t")
