"""The pipelines of this project, each declared once as a :class:`Pipeline`.

A pipeline module (``pipelines/two_stage.py``, ``pipelines/sticker.py``) ends with one
``PIPELINE = Pipeline(...)``: its flags, how it fills their defaults, how it resolves and checks
its data (the plan), and the builders of its stages, each returning ``(recipe, datasets, tests)``.
The entry script runs it (``main``); a sweep (:mod:`tuning`) drives the same object, so a trial
trains exactly the stage the script would.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

NAMES = ("two_stage", "sticker")


@dataclass(frozen=True)
class Pipeline:
    name: str
    script: str                                     # e.g. "pipelines/two_stage.py"
    data_flag: str                                  # the flag whose absence selects the embedded demo
    build_parser: Callable[[], argparse.ArgumentParser]
    apply_defaults: Callable[[argparse.Namespace], argparse.Namespace]
    make_plan: Callable[[argparse.Namespace], Any]  # data resolved, ingested and checked; Ray Datasets
    stages: Mapping[str, Callable[..., tuple]]      # name -> builder(plan, ...) -> (recipe, datasets, tests)
    main: Callable[..., int]


def get_pipeline(name: str) -> Pipeline:
    """The pipeline called ``name`` (``two_stage`` or ``sticker``)."""
    if name == "two_stage":
        from pipelines.two_stage import PIPELINE
    elif name == "sticker":
        from pipelines.sticker import PIPELINE
    else:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(NAMES)}")
    return PIPELINE
