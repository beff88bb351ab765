"""After the sweep: one row per trial from Tune's results (and its MLflow run, made by
:class:`tuning.runs.TrialRuns`), the ranked table printed, ``trials.csv`` and ``best_config.yaml`` written."""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.recipe import jsonable
from tuning.runs import OUTCOME_TAG
from tuning.targets import Target
from tuning.trial import summarize, trial_params


@dataclass
class TrialRow:
    trial_id: str
    config: dict
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
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    summary = summarize(history, metric, mode)
    run = runs.get(trial_id)
    status = run.data.tags.get(OUTCOME_TAG) if run is not None else None
    if status is None:
        status = "error" if result.error else \
            "stopped_by_scheduler" if summary["epochs_run"] < max_t else "completed"
    best_epoch = summary.get("best_epoch")
    best_row = next((r for r in history if r.get("epoch") == best_epoch), {})
    checkpoint = best_row.get("checkpoint_path")
    return TrialRow(trial_id=trial_id, config=trial_params(result.config or {}), best=summary.get(f"best_{metric}"),
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


def table(rows: list[TrialRow], metric: str) -> str:
    """The ranked trials as fixed-width text: rank, trial id, lr, decay, alpha (+ extras), metric,
    epochs run, status."""
    dims = list(dict.fromkeys(k for r in rows for k in r.config))
    header = ["rank", "trial", *dims, metric, "epochs", "status"]
    body = [[str(r.rank), r.trial_id, *(_fmt(r.config.get(d)) for d in dims),
             "-" if r.best is None else f"{r.best:.4f}", str(r.epochs), r.status] for r in rows]
    lines = [header, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def write_csv(rows: list[TrialRow], metric: str, path: Path) -> None:
    dims = list(dict.fromkeys(k for r in rows for k in r.config))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial_id", *dims, metric, "best_epoch", "epochs_run", "status", "mlflow_run_id",
                         "checkpoint"])
        for r in rows:
            writer.writerow([r.rank, r.trial_id, *(jsonable(r.config.get(d)) for d in dims), r.best, r.best_epoch,
                             r.epochs, r.status, r.run_id, r.checkpoint])


def write_best_config(target: Target, base_args: argparse.Namespace, best: TrialRow, metric: str, path: Path) -> None:
    """The pipeline's flag dests (base flags + the best trial's values): ``--config`` for a retrain."""
    import yaml

    flags = jsonable(target.config_flags(base_args, best.config))
    header = (f"# best trial {best.trial_id} of a sweep: {metric} {best.best}\n"
              f"# retrain: python {target.script} --config {path.name}\n")
    path.write_text(header + yaml.safe_dump(flags, sort_keys=True))
