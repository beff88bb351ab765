"""Shared fixtures: one small local Ray instance per test session, paths to shared samples."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# RAY_TRAIN_V2_ENABLED is not set here: the product sets it (pipelines/__init__.py), and
# tests/test_packaging.py checks that path without this file's help.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A 2-CPU local Ray, started once for the whole test session."""
    import pipelines  # noqa: F401 - the product's own environment (Ray Train V2) before Ray starts
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train V2's placement-group cleaner asks the state API (served
        # by the dashboard) whether the controller is alive, and without it removes the workers'
        # placement group mid-run.
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    # Ray Data: keep the progress output quiet in tests.
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    # Not shut down here: other session fixtures may still hold actors.


@pytest.fixture(scope="session")
def emotion6_sample() -> Path:
    path = SHARED_DATA / "emotion6-sample"
    if not (path / "ground_truth.txt").exists():
        pytest.skip("../shared/data/emotion6-sample is not present")
    return path


@pytest.fixture(scope="session")
def nrc_vad_sample() -> Path:
    path = SHARED_DATA / "nrc-vad-sample.txt"
    if not path.exists():
        pytest.skip("../shared/data/nrc-vad-sample.txt is not present")
    return path
