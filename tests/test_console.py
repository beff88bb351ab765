"""The quiet console (pipelines.console) and the MLflow dataset inputs (pipelines.tracking)."""
from __future__ import annotations

import json
import warnings

from pipelines import console


def test_verbose_flag_and_environment(monkeypatch):
    monkeypatch.delenv(console.ENV, raising=False)
    assert not console.is_verbose(None)
    assert console.is_verbose(True)
    monkeypatch.setenv(console.ENV, "1")
    assert console.is_verbose(None)
    monkeypatch.setenv(console.ENV, "0")
    assert not console.is_verbose(None)
    # Quiet: Ray forwards nothing to the console (the project's lines take the relay); verbose: everything.
    assert console.ray_init_kwargs(False)["log_to_driver"] is False
    assert console.ray_init_kwargs(True) == {"log_to_driver": True}


class _Stream:
    def __init__(self, tty: bool):
        self.lines, self.tty = [], tty

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_worker_lines_reach_the_driver_through_the_relay_and_nothing_else(ray_session, monkeypatch):
    """A Ray task (as a Train worker would) emits lines; the driver's printer prints exactly them, in order."""
    import logging

    import ray

    monkeypatch.setattr(console, "_printer", None)
    out = _Stream(tty=False)
    assert console.start_relay(verbose=False, stream=out)

    @ray.remote(num_cpus=0)
    def worker_side():
        emit = console.emitter(logging.getLogger("t"))
        for i in range(3):
            emit(f"epoch {i + 1}/3  loss 0.{i}")
        print("Reporting training result 1: TrainingReport(...)")   # Ray's own chatter: not forwarded
        return True

    assert ray.get(worker_side.remote())
    console.flush()
    printed = "".join(out.lines).splitlines()
    assert printed == ["epoch 1/3  loss 0.0", "epoch 2/3  loss 0.1", "epoch 3/3  loss 0.2"]
    console._printer.stopped.set()


def test_without_the_relay_a_worker_logs_its_lines(ray_session):
    """--verbose starts no relay: the worker's lines go to its logger (Ray forwards them with its prefix)."""
    import logging

    import ray

    @ray.remote(num_cpus=0)
    def worker_side():
        return console.emitter(logging.getLogger("t")) == logging.getLogger("t").info

    assert ray.get(worker_side.remote())
    assert console.start_relay(verbose=True) is False


def test_quiet_configure_hides_ray_datas_console_not_its_file(monkeypatch):
    import logging

    monkeypatch.delenv(console.ENV, raising=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "print_on_execution_start", True)
    handlers = logging.getLogger("ray.data").handlers
    saved = [(h, h.level) for h in handlers]
    try:
        assert console.configure(False) is False
        assert ctx.print_on_execution_start is False
        levels = {type(h).__name__: h.level for h in handlers}
        assert levels["SessionFileHandler"] <= logging.INFO and levels["PlainRayHandler"] == logging.ERROR, levels
    finally:
        for handler, level in saved:
            handler.setLevel(level)


def test_train_data_config_avoids_the_deprecated_exclude_resources():
    from ray.data import DataContext

    DataContext.get_current()
    from ray.util.annotations import RayDeprecationWarning

    from pipelines.train_loop import EvalSplitDataConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        config = EvalSplitDataConfig()
    assert config._options.preserve_order == DataContext.get_current().execution_options.preserve_order


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
    # The schema every shard has (datasets_io.records), not this one file's: one entry per column.
    from datasets_io.records import COLUMNS

    assert set(columns) == set(COLUMNS)
    assert {k: columns[k] for k in ("image", "valence", "label", "image_id", "label_dist")} == {
        "image": "binary", "valence": "float", "label": "long", "image_id": "string", "label_dist": "array"}
    assert {(t.key, t.value) for t in inp.tags} == {("mlflow.data.context", "dimensional")}


def test_epoch_progress_becomes_one_bar_on_a_terminal_and_nothing_elsewhere(ray_session, monkeypatch):
    import logging

    monkeypatch.setattr(console, "_printer", None)
    sent = []
    progress = console.EpochProgress("stage1", 6, sent.append, interval_s=0.0)
    for epoch, steps in ((0, 4), (1, 2)):
        for step in range(steps):
            progress(epoch, step)
    last = json.loads(sent[-1].split(console.PROGRESS, 1)[1])
    assert last == {"stage": "stage1", "epoch": 2, "epochs": 6, "step": 2, "total": 4}   # total: epoch 1's steps
    for tty in (False, True):
        out = _Stream(tty)
        monkeypatch.setattr(console, "_printer", None)
        console.start_relay(verbose=False, stream=out)
        emit = console.emitter(logging.getLogger("t"))
        for line in [*sent, "epoch 2/6  loss 0.1"]:
            emit(line)
        console.flush()
        text = "".join(out.lines)
        if tty:
            assert "[stage1] epoch 2/6" in text and text.rstrip().endswith("epoch 2/6  loss 0.1")
        else:
            assert text.splitlines() == ["epoch 2/6  loss 0.1"]   # not a terminal: no bar
        console._printer.stopped.set()


def test_already_ingested_data_still_starts_ray_with_the_quiet_console(ray_session):
    """A cached demo needs no ingest, so the first Ray call is Ray Data's: the project starts Ray first.

    Otherwise Ray Data would start Ray with its defaults, and every worker's log would reach the console.
    """
    import subprocess
    import sys

    from datasets_io.records import read_manifest
    from pipelines import data

    # The demo the pipeline tests use (cached once for the session), not one of its own.
    shards = data.demo_shards(images_per_class=6, image_size=64, seed=0, show_progress=False)
    path = next(iter(shards.values()))
    classes = len(read_manifest(path)["classes"])
    # training_datasets takes the checked manifest (check_shards: reads it, no Ray) and an ImagePrep now.
    code = ("import ray\nfrom pathlib import Path\nfrom datasets_io.prep import ImagePrep\n"
            "from pipelines import console, data\n"
            f"manifest = data.check_shards(Path({str(path)!r}), role='test')\n"
            "assert not ray.is_initialized()\n"
            f"data.training_datasets(manifest, ImagePrep(size=32), num_classes={classes}, seed=0)\n"
            "assert ray.is_initialized()\n"
            "ray.get_actor(console.RELAY)\n"   # the project's relay: started by the project's init
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stderr, proc.stderr[-3000:]
