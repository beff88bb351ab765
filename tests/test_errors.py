"""The user's errors end in one ``error: ...`` line (exit 2); a bug keeps its traceback."""
from __future__ import annotations

import json

import pytest
import torch

from datasets_io.errors import DataError
from emotion_models.errors import ModelConfigError
from pipelines import cli


def _raiser(exc: BaseException):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc", [
    cli.UsageError("--lr must be positive"),
    DataError("data/x/ground_truth.txt:3: 'abc' is not a number"),
    ModelConfigError("w.pt: does not fit VARegressor (missing 1: va_head.bias)"),
    FileNotFoundError("data/missing: no such dataset folder"),
    NotADirectoryError("data/file.txt: not a folder"),
    IsADirectoryError("data/folder: is a folder"),
])
def test_project_errors_are_one_line(exc, capsys):
    assert cli.run_main(_raiser(exc)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {exc}"]


def test_multi_line_message_stays_one_line(capsys):
    assert cli.run_main(_raiser(DataError("first\nsecond"))) == 2
    assert capsys.readouterr().err.splitlines() == ["error: first second"]


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("bug"), TypeError("bug"), RuntimeError("bug")])
def test_a_bug_keeps_its_traceback(exc, capsys):
    with pytest.raises(type(exc)) as info:
        cli.run_main(_raiser(exc))
    assert info.value is exc
    assert "error:" not in capsys.readouterr().err


def test_success_returns_zero():
    assert cli.run_main(lambda: None) == 0
    assert cli.run_main(lambda: 3) == 3


def test_project_errors_are_value_errors():
    assert issubclass(DataError, ValueError) and issubclass(ModelConfigError, ValueError)
    assert issubclass(cli.UsageError, ValueError)


def test_config_value_outside_choices_is_a_usage_error(tmp_path):
    parser = cli.Parser(prog="p")
    cli.add_config_arg(parser)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"optimizer": "rmsprop"}))
    with pytest.raises(cli.UsageError, match=r"c\.json: .*invalid choice: 'rmsprop'"):
        cli.parse_args(parser, ["--config", str(config)])
    config.write_text(json.dumps({"nosuchflag": 1}))
    with pytest.raises(cli.UsageError, match=r"c\.json: .*unrecognized arguments: --nosuchflag"):
        cli.parse_args(parser, ["--config", str(config)])
    config.write_text(json.dumps({"optimizer": "sgd"}))
    assert cli.parse_args(parser, ["--config", str(config)]).optimizer == "sgd"


# ----------------------------------------------------------------------------- real bad input

def test_unknown_layout_is_a_data_error():
    from datasets_io.layouts import dataset_options, get_layout

    with pytest.raises(DataError, match="unknown dataset layout 'nope'"):
        get_layout("nope")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        dataset_options("nope")


def test_unknown_category_is_a_data_error():
    from datasets_io.lexicon import Lexicon, resolve_categories

    with pytest.raises(DataError, match="unknown emotion category 'zzz-not-an-emotion'"):
        Lexicon.builtin().va("zzz-not-an-emotion")
    with pytest.raises(DataError, match="unknown category set"):
        resolve_categories("NoSuchSet")


def test_bad_lexicon_file_is_a_data_error(tmp_path):
    from datasets_io.lexicon import Lexicon

    path = tmp_path / "lexicon.txt"
    path.write_text("joy\t0.9\t0.5\ngloom\t0.1\tabc\n")
    with pytest.raises(DataError, match=r"lexicon.txt:2: arousal: 'abc' is not a number"):
        Lexicon.from_file(path)


def test_unknown_dataset_name_in_pipelines_is_a_data_error():
    from pipelines.data import check_dataname

    with pytest.raises(DataError, match="unknown dataset 'NoSuchSet'"):
        check_dataname("NoSuchSet")


def _tiny_model():
    from emotion_models import create_model

    return create_model("va", backbone="resnet10t", task="single", num_classes=2)


def test_checkpoint_that_partly_fits_is_a_model_config_error(tmp_path, capsys):
    from emotion_models.weights import load_weights

    model = _tiny_model()
    state = model.state_dict()
    removed = next(k for k in state if k.startswith("backbone.") and k.endswith("conv1.0.weight"))
    del state[removed]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ModelConfigError, match=r"partial.pt: does not fit VARegressor \(missing 1"):
        load_weights(_tiny_model(), path)
    assert cli.run_main(lambda: load_weights(_tiny_model(), path)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: does not fit")


def test_unreadable_weights_file_is_a_model_config_error(tmp_path):
    from emotion_models.weights import load_weights

    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match="garbage.pt: not a readable weights file"):
        load_weights(_tiny_model(), path)


def test_unknown_model_or_backbone_is_a_model_config_error():
    from emotion_models import create_model

    with pytest.raises(ModelConfigError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ModelConfigError, match="unknown timm backbone 'no_such_net'"):
        create_model("va", backbone="no_such_net")


def test_an_abbreviated_option_is_refused_not_guessed():
    """``--mode`` on the sticker pipeline (which has ``--model``, no ``--mode``) is an error, not ``--model``."""
    from pipelines import sticker

    with pytest.raises(cli.UsageError, match="unrecognized arguments: --mode one_stage"):
        sticker.build_parser().parse_args(["--mode", "one_stage"])


class _HealthCheckFailed(Exception):
    """Shaped as Ray Train V2's (internal) health-check error: the lost worker's failure inside."""

    def __init__(self, failure):
        super().__init__("worker health check failed")
        self.health_check_failure = failure


def _group_error(*failures):
    from ray.train import WorkerGroupError

    return WorkerGroupError("Training failed due to worker errors", dict(enumerate(failures)))


def test_lost_workers_are_told_apart_from_the_codes_exceptions():
    """A lost rank (dead actor, lost node, also inside a health-check error) with its DDP peer failing in
    the collective is a loss (one line, rerunnable); a code error, alone or beside a loss, is a bug."""
    from ray.exceptions import NodeDiedError, RayActorError

    from pipelines.train_loop import _workers_lost

    gloo = RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4711")
    assert _workers_lost(_group_error(RayActorError(), RayActorError()))
    assert _workers_lost(_group_error(_HealthCheckFailed(NodeDiedError("node died")), gloo))
    assert _workers_lost(_group_error(_HealthCheckFailed(RayActorError()), torch.distributed.DistBackendError("x")))
    # the peer's failure as Ray Train returns it: a wrapper whose text is the worker's traceback
    returned = Exception('Traceback (most recent call last):\n  File "core.py", line 572, in fit\n'
                         '    work.wait()\nRuntimeError: [gloo/transport/tcp/pair.cc:561] Connection closed by '
                         'peer [127.0.0.1]:42156. This is typically caused by a remote worker crashing.')
    assert _workers_lost(_group_error(_HealthCheckFailed(RayActorError()), returned))
    bug = Exception('Traceback (most recent call last):\n  File "core.py", line 9\nKeyError: \'label\'')
    assert not _workers_lost(_group_error(_HealthCheckFailed(RayActorError()), bug))
    assert not _workers_lost(_group_error(gloo, gloo))                       # no worker was lost
    assert not _workers_lost(_group_error(RayActorError(), KeyError("label")))  # a bug beside the loss
    assert not _workers_lost(_group_error(ValueError("nan loss")))
    assert not _workers_lost(ValueError("not from Ray Train"))
