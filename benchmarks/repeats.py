"""How every benchmark here measures on a noisy machine: peers interleaved, each figure as median and range.

One run of a benchmark proves nothing on a shared machine (``train_overhead.py`` gave Ray / bare 0.66,
then 0.95, in two back-to-back runs on an idle 2-core machine). So every benchmark takes
``--repeats N`` (:func:`add_repeats_arg`), runs its peers once per round in a fixed order, A, B, A,
B, ... (:func:`interleave`: a slow spell of the machine hits every peer, not one), and prints every
figure as ``median (min–max, n=N) unit`` (:class:`Figure`). A ratio of two peers is taken round by
round (:func:`paired`), so each round's pair saw the same machine.

Imported by the benchmarks as a sibling module (``python benchmarks/<name>.py`` puts this folder
first on ``sys.path``). No project import: plain Python and NumPy.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Figure", "WALL", "add_repeats_arg", "interleave", "paired", "steady", "print_table"]

WALL = "wall time"   # the figure interleave() records for every run: its wall-clock seconds


def add_repeats_arg(parser: argparse.ArgumentParser, default: int = 1) -> None:
    parser.add_argument("--repeats", type=_positive, default=default,
                        help="rounds of the benchmark: its peers run once per round, interleaved (A, B, A, B, ...); "
                             "every figure is printed as median (min-max, n=rounds)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


@dataclass
class Figure:
    """The values one figure took over the rounds, its unit and how many decimals it is shown with.

    ``str(figure)``: ``median (min–max, n=N) unit``; values that are NaN (not measured in a round,
    e.g. GPU utilisation without a GPU) are left out of the median and of ``n``; ``n/a`` when none is left.
    """

    unit: str = ""
    digits: int = 1
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def measured(self) -> list[float]:
        return [v for v in self.values if not math.isnan(v)]

    def __str__(self) -> str:
        measured = self.measured
        if not measured:
            return "n/a"
        median, low, high = (f"{v:,.{self.digits}f}" for v in (np.median(measured), min(measured), max(measured)))
        unit = f" {self.unit}" if self.unit else ""
        return f"{median} ({low}–{high}, n={len(measured)}){unit}"


Peer = Callable[[], Mapping[str, float]]


def interleave(peers: Mapping[str, Peer], repeats: int, units: Mapping[str, tuple[str, int]],
               log: Optional[Callable[[str], None]] = print) -> dict[str, dict[str, Figure]]:
    """Run every peer once per round, in the order given, for ``repeats`` rounds.

    A peer is a callable returning its figures of one run, ``{name: value}``; ``units`` maps each
    figure name to ``(unit, decimals)``. Returns ``{peer: {figure: Figure}}``, each peer's figures
    with its runs' wall-clock seconds as :data:`WALL`; ``log`` gets one line per run (the peer, the
    round, its figures and its wall time).
    """
    results: dict[str, dict[str, Figure]] = {name: {} for name in peers}
    for round_ in range(1, repeats + 1):
        for name, peer in peers.items():
            start = time.perf_counter()
            figures = peer()
            seconds = time.perf_counter() - start
            results[name].setdefault(WALL, Figure("s", 1)).add(seconds)
            for key, value in figures.items():
                unit, digits = units.get(key, ("", 2))
                results[name].setdefault(key, Figure(unit, digits)).add(value)
            if log is not None:
                shown = ", ".join(f"{k} {v:,.{units.get(k, ('', 2))[1]}f}" for k, v in figures.items())
                log(f"  round {round_}/{repeats}  {name}: {shown}  ({seconds:.1f} s)")
    return results


def paired(a: Figure, b: Figure, combine: Callable[[float, float], float] = lambda x, y: x / y,
           unit: str = "", digits: int = 2) -> Figure:
    """A figure computed round by round from two peers' values (by default the ratio ``a / b``)."""
    return Figure(unit, digits, [combine(x, y) for x, y in zip(a.values, b.values)])


def steady(per_epoch: Sequence[float]) -> float:
    """The steady rate of a training run: the mean of its epochs after the first (start-up, first
    decode, compilation); the first epoch's when there is only one."""
    values = list(per_epoch[1:] or per_epoch)
    return sum(values) / len(values) if values else float("nan")


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], title: str = "") -> None:
    """A plain text table, its columns left-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    if title:
        print(f"\n{title}")
    for line in [list(header), ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
