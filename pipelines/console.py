"""What the console shows: the project's own lines by default, Ray's whole output with ``--verbose``.

Quiet (the default):

- the driver's ``ray`` logger is set to ERROR (``ray.init(logging_level=...)``) and Ray Data's
  *console* handler to ERROR; Ray Data's log file (``<session>/logs/ray-data/``) keeps everything;
- Ray Data does not announce each execution and its plan (``DataContext.print_on_execution_start``);
- of the output Ray forwards from workers, actors, the raylet and the GCS, only the lines the
  project wrote (:func:`mark`) are printed, without Ray's ``(RayTrainWorker pid=...)`` prefix;
  everything else still goes to the session's log files (``/tmp/ray/session_latest/logs``);
- MLflow's INFO lines (database creation) and artifact download bars are hidden
  (``MLFLOW_LOGGING_LEVEL``, ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``; values you set win).

``--verbose`` or ``EMOTION_RAY_VERBOSE=1`` leaves Ray's and MLflow's output as Ray prints it.

Filtering the forwarded output uses Ray's driver-side dispatcher of worker output
(``ray._private.ray_logging.global_worker_stdstream_dispatcher``), the hook ``log_to_driver``
installs; if a Ray version lacks it, nothing is filtered (and ``tests/test_console.py`` fails).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

ENV = "EMOTION_RAY_VERBOSE"
# Worker-side lines meant for the console carry this tag; the driver strips it (log files keep it).
MARK = "[emotion-ray] "
_HANDLER_NAME = "ray_print_logs"
# Rank 0's progress through the current epoch, at most once a second: ``[emotion-ray] @progress {json}``.
PROGRESS = "@progress "


def is_verbose(flag: Optional[bool] = None) -> bool:
    """``--verbose`` wins; else ``EMOTION_RAY_VERBOSE`` (1/true/yes/on)."""
    if flag:
        return True
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def mark(message: str) -> str:
    """A worker's line that the quiet console keeps."""
    return f"{MARK}{message}"


class EpochProgress:
    """Worker side: report the step reached in the current epoch, at most every ``interval_s``."""

    def __init__(self, stage: str, epochs: int, emit: Callable[[str], None], interval_s: float = 1.0):
        self.stage, self.epochs, self.emit, self.interval_s = stage, epochs, emit, interval_s
        self.last, self.steps_last_epoch = 0.0, None
        self._epoch, self._step = -1, 0

    def __call__(self, epoch: int, step: int) -> None:
        import json
        import time

        if epoch != self._epoch:
            if self._epoch >= 0:
                self.steps_last_epoch = self._step + 1
            self._epoch = epoch
        self._step = step
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.emit(PROGRESS + json.dumps({"stage": self.stage, "epoch": epoch + 1, "epochs": self.epochs,
                                             "step": step + 1, "total": self.steps_last_epoch}))


class _Bar:
    """Driver side: one live tqdm bar for the current epoch, on a terminal only."""

    def __init__(self, stream):
        self.stream, self.bar, self.key = stream, None, None

    def update(self, info: dict) -> None:
        if not self.stream.isatty():
            return
        from tqdm import tqdm

        key = (info.get("stage"), info.get("epoch"))
        if key != self.key:
            self.close()
            self.key = key
            self.bar = tqdm(total=info.get("total"), desc=f"[{key[0]}] epoch {key[1]}/{info.get('epochs')}",
                            unit="step", leave=False, file=self.stream, dynamic_ncols=True)
        self.bar.n = info.get("step", 0)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None


def configure(verbose: Optional[bool] = None) -> bool:
    """Set the driver's console up before Ray starts; returns whether it is verbose.

    Also exports ``EMOTION_RAY_VERBOSE`` so that a local Ray's workers (started from this
    process's environment) and child processes agree.
    """
    verbose = is_verbose(verbose)
    os.environ[ENV] = "1" if verbose else "0"
    if verbose:
        return True
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.print_on_execution_start = False
        ctx.enable_operator_progress_bars = False  # the ingest's bar: one total, not one per operator
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    quiet_ray_data_console()
    return False


def quiet_ray_data_console() -> None:
    """Ray Data's console handler at ERROR, its file handler untouched, through Ray Data's own
    ``RAY_DATA_LOGGING_CONFIG`` (a copy of its default config; one the user set is respected)."""
    import copy
    import tempfile
    from pathlib import Path

    import yaml

    try:
        import ray.data._internal.logging as data_logging
    except ImportError:  # pragma: no cover - an older/newer Ray without this module
        return
    if os.environ.get(data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME):
        return
    config = copy.deepcopy(data_logging.DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "ERROR"
    path = Path(tempfile.gettempdir()) / f"emotion-ray-ray-data-logging-{os.getuid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    os.environ[data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME] = str(path)
    data_logging.configure_logging()


def ray_init_kwargs(verbose: Optional[bool] = None) -> dict:
    """``ray.init`` arguments for the console mode (worker output is forwarded, then filtered)."""
    if is_verbose(verbose):
        return {"log_to_driver": True}
    return {"log_to_driver": True, "logging_level": logging.ERROR}


def filter_worker_output(verbose: Optional[bool] = None) -> bool:
    """After ``ray.init``: print only the project's marked lines of forwarded worker output.

    Returns whether the filter is installed (False when verbose, or when Ray lacks the hook).
    """
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    verbose = is_verbose(verbose)
    names = [name for name, _ in dispatcher.handlers]
    if _HANDLER_NAME not in names:
        return False  # log_to_driver=False: nothing is forwarded
    original = ray_worker.print_to_stdstream
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)

    bar = _Bar(sys.stderr)

    def handle(data: dict) -> None:
        import json

        ours, rest = [], []
        for line in data.get("lines", []):
            if MARK in line:
                ours.append(line.split(MARK, 1)[1])
            else:
                rest.append(line)
        out = sys.stderr if data.get("is_err") else sys.stdout
        for line in ours:
            if line.startswith(PROGRESS):
                try:
                    bar.update(json.loads(line[len(PROGRESS):]))
                except ValueError:
                    pass
                continue
            bar.close()
            print(line, file=out, flush=True)
        if verbose and rest:
            original({**data, "lines": rest}, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler(_HANDLER_NAME)
    dispatcher.add_handler(_HANDLER_NAME, handle)
    if not verbose and not getattr(original, "_emotion_ray", False):
        # Messages the GCS pushes to the driver (``listen_error_messages``) bypass the dispatcher;
        # of those only the raylet's worker start-up notice is dropped (real errors still print).
        def errors(data: dict, ignore_prefix: bool = False) -> None:
            lines = [line for line in data.get("lines", []) if not any(n in line for n in _GCS_NOISE)]
            if lines:
                original({**data, "lines": lines}, ignore_prefix=ignore_prefix)

        errors._emotion_ray = True
        ray_worker.print_to_stdstream = errors
    return not verbose


# Notices pushed by the GCS that are expected on a small machine (see the README's console section).
_GCS_NOISE = ("PYTHON worker processes have been started",)
