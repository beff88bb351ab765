"""The paper's grid in one command, the dimensional baseline, and predict's train/serve parity.

End-to-end on tiny demo data with 2 Ray Train workers (one epoch per stage): these tests check
what runs, what is shared and what is reported, not accuracy.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli, two_stage
from pipelines import grid as comparison

pytestmark = pytest.mark.slow

# --batch-size is the global batch: 2 workers x 8.
TINY = ["--demo-images-per-class", "6", "--image-size", "32", "--backbone", "resnet10t", "--batch-size", "16",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--seed", "3", "--num-epochs", "1", "--stage2-epochs", "1",
        "--early-stop", "0"]


# One task's three frameworks: the grid's sharing (one_stage is stage one, two_stage starts from it) is the
# same code for both tasks; single-task runs are tests/test_e2e_proof.py's (two_stage) and
# tests/test_two_stage.py's (one_stage). ``--frameworks all`` is parsed in test_frameworks_and_seeds_flags.
GRID = ["one_stage-multi", "two_stage-multi", "dimensional"]


def _parsed(*argv):
    return two_stage.configure(cli.parse_args(two_stage.build_parser(), list(argv)))


@pytest.fixture(scope="module")
def grid(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    argv = [*TINY, "--frameworks", *GRID, "--storage-path", str(tmp / "runs"),
            "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--run-name", "grid"]
    assert two_stage.main(argv) == 0
    run_dir = tmp / "runs" / "grid"
    return {"tmp": tmp, "result": json.loads((run_dir / "result.json").read_text())}


def test_grid_gives_a_row_per_framework_with_every_metric(grid):
    result = grid["result"]
    assert [r["framework"] for r in result["rows"]] == GRID
    for row in result["rows"]:
        for key in comparison.COMPARE:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["framework"], key, row[key])
        # Every test metric of the stage's scoring is a row column (none whitelisted away).
        assert {"test_spearman_v", "test_r2_a", "test_macro_f1", "test_categorical_macro_f1"} <= set(row)
    assert set(result["summary"]) == set(GRID)
    for framework in GRID:
        assert f"| {framework} |" in result["table"]
        row = next(r for r in result["rows"] if r["framework"] == framework)
        assert result["summary"][framework]["test_pearson_v"]["mean"] == pytest.approx(row["test_pearson_v"])
        assert -1.0 <= row["test_pearson_v"] <= 1.0
    for path in result["best_checkpoints"].values():
        assert (Path(path) / "state.pt").exists() and (Path(path) / "meta.json").exists()


def test_grid_trains_each_stage_one_once_and_two_stage_reuses_it(grid):
    best = grid["result"]["best_checkpoints"]          # stage name -> its best checkpoint folder
    assert set(best) == {"multi-stage1", "multi-stage2", "dimensional"}
    rows = {r["framework"]: r for r in grid["result"]["rows"]}
    for task in ("multi",):
        s1_best = best[f"{task}-stage1"]
        assert rows[f"one_stage-{task}"]["best_checkpoint"] == s1_best      # the one_stage row is stage one
        s2_meta = json.loads((Path(best[f"{task}-stage2"]) / "meta.json").read_text())
        assert s2_meta["recipe"]["init_from"] == s1_best                   # ... and two_stage starts from it
        assert s2_meta["recipe"]["freeze"] == "published" and s2_meta["recipe"]["freeze_bn"] is False
        assert s2_meta["recipe"]["loss"]["va_weight"] == 0.9 and s2_meta["recipe"]["loss"]["va_scale"] == 16
        assert s2_meta["recipe"]["batching"] == "joined" and s2_meta["recipe"]["source"] == "demo"
    dim_meta = json.loads((Path(best["dimensional"]) / "meta.json").read_text())
    spec = dim_meta["recipe"]
    assert spec["init_from"] is None and spec["freeze"] is None and spec["model"]["options"]["task"] == "single"
    assert spec["select"]["metric"] == "pearson_mean" and spec["batching"] == "plain"
    # Images are prepared as the backbone's pretrained_cfg says, and the ingest size is recorded for predict.
    from emotion_models.va import data_config

    cfg = data_config("resnet10t")
    assert {k: spec["prep"][k] for k in cfg} == cfg and spec["prep"]["max_side"] >= 32


def test_grid_logs_children_table_and_chart_to_one_parent(grid):
    from mlflow import MlflowClient

    result = grid["result"]
    client = MlflowClient(tracking_uri=f"sqlite:///{grid['tmp'] / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["mode"] == "grid"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(grid["result"]["best_checkpoints"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison_table.json", "comparison.png", "result.json", "recipe.yaml"} <= artifacts
    assert parent.data.metrics["dimensional.test_pearson_v_mean"] == pytest.approx(
        result["summary"]["dimensional"]["test_pearson_v"]["mean"])


def test_predict_on_a_trained_checkpoint(grid, tmp_path, capsys):
    """The CLI's V and A are the checkpoint (two_stage/multi's stage two) applied to training's eval transform."""
    import csv

    import torch
    from PIL import Image

    from datasets_io.images import prepare_image
    from datasets_io.prep import ImageTransform
    from pipelines import predict
    from pipelines.checkpoints import load_model

    best = Path(grid["result"]["best_checkpoints"]["multi-stage2"])
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (40, 30), (250, 180, 20)).save(images / "warm.jpg")
    Image.new("RGB", (40, 30), (20, 40, 200)).save(images / "cold.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pred.csv"
    assert predict.main([str(images), "--checkpoint", str(best), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    # The unreadable file is reported on stderr and counted in the summary.
    assert any(l.startswith("skipped ") and "broken.jpg" in l for l in captured.err.splitlines()), captured.err
    assert "wrote 2 predictions" in captured.out and "(1 unreadable images skipped)" in captured.out, captured.out

    rows = list(csv.DictReader(out.open()))
    assert [Path(r["image"]).name for r in rows] == ["cold.png", "warm.jpg"]
    model, meta = load_model(best)
    prep = meta["recipe"].prep
    # Training's path: ingest stores each image as prepare_image's JPEG, the eval transform reads that.
    stored = [prepare_image(Path(r["image"]).read_bytes(), max_side=prep.max_side) for r in rows]
    pixels = ImageTransform(prep, train=False, num_classes=1)({"image": np.array(stored, dtype=object)})["image"]
    batch = prep.norm()(torch.from_numpy(pixels)).numpy()
    model.eval()
    with torch.no_grad():
        va = model(torch.from_numpy(batch))["va"].numpy()
    got = np.array([[float(r["valence"]), float(r["arousal"])] for r in rows])
    np.testing.assert_allclose(got, va, rtol=0, atol=1e-5)
    classes = meta["recipe"].classes
    for r in rows:
        assert float(r["valence_sam"]) == pytest.approx(float(r["valence"]) * 4 + 5, abs=1e-4)
        assert r["nearest_category"] in classes
        assert r["head_category"]  # the multi-task head's category (stage-one classes)


def test_summary_over_seeds_is_mean_and_sample_std():
    rows = [{"framework": "dimensional", "seed": s, "test_pearson_v": v, "test_mse": m}
            for s, v, m in ((42, 0.5, 0.1), (43, 0.7, 0.3), (44, 0.6, 0.2))]
    summary = comparison.summarize(rows)["dimensional"]
    assert summary["test_pearson_v"]["mean"] == pytest.approx(0.6)
    assert summary["test_pearson_v"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1))
    assert summary["test_pearson_v"]["n"] == 3 and "test_ccc_v" not in summary
    assert "0.600 ± 0.100" in comparison.comparison_table({"dimensional": summary})


def test_frameworks_and_seeds_flags():
    plan = _parsed("--frameworks", "two_stage/multi", "dimensional", "--seeds", "42", "43", "42")
    assert plan.frameworks == ["two_stage-multi", "dimensional"] and plan.seeds == [42, 43] and plan.grid
    assert _parsed("--frameworks", "all").frameworks == list(two_stage.FRAMEWORKS)
    plan = _parsed("--mode", "dimensional")
    assert plan.frameworks == ["dimensional"] and plan.recipe.stage("dimensional").freeze is None
    assert plan.recipe.stage("stage2").freeze == "published"
    assert _parsed("--mode", "dimensional", "--freeze-until", "layer1").recipe.stage("dimensional").freeze == "layer1"
    assert _parsed("--freeze-until", "none").recipe.stage("stage2").freeze == "none"
    real = _parsed("--mode", "dimensional", "--dimensional", "/tmp").recipe.stage("dimensional")
    assert (real.optimizer.lr, real.optimizer.name, real.model.backbone) == (1e-4, "adam", "resnet101")  # default recipe
    published = _parsed("--mode", "dimensional", "--dimensional", "/tmp", "--recipe", "published")
    assert published.recipe.stage().model.backbone == "resnet101.tv_in1k"
    for argv, message in ((["--frameworks", "three_stage"], "--frameworks"),
                          (["--mode", "dimensional", "--task", "multi"], "--task multi"),
                          (["--dimensional", "/tmp", "--frameworks", "all"], "needs --dataname")):
        with pytest.raises(cli.UsageError, match=message):
            _parsed(*argv)
    with pytest.raises(FileNotFoundError, match="absent.pth.*--weights"):
        from pipelines.runner import require_weights

        require_weights(_parsed("--mode", "dimensional", "--weights", "/nonexistent/absent.pth").recipe.stage())


def test_dimensional_mode_on_real_emotion6_needs_no_categorical_set(ray_session, emotion6_sample, tmp_path,
                                                                       monkeypatch):
    """``--mode dimensional`` on the 48 real Emotion6 images, then predict prepares an image exactly
    as training's evaluation did (same bytes as the ingest, same transform)."""
    import pyarrow.parquet as pq
    import torch

    from datasets_io.prep import ImageTransform
    from pipelines import predict

    monkeypatch.setenv("EMOTION_RAY_DATA", str(tmp_path / "data"))
    argv = [*TINY, "--mode", "dimensional", "--dimensional", str(emotion6_sample), "--storage-path",
            str(tmp_path / "runs"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", "--run-name", "dim",
            "--max-side", "96", "--weights", "none"]
    assert two_stage.main(argv) == 0
    result = json.loads((tmp_path / "runs" / "dim" / "result.json").read_text())
    assert set(result["best_checkpoints"]) == {"dimensional"} and result["mode"] == "dimensional"
    assert math.isfinite(result["test_pearson_v"]) and "test_categorical_accuracy" not in result
    ckpt = Path(result["best_checkpoints"]["dimensional"])
    from pipelines.checkpoints import read_meta

    prep = read_meta(ckpt)["recipe"].prep
    assert prep.max_side == 96

    # Train/serve parity: the raw image through predict == the ingested bytes through training's eval transform.
    shard = tmp_path / "data" / emotion6_sample.name / "test"
    table = pq.read_table(sorted(shard.glob("*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    raw = next(p for p in (emotion6_sample / table["image_id"], emotion6_sample / "images" / table["image_id"])
               if p.exists())
    _, served, bad = predict.load_images([raw], prep)
    trained = ImageTransform(prep, train=False, num_classes=1)({"image": np.array([table["image"]], dtype=object)})
    assert not bad
    torch.testing.assert_close(served, prep.norm()(torch.from_numpy(trained["image"])), rtol=0, atol=1e-6)
