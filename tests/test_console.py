"""The quiet console (pipelines.console) and the MLflow dataset inputs (pipelines.tracking)."""
from __future__ import annotations

import json
import warnings

import pytest

from pipelines import console


def test_verbose_flag_and_environment(monkeypatch):
    monkeypatch.delenv(console.ENV, raising=False)
    assert not console.is_verbose(None)
    assert console.is_verbose(True)
    monkeypatch.setenv(console.ENV, "1")
    assert console.is_verbose(None)
    monkeypatch.setenv(console.ENV, "0")
    assert not console.is_verbose(None)
    assert console.ray_init_kwargs(False)["log_to_driver"] is True  # the project's worker lines need it
    assert "logging_level" not in console.ray_init_kwargs(True)


@pytest.fixture
def fake_forwarding(monkeypatch):
    """Ray's driver-side dispatcher of forwarded worker output, as log_to_driver=True sets it up."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data))]
    monkeypatch.setattr("ray._private.worker.print_to_stdstream",
                        lambda data, ignore_prefix: printed.append(data))
    yield dispatcher, printed
    dispatcher.handlers = saved


def _emit(dispatcher):
    dispatcher.emit({"lines": ["Reporting training result 1: TrainingReport(...)",
                               console.mark("epoch 1/6  loss 0.1"),
                               "Starting execution of Dataset train_0"],
                     "pid": 123, "actor_name": "RayTrainWorker", "is_err": True, "ip": "127.0.0.1"})


def test_quiet_console_prints_only_the_projects_worker_lines(fake_forwarding, capsys):
    dispatcher, ray_printed = fake_forwarding
    assert console.filter_worker_output(verbose=False) is True
    _emit(dispatcher)
    out = capsys.readouterr()
    assert out.err.splitlines() == ["epoch 1/6  loss 0.1"]   # no Ray prefix, no Ray lines
    assert ray_printed == []
    # Messages the GCS pushes (listen_error_messages -> print_to_stdstream): start-up notice dropped,
    # real errors kept.
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started on node"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["A worker died or was killed while executing a task"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert [d["lines"] for d in ray_printed] == [["A worker died or was killed while executing a task"]]


def test_verbose_console_passes_rays_lines_through(fake_forwarding, capsys):
    dispatcher, ray_printed = fake_forwarding
    assert console.filter_worker_output(verbose=True) is False
    _emit(dispatcher)
    assert capsys.readouterr().err.splitlines() == ["epoch 1/6  loss 0.1"]
    assert [d["lines"] for d in ray_printed] == [["Reporting training result 1: TrainingReport(...)",
                                                  "Starting execution of Dataset train_0"]]


def test_quiet_configure_hides_ray_datas_console_not_its_file(monkeypatch):
    import logging

    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    monkeypatch.delenv(console.ENV, raising=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "print_on_execution_start", True)
    assert console.configure(False) is False
    assert ctx.print_on_execution_start is False
    handlers = logging.getLogger("ray.data").handlers
    levels = {type(h).__name__: h.level for h in handlers}
    assert levels["SessionFileHandler"] <= logging.INFO and levels["PlainRayHandler"] == logging.ERROR, levels
    # Put Ray Data's default logging back for the other tests.
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
    import ray.data._internal.logging as data_logging

    data_logging.configure_logging()


def test_train_data_config_avoids_the_deprecated_exclude_resources():
    from ray.data import DataContext

    DataContext.get_current()
    from ray.util.annotations import RayDeprecationWarning

    from pipelines.train_loop import EvalSplitDataConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        config = EvalSplitDataConfig()
        options = config._resolve_execution_options("val")
    assert options.preserve_order == DataContext.get_current().execution_options.preserve_order


def test_stage_runs_record_their_datasets_as_mlflow_inputs(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.tracking import Tracker, manifest_digest

    shards = tmp_path / "shards"
    (shards / "train").mkdir(parents=True)
    pq.write_table(pa.table({"image": [b"x"], "valence": np.array([0.1], dtype=np.float32),
                             "label": [1], "image_id": ["a"]}), shards / "train" / "part-0.parquet")
    manifest = {"layout": "emotion6", "classes": ["joy"], "counts": {"train": 1, "val": 0, "test": 0},
                "shards": str(shards), "created": "now"}
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "t")
    run = tracker.start_run("stage2")
    tracker.log_dataset_inputs(run, {"dimensional": manifest})
    (inp,) = tracker.client.get_run(run).inputs.dataset_inputs
    assert inp.dataset.name == "dimensional:shards"
    assert inp.dataset.digest == manifest_digest(manifest) != manifest_digest({**manifest, "classes": ["sad"]})
    assert json.loads(inp.dataset.source)["uri"] == str(shards)
    assert json.loads(inp.dataset.profile)["counts"] == {"train": 1, "val": 0, "test": 0}
    columns = {c["name"]: c["type"] for c in json.loads(inp.dataset.schema)["mlflow_colspec"]}
    assert columns == {"image": "binary", "valence": "float", "label": "long", "image_id": "string"}
    assert {(t.key, t.value) for t in inp.tags} == {("mlflow.data.context", "dimensional")}


def test_epoch_progress_reaches_the_driver_as_a_bar_only_on_a_terminal(fake_forwarding, capsys, monkeypatch):
    dispatcher, ray_printed = fake_forwarding
    sent = []
    progress = console.EpochProgress("stage1", 6, lambda m: sent.append(console.mark(m)), interval_s=0.0)
    for epoch, steps in ((0, 4), (1, 2)):
        for step in range(steps):
            progress(epoch, step)
    last = json.loads(sent[-1].split(console.PROGRESS, 1)[1])
    assert last == {"stage": "stage1", "epoch": 2, "epochs": 6, "step": 2, "total": 4}   # total: epoch 1's steps
    console.filter_worker_output(verbose=False)
    data = {"lines": [*sent, console.mark("epoch 2/6  loss 0.1")], "pid": 1, "is_err": True}
    dispatcher.emit(data)
    assert capsys.readouterr().err.splitlines() == ["epoch 2/6  loss 0.1"]   # not a terminal: no bar
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    console.filter_worker_output(verbose=False)
    dispatcher.emit(data)
    err = capsys.readouterr().err
    assert "[stage1] epoch 2/6" in err and err.rstrip().endswith("epoch 2/6  loss 0.1")
