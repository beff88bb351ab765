"""Search dimensions: the ``--lr/--decay/--alpha-range`` flags and a ``--space`` file, as Ray Tune domains.

Every dimension is a recipe field, named by its path (``section.field...``), so a trial applies its
config with ``Recipe.with_overrides``. A ``--space`` file (YAML or JSON) maps a field path to one of::

    stage2.optimizer.lr:           {loguniform: [1.0e-4, 1.0e-2]}   # log-uniform float, 0 < LO < HI
    stage2.loss.va_weight:         {uniform: [0.1, 0.9]}            # uniform float, LO < HI
    stage.schedule.warmup_epochs:  {int: [0, 2]}                    # uniform integer, both ends included
    stage.batch_size:              {choice: [8, 16]}                # one of the values, sampled
    stage2.optimizer.weight_decay: {grid: [0.0, 1.0e-4]}            # every value, in order (random search
                                                                    #   only; each point --num-samples times)
    stage.optimizer.name:          adamw                            # a constant

A path must be a field the pipeline lets a sweep search (``Pipeline.sweepable(plan)`` and the fields of
its ``sweep_fields(plan)``); file entries override the command-line ranges. Every value is checked
here, before Ray starts, against the field's limits and the recipe's own types, and a bad one is one
line naming the file (or the flag).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from pipelines.cli import UsageError, load_config_file

RANGE_KINDS = ("loguniform", "uniform", "int")
LIST_KINDS = ("choice", "grid")
KINDS = RANGE_KINDS + LIST_KINDS


@dataclass(frozen=True)
class Limits:
    """What values a dimension accepts: bounds (inclusive) and whether they must be integers."""

    low: Optional[float] = None
    high: Optional[float] = None
    integer: bool = False
    positive: bool = False

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UsageError(f"{where}: {value!r} is not a finite number")
        if self.integer and float(value) != int(value):
            raise UsageError(f"{where}: {value!r} must be an integer")
        if self.positive and value <= 0:
            raise UsageError(f"{where}: {value!r} must be positive")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise UsageError(f"{where}: {value!r} lies outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Dim:
    """One search dimension of the recipe field ``name`` (a path): ``kind`` is one of :data:`KINDS` or
    ``"const"``."""

    name: str
    kind: str
    values: tuple

    @property
    def swept(self) -> bool:
        return self.kind != "const"

    def domain(self) -> Any:
        """The Ray Tune search-space object (or the constant)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return self.values[0]

    def describe(self) -> str:
        if self.kind == "const":
            return repr(self.values[0])
        return f"{self.kind}({', '.join(repr(v) for v in self.values)})"


def range_dim(name: str, bounds: Sequence[float], kind: str, limits: Limits, where: str) -> Dim:
    """A ``loguniform``/``uniform``/``int`` dimension from ``[LO, HI]``, checked against ``limits``."""
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise UsageError(f"{where}: needs two bounds [LO, HI], got {bounds!r}")
    lo, hi = bounds
    if kind == "loguniform":
        limits = replace(limits, positive=True)
    if kind == "int":
        limits = replace(limits, integer=True)
    for value in (lo, hi):
        limits.check(value, where)
    if not lo < hi:
        raise UsageError(f"{where}: needs LO < HI, got {lo!r} {hi!r}")
    if kind == "int":
        lo, hi = int(lo), int(hi)
    return Dim(name, kind, (lo, hi))


def parse_entry(name: str, entry: Any, limits: Optional[Limits], where: str) -> Dim:
    """One ``--space`` entry (see the module docstring) as a :class:`Dim`."""
    if not isinstance(entry, dict):
        values, kind = (entry,), "const"
    else:
        if len(entry) != 1 or next(iter(entry)) not in KINDS:
            raise UsageError(f"{where}: expected one of {', '.join(KINDS)} or a constant, got {entry!r}")
        kind, values = next(iter(entry.items()))
        if kind in RANGE_KINDS:
            return range_dim(name, values, kind, limits or Limits(), where)
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        values = tuple(values)
    if limits is not None:
        for value in values:
            limits.check(value, where)
    return Dim(name, kind, values)


def load_space_file(path: str, limits: dict[str, Limits], check_path: Callable[[str, str], None],
                    check_value: Callable[[str, Any, str], None]) -> dict[str, Dim]:
    """Read a ``--space`` file into ``{field path: Dim}``.

    ``check_path(field_path, where)`` raises when the path may not be searched; ``limits`` holds the
    bounds of the fields that have them; ``check_value(field_path, value, where)`` raises when a value
    (a constant, a choice, a grid point or a range's end) does not fit the recipe."""
    entries = load_config_file(path)
    dims = {}
    for name, entry in entries.items():
        where = f"{path}: {name}"
        check_path(str(name), where)
        dim = parse_entry(str(name), entry, limits.get(name), where)
        for value in dim.values:
            check_value(dim.name, value, where)
        dims[dim.name] = dim
    return dims


def check_search_algorithm(dims: dict[str, Dim], search: str, where: str = "--space") -> None:
    """Optuna samples every dimension itself: Tune's grid search is for random search only."""
    grids = [d.name for d in dims.values() if d.kind == "grid"]
    if search != "random" and grids:
        raise UsageError(f"{where}: grid dimension(s) {', '.join(grids)} need --search random "
                         f"(use choice with --search {search})")
    if not any(d.swept for d in dims.values()):
        raise UsageError("nothing to search: every dimension is a constant")
