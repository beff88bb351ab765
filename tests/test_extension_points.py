"""The code-layout page's "Where to add things", followed to the letter on a copy of the project.

Each test copies the project's packages (a fresh copy per test, from one copy made per module), makes the
one edit its sentence describes (a registry entry, a new file, a field and its use, a flag), checks that
no other file changed, and runs a short ``python -c`` in the copy that uses the new thing through the
project's public entry points. The copy, not the installed (editable) project, is imported: every project
module loaded in the subprocess must come from it. No Ray is started and nothing is trained beyond one
epoch of an eight-parameter model, so the file needs no ``slow`` mark (about 45 s of CPU time in all,
most of it the subprocesses importing torch and timm).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datasets_io", "emotion_models", "pipelines", "tuning")   # pyproject's packages.find
COPIED = PACKAGES + ("recipes",)        # and the recipe files, found beside the packages (pipelines/recipe.py)
PROBE_TIMEOUT_S = 240                   # generous: a subprocess importing torch and timm on a loaded machine

# Runs first in every probe: its arguments, and done(result), which prints the result as the last line of
# stdout together with every project module that was not imported from the copy.
PRELUDE = f"""
import json, os, sys
ROOT = os.path.realpath(sys.argv[1])
ARGS = json.loads(sys.argv[2])

def done(result):
    stray = sorted(name for name, module in list(sys.modules.items())
                   if name.split(".")[0] in {PACKAGES!r}
                   and not os.path.realpath(getattr(module, "__file__", None) or "").startswith(ROOT + os.sep))
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in {PACKAGES!r})
    print(json.dumps({{**result, "_stray": stray, "_loaded": loaded}}))
"""


class Project:
    """A copy of the project: edit it, see what changed against the pristine copy, run code in it."""

    def __init__(self, root: Path, pristine: Path):
        self.root, self.pristine = root, pristine

    def edit(self, rel: str, old: str, new: str) -> None:
        """Replace ``old`` (which must occur exactly once) with ``new`` in the file ``rel``."""
        path = self.root / rel
        text = path.read_text()
        assert text.count(old) == 1, f"{rel}: expected exactly one {old!r} to edit (the project changed?)"
        path.write_text(text.replace(old, new))

    def add(self, rel: str, text: str) -> None:
        path = self.root / rel
        assert not path.exists(), f"{rel} exists already"
        path.write_text(textwrap.dedent(text).lstrip())

    def changed(self) -> set[str]:
        """Files added, removed or edited against the pristine copy (compiled files aside)."""
        def files(root: Path) -> dict[str, bytes]:
            return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts}

        now, before = files(self.root), files(self.pristine)
        return {rel for rel in now.keys() | before.keys() if now.get(rel) != before.get(rel)}

    def run(self, probe: str, **args) -> dict:
        """Run ``probe`` (after :data:`PRELUDE`) with the copy as working folder and PYTHONPATH; its result."""
        env = {**os.environ, "PYTHONPATH": str(self.root), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(probe), str(self.root),
                               json.dumps(args)], cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
        assert proc.returncode == 0, f"probe failed:\n{proc.stderr[-4000:]}"
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result.pop("_stray") == [], "project modules imported from outside the copy"
        loaded = result.pop("_loaded")
        assert loaded, "the probe imported no project module"
        return result


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


@pytest.fixture
def project(pristine, tmp_path) -> Project:
    root = tmp_path / "project"
    shutil.copytree(pristine, root)
    return Project(root, pristine)


def _png(pixels: np.ndarray, path: Path) -> Path:
    Image.fromarray(pixels).save(path, "PNG")
    return path


# ----------------------------------------------------------------------------- a dataset layout

LISTING_READER = '''

# ----------------------------------------------------------------------------- listing

LISTING_FILE = "listing.txt"


def read_listing(root: PathLike, split_ratios: Ratios = DEFAULT_RATIOS, seed: int = 42) -> ReaderResult:
    """``listing.txt`` rows ``<image path>  <category>  <valence>  <arousal>`` (VA on the canonical scale)."""
    members = _Members(root)
    rows = read_table(members.root / LISTING_FILE)
    classes = sorted({fields[1] for _, fields in rows})
    records = []
    for _, fields in rows:
        rel = members.get(fields[0])
        if rel is not None:
            records.append(Record(rel, "", label=classes.index(fields[1]), valence=float(fields[2]),
                                  arousal=float(fields[3]), va_source="measured", group=fields[1]))
    _assign_splits(records, lambda record: record.label, split_ratios, seed)
    return _result(records, classes, members, layout="listing", split_ratios=list(split_ratios), seed=seed)
'''

LAYOUT_PROBE = """
import contextlib, io
from datasets_io import layouts
from datasets_io.__main__ import build_parser
from datasets_io.errors import DataError
from pipelines.data import check_dataname

root = ARGS["root"]
parser = build_parser()
shown = io.StringIO()
with contextlib.redirect_stdout(shown), contextlib.suppress(SystemExit):
    parser.parse_args(["ingest", "--help"])
parsed = parser.parse_args(["ingest", "--layout", "listing", "--root", root, "--out", root + "-shards"])
read = layouts.read_dataset("listing", root)
check_dataname("Mini", "--dataname")                       # the pipelines' --dataname check
layouts.require({"layout": "listing"}, layouts.MEASURED_VA, root, "dimensional")
try:
    layouts.require({"layout": "listing"}, layouts.STICKERS, root, "sticker")
    sticker = "accepted"
except DataError as exc:
    sticker = str(exc)
done({"layouts": list(layouts.LAYOUTS), "help": shown.getvalue(), "parsed": parsed.layout,
      "detected": layouts.detect_layout(root), "of_name": layouts.layout_of("Mini"),
      "options": layouts.reader_options("listing"), "classes": read.classes, "skipped": read.skipped,
      "records": [[r.path, r.split, r.label, r.valence, r.arousal, r.va_source] for r in read.records],
      "sticker": sticker})
"""


def test_a_dataset_layout_is_one_layout_entry(project, tmp_path):
    """A dataset layout is one ``Layout`` entry in ``REGISTRY`` in ``datasets_io/layouts.py`` (its reader,
    written in ``datasets_io/readers.py``, how a raw folder is recognised, what it can serve, its dataset
    names ...), which the ingest's ``--layout``, ``--dataname``, folder detection and the pipelines' checks
    all read."""
    with open(project.root / "datasets_io/readers.py", "a") as f:
        f.write(LISTING_READER)
    project.edit("datasets_io/layouts.py", "from datasets_io.records import ReaderResult",
                 "from datasets_io.readers import LISTING_FILE, read_listing\n"
                 "from datasets_io.records import ReaderResult")
    project.edit("datasets_io/layouts.py", "           demo=Demo(\"ser30k\", \"sticker\")),\n)\n",
                 "           demo=Demo(\"ser30k\", \"sticker\")),\n"
                 "    Layout(\"listing\", read_listing, detect=lambda root: (root / LISTING_FILE).is_file(),\n"
                 "           capabilities=frozenset({MEASURED_VA}), datasets={\"Mini\": {}}),\n)\n")
    assert project.changed() == {"datasets_io/readers.py", "datasets_io/layouts.py"}

    root = tmp_path / "Mini"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for category, valence in (("calm", -0.5), ("lively", 0.5)):
        for i in range(10):
            _png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), root / "img" / f"{category}{i}.png")
            rows.append(f"img/{category}{i}.png\t{category}\t{valence}\t{valence / 2}")
    (root / "listing.txt").write_text("\n".join(rows) + "\n")

    out = project.run(LAYOUT_PROBE, root=str(root))
    assert out["layouts"][-1] == "listing"
    choices = re.search(r"--layout \{([^}]*)\}", out["help"]).group(1).split(",")
    assert "listing" in choices and out["parsed"] == "listing"
    assert out["detected"] == "listing" and out["of_name"] == "listing"   # a raw folder; a dataset name
    assert out["options"] == ["split_ratios", "seed"]
    assert out["classes"] == ["calm", "lively"] and out["skipped"] == []
    records = out["records"]
    assert len(records) == 20 and {r[1] for r in records} == {"train", "val", "test"}
    assert ["img/lively3.png", records[13][1], 1, 0.5, 0.25, "measured"] == records[13]
    assert "must be a sticker set" in out["sticker"] and "layout ser30k" in out["sticker"]


# ----------------------------------------------------------------------------- a model

TINY_MODEL = '''
"""A tiny CNN (the smallest model the registry can build)."""
import torch
import torch.nn as nn

from emotion_models.registry import NONE, register_model


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, image):
        return {"logits": self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))}


@register_model("tiny_cnn")
def build_tiny_cnn(num_classes: int = 3, weights: str = NONE) -> TinyCNN:
    return TinyCNN(num_classes)
'''

MODEL_PROBE = """
import emotion_models
import torch
from emotion_models import ModelSpec, build_model, create_model, list_models
from pipelines.checkpoints import build_stage_model
from pipelines.recipe import Recipe

imported = "emotion_models.tiny_cnn" in sys.modules        # by the package, not by this probe
by_name = create_model("tiny_cnn", num_classes=4)
by_spec = build_model(ModelSpec(name="tiny_cnn", weights="none"), num_classes=4)
stage = Recipe.load("sticker", ARGS["recipe"], ("stage",)).stage()
staged = build_stage_model(stage)                            # what a stage's workers train
done({"imported": imported, "listed": list_models(), "stage_model": stage.model.name,
      "types": [type(m).__name__ for m in (by_name, by_spec, staged)],
      "file": sys.modules[type(staged).__module__].__file__,
      "logits": list(staged(torch.zeros(2, 3, 16, 16))["logits"].shape)})
"""


def test_a_model_is_one_new_file(project, tmp_path):
    """A model is one new file in ``emotion_models/`` whose builder is decorated with
    ``@register_model("name")``, because importing the package imports every module in it; a recipe's
    ``model.name`` then builds it."""
    project.add("emotion_models/tiny_cnn.py", TINY_MODEL)
    assert project.changed() == {"emotion_models/tiny_cnn.py"}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"description": "a recipe naming the new model",
                                      "stage": {"model": {"name": "tiny_cnn", "weights": "none",
                                                          "options": {"num_classes": 4}}}}))

    out = project.run(MODEL_PROBE, recipe=str(recipe))
    assert out["imported"] and "tiny_cnn" in out["listed"] and out["stage_model"] == "tiny_cnn"
    assert out["types"] == ["TinyCNN"] * 3 and out["logits"] == [2, 4]
    assert Path(out["file"]).resolve() == (project.root / "emotion_models/tiny_cnn.py").resolve()


# ----------------------------------------------------------------------------- a metric

MAE = '''

def mae(y_true, y_pred) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(_vector(y_pred) - _vector(y_true))))
'''

METRIC_PROBE = """
import numpy as np
import torch
from pipelines import core
from pipelines.objectives import build_objective
from pipelines.recipe import StageRecipe
from pipelines.tracking import log_stage_artifacts

recipe = StageRecipe(name="metric", classes=("calm", "lively"), anchors=((-0.5, -0.25), (0.5, 0.25)))
objective = build_objective(recipe)
pred, true = np.asarray(ARGS["pred"], np.float32), np.asarray(ARGS["true"], np.float32)
n = len(pred)
direct = objective.metrics({"va_pred": pred, "va_true": true, "has_va": np.ones(n, bool),
                            "label": (true[:, 0] > 0).astype(np.int64)})


class VAHead(torch.nn.Module):                                # any model with a "va" output
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, image):
        return {"va": torch.tanh(self.fc(image.mean(dim=(2, 3))))}


torch.manual_seed(0)
va = torch.as_tensor(true)
batch = {"image": torch.rand(n, 3, 4, 4), "valence": va[:, 0], "arousal": va[:, 1],
         "has_va": torch.ones(n, dtype=torch.bool), "label": (va[:, 0] > 0).long(),
         "has_label": torch.ones(n, dtype=torch.bool), "label_dist": torch.zeros(n, 2),
         "has_dist": torch.zeros(n, dtype=torch.bool)}
model = VAHead()
optimizer = core.build_optimizer(model, core.OptimizerSpec(name="adamw", lr=1e-3), global_batch=n)
state = core.TrainState(model, optimizer, core.Schedule(optimizer, core.ScheduleSpec(), 1),
                        core.EarlyStopping(patience=0))
precision = core.Precision.for_device("cpu")
core.fit(state, objective, precision, train_batches=lambda epoch: [batch], val_batches=lambda epoch: [batch],
         epochs=1, monitor="pearson_mean", log=lambda *_: None)
test_metrics, _ = core.evaluate(model, [batch], objective, precision)


class Recorder:                                               # the MLflow calls of a stage's test scores
    logged = {}
    client = type("Client", (), {"log_artifact": staticmethod(lambda *a, **k: None)})()

    def log_metrics(self, run_id, metrics):
        self.logged.update(metrics)


log_stage_artifacts(Recorder(), "run", checkpoint_dir=None, log_model=False,
                    tests={"test": {"metrics": test_metrics, "arrays": {}}})
done({"direct": {k: v for k, v in direct.items() if isinstance(v, float)},
      "history": sorted(state.history[-1]), "mlflow": sorted(Recorder.logged)})
"""


def test_a_metric_goes_into_the_objectives_metrics(project):
    """A metric goes into the objective's ``metrics()`` in ``pipelines/objectives.py``, with the arithmetic
    in ``emotion_models/metrics.py``, and appears as ``val_*`` / ``test_*`` everywhere (here: every epoch's
    row, from which Ray's reports, the MLflow curves and Tune read, and the test split's MLflow metrics)."""
    with open(project.root / "emotion_models/metrics.py", "a") as f:
        f.write(MAE)
    project.edit("pipelines/objectives.py",
                 '            out["ccc_mean"] = (out["ccc_v"] + out["ccc_a"]) / 2\n',
                 '            out["ccc_mean"] = (out["ccc_v"] + out["ccc_a"]) / 2\n'
                 '            for i, dim in enumerate("va"):\n'
                 '                out[f"mae_{dim}"] = metrics.mae(arrays["va_true"][has_va][:, i],'
                 ' arrays["va_pred"][has_va][:, i])\n')
    assert project.changed() == {"emotion_models/metrics.py", "pipelines/objectives.py"}

    rng = np.random.default_rng(1)
    true = rng.uniform(-1, 1, (6, 2))
    pred = np.clip(true + rng.normal(0, 0.3, true.shape), -1, 1)
    out = project.run(METRIC_PROBE, pred=pred.tolist(), true=true.tolist())
    expected = np.abs(pred.astype(np.float32) - true.astype(np.float32)).mean(axis=0)
    assert out["direct"]["mae_v"] == pytest.approx(expected[0], rel=1e-5)
    assert out["direct"]["mae_a"] == pytest.approx(expected[1], rel=1e-5)
    assert {"val_mae_v", "val_mae_a", "val_pearson_v"} <= set(out["history"])
    assert {"test_mae_v", "test_mae_a", "test_pearson_v"} <= set(out["mlflow"])


# ----------------------------------------------------------------------------- an augmentation

AUGMENTATION_PROBE = """
from dataclasses import replace

import numpy as np
from datasets_io.prep import DeviceImagePipeline, ImageTransform
from pipelines.recipe import Recipe

data = open(ARGS["image"], "rb").read()
batch = {"image": np.array([data], dtype=object), "image_id": np.array(["one"], dtype=object)}
recipe = Recipe.load("augmentation", ARGS["recipe"], ("stage",))
flip = recipe.stage().prep                                            # vflip 1.0, from the recipe file
keep = recipe.with_overrides({"stage.prep.vflip": 0.0}).stage().prep  # and overridden


def cpu(prep, train):
    step = prep.batch_transform(train=True, num_classes=2, seed=0) if train else \\
        ImageTransform(prep, train=False, num_classes=2, seed=0)
    return step(batch)["image"][0].tolist()


def device(prep, train):
    pipeline = replace(prep, decode="device").device_pipeline("cpu", seed=0) if train else \\
        DeviceImagePipeline(prep, train=False, device="cpu", seed=0)
    images, kept, skipped = pipeline([data], ["one"], epoch=0)
    return images[0].numpy().tolist()


done({"vflip": [flip.vflip, keep.vflip],
      **{f"{path.__name__}_{'train' if train else 'eval'}_{name}": path(prep, train)
         for path in (cpu, device) for train in (True, False) for name, prep in (("flip", flip), ("keep", keep))}})
"""


def test_an_augmentation_is_an_imageprep_field_and_its_use_on_both_paths(project, tmp_path):
    """An augmentation is a field of ``ImagePrep`` in ``datasets_io/prep.py`` plus its use in
    ``ImageTransform`` (the CPU path) and ``DeviceImagePipeline`` (the device path), so that both decode
    paths, evaluation and predict stay one definition."""
    project.edit("datasets_io/prep.py", "    hflip: float = 0.5\n",
                 "    hflip: float = 0.5\n    vflip: float = 0.0\n")
    project.edit("datasets_io/prep.py", "                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)\n",
                 "                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)\n"
                 "                if rng.random() < p.vflip:\n"
                 "                    img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)\n")
    project.edit("datasets_io/prep.py", "            img = F.horizontal_flip(img)\n",
                 "            img = F.horizontal_flip(img)\n"
                 "        if rng.random() < p.vflip:\n"
                 "            img = F.vertical_flip(img)\n")
    assert project.changed() == {"datasets_io/prep.py"}

    pixels = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = _png(pixels, tmp_path / "one.png")   # lossless: both paths decode the same pixels
    recipe = tmp_path / "augmentation.yaml"      # the crop is the whole image, and no horizontal flip
    recipe.write_text(yaml.safe_dump({"stage": {"prep": {"size": 16, "scale": [1.0, 1.0], "ratio": [1.0, 1.0],
                                                         "hflip": 0.0, "vflip": 1.0}}}))

    out = project.run(AUGMENTATION_PROBE, image=str(image), recipe=str(recipe))
    assert out["vflip"] == [1.0, 0.0]
    original = pixels.transpose(2, 0, 1)                     # CHW, as both paths give it
    for path in ("cpu", "device"):
        np.testing.assert_array_equal(out[f"{path}_train_keep"], original, err_msg=path)
        np.testing.assert_array_equal(out[f"{path}_train_flip"], original[:, ::-1, :], err_msg=path)
        assert out[f"{path}_eval_flip"] == out[f"{path}_eval_keep"], f"{path}: evaluation changed"


# ----------------------------------------------------------------------------- a pipeline

MINI_PIPELINE = '''
"""A minimal pipeline: one stage, its recipe built in, two flags."""
from __future__ import annotations

from dataclasses import dataclass

from pipelines import cli
from pipelines.recipe import Flag, Recipe, add_flags, apply_overrides, flag_overrides
from pipelines.registry import Pipeline, SweepField

FLAGS = (Flag("--lr", ("stage.optimizer.lr",), "learning rate"),
         Flag("--decay", ("stage.optimizer.weight_decay",), "weight decay"))


@dataclass
class Plan:
    recipe: Recipe


class Mini(Pipeline):
    name = "mini"
    script = "pipelines/mini.py"
    flags = FLAGS

    def build_parser(self):
        parser = cli.Parser(prog="mini.py")
        add_flags(parser, FLAGS)
        return parser

    def plan(self, args) -> Plan:
        recipe = Recipe(self.name, "builtin", "", {"stage": {"optimizer": {"lr": 1e-3}}}, self.sections)
        return Plan(apply_overrides(recipe, flag_overrides(args, FLAGS), args, FLAGS))

    def trial(self, plan: Plan, init_from):
        return plan.recipe.stage(name="mini"), None    # no data: this pipeline only shows the registry

    def sweep_fields(self, plan: Plan) -> dict[str, SweepField]:
        return {"lr": SweepField("stage.optimizer.lr", low=0.0)}


PIPELINE = Mini()
'''

PIPELINE_PROBE = """
from pipelines.registry import Pipeline, get_pipeline, names
from tuning import sweep

parser = sweep.build_parser()
known, _ = parser.parse_known_args(["--pipeline", "mini"])
cfg = sweep.parse(["--pipeline", "mini", "--lr", "0.005", "--lr-range", "1e-4", "1e-2", "--num-samples", "2"])
import pipelines.mini

trial, _ = cfg.pipeline.trial(cfg.plan, None)
done({"names": names(), "same": get_pipeline("mini") is pipelines.mini.PIPELINE is cfg.pipeline,
      "is_pipeline": isinstance(cfg.pipeline, Pipeline), "parsed": known.pipeline, "help": parser.format_help(),
      "dims": {k: [d.kind, list(d.values)] for k, d in cfg.dims.items()}, "roles": cfg.roles,
      "lr": trial.optimizer.lr, "max_t": cfg.max_t, "metric": cfg.metric})
"""


def test_a_pipeline_is_a_module_that_ends_with_pipeline(project):
    """A pipeline is a module in ``pipelines/`` that ends with ``PIPELINE = <a Pipeline subclass>()`` (its
    recipe sections, flags, data plan and stage builders), which ``pipelines/registry.py`` finds by
    reading the source, so ``python -m tuning --pipeline NAME`` sweeps it too."""
    project.add("pipelines/mini.py", MINI_PIPELINE)
    assert project.changed() == {"pipelines/mini.py"}

    out = project.run(PIPELINE_PROBE)
    assert out["names"] == ["mini", "sticker", "two_stage"]
    assert out["same"] and out["is_pipeline"] and out["parsed"] == "mini"
    assert re.search(r"--pipeline \{[^}]*\bmini\b[^}]*\}", out["help"])
    assert out["dims"] == {"stage.optimizer.lr": ["loguniform", [1e-4, 1e-2]]}
    assert out["roles"] == {"lr": "stage.optimizer.lr"} and out["metric"] == "val_accuracy"
    assert out["lr"] == 0.005 and out["max_t"] == 1           # the pipeline's flag reached its recipe


# ----------------------------------------------------------------------------- a sweepable field

SWEEPABLE_PROBE = """
from types import SimpleNamespace

from pipelines import cli, two_stage
from pipelines.registry import get_pipeline
from tuning import sweep

pipeline = get_pipeline("two_stage")
args = cli.parse_args(pipeline.build_parser(), ["--grad-clip", "0.5"])
plan = two_stage.configure(args)                  # the recipe and flags, checked; no data read, no Ray
fields = pipeline.sweep_fields(plan)


def space(path):                                  # what python -m tuning --space PATH makes of the file
    try:
        dims = sweep.search_dims(pipeline, plan, fields, SimpleNamespace(lr_range=None, decay_range=None,
                                                                         alpha_range=None, space=path))
        return {k: [d.kind, list(d.values)] for k, d in dims.items()}
    except cli.UsageError as exc:
        return str(exc)


done({"value": plan.recipe.stage().grad_clip, "space": space(ARGS["space"]), "select": space(ARGS["select"]),
      "elsewhere": any("stage.grad_clip" in f.paths for f in two_stage.FLAGS if f.option != "--grad-clip")})
"""


def test_a_sweepable_field_is_a_flag_unless_not_sweepable(project, tmp_path):
    """A sweepable field is a ``Flag`` in the pipeline's ``FLAGS`` (a recipe field path), sweepable by a
    ``--space`` file unless the pipeline lists it in its ``not_sweepable`` (preset flags such as
    ``--select`` are not sweepable either)."""
    last = '    Flag("--stage1-multi-val", ("stage1_multi.val",), "the validation set that selects stage one with ' \
           '--task multi"),\n)\n'
    project.edit("pipelines/two_stage.py", last,
                 last[:-2] + '    Flag("--grad-clip", ("stage.grad_clip",), "clip the gradient norm (0: off)"),\n)\n')
    assert project.changed() == {"pipelines/two_stage.py"}
    space, select = tmp_path / "space.yaml", tmp_path / "select.yaml"
    space.write_text(yaml.safe_dump({"stage.grad_clip": {"uniform": [0.5, 2.0]}}))
    select.write_text(yaml.safe_dump({"stage.select": "val_accuracy_best"}))

    out = project.run(SWEEPABLE_PROBE, space=str(space), select=str(select))
    assert out["value"] == 0.5 and not out["elsewhere"]      # the new flag, and only it, names the field
    assert out["space"]["stage.grad_clip"] == ["uniform", [0.5, 2.0]]
    assert "stage.select: cannot be searched" in out["select"]

    project.edit("pipelines/two_stage.py", "    not_sweepable = frozenset({",
                 '    not_sweepable = frozenset({"stage.grad_clip", ')
    out = project.run(SWEEPABLE_PROBE, space=str(space), select=str(select))
    assert out["value"] == 0.5                                # still a flag
    assert f"{space}: stage.grad_clip: cannot be searched (two_stage does not let a sweep search it)" \
        in out["space"]
