"""Shared fixtures: one small local Ray instance per test session, paths to shared samples.

No test writes into the user's home: everything that would land there (the runs and MLflow store, the
demo cache, Ray's auth token, Hugging Face's, torch's and matplotlib's caches) is pointed at a
temporary folder here, before anything is imported, and the session fails if the home changed anyway.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

_SCRATCH = Path(tempfile.mkdtemp(prefix="emotion-ray-tests-"))
for _var, _sub in (("EMOTION_RAY_HOME", "home"), ("EMOTION_RAY_CACHE", "cache"), ("HF_HOME", "hf"),
                   ("TORCH_HOME", "torch"), ("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "xdg-cache")):
    os.environ.setdefault(_var, str(_SCRATCH / _sub))
# Ray 2.60 turns token auth on for a local ray.init() and writes a new token to ~/.ray/auth_token unless
# one is given: the session's own token, in the environment (inherited by Ray's processes).
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# RAY_TRAIN_V2_ENABLED is not set here: the product sets it (pipelines/__init__.py), and
# tests/test_packaging.py checks that path without this file's help.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# What the suite must leave as it found it in the home folder.
WATCHED = [Path.home() / p for p in (".ray", "emotion-ray", ".cache/emotion-ray", ".cache/huggingface",
                                     ".cache/torch", ".config/matplotlib", ".cache/matplotlib", "mlruns")]


def _snapshot() -> dict:
    state = {}
    for root in WATCHED:
        if root.exists():
            files = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
            state.update({str(p): p.stat().st_mtime_ns for p in files[:10000]})
    return state


_HOME_BEFORE = _snapshot()


def pytest_collection_modifyitems(config, items):
    """A test that uses the session's Ray is a slow one, marked or not: ``-m "not slow"`` starts no Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("markexpr", "") == "not slow":
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            print('\n-m "not slow" started Ray: a test that starts Ray must be marked slow')
            session.exitstatus = 1
    changed = sorted(set(_snapshot().items()) ^ set(_HOME_BEFORE.items()))
    if changed:
        paths = sorted({p for p, _ in changed})
        print(f"\nthe test session wrote into the home folder: {', '.join(paths[:10])}")
        session.exitstatus = 1


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
