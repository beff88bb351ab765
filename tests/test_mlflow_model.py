"""The logged model: a code-based pyfunc (no pickle), registered with --register and the alias
'candidate', loaded by ``python -m pipelines.predict --model``, served over HTTP on loopback."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CLASSES = ["joy", "sadness"]


def _jpeg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny VA checkpoint, logged into a stage run and registered the way a pipeline run does it."""
    import torch

    from datasets_io.prep import ImagePrep
    from emotion_models.losses import LossSpec
    from emotion_models.registry import ModelSpec
    from pipelines.checkpoints import build_stage_model, write_meta
    from pipelines.recipe import Recipe, StageRecipe
    from pipelines.runner import PipelineRun
    from pipelines.tracking import log_stage_artifacts
    from pipelines.train_loop import RunOptions

    tmp = tmp_path_factory.mktemp("mlflow_model")
    # "bounded": True is the tanh VA head now; the image section is the recipe's ImagePrep.
    recipe = StageRecipe(name="stage2", model=ModelSpec(name="va", backbone="resnet10t", weights="none", head="tanh",
                                                        options={"task": "single", "num_classes": 2}),
                         loss=LossSpec(kind="va"),
                         prep=ImagePrep(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                        interpolation="bilinear", crop_pct=1.0, max_side=64),
                         classes=tuple(CLASSES), anchors=((0.8, 0.5), (-0.8, -0.5)))
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save({"model": build_stage_model(recipe).state_dict(), "optimizer": {}}, ckpt / "state.pt")
    write_meta(ckpt, recipe, epoch=0)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    pipeline = PipelineRun(run=RunOptions(storage_path=str(tmp), mlflow_uri=uri, experiment="t", register="emo-test"),
                           run_name="run", tags={}, recipe=Recipe("test", "test", "", {}, ("stage",)))
    child = pipeline.tracker.start_run("stage2", parent_id=pipeline.parent_id)
    model_uri = log_stage_artifacts(pipeline.tracker, child, checkpoint_dir=str(ckpt))
    import mlflow

    after_logging = (pipeline.tracker.client.get_run(child).info, mlflow.active_run())
    pipeline.state["stages"]["stage2"] = {"mlflow_run_id": child, "model_uri": model_uri}
    result = json.loads(Path(pipeline.finish({"pipeline": "test"})).read_text())
    images = tmp / "photos"
    images.mkdir()
    (images / "red.jpg").write_bytes(_jpeg((220, 30, 30)))
    (images / "blue.jpg").write_bytes(_jpeg((30, 30, 220)))
    (images / "broken.jpg").write_bytes(b"not an image")
    return {"uri": uri, "child": child, "result": result, "images": images, "tmp": tmp, "after_logging": after_logging}


def test_logging_the_model_leaves_the_stage_run_open(registered):
    """The stage logs its best epoch and ends its run after the model: logging the model must not end the
    run (nor leave it the process's active run), or the run would be ended twice."""
    info, active = registered["after_logging"]
    assert info.status == "RUNNING" and info.end_time is None and active is None


def test_model_is_a_pyfunc_without_pickle(registered):
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{registered['child']}/model"))
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "pytorch" not in mlmodel
    assert not list(local.rglob("*.pkl"))
    import torch

    state = torch.load(next(local.rglob("state.pt")), weights_only=True)   # plain tensors only
    assert set(state) == {"model"}                                         # no optimizer state shipped


def test_register_sets_the_candidate_alias(registered):
    from mlflow import MlflowClient

    reg = registered["result"]["registered_model"]
    assert reg == {"name": "emo-test", "version": 1, "alias": "candidate", "uri": "models:/emo-test@candidate",
                   "stage": "stage2"}
    version = MlflowClient(tracking_uri=registered["uri"]).get_model_version_by_alias("emo-test", "candidate")
    assert version.run_id == registered["child"]


def test_predict_cli_loads_the_registered_model(registered, monkeypatch, capsys):
    from pipelines import predict

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    assert predict.main(["--model", "models:/emo-test@candidate", str(registered["images"])]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 and all("nearest_category=" in line for line in lines)
    assert "skipped" in out.err and "broken.jpg" in out.err and "2 images predicted, 1 unreadable" in out.err


def test_predict_cli_needs_exactly_one_model_source(registered, capsys):
    from pipelines import cli, predict

    assert cli.run_main(lambda: predict.main([str(registered["images"])])) == 2
    assert "exactly one of --checkpoint and --model" in capsys.readouterr().err


@pytest.mark.slow
def test_served_model_answers_http_with_images_and_flags_a_corrupt_one(registered):
    """``mlflow models serve`` on 127.0.0.1: a real request with two images and a corrupt one (200, that
    row's ``error`` set), then one with only a corrupt image (400 naming the row), then a good one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    log = open(registered["tmp"] / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/emo-test@candidate",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (registered["tmp"] / "serve.log").read_text()[-2000:]
            assert time.time() < deadline, "the server did not come up in 180 s"
            time.sleep(1)
        rows = [[base64.b64encode(_jpeg((220, 30, 30))).decode()], [base64.b64encode(b"garbage").decode()],
                [base64.b64encode(_jpeg((30, 30, 220))).decode()]]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert [p["error"] == "" for p in predictions] == [True, False, True]
        assert "unreadable image" in predictions[1]["error"]
        assert predictions[0]["nearest_category"] in CLASSES and -1 <= predictions[0]["valence"] <= 1
        assert server.poll() is None   # the corrupt row did not take the server down

        # A request whose only image is corrupt: a client error (400) naming the row, not a 5xx.
        bad = json.dumps({"dataframe_split": {"columns": ["image"],
                                              "data": [[base64.b64encode(b"garbage").decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=bad,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60)
        assert answer.value.code == 400
        error = json.loads(answer.value.read())
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "no image in the request could be read: row 0: unreadable image" in error["message"]
        # ... and the server still answers a good request afterwards.
        good = json.dumps({"dataframe_split": {"columns": ["image"], "data": [rows[0]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=good,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["predictions"][0]["error"] == ""
        assert server.poll() is None

        # Malformed requests: each answered with a 4xx whose message names the problem; none takes the
        # server down, and a good request after them is still answered with 200.
        malformed = {
            "bad JSON": (b'{"dataframe_split": {"columns": ["image"], "data": [["abc"', ("json",)),
            "no image column": (json.dumps({"dataframe_split": {"columns": ["text"], "data": [["hello"]]}}).encode(),
                                ("image",)),
            # MLflow decodes the signature's binary column before the model sees it: a value that is not
            # base64 stops there, naming the column and the decoding error ("Incorrect padding").
            "not base64": (json.dumps({"dataframe_split": {"columns": ["image"],
                                                          "data": [["this is *not* base64!"]]}}).encode(),
                           ("column image", "padding")),
            # Characters outside base64's alphabet are dropped by that decoder: no bytes reach the model,
            # which answers that the row's image is unreadable.
            "no base64 characters": (json.dumps({"dataframe_split": {"columns": ["image"],
                                                                    "data": [["@@@@ @@@@"]]}}).encode(),
                                     ("row 0: unreadable image",)),
        }
        for what, (body, named) in malformed.items():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=60)
            text = answer.value.read().decode("utf-8", "replace")
            assert 400 <= answer.value.code < 500, (what, answer.value.code, text[:500])
            message = json.loads(text)["message"].lower()
            assert all(word in message for word in named), (what, message[:500])
            assert server.poll() is None, what
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=good,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["predictions"][0]["error"] == ""
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_predict_raises_a_client_error_when_no_row_is_readable(registered):
    """In-process: a mixed batch keeps per-row errors; a batch of only unreadable rows is a 400-class error."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model("models:/emo-test@candidate")
    mixed = model.predict(pd.DataFrame({"image": [_jpeg((220, 30, 30)), b"garbage"]}))
    assert mixed["error"].tolist()[0] == "" and "unreadable image" in mixed["error"].tolist()[1]
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame({"image": [b"garbage", b"more garbage"]}))
    assert error.value.get_http_status_code() == 400
    assert "row 0: unreadable image" in error.value.message and "row 1: unreadable image" in error.value.message


@pytest.mark.parametrize("raised, status", [(ValueError("a bug in the training code"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_a_stage_that_raises_ends_its_runs(tmp_path, monkeypatch, raised, status):
    """A stage that raises (a bug keeps its traceback; Ctrl-C / `ray job stop`) leaves no MLflow run RUNNING:
    the stage's and the parent's runs end FAILED or KILLED. No Ray: run_stage itself raises."""
    from datasets_io.prep import ImagePrep
    from emotion_models.losses import LossSpec
    from emotion_models.registry import ModelSpec
    from pipelines import runner
    from pipelines.recipe import Recipe, StageRecipe
    from pipelines.train_loop import RunOptions, StageData

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(runner, "run_stage", failing)
    recipe = StageRecipe(name="stage1", model=ModelSpec(name="va", backbone="resnet10t", weights="none",
                                                        options={"task": "single", "num_classes": 2}),
                         loss=LossSpec(kind="va"), prep=ImagePrep(size=32), classes=tuple(CLASSES),
                         anchors=((0.8, 0.5), (-0.8, -0.5)))
    pipeline = runner.PipelineRun(run=RunOptions(storage_path=str(tmp_path), mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}",
                                                 experiment="t"),
                                  run_name="run", tags={}, recipe=Recipe("test", "test", "", {}, ("stage1",)))
    with pytest.raises(type(raised)):
        pipeline.stage(recipe, StageData(datasets={}), manifests={})
    client = pipeline.tracker.client
    child = pipeline.state["child_runs"]["stage1"]
    assert [client.get_run(r).info.status for r in (child, pipeline.parent_id)] == [status, status]
