#!/usr/bin/env bash
# Regenerate requirements/constraints.txt, the lock file that CI (.ci/run) and the cluster (cluster.yaml)
# install from: every package that `pip install -e '.[dev]'` pulls in, pinned with ==, resolved for
# CPython 3.11 on linux x86_64 (the CI machines and the cluster's nodes).
#
#   pip install uv && requirements/lock.sh          # add what pyproject.toml gained, keep the rest
#   requirements/lock.sh --upgrade-package mlflow   # move one package (and what it needs)
#   requirements/lock.sh --upgrade                  # move everything, within HELD below
#
# uv keeps the versions already in the lock file unless told to upgrade, so a re-run changes only what
# pyproject.toml made it change. Resolution reads metadata only: it downloads no wheels (no torch).
set -euo pipefail
cd "$(dirname "$0")/.."

# Held on purpose; bump them here, deliberately:
#   torch, torchvision: the releases pip installs from local disk on the CI machines (their pip.conf caps
#     torch<=2.14.1, torchvision<=0.29.1); a newer pin would fail there or download gigabytes of CUDA wheels.
#   ray: the cluster runs the Ray of the `ray up` / `ray job submit` client, which must be this one.
HELD=(torch==2.14.1 torchvision==0.29.1 ray==2.60.0)

uv pip compile pyproject.toml --extra dev \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --constraint <(printf '%s\n' "${HELD[@]}") \
    --no-annotate --custom-compile-command requirements/lock.sh \
    --output-file requirements/constraints.txt "$@"
