"""``python -m tuning``: a Ray Tune sweep of a pipeline (see :mod:`tuning`)."""
import sys

from pipelines.cli import run_main
from tuning.sweep import main

if __name__ == "__main__":
    sys.exit(run_main(main))
