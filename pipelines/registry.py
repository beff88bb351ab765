"""The pipelines of this project: one registry for training and for sweeps.

A pipeline is a module in ``pipelines/`` that ends with ``PIPELINE = <a Pipeline subclass>()``: its
recipe sections and flags, its data plan, its stage builders, and what a sweep of it searches. The
entry script runs it (``python pipelines/<name>.py``), ``python -m tuning --pipeline <name>`` sweeps
the same object, so a trial trains exactly the stage the script would. :func:`names` finds the
pipeline modules by reading their source (no import, no side effect), :func:`get_pipeline` imports one.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipelines.recipe import Flag, Recipe, StageRecipe


@dataclass(frozen=True)
class SweepField:
    """A recipe field a sweep searches by default: its path and the Tune space around the recipe's value
    (``loguniform`` over a decade either side, or ``uniform`` / ``int`` over ``bounds``)."""

    path: str
    kind: str = "loguniform"
    bounds: Optional[tuple] = None       # None: a decade either side of the recipe's value
    low: Optional[float] = None          # the values it may take (checked for --space and the ranges)
    high: Optional[float] = None
    integer: bool = False


class Pipeline:
    """What a pipeline module declares; see the module docstring. Subclasses fill in the methods."""

    name: str = ""
    script: str = ""
    sections: tuple[str, ...] = ("stage",)   # the recipe file's sections
    flags: tuple[Flag, ...] = ()             # flags that override recipe fields
    metric: str = "val_accuracy"             # what a sweep optimises by default

    def build_parser(self):
        raise NotImplementedError

    def load_recipe(self, name_or_path: str) -> Recipe:
        return Recipe.load(self.name, name_or_path, self.sections)

    def plan(self, args) -> Any:
        """Resolve the recipe, the run options and the data (ingested and checked); raises before training."""
        raise NotImplementedError

    def main(self, argv: Optional[Sequence[str]] = None) -> int:
        raise NotImplementedError

    # What a sweep needs.
    def stage_one(self, plan) -> Optional[tuple[StageRecipe, Any]]:
        """The stage trained once before the trials start from it (None: trials start from scratch)."""
        return None

    def trial(self, plan, init_from: Optional[str]) -> tuple[StageRecipe, Any]:
        """The stage one trial trains: ``(recipe, StageData)``; test splits are never scored."""
        raise NotImplementedError

    def sweep_fields(self, plan) -> dict[str, SweepField]:
        """The sweep's ``lr``, ``decay`` and ``alpha`` (the ``--*-range`` flags' fields), by role."""
        raise NotImplementedError

    def sweepable(self, plan) -> set[str]:
        """Recipe field paths a ``--space`` file may search: every flag's field but the run's shape."""
        return {p for flag in self.flags for p in flag.paths if flag.presets is None} - self.not_sweepable

    not_sweepable: frozenset = frozenset()


def names() -> list[str]:
    """The pipeline modules of this package: those whose source assigns ``PIPELINE`` at top level."""
    import pipelines

    found = []
    for module in pkgutil.iter_modules(pipelines.__path__):
        source = Path(pipelines.__path__[0], f"{module.name}.py")
        if source.is_file() and any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PIPELINE"
                                                                         for t in node.targets)
                                    for node in ast.parse(source.read_text()).body):
            found.append(module.name)
    return sorted(found)


def get_pipeline(name: str) -> Pipeline:
    """The pipeline called ``name``."""
    known = names()
    if name not in known:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(known)}")
    return importlib.import_module(f"pipelines.{name}").PIPELINE
