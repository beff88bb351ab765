"""Starting or joining Ray with a quiet console: Ray's own output goes to its session logs, not the terminal.

Shared by the ingest (``python -m datasets_io ingest``) and the pipelines (:mod:`pipelines.console`
builds on it; datasets_io never imports pipelines). Quiet, the default:

- Ray starts with ``log_to_driver=False``: the output of workers, actors, the raylet and the GCS goes to
  the session's log files (``/tmp/ray/session_latest/logs``), not to the console; the driver's ``ray``
  logger is at ERROR (``ray.init(logging_level=...)``), so neither the token-authentication warning nor
  "Started a local Ray instance" is printed;
- Ray Data does not announce each execution and its plan (``DataContext.print_on_execution_start``),
  draws no per-operator bars (``enable_operator_progress_bars``), and its console handlers are at
  ERROR (its file handler, the session's ``ray-data`` log, keeps everything);
- :func:`init_ray` can start a local Ray without the dashboard (``include_dashboard=False``): the
  ingest needs none, and on a small machine its processes compete with the job for the CPUs.

``--verbose`` or ``EMOTION_RAY_VERBOSE=1`` leaves Ray's output as Ray prints it. Only public Ray APIs
are used: ``ray.init`` options, ``ray.is_initialized``, ``DataContext`` fields and logging handlers.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Optional

__all__ = ["ENV", "is_verbose", "ray_init_kwargs", "quiet_ray_data", "quiet_ray_data_console", "init_ray"]

ENV = "EMOTION_RAY_VERBOSE"


def is_verbose(flag: Optional[bool] = None) -> bool:
    """``--verbose`` (``flag``) wins; else ``EMOTION_RAY_VERBOSE`` (1/true/yes/on)."""
    if flag:
        return True
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def ray_init_kwargs(verbose: Optional[bool] = None) -> dict:
    """``ray.init`` arguments for the console mode (quiet: nothing forwarded, Ray's logger at ERROR)."""
    if is_verbose(verbose):
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def quiet_ray_data(context: Any = None) -> None:
    """Ray Data without its console chatter: no execution announcement and plan, no per-operator bars.

    ``context``: the ``DataContext`` to change (a dataset's own copy, ``ds.context``), default the
    process's current one. Its console handlers go to ERROR too (:func:`quiet_ray_data_console`).
    """
    if context is None:
        from ray.data import DataContext

        context = DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_operator_progress_bars = False  # at most one total bar, not one per operator
    quiet_ray_data_console()


def quiet_ray_data_console() -> None:
    """Ray Data's console handlers at ERROR; its file handler (the session's ray-data log) untouched."""
    importlib.import_module("ray.data")  # importing it configures the "ray.data" logger's handlers

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler) is logging.StreamHandler or type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.ERROR)


def init_ray(address: Optional[str] = None, *, verbose: Optional[bool] = None, dashboard: bool = True,
             **init_kwargs: Any) -> bool:
    """Reuse the running Ray, else connect to ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Returns whether this call initialised Ray (False: it was already initialised, and is used as it
    is). ``dashboard=False`` starts a local Ray without the dashboard; it does not apply when
    connecting to a cluster (or to a local ``ray start`` instance, which Ray finds by itself).
    ``init_kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for a local Ray).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {**ray_init_kwargs(verbose), **init_kwargs}
    if address is None and not dashboard:
        kwargs.setdefault("include_dashboard", False)
    ray.init(address=address, **kwargs)
    return True
