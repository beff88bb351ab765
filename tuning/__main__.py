"""``python -m tuning``: a Ray Tune sweep of a pipeline (see :mod:`tuning`): :func:`tuning.sweep.parse`,
then :func:`tuning.driver.run_sweep`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a sweep; 0 when it finished (or had finished), 130 when it was interrupted (re-run to resume)."""
    from tuning.sweep import parse

    cfg = parse(argv)   # the command line, the plan and the space: a mistake stops here, before Ray is imported
    from tuning.driver import run_sweep

    return 0 if run_sweep(cfg) is not None else 130


if __name__ == "__main__":
    from pipelines.cli import run_main

    sys.exit(run_main(main))
