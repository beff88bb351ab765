"""Checkpoints of the published code import exactly: names mapped, VA head rescaled to [-1, 1].

The published model is rebuilt here from its description (a torchvision ResNet without ``fc`` as
``resnet``, ReLU, ``FC_va`` / ``FC_cat``), with random weights, saved as the published code saves it
(a bare ``state_dict``), imported, and compared with the published arithmetic
``relu(flatten(resnet(x))) @ W.T + b`` mapped to the project's scale. resnet18 stands in for
resnet101 (same naming, a fraction of the cost).
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

torchvision = pytest.importorskip("torchvision")

from pipelines import import_published, predict  # noqa: E402
from pipelines.checkpoints import load_model  # noqa: E402


class PublishedVA(nn.Module):
    """The published SingleTaskResnet / MultiTaskResnet layout, on resnet18."""

    def __init__(self, num_classes: int | None):
        super().__init__()
        self.resnet = nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1])
        self.relu = nn.ReLU()
        self.FC_va = nn.Linear(512, 2)
        if num_classes:
            self.FC_cat = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.relu(self.resnet(x).flatten(1))
        return self.FC_va(x), (self.FC_cat(x) if hasattr(self, "FC_cat") else None)


def _published(tmp_path, task: str) -> tuple[PublishedVA, str]:
    torch.manual_seed(7)
    net = PublishedVA(8 if task == "multi" else None)
    with torch.no_grad():  # non-trivial BatchNorm statistics and a head that lands around SAM 5
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
        net.FC_va.bias.copy_(torch.tensor([5.5, 4.0]))
    path = tmp_path / f"two_stage_{task}_FI_rs_42.pt"
    torch.save(net.state_dict(), path)  # as the published Trainer.save_checkpoint does
    return net.eval(), str(path)


@pytest.mark.parametrize("task", ["single", "multi"])
def test_imported_model_reproduces_the_published_arithmetic(tmp_path, task):
    net, path = _published(tmp_path, task)
    model, meta = import_published.import_checkpoint(path, backbone="resnet18")
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = torch.relu(torch.flatten(net.resnet(x), 1))
        sam = features @ net.FC_va.weight.T + net.FC_va.bias       # the published VA, SAM 1..9
        out = model(x)
    assert sam.abs().max() > 1.5, "the check needs outputs outside [-1, 1] on the canonical scale"
    torch.testing.assert_close(out["va"], (sam - 5) / 4, rtol=1e-5, atol=1e-5)
    assert meta["recipe"].model.head == "relu_linear"    # the published head: relu, then unbounded linear
    if task == "multi":
        torch.testing.assert_close(out["logits"], features @ net.FC_cat.weight.T + net.FC_cat.bias,
                                   rtol=1e-5, atol=1e-5)
        assert list(meta["recipe"].head_classes[:3]) == ["amusement", "anger", "awe"]  # sorted FI folders
    else:
        assert "logits" not in out
    assert meta["published"]["mode"] == "two_stage" and meta["published"]["seed"] == 42


def test_import_command_writes_a_project_checkpoint_and_predict_gives_published_sam(tmp_path):
    from PIL import Image

    net, path = _published(tmp_path, "multi")
    out_dir = tmp_path / "imported"
    assert import_published.main([path, str(out_dir), "--backbone", "resnet18"]) == 0
    model, meta = load_model(out_dir)             # weights_only load of the project format
    assert meta["recipe"].prep.crop_pct == 1.0 and meta["recipe"].prep.size == 448

    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)).save(images / f"{i}.png")
    # Predict straight from the published file and from the imported folder: same numbers, and the
    # published model's own output on the images as predict prepares them, on the SAM scale.
    results = {}
    for name, ckpt in (("file", path), ("folder", str(out_dir))):
        csv_path = tmp_path / f"{name}.csv"
        extra = ["--backbone", "resnet18"] if name == "file" else []
        assert predict.main([str(images), "--checkpoint", ckpt, "--image-size", "96", "--out", str(csv_path),
                             *extra]) == 0
        results[name] = list(csv.DictReader(csv_path.open()))
    paths = sorted(images.iterdir())
    from dataclasses import replace

    _, batch, bad = predict.load_images(paths, replace(meta["recipe"].prep, size=96))
    assert not bad
    with torch.no_grad():
        sam, _ = net(batch)
    for name, rows in results.items():
        got = np.array([[float(r["valence_sam"]), float(r["arousal_sam"])] for r in rows])
        np.testing.assert_allclose(got, sam.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_import_rejects_foreign_files_naming_them(tmp_path):
    odd = tmp_path / "odd.pt"
    torch.save({"FC_va.weight": torch.zeros(2, 512), "FC_va.bias": torch.zeros(2), "encoder.w": torch.zeros(1)}, odd)
    with pytest.raises(ValueError, match=r"odd\.pt.*encoder\.w"):
        import_published.import_checkpoint(odd, backbone="resnet18")
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"other\.pt.*FC_va"):
        import_published.import_checkpoint(other, backbone="resnet18")
    net, path = _published(tmp_path, "single")
    with pytest.raises(ValueError, match="does not fit --backbone resnet34"):
        import_published.import_checkpoint(path, backbone="resnet34")
