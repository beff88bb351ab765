"""After the sweep: one row per trial from Tune's results (and its MLflow run, made by
:class:`tuning.runs.TrialRuns`), the ranked table printed, ``trials.csv``, ``best_recipe.yaml`` and
``best_config.yaml`` written.

``best_recipe.yaml`` is the sweep's resolved recipe (the recipe file, the flags, the demo preset) with
the best trial's field values: a recipe file ``--recipe`` reads (``Recipe.load``). ``best_config.yaml``
is a ``--config`` file of the pipeline: ``recipe: <best_recipe.yaml>`` and the data and run flags of
the sweep's command that differ from the pipeline's defaults, so ``python pipelines/<name>.py --config
best_config.yaml`` retrains the best trial's stage (and the stages before it) in one command.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipelines.recipe import Recipe, jsonable
from pipelines.registry import Pipeline
from tuning.runs import OUTCOME_TAG, summarize

# Pipeline flags a retrain does not take from the sweep: the run's own name, cluster address (RAY_ADDRESS
# or the retrain's own --address says where it runs), registry name and test hooks, evaluation only,
# several runs at once, and the recipe (best_recipe.yaml instead).
NOT_RETRAINED = frozenset({"config", "recipe", "run_name", "address", "fault", "eval", "checkpoint", "verbose",
                           "register", "frameworks", "seeds"})


@dataclass
class TrialRow:
    trial_id: str
    config: dict                    # recipe field path -> value
    best: Optional[float]           # the best value of the sweep's metric over the trial's epochs
    best_epoch: Optional[int]       # 0-based
    epochs: int                     # epochs reported to Tune
    status: str                     # completed | early_stopped | stopped_by_scheduler | error
    run_id: Optional[str]           # the trial's MLflow child run
    checkpoint: Optional[str]       # the best epoch's checkpoint folder
    rank: int = 0


def trial_row(result, runs: dict, metric: str, mode: str, max_t: int) -> TrialRow:
    """One Tune result as a row; ``runs`` are the sweep's MLflow child runs by trial id, whose
    ``sweep_outcome`` tag gives the status (else it is read from the result)."""
    frame = result.metrics_dataframe
    history = frame.to_dict("records") if frame is not None else []
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name   # the trial's folder is its id
    summary = summarize(history, metric, mode)
    run = runs.get(trial_id)
    status = run.data.tags.get(OUTCOME_TAG) if run is not None else None
    if status is None:
        status = "error" if result.error else \
            "stopped_by_scheduler" if summary["epochs_run"] < max_t else "completed"
    best_epoch = summary.get("best_epoch")
    best_row = next((r for r in history if r.get("epoch") == best_epoch), {})
    checkpoint = best_row.get("checkpoint_path")
    return TrialRow(trial_id=trial_id, config=jsonable(dict(result.config or {})), best=summary.get(f"best_{metric}"),
                    best_epoch=None if best_epoch is None else int(best_epoch), epochs=int(summary["epochs_run"]),
                    status=status, run_id=run.info.run_id if run is not None else None,
                    checkpoint=checkpoint if isinstance(checkpoint, str) else None)


def rank(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best first by the metric; trials that reported nothing last."""
    sign = -1.0 if mode == "max" else 1.0
    ordered = sorted(rows, key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0.0))
    for i, row in enumerate(ordered, 1):
        row.rank = i
    return ordered


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _columns(rows: list[TrialRow], dims: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*dims, *(k for r in rows for k in r.config)]))


def table(rows: list[TrialRow], metric: str, dims: Sequence[str] = ()) -> str:
    """The ranked trials as fixed-width text: rank, trial id, the searched fields (by path), metric,
    epochs run, status."""
    columns = _columns(rows, dims)
    header = ["rank", "trial", *columns, metric, "epochs", "status"]
    body = [[str(r.rank), r.trial_id, *(_fmt(r.config.get(d)) for d in columns),
             "-" if r.best is None else f"{r.best:.4f}", str(r.epochs), r.status] for r in rows]
    lines = [header, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def write_csv(rows: list[TrialRow], metric: str, path: Path, dims: Sequence[str] = ()) -> None:
    columns = _columns(rows, dims)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial_id", *columns, metric, "best_epoch", "epochs_run", "status", "mlflow_run_id",
                         "checkpoint"])
        for r in rows:
            writer.writerow([r.rank, r.trial_id, *(r.config.get(d) for d in columns), r.best, r.best_epoch,
                             r.epochs, r.status, r.run_id, r.checkpoint])


def recipe_file_text(recipe: Recipe, header: str = "") -> str:
    """A recipe as a file :meth:`Recipe.load` reads: its description and sections (``to_dict``'s
    ``pipeline`` and ``recipe`` keys are not sections), every ``extends`` already resolved."""
    import yaml

    data = {k: v for k, v in recipe.to_dict().items() if k not in ("pipeline", "recipe")}
    return header + yaml.safe_dump(data, sort_keys=False)


def write_best_recipe(recipe: Recipe, best: TrialRow, metric: str, path: Path) -> Recipe:
    """The sweep's recipe with the best trial's values, as a recipe file; returns that recipe."""
    best_recipe = recipe.with_overrides(best.config)
    header = (f"# The recipe of the best trial {best.trial_id} of a sweep ({metric} {best.best}): the sweep's\n"
              f"# recipe {recipe.name} with its flags, and the trial's values:\n"
              + "".join(f"#   {k}: {v}\n" for k, v in best.config.items()))
    path.write_text(recipe_file_text(best_recipe, header))
    return best_recipe


def retrain_flags(pipeline: Pipeline, args: argparse.Namespace, storage_path: Optional[str] = None) -> dict:
    """The data and run flags of the sweep's command that differ from the pipeline's defaults (the recipe
    flags are in the recipe file); ``storage_path``: the resolved ``--storage-path`` when one was given."""
    parser = pipeline.build_parser()
    recipe_dests = {flag.dest for flag in pipeline.flags}
    flags = {}
    for dest, value in sorted(vars(args).items()):
        if dest in recipe_dests or dest in NOT_RETRAINED or value is None or value == parser.get_default(dest):
            continue
        flags[dest] = storage_path if dest == "storage_path" and storage_path else value
    return jsonable(flags)


def write_best_config(pipeline: Pipeline, args: argparse.Namespace, recipe_path: Path, best: TrialRow, metric: str,
                      path: Path, storage_path: Optional[str] = None) -> dict:
    """``--config`` file of the pipeline for a retrain of the best trial; returns its values."""
    import yaml

    flags = {"recipe": str(recipe_path), **retrain_flags(pipeline, args, storage_path)}
    header = (f"# best trial {best.trial_id} of a sweep: {metric} {best.best}\n"
              f"# retrain: python {pipeline.script} --config {path}\n")
    path.write_text(header + yaml.safe_dump(flags, sort_keys=False))
    return flags
