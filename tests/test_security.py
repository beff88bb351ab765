"""Every checkpoint loader refuses a malicious pickle: it raises one line naming the file, and the
payload never runs.

The payload is an object whose ``__reduce__`` would call ``open(marker, "w")`` when unpickled: the
marker file exists afterwards exactly when the loader ran arbitrary code (``torch.load`` with
``weights_only=False``). :func:`test_the_payload_is_live` shows that it does run under an unsafe load,
so each loader test below would fail if its loader unpickled unsafely.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch


class Payload:
    """Unpickling this creates ``marker``: the side effect an unsafe load would have."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(path: Path, marker: Path, payload_at=lambda state, p: {**state, "extra": p}, state=None) -> Path:
    state = state if state is not None else {"model": {"w": torch.zeros(2)}}
    torch.save(payload_at(state, Payload(marker)), path)
    return path


def _one_line_naming(error: BaseException, path: Path) -> None:
    text = str(error)
    assert "\n" not in text, text
    assert str(path) in text, text


def test_the_payload_is_live(tmp_path):
    """The control: an unsafe load (weights_only=False) runs the payload and creates the marker."""
    marker = tmp_path / "ran"
    path = _evil(tmp_path / "state.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_state_refuses_a_malicious_state_pt(tmp_path):
    from emotion_models.errors import ModelConfigError
    from pipelines.checkpoints import load_state

    marker = tmp_path / "ran"
    path = _evil(tmp_path / "state.pt", marker)
    with pytest.raises(ModelConfigError) as error:
        load_state(path)
    _one_line_naming(error.value, path)
    assert not marker.exists()


def test_import_published_refuses_a_malicious_published_pt(tmp_path):
    from emotion_models.errors import ModelConfigError
    from pipelines.import_published import import_checkpoint

    marker = tmp_path / "ran"
    path = _evil(tmp_path / "two_stage_single_FI_rs_42.pt", marker, state={"FC_va.weight": torch.zeros(2, 4)})
    with pytest.raises(ModelConfigError) as error:
        import_checkpoint(path, backbone="resnet10t")
    _one_line_naming(error.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["beside_the_weights", "inside_the_saved_args"])
def test_weights_readers_refuse_a_malicious_weights_file(tmp_path, where):
    """``--weights FILE`` and a SER30K ``checkpoint.pth`` (whose ``args`` Namespace is the one allowed
    non-tensor type: a payload inside it is refused too)."""
    from emotion_models.errors import ModelConfigError
    from emotion_models.weights import load_weights, read_checkpoint

    marker = tmp_path / "ran"
    if where == "beside_the_weights":
        def payload_at(state, p):
            return {**state, "extra": p}
    else:
        def payload_at(state, p):
            return {**state, "args": argparse.Namespace(alpha=8, hook=p)}
    path = _evil(tmp_path / "checkpoint.pth", marker, payload_at, state={"model": torch.nn.Linear(2, 2).state_dict()})
    with pytest.raises(ModelConfigError) as error:
        read_checkpoint(path)
    _one_line_naming(error.value, path)
    with pytest.raises(ModelConfigError) as error:
        load_weights(torch.nn.Linear(2, 2), path)
    _one_line_naming(error.value, path)
    assert not marker.exists()


def _checkpoint_folder(folder: Path, marker: Path) -> Path:
    """A project checkpoint folder: a genuine meta.json (a tiny VA recipe) and a malicious state.pt."""
    from emotion_models.registry import ModelSpec
    from pipelines.checkpoints import STATE_FILE, write_meta
    from pipelines.recipe import StageRecipe

    folder.mkdir()
    recipe = StageRecipe(name="stage2", model=ModelSpec(name="va", backbone="resnet10t", weights="none",
                                                        options={"task": "single"}),
                         classes=("joy", "sadness"), anchors=((0.8, 0.5), (-0.8, -0.5)))
    write_meta(folder, recipe, epoch=0)
    _evil(folder / STATE_FILE, marker)
    return folder / STATE_FILE


def test_model_loaders_refuse_a_checkpoint_folder_with_a_malicious_state_pt(tmp_path):
    """``load_model`` (predict, --eval) and the MLflow pyfunc's ``load_context`` (mlflow models serve)."""
    import mlflow

    from emotion_models.errors import ModelConfigError
    from pipelines.checkpoints import load_model
    from pipelines.mlflow_model import CHECKPOINT, EmotionModel

    marker = tmp_path / "ran"
    state = _checkpoint_folder(tmp_path / "ckpt", marker)
    with pytest.raises(ModelConfigError) as error:
        load_model(state.parent)
    _one_line_naming(error.value, state)
    context = mlflow.pyfunc.PythonModelContext(artifacts={CHECKPOINT: str(state.parent)}, model_config={})
    with pytest.raises(ModelConfigError) as error:
        EmotionModel().load_context(context)
    _one_line_naming(error.value, state)
    assert not marker.exists()
