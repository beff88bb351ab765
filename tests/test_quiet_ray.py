"""datasets_io.quiet_ray: how Ray is started or joined, and Ray Data's console, quiet or verbose."""
from __future__ import annotations

import logging

import pytest

from datasets_io import quiet_ray


@pytest.fixture
def ray_calls(monkeypatch):
    """``ray.init`` recorded instead of run, as if no Ray were running in this process."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(quiet_ray.ENV, raising=False)
    return calls


def test_a_local_ray_for_the_ingest_starts_quiet_and_without_the_dashboard(ray_calls):
    assert quiet_ray.init_ray(dashboard=False) is True
    assert ray_calls == [{"address": None, "log_to_driver": False, "logging_level": logging.ERROR,
                          "include_dashboard": False}]


def test_a_cluster_address_is_joined_as_it_is(ray_calls, monkeypatch):
    quiet_ray.init_ray("10.0.0.1:6379", dashboard=False)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    quiet_ray.init_ray(dashboard=False)
    assert [call["address"] for call in ray_calls] == ["10.0.0.1:6379", "auto"]
    assert not any("include_dashboard" in call for call in ray_calls)  # the cluster's own settings apply


def test_verbose_gives_rays_output_back(ray_calls, monkeypatch):
    quiet_ray.init_ray(verbose=True, dashboard=False)
    monkeypatch.setenv(quiet_ray.ENV, "1")
    quiet_ray.init_ray(dashboard=True, num_cpus=2)
    assert ray_calls == [{"address": None, "log_to_driver": True, "include_dashboard": False},
                         {"address": None, "log_to_driver": True, "num_cpus": 2}]


def test_a_running_ray_is_reused(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init called although Ray runs"))
    assert quiet_ray.init_ray("10.0.0.1:6379", dashboard=False) is False


def test_quiet_ray_data_changes_the_given_context_only():
    from ray.data import DataContext

    current = DataContext.get_current()
    own = current.copy()
    own.print_on_execution_start = own.enable_operator_progress_bars = True
    before = (current.print_on_execution_start, current.enable_operator_progress_bars)
    handlers = logging.getLogger("ray.data").handlers
    saved = [(h, h.level) for h in handlers]
    try:
        quiet_ray.quiet_ray_data(own)
        assert (own.print_on_execution_start, own.enable_operator_progress_bars) == (False, False)
        assert (current.print_on_execution_start, current.enable_operator_progress_bars) == before
        levels = {type(h).__name__: h.level for h in handlers}
        assert levels["PlainRayHandler"] == logging.ERROR and levels["SessionFileHandler"] <= logging.INFO, levels
    finally:
        for handler, level in saved:
            handler.setLevel(level)
