"""What the console shows: the project's own lines by default, Ray's whole output with ``--verbose``.

Quiet (the default):

- Ray starts with ``log_to_driver=False``: the output of workers, actors, the raylet and the GCS
  goes to the session's log files (``/tmp/ray/session_latest/logs``), not to the console; the
  driver's ``ray`` logger is at ERROR (``ray.init(logging_level=...)``);
- the project's own worker lines (one per epoch, test scores, a resume) reach the driver through a
  small named actor, the relay (:func:`start_relay`, :func:`emitter`): rank 0 puts a line, a thread
  of the driver prints it, and the current epoch's progress drives one live bar;
- Ray Data does not announce each execution and its plan (``DataContext.print_on_execution_start``),
  and its console handler is at ERROR (its log file keeps everything);
- MLflow's INFO lines (database creation) and artifact download bars are hidden
  (``MLFLOW_LOGGING_LEVEL``, ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``; values you set win).

``--verbose`` or ``EMOTION_RAY_VERBOSE=1`` leaves Ray's and MLflow's output as Ray prints it (workers'
lines forwarded with Ray's ``(RayTrainWorker pid=...)`` prefix); no relay is started. Only public
Ray APIs are used: ``ray.init`` options, a named actor, ``ray.get_actor``. The Ray part that is not
about training (the flag, ``ray.init`` arguments, Ray Data's console) is :mod:`datasets_io.quiet_ray`'s,
shared with the ingest.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

# The generic part (verbose flag, ray.init arguments, Ray Data's console) is shared with the ingest.
from datasets_io.quiet_ray import ENV, is_verbose, quiet_ray_data, quiet_ray_data_console, ray_init_kwargs

__all__ = ["ENV", "PROGRESS", "is_verbose", "configure", "quiet_ray_data_console", "ray_init_kwargs",
           "EpochProgress", "start_relay", "flush", "emitter"]

# Rank 0's progress through the current epoch, at most once a second: ``@progress {json}``.
PROGRESS = "@progress "


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
    quiet_ray_data()  # no execution plans, no per-operator bars, Ray Data's console handlers at ERROR
    return False


RELAY = "emotion-ray-console"   # the named actor carrying the project's worker lines to the driver
_printer: Optional["_Printer"] = None


def _relay_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=1)
    class ConsoleRelay:
        def __init__(self):
            self.lines: list[str] = []

        def put(self, line: str) -> None:
            self.lines.append(line)

        def take(self) -> list[str]:
            lines, self.lines = self.lines, []
            return lines

    return ConsoleRelay


class _Printer:
    """Driver side: prints what the relay holds, every ``interval_s``, from a daemon thread."""

    def __init__(self, relay, stream=None, interval_s: float = 0.25):
        import threading

        self.relay, self.stream, self.interval_s = relay, stream, interval_s
        self.bar = _Bar(stream or sys.stderr)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="emotion-ray-console", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - Ray shut down: nothing left to print
                return

    def drain(self) -> None:
        import json

        import ray

        with self.lock:
            if not ray.is_initialized():  # Ray shut down: asking the relay would start a new Ray
                self.stopped.set()
                return
            for line in ray.get(self.relay.take.remote()):
                if line.startswith(PROGRESS):
                    try:
                        self.bar.update(json.loads(line[len(PROGRESS):]))
                    except ValueError:
                        pass
                    continue
                self.bar.close()
                print(line, file=self.stream or sys.stdout, flush=True)


def start_relay(verbose: Optional[bool] = None, stream=None) -> bool:
    """After ``ray.init`` on the driver: start the relay and its printer (quiet mode only).

    Returns whether the relay runs. Idempotent within a process.
    """
    global _printer
    if is_verbose(verbose):
        return False
    if _printer is None:
        import atexit

        relay = _relay_class().options(name=RELAY, get_if_exists=True, lifetime=None).remote()
        _printer = _Printer(relay, stream)
        # Exit hooks run last-registered first: this stops the printer before Ray's own shutdown hook.
        atexit.register(_printer.stopped.set)
    return True


def flush() -> None:
    """Print what the relay holds now (the driver calls it at the end of each stage)."""
    if _printer is not None:
        try:
            _printer.drain()
        except Exception:  # noqa: BLE001 - Ray already shut down
            pass


def emitter(logger: logging.Logger) -> Callable[[str], None]:
    """Worker side: a function that shows a line on the driver's console.

    With the relay (quiet mode) the line goes through it; without (``--verbose``) it is logged, and
    Ray forwards it with the worker's prefix.
    """
    import ray

    try:
        relay = ray.get_actor(RELAY)
    except ValueError:
        return logger.info

    def emit(line: str) -> None:
        ray.get(relay.put.remote(line))  # waited for: a worker that exits next loses nothing

    return emit
