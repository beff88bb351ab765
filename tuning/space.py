"""Search dimensions: the ``--lr/--decay/--alpha-range`` flags and a ``--space`` file, as Ray Tune domains.

A ``--space`` file (YAML or JSON) maps a dimension to one of::

    lr:         {loguniform: [1.0e-4, 1.0e-2]}   # log-uniform float, 0 < LO < HI
    alpha:      {uniform: [0.1, 0.9]}            # uniform float, LO < HI
    warmup_epochs: {int: [0, 2]}                 # uniform integer, both ends included
    batch_size: {choice: [8, 16]}                # one of the values, sampled
    decay:      {grid: [0.0, 1.0e-4]}            # every value, in order (random search only;
                                                 #   each grid point is run --num-samples times)
    optimizer:  adamw                            # a constant

A dimension is ``lr``, ``decay``, ``alpha`` (the pipeline's alpha, see :mod:`tuning`) or any other
flag of the pipeline by its dest (``batch_size``, ``warmup_epochs``, ...); file entries override the
command-line ranges. Values are checked here, before Ray starts, and a bad one is reported as one
line naming the file or flag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

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
    """One search dimension: ``kind`` is one of :data:`KINDS` or ``"const"``."""

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
    for value in (lo, hi):
        limits.check(value, where)
    if kind == "loguniform" and lo <= 0:
        raise UsageError(f"{where}: a log-uniform range needs 0 < LO, got {lo!r}")
    if not lo < hi:
        raise UsageError(f"{where}: needs LO < HI, got {lo!r} {hi!r}")
    if kind == "int":
        lo, hi = int(lo), int(hi)
    return Dim(name, kind, (lo, hi))


def parse_entry(name: str, entry: Any, limits: Optional[Limits], where: str) -> Dim:
    """One ``--space`` entry (see the module docstring) as a :class:`Dim`."""
    if not isinstance(entry, dict):
        values = (entry,)
        kind = "const"
    else:
        if len(entry) != 1 or next(iter(entry)) not in KINDS:
            raise UsageError(f"{where}: expected one of {', '.join(KINDS)} or a constant, got {entry!r}")
        kind, values = next(iter(entry.items()))
        if kind in RANGE_KINDS:
            numeric = limits or Limits()
            if kind == "int":
                numeric = replace(numeric, integer=True)
            return range_dim(name, values, kind, numeric, where)
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        values = tuple(values)
    if limits is not None:
        for value in values:
            limits.check(value, where)
    return Dim(name, kind, values)


def load_space_file(path: str, limits: dict[str, Limits]) -> dict[str, Dim]:
    """Read a ``--space`` file; ``limits`` holds the checks of dimensions that have them."""
    entries = load_config_file(path)
    return {name: parse_entry(name, entry, limits.get(name), f"{path}: {name}") for name, entry in entries.items()}


def check_search_algorithm(dims: dict[str, Dim], search: str, where: str = "--space") -> None:
    """Optuna samples every dimension itself: Tune's grid search is for random search only."""
    grids = [d.name for d in dims.values() if d.kind == "grid"]
    if search != "random" and grids:
        raise UsageError(f"{where}: grid dimension(s) {', '.join(grids)} need --search random "
                         f"(use choice with --search {search})")
    if not any(d.swept for d in dims.values()):
        raise UsageError("nothing to search: every dimension is a constant")
