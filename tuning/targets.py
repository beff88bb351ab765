"""The pipelines a sweep can drive, and what one trial of each trains.

A :class:`Target` wraps a pipeline's :class:`~pipelines.registry.Pipeline` (``build_parser``, ``apply_defaults``,
``make_plan`` and its stage builders), so a trial builds exactly the recipe and datasets that
``python pipelines/<name>.py`` would, with the trial's lr, decay, alpha and extras set on a copy of
the base flags:

- ``two_stage``: a trial is stage two, started from one fixed stage-one checkpoint; lr, decay and
  alpha are stage two's (``--stage2-lr``, ``--stage2-decay``, and ``--alpha2``, the multi-task weight). With ``--mode one_stage`` a trial is stage one and
  alpha is ``--alpha``. Alpha only acts with ``--task multi``; with ``--task single`` it is not swept.
- ``sticker``: a trial is the one LORA / LORA-V training run; alpha is LORA's integer token
  multiplier (``--alpha``).
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Optional

from pipelines import cli
from pipelines.registry import Pipeline, get_pipeline
from tuning.space import Limits

# Flags that say where and how a run happens, not how the model learns: never search dimensions.
NOT_SWEEPABLE = frozenset({
    "help", "config", "fault", "address", "num_workers", "use_gpu", "cpus_per_worker", "storage_path", "run_name",
    "max_failures", "mlflow_uri", "experiment", "dataname", "data_root", "dimensional", "lexicon", "max_side",
    "demo_images_per_class", "demo_image_size", "eval", "checkpoint", "mode", "task", "model", "verbose", "register",
})
# The trial's epoch count is ASHA's budget (max_t), set by the pipeline flag, not sampled.
EPOCH_DESTS = frozenset({"num_epochs", "stage2_epochs"})


def raise_usage_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` raise :class:`cli.UsageError` (one line, exit 2 via ``cli.run_main``) instead of
    printing its usage block and exiting."""

    def error(message: str):
        raise cli.UsageError(f"{parser.prog}: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


class Target:
    """One pipeline as seen by a sweep."""

    name: str = ""
    default_metric: str = ""
    alpha_kind: str = "uniform"     # how --alpha-range is sampled
    alpha_limits = Limits()
    alpha_range: tuple = ()         # the default --alpha-range
    demo_preset: dict = {}          # sweep-sized demo settings, unless the flag is given

    @property
    def pipeline(self) -> Pipeline:
        return get_pipeline(self.name)

    @property
    def script(self) -> str:
        return self.pipeline.script

    def build_parser(self) -> argparse.ArgumentParser:
        return raise_usage_errors(self.pipeline.build_parser())

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """The pipeline's flags (the base of every trial), with its defaults and the sweep's demo preset."""
        args = cli.parse_args(self.build_parser(), argv)
        if getattr(args, self.pipeline.data_flag) is None:
            for key, value in self.demo_preset.items():
                if key not in args.explicit:
                    setattr(args, key, value)
        return self.pipeline.apply_defaults(args)

    def default_alpha_range(self, args: argparse.Namespace) -> tuple:
        """The ``--alpha-range`` searched when none is given."""
        return self.alpha_range

    def flag_dests(self) -> dict[str, argparse.Action]:
        return {a.dest: a for a in self.build_parser()._actions}

    def sweepable(self) -> set[str]:
        return set(self.flag_dests()) - NOT_SWEEPABLE - EPOCH_DESTS

    def trial_args(self, base: argparse.Namespace, config: dict) -> argparse.Namespace:
        """A copy of the base flags with one trial's values set (each at the flag :meth:`dest` names)."""
        args = copy.deepcopy(base)
        for key, value in config.items():
            setattr(args, self.dest(base, key), value)
        return args

    def dest(self, args, key: str) -> str:
        """The pipeline flag a searched name sets: ``alpha`` is the pipeline's own alpha, other names
        are flags as they are."""
        return self.alpha_dest(args) if key == "alpha" else key

    def config_flags(self, base: argparse.Namespace, config: dict) -> dict[str, Any]:
        """Flag dests of the pipeline for a retrain: the base flags plus a trial's values."""
        skip = {"help", "config", "run_name", "fault", "eval", "checkpoint"}
        flags = {dest: getattr(base, dest) for dest in self.flag_dests()
                 if dest not in skip and getattr(base, dest, None) is not None}
        return vars(self.trial_args(argparse.Namespace(**flags), config))

    # What each pipeline fills in.
    def alpha_dest(self, args) -> str:
        raise NotImplementedError

    def alpha_acts(self, args) -> bool:
        return True

    def epochs(self, args) -> int:
        """Epochs of one trial: ASHA's ``max_t``."""
        raise NotImplementedError

    def needs_stage1(self, args) -> bool:
        return False

    def make_plan(self, args):
        return self.pipeline.make_plan(args)

    def stage1(self, plan) -> tuple:
        raise NotImplementedError

    def trial_stage(self, plan, init_from: Optional[str]) -> tuple:
        """(recipe, datasets) of one trial; test splits are left out (selection uses validation only)."""
        raise NotImplementedError


class TwoStage(Target):
    name = "two_stage"
    default_metric = "val_pearson_mean"
    alpha_limits = Limits(0.0, 1.0)
    alpha_range = (0.1, 0.9)
    demo_preset = {"num_epochs": 4, "stage2_epochs": 4}

    def alpha_dest(self, args) -> str:
        return "alpha2" if self.needs_stage1(args) else "alpha"

    def dest(self, args, key: str) -> str:
        # A trial is stage two: its lr and decay are stage two's, stage one keeps the base flags.
        if key in ("lr", "decay") and self.needs_stage1(args):
            return f"stage2_{key}"
        return super().dest(args, key)

    def alpha_acts(self, args) -> bool:
        return args.task == "multi"

    def epochs(self, args) -> int:
        return args.stage2_epochs if self.needs_stage1(args) else args.num_epochs

    def needs_stage1(self, args) -> bool:
        return args.mode == "two_stage"

    def stage1(self, plan) -> tuple:
        recipe, datasets, _ = self.pipeline.stages["stage1"](plan)
        return recipe, datasets

    def trial_stage(self, plan, init_from: Optional[str]) -> tuple:
        if self.needs_stage1(plan.args):
            recipe, datasets, _ = self.pipeline.stages["stage2"](plan, init_from)
            return recipe, datasets
        return self.stage1(plan)


class Sticker(Target):
    name = "sticker"
    default_metric = "val_accuracy"
    alpha_kind = "int"
    alpha_limits = Limits(low=1, integer=True)
    alpha_range = (2, 16)
    demo_preset = {"num_epochs": 4}

    def default_alpha_range(self, args: argparse.Namespace) -> tuple:
        # The demo's 64 px images supply alpha * sr^2 tokens per head only up to alpha 4.
        return (1, 4) if args.demo else self.alpha_range

    def parse(self, argv: list[str]) -> argparse.Namespace:
        args = super().parse(argv)
        if args.eval:
            raise cli.UsageError("--eval scores one checkpoint; it cannot be swept")
        return args

    def alpha_dest(self, args) -> str:
        return "alpha"

    def epochs(self, args) -> int:
        return args.num_epochs

    def trial_stage(self, plan, init_from: Optional[str]) -> tuple:
        recipe, datasets, _ = self.pipeline.stages["sticker"](plan)
        return recipe, datasets


TARGETS: dict[str, Target] = {t.name: t for t in (TwoStage(), Sticker())}
