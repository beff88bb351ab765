"""What a stage trains: one typed :class:`StageRecipe`, read from a recipe file, overridden by flags.

A recipe file, ``recipes/<pipeline>/<name>.yaml``, holds *sections*: ``stage`` (every stage) and the
pipeline's per-stage sections that override it (two_stage: ``stage1``, ``stage1_multi``, ``stage2``,
``stage2_multi``, ``dimensional``); ``extends: <name>`` starts from another recipe of the same
pipeline, so ``default.yaml`` is ``published.yaml`` plus the project's corrections, each commented.
A flag overrides one field (``--lr`` -> ``stage.optimizer.lr``): :class:`Flag` declares which, and
its type, choices and arity come from the field's type here, so no value is written twice.

Each section's type lives beside the code that uses it and is only composed here: the model
(:class:`emotion_models.registry.ModelSpec`), the images (:class:`datasets_io.prep.ImagePrep`), the
loss (:class:`emotion_models.losses.LossSpec`), the optimiser, schedule and selection
(:mod:`pipelines.core`), the data choices (:class:`DataSpec`). Checkpoint files are
:mod:`pipelines.checkpoints`'s business.

No Ray import here, and torch only through the section types' modules.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np

from datasets_io import storage
from datasets_io.prep import ImagePrep
from emotion_models.losses import LossSpec
from emotion_models.registry import ModelSpec
from pipelines.core import SELECT_PRESETS, OptimizerSpec, ScheduleSpec, SelectSpec

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BASE = "stage"   # the section every stage starts from


class RecipeError(ValueError):
    """A recipe file or flag value that does not fit the recipe's types; one line naming it."""


@dataclass(frozen=True)
class DataSpec:
    """Choices about the data a recipe makes (a recipe's ``data`` section).

    ``keep_duplicates``: SER30K annotation entries listed twice are trained on twice (the published
    loader keeps every entry), else once. ``ldl_test``: the LDL sets' categorical test split is
    their ``own_split``, or the ``training_images`` (the published ``DimensionalDataset`` reads
    ``train/`` for its test mode too).
    """

    keep_duplicates: bool = False
    ldl_test: Literal["own_split", "training_images"] = "own_split"


@dataclass(frozen=True)
class StageRecipe:
    """One training stage, fully resolved: what every worker trains from, stored in every checkpoint.

    ``batch_size`` is the *global* batch: each of N workers takes ``batch_size / N``.
    ``batching`` (stage two, multi-task): ``joined`` (each dimensional batch joined by a categorical
    one, the project's) or ``pool`` (one shuffled pool of both training sets, the published one).
    ``val``: which set validates the stage (two_stage's stage one: its categorical set, or the
    dimensional one as the published multi-task code does). The fields after ``data`` come from the
    data and the pipeline, never from a recipe file.
    """

    model: ModelSpec = ModelSpec()
    prep: ImagePrep = ImagePrep()
    loss: LossSpec = LossSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    select: SelectSpec = SelectSpec()
    batch_size: int = 32
    epochs: int = 1
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_scaler: Literal["run", "epoch"] = "run"
    grad_clip: float = 0.0
    compile: bool = False
    deterministic: bool = False
    freeze: Optional[str] = None
    freeze_bn: bool = False
    batching: Literal["plain", "joined", "pool"] = "plain"
    val: Literal["own", "categorical", "dimensional"] = "own"
    test_every_epoch: bool = False
    data: DataSpec = DataSpec()
    # Set by the pipeline from the data, never by a recipe file:
    name: str = ""
    source: str = ""
    classes: tuple[str, ...] = ()
    head_classes: Optional[tuple[str, ...]] = None
    anchors: Optional[tuple[tuple[float, float], ...]] = None
    init_from: Optional[str] = None
    init_weights: Optional[str] = None

    def __post_init__(self):
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, not {self.grad_clip}")

    def replace(self, **changes) -> "StageRecipe":
        return dataclasses.replace(self, **changes)

    def per_worker_batch(self, workers: int) -> int:
        """The batch each of ``workers`` DDP ranks takes; the global batch must divide evenly."""
        if self.batch_size % workers:
            raise RecipeError(f"--batch-size {self.batch_size} (the global batch) does not divide among "
                              f"{workers} workers; pick a multiple of {workers} or another --num-workers")
        return self.batch_size // workers

    def to_dict(self) -> dict:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "recipe") -> "StageRecipe":
        return build(cls, data, where)


@dataclass(frozen=True)
class EvalSet:
    """A split scored with a stage's selected checkpoint after training (``classes``, ``anchors``:
    when they differ from the recipe's, e.g. the categorical test split of a VA stage)."""

    dataset: Any                               # a Ray Dataset of tensors
    classes: Optional[tuple[str, ...]] = None
    anchors: Optional[tuple[tuple[float, float], ...]] = None


# ----------------------------------------------------------------------------- typed building

def build(cls, data: Mapping, where: str):
    """A (frozen) dataclass from a mapping, every value checked against its field's type.

    Unknown keys, wrong types, values outside a ``Literal``'s choices and the dataclass's own
    ``__post_init__`` checks all raise :class:`RecipeError` naming ``where`` and the field.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _coerce(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (collections.abc.Mapping, dict) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {hint}")


def field_type(path: str, root=StageRecipe):
    """The type of the field at a dotted ``path`` below a section (``optimizer.lr`` -> float)."""
    hint = root
    for part in path.split("."):
        hints = typing.get_type_hints(hint)
        if part not in hints:
            raise KeyError(f"{path}: {part!r} is not a field of {hint.__name__}")
        hint = hints[part]
        if typing.get_origin(hint) in (Union, types.UnionType):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = inner[0] if len(inner) == 1 else hint
    return hint


# ----------------------------------------------------------------------------- recipe files

def _merge(base: dict, over: Mapping) -> dict:
    """``over`` deep-merged onto ``base`` (nested mappings merged; anything else replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Union[Path, str]) -> dict:
    """A recipe file's mapping: a local path, or a URI (read through :mod:`datasets_io.storage`)."""
    import yaml

    try:
        data = yaml.safe_load(storage.read_text(path) if storage.is_uri(path) else path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe file holds a mapping of sections")
    return data


class Recipe:
    """A pipeline's recipe file, resolved: its sections after ``extends`` and the flags' overrides.

    :meth:`stage` gives the :class:`StageRecipe` of one stage: the ``stage`` section, then the named
    sections in order, then the data-given fields.
    """

    def __init__(self, pipeline: str, name: str, description: str, sections: dict[str, dict],
                 allowed: Sequence[str], files: Sequence[str] = ()):
        self.pipeline, self.name, self.description = pipeline, name, description
        self.sections = sections
        self.allowed = tuple(allowed)
        self.files = tuple(files)
        unknown = sorted(set(sections) - set(self.allowed))
        if unknown:
            raise RecipeError(f"{self.where}: unknown section(s) {', '.join(unknown)}; {pipeline} takes "
                              f"{', '.join(self.allowed)}")
        for section in self.allowed:   # every stage builds: a bad value stops here, naming the file
            self.stage(section)

    @property
    def where(self) -> str:
        return self.files[0] if self.files else self.name

    @classmethod
    def load(cls, pipeline: str, name_or_path: str, allowed: Sequence[str]) -> "Recipe":
        """``recipes/<pipeline>/<name>.yaml`` by name, or any YAML file by path or by URI (object storage:
        a sweep's ``best_recipe.yaml`` there)."""
        if storage.is_uri(name_or_path):
            path = str(name_or_path)
            if not storage.is_file(path):
                raise FileNotFoundError(f"{path}: no such recipe file")
            data, files = cls._resolve(pipeline, path, ())
            return cls._from_data(pipeline, path, path, data, files, allowed)
        path = Path(name_or_path).expanduser()
        if not (path.suffix in (".yaml", ".yml") or path.is_file()):
            path = RECIPES_DIR / pipeline / f"{name_or_path}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in (RECIPES_DIR / pipeline).glob("*.yaml"))
                raise RecipeError(f"--recipe {name_or_path}: no such recipe for {pipeline} "
                                  f"(known: {', '.join(known)}; or a path to a YAML file)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        data, files = cls._resolve(pipeline, path.resolve(), ())
        name = path.stem if path.parent == RECIPES_DIR / pipeline else str(path)
        return cls._from_data(pipeline, name, path, data, files, allowed)

    @classmethod
    def _from_data(cls, pipeline: str, name: str, path, data: dict, files: tuple,
                   allowed: Sequence[str]) -> "Recipe":
        description = str(data.pop("description", "") or "")
        sections = {k: v for k, v in data.items()}
        for key, value in sections.items():
            if not isinstance(value, Mapping):
                raise RecipeError(f"{path}: section {key!r} must be a mapping of fields")
        return cls(pipeline, name, description, sections, allowed, files)

    @classmethod
    def _resolve(cls, pipeline: str, path: Union[Path, str], seen: tuple) -> tuple[dict, tuple[str, ...]]:
        """A recipe file's data with its ``extends`` chain merged; ``path`` is a local ``Path`` or a URI
        (whose relative ``extends`` file is beside it on the same storage)."""
        if path in seen:
            raise RecipeError(f"{path}: 'extends' loops back to itself")
        data = _read_yaml(path)
        parent = data.pop("extends", None)
        if parent is None:
            return data, (str(path),)
        is_file_name = str(parent).endswith((".yaml", ".yml"))
        if storage.is_uri(str(parent)) or (storage.is_uri(path) and is_file_name and not Path(parent).is_absolute()):
            parent_uri = str(parent) if storage.is_uri(str(parent)) else storage.join(storage.parent(path), str(parent))
            if not storage.is_file(parent_uri):
                raise RecipeError(f"{path}: extends {parent!r}, which is not a recipe of {pipeline}")
            base, files = cls._resolve(pipeline, parent_uri, seen + (path,))
            return _merge(base, data), (str(path),) + files
        parent_path = Path(parent) if is_file_name else RECIPES_DIR / pipeline / f"{parent}.yaml"
        if not parent_path.is_absolute():
            parent_path = (path.parent / parent_path) if not parent_path.exists() else parent_path
        if not parent_path.is_file():
            raise RecipeError(f"{path}: extends {parent!r}, which is not a recipe of {pipeline}")
        base, files = cls._resolve(pipeline, parent_path.resolve(), seen + (path,))
        return _merge(base, data), (str(path),) + files

    def with_overrides(self, values: Mapping[str, Any]) -> "Recipe":
        """A copy with ``{"stage2.optimizer.lr": 1e-3, ...}`` set (each path: a section, then fields)."""
        sections = {k: dict(v) for k, v in self.sections.items()}
        for path, value in values.items():
            section, _, rest = path.partition(".")
            if section not in self.allowed or not rest:
                raise RecipeError(f"{path}: not a field path of the {self.pipeline} recipe "
                                  f"(sections: {', '.join(self.allowed)})")
            node = sections.setdefault(section, {})
            *parents, leaf = rest.split(".")
            for part in parents:
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, Mapping) else {}
                node = node[part]
            node[leaf] = value
        return Recipe(self.pipeline, self.name, self.description, sections, self.allowed, self.files)

    def raw(self, *sections: str) -> dict:
        """The merged fields of ``stage`` and ``sections``, before typing."""
        merged = dict(self.sections.get(BASE, {}))
        for section in sections:
            if section != BASE:
                merged = _merge(merged, self.sections.get(section, {}))
        return merged

    def stage(self, *sections: str, **fixed) -> StageRecipe:
        """The typed recipe of a stage: ``stage``, then ``sections`` (absent ones skipped), then ``fixed``
        (deep-merged: ``model={"options": {"task": "multi"}}`` keeps the model's other fields)."""
        where = f"{self.where} [{', '.join((BASE,) + tuple(s for s in sections if s != BASE))}]"
        return build(StageRecipe, _merge(self.raw(*sections), {"source": self.name, **fixed}), where)

    def to_dict(self) -> dict:
        return jsonable({"pipeline": self.pipeline, "recipe": self.name, "description": self.description,
                         **self.sections})

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- flags

@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets recipe fields: ``paths`` (``section.field...``), all to its value.

    Type, choices and arity come from the field's type; ``presets`` map a flag value to several
    fields of the path's section at once (``--select val_pearson_v_last_on_stop``); ``aliases``
    are other option strings (``--alpha`` for ``--va-weight``).
    """

    option: str
    paths: tuple[str, ...]
    help: str = ""
    aliases: tuple[str, ...] = ()
    presets: Optional[Mapping[str, Mapping]] = None
    type: Any = None                      # for paths inside a free-form mapping (model.options.*)
    nargs: Any = None
    also: Optional[Mapping[str, Any]] = None   # other fields set with it (--lr: optimizer.base_lr null)

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    def add_to(self, parser) -> None:
        kwargs: dict = {"dest": self.dest, "default": argparse.SUPPRESS, "help": self.help}
        if self.type is not None:
            if self.type is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs.update(type=self.type, **({"nargs": self.nargs} if self.nargs is not None else {}))
            parser.add_argument(self.option, *self.aliases, **kwargs)
            return
        hint = field_type(self.paths[0].partition(".")[2])
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if self.presets is not None:
            kwargs["choices"] = sorted(self.presets)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple:
            element = args[0]
            kwargs["type"] = element if element in (int, float) else str
            kwargs["nargs"] = "*" if len(args) == 2 and args[1] is Ellipsis else len(args)
            if typing.get_origin(element) is Literal:
                kwargs["choices"], kwargs["type"] = list(typing.get_args(element)), str
        elif hint in (int, float):
            kwargs["type"] = hint
        parser.add_argument(self.option, *self.aliases, **kwargs)

    def overrides(self, value) -> dict[str, Any]:
        """``{path: value}`` for every path (a preset: one entry per field it sets)."""
        if self.presets is not None:
            return {f"{path}.{key}": v for path in self.paths for key, v in self.presets[value].items()}
        if isinstance(value, list):
            value = tuple(value)
        return {**{path: value for path in self.paths}, **(self.also or {})}


def add_flags(parser, flags: Sequence[Flag], title: str = "recipe (each flag overrides one field of --recipe)"):
    group = parser.add_argument_group(title)
    for flag in flags:
        flag.add_to(group)


def flag_overrides(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """The recipe fields the command line sets (flags not given are absent from ``args``: SUPPRESS)."""
    out: dict[str, Any] = {}
    for flag in flags:
        if hasattr(args, flag.dest):
            out.update(flag.overrides(getattr(args, flag.dest)))
    return out


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any], args: argparse.Namespace,
                    flags: Sequence[Flag]) -> Recipe:
    """``recipe.with_overrides(overrides)``; a value the recipe's types refuse names the flag(s) it came from
    (``--repeated-aug: ... repeated_aug must be >= 1``), not only the recipe file."""
    try:
        return recipe.with_overrides(overrides)
    except RecipeError as exc:
        named = [f.option for f in flags if hasattr(args, f.dest)
                 and any(path.rsplit(".", 1)[-1] in str(exc) for path in f.overrides(getattr(args, f.dest)))]
        if not named:
            raise
        raise RecipeError(f"{', '.join(named)}: {exc}") from None


SELECT_FLAG_HELP = ("the selection rule, as a preset: " + "; ".join(f"{k}" for k in SELECT_PRESETS)
                    + " (val_pearson_v_last_on_stop: the published two-stage rule)")


def select_flag(paths: tuple[str, ...] = (f"{BASE}.select",)) -> Flag:
    return Flag("--select", paths, SELECT_FLAG_HELP, presets=SELECT_PRESETS)


# ----------------------------------------------------------------------------- plain values

def jsonable(value: Any) -> Any:
    """Numbers, arrays and tuples as plain JSON values (NaN kept as null)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if value != value else value
    if isinstance(value, np.integer):
        return int(value)
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=1)
