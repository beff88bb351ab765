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


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one :class:`UsageError` line (exit 2 through :func:`run_main`)
    instead of a usage block, so that every entry point reports bad input the same way. Abbreviated options
    are refused: ``--mode`` must never be read as ``--model`` because the pipeline has no ``--mode``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


# The speed flags both pipelines take, and --recipe.
COMPILE_HELP = ("compile the training model in place (nn.Module.compile, after DDP wrapping); the first steps pay "
                "a warm-up of tens of seconds (more on CPU) before the faster steps; validation/test stay eager")
DECODE_HELP = ("where training images are decoded and augmented: cpu (Ray Data tasks, uint8 pixels to the "
               "workers) or device (Ray Data hands the stored bytes; the worker decodes with nvJPEG on its GPU "
               "and augments with torchvision.transforms.v2 ops)")


def add_recipe_arg(parser: argparse.ArgumentParser, pipeline: str, default: str = "default") -> None:
    parser.add_argument("--recipe", default=None, metavar="NAME|PATH",
                        help=f"the training recipe: a name in recipes/{pipeline}/ (published: the released code's "
                             f"training; default: the project's corrections; demo) or a YAML file; default "
                             f"'{default}' for real data, 'demo' for the embedded demo")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    g.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
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
    g.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default="PACK",
                   help="where Ray places the workers: PACK fills a node first, SPREAD spreads them over nodes")
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
                        help="YAML/JSON file of flag values (flag name: value); flags on the command line win")


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
    return data


def config_tokens(values: dict) -> list[str]:
    """A config file's ``{flag: value}`` as command-line tokens (``lr: 0.1`` -> ``--lr 0.1``; true ->
    ``--flag``, false -> ``--no-flag``; lists -> several values), so argparse itself checks them."""
    tokens: list[str] = []
    for key, value in values.items():
        option = "--" + str(key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            tokens.append(option if value else f"--no-{option[2:]}")
        elif isinstance(value, (list, tuple)):
            tokens += [option, *map(str, value)]
        else:
            tokens += [option, str(value)]
    return tokens


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line, with a ``--config FILE``'s values first (the command line's own flags win).

    The file's values are parsed by the same parser (so a wrong name, type or choice is the same one-line
    error, naming the file), then the command line after them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        tokens = config_tokens(load_config_file(pre.config))
        try:
            parser.parse_args(tokens)
        except UsageError as exc:
            raise UsageError(f"{pre.config}: {exc}") from None
        argv = tokens + argv
    args = parser.parse_args(argv)
    if hasattr(args, "verbose"):  # every entry point with the Ray flags
        from pipelines import console

        console.configure(args.verbose)
        global _ADDRESS
        _ADDRESS = getattr(args, "address", None)
    return args


def run_options(args: argparse.Namespace):
    """Where the run happens (:class:`pipelines.train_loop.RunOptions`) from the shared Ray and MLflow flags."""
    from pipelines.train_loop import RunOptions

    return RunOptions(storage_path=str(storage_root(args.storage_path)), num_workers=args.num_workers,
                      use_gpu=args.use_gpu, cpus_per_worker=cpus_per_worker(args), max_failures=args.max_failures,
                      placement_strategy=args.placement_strategy,
                      address=args.address, run_name=args.run_name, mlflow_uri=args.mlflow_uri,
                      experiment=args.experiment, register=args.register, fault=getattr(args, "fault", None))


def default_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(arg: Optional[str]) -> str:
    """Where runs go: ``--storage-path`` (a local or mounted folder, made; or an object-store URI such as
    ``s3://bucket/runs``), default ``<EMOTION_RAY_HOME>/runs``."""
    from datasets_io import storage

    root = storage.local(arg) if arg else str(home_dir() / "runs")
    storage.makedirs(root)
    return root


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
    (:class:`emotion_models.errors.ModelConfigError`), a recipe that does not fit its types
    (:class:`pipelines.recipe.RecipeError`), and a missing file or a file where a folder belongs
    (or the other way round), and an MLflow tracking server that does not answer
    (:class:`pipelines.tracking.TrackingServerUnreachable`). Any other exception, a plain ``ValueError``
    or ``KeyError`` included, is a bug."""
    from datasets_io.errors import DataError
    from emotion_models.errors import ModelConfigError  # imported here: emotion_models imports torch
    from pipelines.tracking import TrackingServerUnreachable

    from pipelines.recipe import RecipeError
    from pipelines.train_loop import StageFailed

    return (UsageError, RecipeError, DataError, ModelConfigError, TrackingServerUnreachable, StageFailed,
            FileNotFoundError, NotADirectoryError, IsADirectoryError)


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
