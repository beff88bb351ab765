"""The VA regressor: outputs, gradients, stage-two freezing, and loading local weights."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from emotion_models import create_model, list_models
from emotion_models.va import VARegressor, backbone_stages, build_va
from emotion_models.weights import load_weights

TINY = "resnet10t"


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task", ["single", "multi"])
def test_forward_shapes_and_every_parameter_gets_a_gradient(task):
    torch.manual_seed(0)
    model = build_va(TINY, task=task, num_classes=5)
    out = model(_images())
    assert out["va"].shape == (2, 2)
    assert ("logits" in out) == (task == "multi")
    loss = out["va"].sum() + (out["logits"].sum() if task == "multi" else 0)
    loss.backward()
    if task == "multi":
        assert out["logits"].shape == (2, 5)
    assert model.task == task and model.num_classes == 5
    # Every parameter is on the graph (timm zero-inits each block's last BN, so some grads are 0).
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.va_head.weight.grad.abs().sum() > 0 and model.backbone.conv1[0].weight.grad.abs().sum() > 0


def test_create_model_builds_the_registered_va_model():
    assert "va" in list_models()
    model = create_model("va", backbone=TINY, task="multi", num_classes=3, weights="none")
    assert isinstance(model, VARegressor) and model(_images())["logits"].shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model 'vaa'"):
        create_model("vaa")


def test_heads_tanh_stays_on_the_canonical_scale_and_the_published_one_is_relu_then_linear():
    torch.manual_seed(0)
    tanh, linear, published = (build_va(TINY, head=h) for h in ("tanh", "linear", "relu_linear"))
    for model in (tanh, linear, published):
        torch.nn.init.constant_(model.va_head.bias, 5.0)  # push raw outputs far above 1
    x = _images(4) * 10
    assert tanh(x)["va"].abs().max() <= 1.0
    assert linear(x)["va"].max() > 1.0
    # The published head, FC_va(relu(flatten(features))), written out.
    published.load_state_dict(linear.state_dict())
    published.eval(), linear.eval()
    with torch.no_grad():
        features = published.backbone(x)
        by_hand = torch.relu(features) @ published.va_head.weight.T + published.va_head.bias
        torch.testing.assert_close(published(x)["va"], by_hand)
        # After a ResNet's pooling the features are already >= 0: the ReLU changes nothing there.
        torch.testing.assert_close(published(x)["va"], linear(x)["va"])
    with pytest.raises(ValueError, match="head"):
        build_va(TINY, head="sigmoid")


def test_unknown_task_and_backbone_are_rejected():
    with pytest.raises(ValueError, match="task"):
        build_va(TINY, task="both")
    with pytest.raises(ValueError, match="no_such_net"):
        build_va("no_such_net")


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def test_freeze_stage_two_trains_only_the_last_stage_and_heads():
    torch.manual_seed(0)
    model = build_va(TINY, task="multi", num_classes=4).freeze("layer3").train()
    expected = {n for n, _ in model.named_parameters() if n.startswith(("backbone.layer4.", "va_head.", "cls_head."))}
    assert _trainable_names(model) == expected
    assert {id(p) for p in model.trainable_parameters()} == \
        {id(p) for n, p in model.named_parameters() if n in expected}
    # train() must not wake the frozen modules up (BatchNorm statistics would drift).
    assert not model.backbone.bn1.training and not model.backbone.layer3.training
    assert model.backbone.layer4.training and model.training

    frozen_stats, last_stats = _bn_stats(model.backbone.layer3), _bn_stats(model.backbone.layer4)
    stem_stats = _bn_stats(model.backbone.bn1)
    last_params = {n: p.clone() for n, p in model.backbone.layer4.named_parameters()}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    out = model(_images(4))
    (out["va"].pow(2).sum() + out["logits"].sum()).backward()
    optimizer.step()

    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)
    for before, after in ((frozen_stats, model.backbone.layer3), (stem_stats, model.backbone.bn1)):
        for name, value in _bn_stats(after).items():
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert any(not torch.equal(v, last_stats[n]) for n, v in _bn_stats(model.backbone.layer4).items())
    assert any(not torch.equal(p, last_params[n]) for n, p in model.backbone.layer4.named_parameters())


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_published_freeze_trains_layer4_and_batchnorm_statistics_follow_the_flag(freeze_bn):
    """The published fine-tune: conv1, bn1, layer1, layer2, layer3 frozen; layer4 and the heads train;
    frozen BatchNorm statistics keep updating (the model is in train mode) unless ``freeze_bn``.
    (tests/test_protocols.py checks the frozen set against the published prefix rule itself.)"""
    torch.manual_seed(0)
    model = build_va(TINY, task="multi", num_classes=4).freeze("published", freeze_bn=freeze_bn).train()
    trainable = _trainable_names(model)
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("backbone.layer4.", "va_head.", "cls_head."))}
    assert model.backbone.layer3.training is not freeze_bn and model.backbone.bn1.training is not freeze_bn
    before = {m: _bn_stats(getattr(model.backbone, m)) for m in ("bn1", "layer1", "layer2", "layer3", "layer4")}
    frozen_weight = model.backbone.layer3[0].conv1.weight.clone()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    out = model(_images(4))
    (out["va"].pow(2).sum() + out["logits"].sum()).backward()
    optimizer.step()
    assert torch.equal(model.backbone.layer3[0].conv1.weight, frozen_weight)   # frozen weights do not move
    for name in ("bn1", "layer1", "layer2", "layer3"):
        moved = any(not torch.equal(v, before[name][k]) for k, v in _bn_stats(getattr(model.backbone, name)).items())
        assert moved is not freeze_bn, (name, freeze_bn)
    assert any(not torch.equal(v, before["layer4"][k]) for k, v in _bn_stats(model.backbone.layer4).items())


def test_published_cut_maps_by_stride_on_other_backbones():
    from emotion_models.va import data_config, published_cut

    eff = build_va("tf_efficientnet_lite0")
    assert published_cut(eff.backbone) == "blocks.4"          # the stride-16 stage, like resnet's layer3
    eff.freeze("published")
    trainable = _trainable_names(eff)
    assert not any(n.startswith(("backbone.conv_stem", "backbone.blocks.0.", "backbone.blocks.2.",
                                 "backbone.blocks.4.")) for n in trainable)
    assert any(n.startswith("backbone.blocks.5.") for n in trainable) and "va_head.weight" in trainable
    assert published_cut(build_va(TINY).backbone) == "layer3"
    # Image preparation follows the backbone's pretrained_cfg, not fixed ImageNet values.
    cfg = data_config("tf_efficientnet_lite0")
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5] and cfg["interpolation"] == "bicubic"
    assert data_config("resnet101")["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_freeze_forms_agree_and_none_unfreezes():
    model = build_va(TINY)
    assert backbone_stages(model.backbone) == ["layer1", "layer2", "layer3", "layer4"]
    results = []
    for until in ("layer3", "all_but_last", 3):
        model.freeze(until)
        results.append(_trainable_names(model))
    assert results[0] == results[1] == results[2]
    assert not any(n.startswith("backbone.layer3") for n in results[0])

    model.freeze(0)  # the stem only
    assert "backbone.conv1.0.weight" not in _trainable_names(model)
    assert any(n.startswith("backbone.layer1.") for n in _trainable_names(model))

    model.freeze(None)
    model.train()
    assert _trainable_names(model) == {n for n, _ in model.named_parameters()}
    assert all(m.training for m in model.modules())


def test_freeze_rejects_unknown_stages_with_the_valid_names():
    model = build_va(TINY)
    with pytest.raises(ValueError, match="layer4"):
        model.freeze("layer9")
    with pytest.raises(ValueError, match="4"):
        model.freeze(5)


def test_freeze_finds_stages_of_non_resnet_backbones():
    # A ViT keeps stem parameters (cls_token, pos_embed) directly on the root module.
    vit = build_va("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    assert backbone_stages(vit.backbone) == ["blocks.0", "blocks.1", "blocks.2"]
    vit.freeze(0)
    frozen = {n for n, _ in vit.named_parameters()} - _trainable_names(vit)
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight"} <= frozen
    assert not any(n.startswith("backbone.blocks.") for n in frozen)
    vit.freeze("all_but_last")
    assert any(n.startswith("backbone.blocks.1.") for n in {n for n, _ in vit.named_parameters()}
               - _trainable_names(vit))
    assert all(n.startswith(("backbone.blocks.2.", "backbone.norm", "backbone.fc_norm", "va_head"))
               for n in _trainable_names(vit))


def _features(model: VARegressor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_features(_images())


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model"])
def test_weights_round_trip_strips_prefix_and_reports_head_keys(tmp_path, wrap):
    torch.manual_seed(1)
    source = build_va(TINY)
    state = {f"module.{k}": v for k, v in source.backbone.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, source.backbone.num_features)
    path = tmp_path / "backbone.pth"
    torch.save(state if wrap == "raw" else {wrap: state, "epoch": 3}, path)

    torch.manual_seed(2)
    target = build_va(TINY)
    assert not torch.allclose(_features(target), _features(source))
    report = load_weights(target.backbone, path)
    assert report.skipped_head == ["fc.weight"]  # an ImageNet classifier: said, not loaded
    assert report.loaded == len(source.backbone.state_dict())
    torch.testing.assert_close(_features(target), _features(source))

    via_builder = build_va(TINY, weights=str(path))
    torch.testing.assert_close(_features(via_builder), _features(source))


def test_weights_of_another_shape_stop_the_load_and_change_nothing(tmp_path):
    source = build_va(TINY)
    state = dict(source.backbone.state_dict())
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    target = build_va(TINY)
    before = {k: v.clone() for k, v in target.backbone.state_dict().items()}
    with pytest.raises(ValueError, match=r"odd\.pth: does not fit .*other shape 1: conv1\.0\.weight"):
        load_weights(target.backbone, path)
    assert all(torch.equal(v, before[k]) for k, v in target.backbone.state_dict().items())


def test_weights_missing_part_of_the_backbone_stop_the_load(tmp_path):
    state = dict(build_va(TINY).backbone.state_dict())
    dropped = sorted(k for k in state if k.startswith("layer4."))
    for key in dropped:
        state.pop(key)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=rf"partial\.pth: does not fit .*missing {len(dropped) - sum('num_batches' in k for k in dropped)}"):
        build_va(TINY, weights=str(tmp_path / "partial.pth"))


def test_weights_that_match_nothing_or_do_not_exist_name_the_file(tmp_path):
    model = build_va(TINY)
    path = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"unrelated\.pth.*matches no parameter of ResNet"):
        load_weights(model.backbone, path)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_va(TINY, weights=str(tmp_path / "absent.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_weights(model.backbone, garbage)


def test_weights_from_safetensors(tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    source = build_va(TINY)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    target = build_va(TINY, weights=str(path))
    torch.testing.assert_close(_features(target), _features(source))


def test_default_backbone_is_resnet101():
    model = build_va(weights="none")
    assert type(model.backbone).__name__ == "ResNet" and model.backbone.num_features == 2048
    assert len(model.backbone.layer3) == 23  # resnet101's 3-4-23-3 blocks
    model.eval()
    with torch.no_grad():
        assert model(_images(1))["va"].shape == (1, 2)


def test_emotion_models_imports_without_ray_mlflow_scipy_or_sklearn():
    code = ("import sys, emotion_models, emotion_models.va; "
            "print(','.join(m for m in ('ray', 'mlflow', 'scipy', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
