"""The CLI skeleton every entry point shares: Ray and MLflow flags, ``--config``, one-line errors."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipelines.tracking import home_dir


class UsageError(ValueError):
    """A bad flag value or combination, reported as one line."""


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    g.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast, channels_last")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per worker (default 1 with GPUs; 0.5 on a CPU-only machine, "
                        "leaving cores to Ray Data)")
    g.add_argument("--storage-path", default=None,
                   help="where runs, checkpoints and result.json go (shared storage on a cluster; "
                        "default <EMOTION_RAY_HOME>/runs)")
    g.add_argument("--run-name", default=None,
                   help="name of this run; re-running with the same name resumes it")
    g.add_argument("--max-failures", type=int, default=0,
                   help="worker failures to recover from (restart from the last checkpoint)")
    g.add_argument("--verbose", action="store_true", default=None,
                   help="print Ray's and MLflow's own output too (default: the project's lines only; "
                        "also EMOTION_RAY_VERBOSE=1). Ray's logs always go to its session log files")


def add_mlflow_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("MLflow")
    g.add_argument("--mlflow-uri", default=None,
                   help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<EMOTION_RAY_HOME>/mlflow.db)")
    g.add_argument("--experiment", default="emotion-ray", help="MLflow experiment name")
    g.add_argument("--register", default=None, metavar="NAME",
                   help="register the last stage's model as a new version of NAME in the MLflow model "
                        "registry and set its alias 'candidate' (models:/NAME@candidate)")


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML/JSON file of flag values (e.g. a sweep's best_config.yaml); "
                             "flags on the command line win")


def load_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such config file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise UsageError(f"{p}: cannot parse config file: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: a config file must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse with ``--config FILE`` values as defaults under the command line's own flags."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        values = load_config_file(pre.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{pre.config}: unknown setting(s) {', '.join(unknown)}")
        for action in parser._actions:  # argparse checks choices on the command line only, not on defaults
            value = values.get(action.dest)
            if action.choices is None or value is None:
                continue
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in action.choices]
            if bad:
                raise UsageError(f"{pre.config}: {action.dest}: {bad[0]!r} is not one of "
                                 f"{', '.join(map(str, action.choices))}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if any(a.dest == "verbose" for a in parser._actions):  # every entry point with the Ray flags
        from pipelines import console

        console.configure(args.verbose)
        global _ADDRESS
        _ADDRESS = getattr(args, "address", None)
    args.explicit = _explicit_dests(parser, argv) | (set(load_config_file(pre.config)) if pre.config else set())
    return args


def _explicit_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set[str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    found = set()
    for token in argv:
        key = token.split("=", 1)[0]
        if key in flags:
            found.add(flags[key])
    return found


def default_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(arg: Optional[str]) -> Path:
    path = Path(arg).expanduser() if arg else home_dir() / "runs"
    if "://" in str(arg or ""):
        raise UsageError(f"{arg}: only local or mounted shared paths are supported as --storage-path")
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


_ADDRESS: Optional[str] = None  # --address of the parsed command line: also used when the ingest starts Ray


def init_ray(address: Optional[str] = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS, as set inside ``ray job submit``), else start a local Ray.

    The console follows :mod:`pipelines.console` (quiet unless ``--verbose`` / ``EMOTION_RAY_VERBOSE=1``).
    """
    import ray

    from pipelines import console

    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false", "no"):
        raise UsageError("these pipelines need Ray Train V2: unset RAY_TRAIN_V2_ENABLED (or set it to 1)")
    if not ray.is_initialized():
        address = address or _ADDRESS or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **console.ray_init_kwargs())
    console.start_relay()


def cpus_per_worker(args) -> float:
    if args.cpus_per_worker is not None:
        return args.cpus_per_worker
    return 1.0 if args.use_gpu else 0.5


def print_table(rows: list[tuple[str, str]], title: str = "") -> None:
    width = max((len(k) for k, _ in rows), default=0)
    if title:
        print(f"\n{title}")
        print("-" * max(len(title), width + 14))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def one_line_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's, reported as one line: a bad flag (:class:`UsageError`), bad input
    data (:class:`datasets_io.errors.DataError`), a model or checkpoint that cannot be built or loaded
    (:class:`emotion_models.errors.ModelConfigError`) and a missing file or a file where a folder belongs
    (or the other way round), and an MLflow tracking server that does not answer
    (:class:`pipelines.tracking.TrackingServerUnreachable`). Any other exception, a plain ``ValueError``
    or ``KeyError`` included, is a bug."""
    from datasets_io.errors import DataError
    from emotion_models.errors import ModelConfigError  # imported here: emotion_models imports torch
    from pipelines.tracking import TrackingServerUnreachable

    return (UsageError, DataError, ModelConfigError, TrackingServerUnreachable, FileNotFoundError,
            NotADirectoryError, IsADirectoryError)


def run_main(fn: Callable[[], int | None]) -> int:
    """Run ``fn``; the user's errors (:func:`one_line_errors`) become one ``error: ...`` line and exit code 2.

    Every other exception propagates with its traceback: a bug is not reported as bad input.
    """
    try:
        return int(fn() or 0)
    except Exception as exc:
        if not isinstance(exc, one_line_errors()):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
