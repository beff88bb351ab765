"""Pretrained weights the way timm users expect them: the Hugging Face hub and its local cache.

No network here: a small model's weights are placed in a local hub cache (the layout huggingface_hub
writes), and every check runs in a clean process whose environment points at it (``HF_HUB_CACHE``,
``HF_HUB_OFFLINE=1``), since huggingface_hub reads them when it is imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TAG = "resnet10t.c3_in1k"          # timm's hub repository timm/resnet10t.c3_in1k


def _run(code: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding random resnet10t weights as ``timm/resnet10t.c3_in1k``'s model.safetensors."""
    import timm
    from safetensors.torch import save_file

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    torch.manual_seed(11)
    model = timm.create_model("resnet10t", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    return cache


def test_hub_weights_load_from_the_local_cache_without_the_network(hub_cache):
    """``weights: hub`` builds the backbone with the cached file's weights (the check, the driver's
    pre-flight and the worker's build all find it; no request leaves the machine: HF_HUB_OFFLINE=1)."""
    code = f"""
import json, torch
from safetensors.torch import load_file
from emotion_models.weights import cached_hub_file, require_hub_weights
from emotion_models.registry import ModelSpec, build_model
path = require_hub_weights("{TAG}")
assert path == cached_hub_file("{TAG}"), (path, cached_hub_file("{TAG}"))
model = build_model(ModelSpec(backbone="{TAG}", weights="hub"), task="single", num_classes=3)
saved = load_file(path)
same = all(torch.equal(model.backbone.state_dict()[k], v) for k, v in saved.items() if k in model.backbone.state_dict())
fresh = build_model(ModelSpec(backbone="{TAG}", weights="none"), task="single", num_classes=3)
differs = not torch.equal(fresh.backbone.conv1[0].weight, saved["conv1.0.weight"])
print(json.dumps({{"same": same, "differs": differs, "path": path}}))
"""
    proc = _run(code, {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and out["differs"] and out["path"].startswith(str(hub_cache))


def test_without_cached_weights_offline_the_run_stops_in_one_line_before_ray_or_data(tmp_path):
    """Real data, no --weights, no network, nothing cached: one line naming both ways out, exit 2; Ray is
    not started and the data is not read (no ingest output appears)."""
    raw = tmp_path / "FI"
    for cls in ("amusement", "anger"):
        (raw / cls).mkdir(parents=True)
    data_home = tmp_path / "data"
    code = f"""
import sys
from pipelines import cli, two_stage
rc = cli.run_main(lambda: two_stage.main(["--dataname", "{raw}", "--mode", "one_stage", "--storage-path",
                                          "{tmp_path / 'runs'}", "--mlflow-uri", "sqlite:///{tmp_path / 'm.db'}"]))
import ray
print("ray started:", ray.is_initialized(), file=sys.stderr)
sys.exit(rc)
"""
    proc = _run(code, {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1",
                       "EMOTION_RAY_DATA": str(data_home)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "--weights PATH" in errors[0] and "--weights none" in errors[0] and "resnet101" in errors[0]
    assert "ray started: False" in proc.stderr
    assert not data_home.exists() or not any(data_home.iterdir()), "data was ingested before the check"


def test_a_local_weights_file_and_none_need_no_hub(tmp_path):
    """``--weights PATH`` reads the file (all or nothing); ``--weights none`` starts from scratch and says so."""
    from emotion_models.registry import ModelSpec, build_model
    from pipelines.runner import require_weights
    from pipelines.recipe import StageRecipe

    source = build_model(ModelSpec(backbone="resnet10t", weights="none"), task="single", num_classes=2)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    model = build_model(ModelSpec(backbone="resnet10t", weights=str(path)), task="single", num_classes=2)
    assert torch.equal(model.backbone.conv1[0].weight, source.backbone.conv1[0].weight)
    require_weights(StageRecipe(model=ModelSpec(backbone="resnet10t", weights=str(path))))   # no error
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        require_weights(StageRecipe(model=ModelSpec(backbone="resnet10t", weights=str(tmp_path / "nope.pt"))))


def test_from_scratch_is_said(capsys):
    from emotion_models.registry import ModelSpec
    from pipelines.runner import require_weights
    from pipelines.recipe import StageRecipe

    require_weights(StageRecipe(model=ModelSpec(backbone="resnet10t", weights="none")))
    assert "training from scratch" in capsys.readouterr().out


def test_lora_has_no_hub_weights_and_says_how_to_give_them():
    from emotion_models.errors import ModelConfigError
    from emotion_models.registry import ModelSpec
    from pipelines.runner import require_weights
    from pipelines.recipe import StageRecipe

    with pytest.raises(ModelConfigError, match="pvt_small.pth"):
        require_weights(StageRecipe(model=ModelSpec(name="lora", weights="hub")))
