"""The sweep driver: flags, search space, MLflow parent run, stage one, the Tuner, the reports.

The sweep's own flags are parsed first (``parse_known_args``); everything else goes to the
pipeline's parser, so every pipeline flag works and a wrong one is still a one-line error.
``--mode`` is shared: ``max``/``min`` is the sweep's direction, ``one_stage``/``two_stage`` the
two-stage pipeline's mode. ``--seed``, ``--storage-path`` and ``--mlflow-uri`` are the pipeline's
flags too: the seed seeds the search and every trial's training.

Folder of a sweep: ``<storage>/<sweep name>/`` with ``sweep_state.json`` (the MLflow parent run id,
stage one's checkpoint), ``stage1/`` (two_stage), ``tune/`` (the Tune experiment), ``trials/<id>/``
(each trial's Ray Train run), and at the end ``trials.csv`` and ``best_config.yaml``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from pipelines import cli
from tuning.space import Dim, Limits, check_search_algorithm, load_space_file, range_dim
from tuning.targets import TARGETS, Target, raise_usage_errors

STATE_FILE = "sweep_state.json"
SHARED_WITH_PIPELINE = {"seed": "--seed", "storage_path": "--storage-path", "mlflow_uri": "--mlflow-uri"}


class _SharedMode(argparse.Action):
    """``--mode max|min`` is the sweep's; any other value is handed to the pipeline's ``--mode``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values in ("max", "min"):
            namespace.mode = values
        else:
            namespace.pipeline_mode = values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tuning", allow_abbrev=False,  # --lr must not abbreviate --lr-range
        description="Ray Tune sweep over lr, decay and alpha of a pipeline; every trial an MLflow run.",
        epilog="Any other flag goes to the pipeline (python pipelines/<pipeline>.py --help): data, model, "
               "--num-epochs (a trial's epochs), --num-workers / --cpus-per-worker (one trial's Ray Train "
               "workers), --experiment, --address, ... With no data flags the embedded demo is swept.")
    p.add_argument("--pipeline", choices=sorted(TARGETS), default="two_stage", help="default: %(default)s")
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
                   help="validation metric to optimise (default: val_pearson_mean / val_accuracy for sticker)")
    s.add_argument("--mode", action=_SharedMode, choices=["max", "min", "one_stage", "two_stage"], default="max",
                   help="max (default) or min the metric; one_stage / two_stage: the two_stage pipeline's --mode")
    s.add_argument("--lr-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="log-uniform (default: a decade either side of the pipeline's lr)")
    s.add_argument("--decay-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="log-uniform weight decay (default: a decade either side of the pipeline's)")
    s.add_argument("--alpha-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="uniform; integer for sticker (default: 0.1 0.9; sticker 2 16)")
    s.add_argument("--space", default=None, help="YAML/JSON file of extra or overriding dimensions (see tuning)")
    r = p.add_argument_group("where")
    r.add_argument("--sweep-name", default=None,
                   help="folder and MLflow run name (default: from the command, so re-running it resumes)")
    r.add_argument("--storage-path", default=None, help="root of sweep folders (default <EMOTION_RAY_HOME>/runs)")
    r.add_argument("--mlflow-uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI, else local sqlite)")
    r.add_argument("--seed", type=int, default=None, help="seeds the search and every trial (default: the pipeline's)")
    r.add_argument("--stage1-checkpoint", default=None,
                   help="two_stage: a stage-one checkpoint folder to start every trial from (else trained once)")
    return raise_usage_errors(p)


@dataclass
class SweepConfig:
    """Everything resolved from the command line before Ray starts."""

    target: Target
    args: argparse.Namespace        # the pipeline's flags: the base of every trial
    dims: dict[str, Dim]
    search: str
    scheduler: str
    num_samples: int
    max_concurrent: Optional[int]
    grace_period: int
    metric: str
    mode: str
    name: str
    stage1_checkpoint: Optional[str]

    @property
    def max_t(self) -> int:
        return self.target.epochs(self.args)

    def param_space(self) -> dict:
        return {name: dim.domain() for name, dim in self.dims.items()}


def parse(argv: Optional[Sequence[str]] = None) -> SweepConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, rest = build_parser().parse_known_args(argv)
    if getattr(ns, "pipeline_mode", None):
        rest += ["--mode", ns.pipeline_mode]
    for dest, flag in SHARED_WITH_PIPELINE.items():
        if getattr(ns, dest) is not None:
            rest += [flag, str(getattr(ns, dest))]
    target = TARGETS[ns.pipeline]
    args = target.parse(rest)
    metric = ns.metric or target.default_metric
    if not metric.startswith("val_"):
        raise cli.UsageError(f"--metric {metric}: trials are selected on validation metrics (val_...) only")
    for flag, value in (("--num-samples", ns.num_samples), ("--grace-period", ns.grace_period),
                        ("--max-concurrent", ns.max_concurrent or 1)):
        if value < 1:
            raise cli.UsageError(f"{flag} must be at least 1, not {value}")
    max_t = target.epochs(args)
    if ns.scheduler == "asha" and ns.grace_period > max_t:
        raise cli.UsageError(f"--grace-period {ns.grace_period} exceeds a trial's {max_t} epochs")
    if ns.stage1_checkpoint and not target.needs_stage1(args):
        raise cli.UsageError("--stage1-checkpoint applies to --pipeline two_stage --mode two_stage only")
    dims = search_dims(target, args, ns)
    check_search_algorithm(dims, ns.search, ns.space or "--space")
    name = ns.sweep_name or default_sweep_name(ns.pipeline, argv)
    return SweepConfig(target=target, args=args, dims=dims, search=ns.search, scheduler=ns.scheduler,
                       num_samples=ns.num_samples, max_concurrent=ns.max_concurrent, grace_period=ns.grace_period,
                       metric=metric, mode=ns.mode, name=name, stage1_checkpoint=ns.stage1_checkpoint)


def _decade(value: float) -> tuple[float, float]:
    return value / 10.0, value * 10.0


def search_dims(target: Target, args: argparse.Namespace, ns: argparse.Namespace) -> dict[str, Dim]:
    """lr, decay and alpha from their ranges (or the defaults), then the ``--space`` file on top."""
    positive = Limits(positive=True)
    lr, decay, alpha = (getattr(args, target.dest(args, key)) for key in ("lr", "decay", "alpha"))
    dims = {"lr": range_dim("lr", ns.lr_range or _decade(lr), "loguniform", positive, "--lr-range")}
    if ns.decay_range or decay > 0:
        dims["decay"] = range_dim("decay", ns.decay_range or _decade(decay), "loguniform", positive,
                                  "--decay-range")
    else:  # no decay to centre a log range on: kept fixed unless a range is given
        dims["decay"] = Dim("decay", "const", (decay,))
    if ns.alpha_range or target.alpha_acts(args):
        dims["alpha"] = range_dim("alpha", ns.alpha_range or target.default_alpha_range(args), target.alpha_kind,
                                  target.alpha_limits, "--alpha-range")
    else:  # two_stage --task single: alpha weighs a loss term that is off
        dims["alpha"] = Dim("alpha", "const", (alpha,))
    if ns.space:
        limits = {"lr": positive, "decay": Limits(low=0.0), "alpha": target.alpha_limits}
        extra = load_space_file(ns.space, limits)
        allowed = target.sweepable() | {"alpha"}
        bad = sorted(set(extra) - allowed)
        if bad:
            raise cli.UsageError(f"{ns.space}: {', '.join(bad)} cannot be searched: not a training hyperparameter "
                                 f"of {target.script} (epochs are ASHA's budget: set them with the pipeline's flags)")
        dims.update(extra)
    return dims


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a sweep; 0 when it finished, 130 when it was interrupted (re-run to resume)."""
    from tuning.driver import run_sweep

    return 0 if run_sweep(parse(argv)) is not None else 130
