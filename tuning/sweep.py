"""The sweep's command line: its own flags, the pipeline's flags and plan, the search space.

:func:`parse` reads the sweep's own flags first (``parse_known_args``; ``--lr`` does not abbreviate
``--lr-range``); every other flag goes to the pipeline's parser (``Pipeline.build_parser()``), so every
pipeline flag works, ``--config FILE`` included, and a wrong one is still a one-line error. ``--mode``
is shared: ``max``/``min`` is the sweep's direction, any other value (``one_stage``, ``two_stage``,
``dimensional``) goes to the pipeline's ``--mode``. Then ``Pipeline.plan(args)`` resolves the recipe,
the run options and the data (ingested and checked once, before Ray starts), and the dimensions are
built from ``Pipeline.sweep_fields(plan)`` (the ``lr`` / ``decay`` / ``alpha`` roles the ``--*-range``
flags set) and the ``--space`` file (:mod:`tuning.space`), every one of them a recipe field path.

On the embedded demo (the plan's ``demo``) a trial trains 4 epochs of each stage: every epochs flag of
the pipeline (``--num-epochs``, ``--stage2-epochs``) the command leaves out sets its field to 4, unless
``--recipe`` names the recipe to train. A trial's epochs (ASHA's ``max_t``) are those of the section
its sweep fields live in (``stage2`` for a two-stage trial).

This module imports neither Ray nor :mod:`tuning.driver`: ``python -m tuning`` is
``driver.run_sweep(sweep.parse(argv))``.

Folder of a sweep: ``<storage>/<sweep name>/`` with ``sweep_state.json`` (the MLflow parent run id,
stage one's checkpoint), ``stage1/`` (two_stage), ``tune/`` (the Tune experiment), ``trials/<id>/``
(each trial's Ray Train run), and at the end ``trials.csv``, ``best_recipe.yaml`` and ``best_config.yaml``.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import hashlib
import json
import sys
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pipelines import cli
from pipelines.recipe import Recipe, RecipeError, field_type, jsonable
from pipelines.registry import Pipeline, SweepField, get_pipeline, names
from tuning.space import Dim, Limits, check_search_algorithm, load_space_file, range_dim

STATE_FILE = "sweep_state.json"
ROLES = ("lr", "decay", "alpha")        # the --<role>-range flags, in this order
DEMO_EPOCHS = 4                         # a demo trial's epochs per stage, unless an epochs flag is given


class _SharedMode(argparse.Action):
    """``--mode max|min`` is the sweep's; any other value is handed to the pipeline's ``--mode``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values in ("max", "min"):
            namespace.mode = values
        else:
            namespace.pipeline_mode = values


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m tuning", allow_abbrev=False,  # --lr must not abbreviate --lr-range
        description="Ray Tune sweep over recipe fields of a pipeline; every trial an MLflow child run.",
        epilog="Any other flag goes to the pipeline (python pipelines/<pipeline>.py --help): data, recipe "
               "(--recipe, --num-epochs: a trial's epochs, ...), --num-workers / --cpus-per-worker (one "
               "trial's Ray Train workers), --storage-path, --mlflow-uri, --experiment, --seed (also seeds "
               "the search), --address, ... With no data flags the embedded demo is swept.")
    p.add_argument("--pipeline", choices=names(), default="two_stage", help="default: %(default)s")
    s = p.add_argument_group("search")
    s.add_argument("--num-samples", type=int, default=8,
                   help="trials (with grid dimensions: per grid point); default %(default)s")
    s.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="random (default): Tune's BasicVariantGenerator; optuna: TPE (the [optuna] extra)")
    s.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha (default) stops poor trials at epochs grace, 2 x grace, ...; fifo runs all to the end")
    s.add_argument("--grace-period", type=int, default=1,
                   help="ASHA: epochs every trial runs before a stop; default %(default)s")
    s.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as fit in half the CPUs, and in the GPUs; at least 1)")
    s.add_argument("--metric", default=None,
                   help="validation metric to optimise (default: the pipeline's, e.g. val_pearson_mean)")
    s.add_argument("--mode", action=_SharedMode, default="max",
                   help="max (default) or min the metric; any other value is the pipeline's --mode "
                        "(two_stage: one_stage, two_stage, dimensional)")
    s.add_argument("--lr-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the pipeline's lr field (default: a decade either side of the recipe's value)")
    s.add_argument("--decay-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the pipeline's weight-decay field (default: a decade either side of the recipe's; "
                        "not searched when the recipe has none)")
    s.add_argument("--alpha-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the pipeline's alpha field, where it has one (two_stage --task multi: the VA loss "
                        "weight; sticker: LORA's integer token multiplier); default: its bounds")
    s.add_argument("--space", default=None,
                   help="YAML/JSON file of extra or overriding dimensions, by recipe field path (see tuning.space)")
    r = p.add_argument_group("where")
    r.add_argument("--sweep-name", default=None,
                   help="folder and MLflow run name (default: from the command, so re-running it resumes)")
    r.add_argument("--stage1-checkpoint", default=None,
                   help="two_stage --mode two_stage: a stage-one checkpoint folder every trial starts from "
                        "(else stage one is trained once by the sweep)")
    return p


@dataclass
class SweepConfig:
    """Everything resolved from the command line before Ray starts."""

    pipeline: Pipeline
    args: argparse.Namespace        # the pipeline's flags
    plan: Any                       # the pipeline's plan: the base of every trial (plan.recipe, plan.run)
    dims: dict[str, Dim]            # recipe field path -> dimension
    roles: dict[str, str]           # lr / decay / alpha -> the field path it searches (declared by the pipeline)
    search: str
    scheduler: str
    num_samples: int
    max_concurrent: Optional[int]
    grace_period: int
    metric: str
    mode: str
    name: str
    max_t: int                      # a trial's epochs
    seed: int                       # seeds the search (the recipe's seed)
    stage1_checkpoint: Optional[str] = None

    def param_space(self) -> dict:
        return {path: dim.domain() for path, dim in self.dims.items()}


def parse(argv: Optional[Sequence[str]] = None) -> SweepConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, rest = build_parser().parse_known_args(argv)
    if getattr(ns, "pipeline_mode", None):
        rest += ["--mode", ns.pipeline_mode]
    pipeline = get_pipeline(ns.pipeline)
    metric = ns.metric or pipeline.metric
    if not metric.startswith("val_"):
        raise cli.UsageError(f"--metric {metric}: trials are selected on validation metrics (val_...) only")
    for flag, value in (("--num-samples", ns.num_samples), ("--grace-period", ns.grace_period),
                        ("--max-concurrent", ns.max_concurrent or 1)):
        if value < 1:
            raise cli.UsageError(f"{flag} must be at least 1, not {value}")
    if ns.stage1_checkpoint and type(pipeline).stage_one is Pipeline.stage_one:
        raise cli.UsageError(f"--stage1-checkpoint: {pipeline.name} has no stage one (it applies to "
                             "two_stage --mode two_stage only)")
    args = cli.parse_args(pipeline.build_parser(), rest)
    plan = pipeline.plan(args)
    if getattr(plan, "grid", False):
        raise cli.UsageError("--frameworks / --seeds run several trainings; a sweep trial is one: pass --mode "
                             "and --task (and --seed)")
    preset = demo_preset(pipeline, args, plan)
    if preset:
        plan = dataclasses.replace(plan, recipe=plan.recipe.with_overrides(preset))
    fields = pipeline.sweep_fields(plan)
    max_t = trial_epochs(plan.recipe, fields)
    if ns.scheduler == "asha" and ns.grace_period > max_t:
        raise cli.UsageError(f"--grace-period {ns.grace_period} exceeds a trial's {max_t} epochs")
    dims = search_dims(pipeline, plan, fields, ns)
    check_search_algorithm(dims, ns.search, ns.space or "--space")
    return SweepConfig(pipeline=pipeline, args=args, plan=plan, dims=dims,
                       roles={role: f.path for role, f in fields.items()}, search=ns.search,
                       scheduler=ns.scheduler, num_samples=ns.num_samples, max_concurrent=ns.max_concurrent,
                       grace_period=ns.grace_period, metric=metric, mode=ns.mode,
                       name=ns.sweep_name or default_sweep_name(pipeline.name, argv), max_t=max_t,
                       seed=plan.recipe.stage().seed, stage1_checkpoint=ns.stage1_checkpoint)


def epoch_flags(pipeline: Pipeline):
    """The pipeline's flags that set a section's ``epochs``."""
    return [f for f in pipeline.flags if f.presets is None and any(p.endswith(".epochs") for p in f.paths)]


def demo_preset(pipeline: Pipeline, args: argparse.Namespace, plan) -> dict:
    """On the demo: ``{field path: 4}`` for every epochs flag the command leaves out (none with ``--recipe``)."""
    if not getattr(plan, "demo", False) or getattr(args, "recipe", None):
        return {}
    return {path: DEMO_EPOCHS for flag in epoch_flags(pipeline) if not hasattr(args, flag.dest)
            for path in flag.paths}


def trial_section(fields: dict[str, SweepField]) -> str:
    """The section a trial trains: the one its sweep fields live in (``stage`` when it declares none)."""
    for role in ROLES:
        if role in fields:
            return fields[role].path.partition(".")[0]
    return "stage"


def trial_epochs(recipe: Recipe, fields: dict[str, SweepField]) -> int:
    return recipe.stage(trial_section(fields)).epochs


def field_value(recipe: Recipe, path: str) -> Any:
    """The value a recipe gives the field at ``path`` (its section over ``stage``)."""
    section, _, rest = path.partition(".")
    node: Any = recipe.stage(section)
    for part in rest.split("."):
        if node is None:
            return None
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def field_limits(field: SweepField) -> Limits:
    return Limits(low=field.low, high=field.high, integer=field.integer or field.kind == "int")


def _decade(value: float) -> tuple[float, float]:
    return value / 10.0, value * 10.0


def _describe(plan) -> str:
    """How the plan trains, for messages (``--mode two_stage --task single``)."""
    parts = [f"--{k} {getattr(plan, k)}" for k in ("mode", "task") if isinstance(getattr(plan, k, None), str)]
    return f" ({' '.join(parts)})" if parts else ""


def search_dims(pipeline: Pipeline, plan, fields: dict[str, SweepField], ns: argparse.Namespace) -> dict[str, Dim]:
    """The roles' fields from their ranges (or the defaults), then the ``--space`` file on top."""
    dims: dict[str, Dim] = {}
    for role in ROLES:
        given = getattr(ns, f"{role}_range")
        flag = f"--{role}-range"
        field = fields.get(role)
        if field is None:
            if given:
                raise cli.UsageError(f"{flag}: {pipeline.name}{_describe(plan)} has no {role} field to search")
            continue
        if given:
            dims[field.path] = range_dim(field.path, given, field.kind, field_limits(field), flag)
        elif field.bounds is not None:
            dims[field.path] = range_dim(field.path, field.bounds, field.kind, field_limits(field), flag)
        else:  # a decade either side of the recipe's value; none to centre on: not searched
            value = field_value(plan.recipe, field.path)
            if isinstance(value, (int, float)) and value > 0:
                dims[field.path] = range_dim(field.path, _decade(float(value)), field.kind, field_limits(field),
                                             f"{flag} (a decade either side of the recipe's {value})")
    if ns.space:
        dims.update(load_space_file(ns.space, {f.path: field_limits(f) for f in fields.values()},
                                    _path_check(pipeline, plan, fields), _value_check(plan)))
    return dims


def _path_check(pipeline: Pipeline, plan, fields: dict[str, SweepField]):
    allowed = pipeline.sweepable(plan) | {f.path for f in fields.values()}

    def check(path: str, where: str) -> None:
        if path in allowed:
            return
        section, _, rest = path.partition(".")
        if section not in pipeline.sections or not rest:
            raise cli.UsageError(f"{where}: not a field path of the {pipeline.name} recipe (section.field..., "
                                 f"sections: {', '.join(pipeline.sections)})")
        if not is_field(rest):
            raise cli.UsageError(f"{where}: not a field of the {pipeline.name} recipe (sweepable: "
                                 f"{', '.join(sorted(allowed))})")
        why = "epochs are ASHA's budget: set them with the pipeline's flags" if rest == "epochs" else \
            f"{pipeline.name} does not let a sweep search it"
        raise cli.UsageError(f"{where}: cannot be searched ({why}); sweepable fields: {', '.join(sorted(allowed))}")

    return check


def is_field(path: str) -> bool:
    """Whether ``path`` (below a section) names a field of a stage recipe; any key below a free-form
    mapping field (``model.options.alpha``) counts."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        try:
            hint = field_type(".".join(parts[:i]))
        except (KeyError, TypeError):
            return False
        if typing.get_origin(hint) in (dict, collections.abc.Mapping) or hint in (dict, typing.Any):
            return True
    return True


def _value_check(plan):
    def check(path: str, value: Any, where: str) -> None:
        try:
            plan.recipe.with_overrides({path: jsonable(value)})
        except RecipeError as exc:
            raise cli.UsageError(f"{where}: {value!r} does not fit the recipe ({exc})") from None

    return check


def trial_overrides(config: dict) -> dict:
    """A trial's config as recipe overrides (plain Python values: Tune samples numpy numbers)."""
    return jsonable(dict(config))


def default_sweep_name(pipeline: str, argv: Sequence[str]) -> str:
    """``<pipeline>-sweep-<hash of the command>``: the same command finds (and resumes) the same sweep."""
    digest = hashlib.sha1(json.dumps(list(argv)).encode()).hexdigest()[:8]
    return f"{pipeline}-sweep-{digest}"


def default_concurrency(resources: dict, num_workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """Trials at once: as many Ray Train runs (``num_workers x cpus_per_worker`` CPUs each) as fit in
    half the cluster's CPUs, the other half being left to Ray Data that feeds them; with GPUs, also
    no more than the GPUs hold (one per worker). At least one."""
    by_cpu = int(resources.get("CPU", 1) / 2 // max(num_workers * cpus_per_worker, 1e-9))
    limit = min(by_cpu, int(resources.get("GPU", 0) // num_workers)) if use_gpu else by_cpu
    return max(1, limit)
