"""pipelines.system_metrics: the node's system metrics on a run the sampler does not own, under MLflow's
names, against a real MLflow sqlite store (no Ray, no server); and with a tracking server that does not
answer (a closed port) or stops answering for a while."""
from __future__ import annotations

import ast
import socket
import sys
import time
import types
from pathlib import Path

import psutil
import pytest

from pipelines import system_metrics
from pipelines.system_metrics import SystemMetricsSampler, average

CPU, MEMORY_MB, MEMORY_PCT = ("cpu_utilization_percentage", "system_memory_usage_megabytes",
                              "system_memory_usage_percentage")
NAMES = (CPU, MEMORY_MB, MEMORY_PCT, "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes",
         "network_receive_megabytes", "network_transmit_megabytes")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """No NVML here unless a test puts in its own (``import pynvml`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for this file (creating its schema takes seconds) and an experiment in it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("system-metrics")


@pytest.fixture
def run(store):
    """A fresh RUNNING run, created as the driver creates a stage's run: (uri, client, run id)."""
    uri, client, experiment_id = store
    return uri, client, client.create_run(experiment_id).info.run_id


def sample_for(uri: str, run_id: str, seconds: float = 1.0, **kwargs) -> SystemMetricsSampler:
    sampler = SystemMetricsSampler(uri, run_id, interval=0.2, **kwargs)
    time.sleep(seconds)
    sampler.stop(wait_s=5.0)
    return sampler


def steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_names_sane_values_steps_without_repeats_and_the_run_left_running(run):
    uri, client, run_id = run
    sample_for(uri, run_id)
    history = {name: client.get_metric_history(run_id, f"system/{name}") for name in NAMES}
    n = len(history[CPU])
    assert n >= 2, "0.2 s samples over 1 s, plus the last partial step"
    assert all(len(h) == n for h in history.values()), {k: len(h) for k, h in history.items()}
    assert steps(client, run_id, f"system/{CPU}") == list(range(n))
    assert all(0 <= m.value <= 100 * psutil.cpu_count() for m in history[CPU])
    assert all(m.value > 0 for m in history[MEMORY_MB])
    assert all(0 < m.value <= 100 for m in history[MEMORY_PCT])
    assert not [k for k in client.get_run(run_id).data.metrics if "gpu" in k]   # no NVML: no GPU metrics
    assert client.get_run(run_id).info.status == "RUNNING"                       # never ended by the sampler


def test_node_id_prefix(run):
    uri, client, run_id = run
    sample_for(uri, run_id, seconds=0.5, node_id="node_1")
    logged = client.get_run(run_id).data.metrics
    assert {f"system/node_1/{name}" for name in NAMES} <= set(logged)
    assert not [k for k in logged if not k.startswith("system/node_1/")]


def test_a_second_sampler_continues_after_the_runs_last_step(run):
    uri, client, run_id = run
    sample_for(uri, run_id, seconds=0.5)
    first = len(steps(client, run_id, f"system/{CPU}"))
    sample_for(uri, run_id, seconds=0.5)
    assert steps(client, run_id, f"system/{CPU}") == list(range(len(steps(client, run_id, f"system/{CPU}"))))
    assert len(steps(client, run_id, f"system/{CPU}")) > first


def test_a_stage_shorter_than_the_interval_still_gets_one_point(run):
    uri, client, run_id = run
    sampler = SystemMetricsSampler(uri, run_id, interval=60.0)
    time.sleep(0.3)
    started = time.monotonic()
    sampler.stop()
    assert time.monotonic() - started < 5
    assert steps(client, run_id, f"system/{MEMORY_MB}") == [0]


def test_a_step_is_the_mean_of_its_samples_and_the_counters_latest_value():
    samples = [{CPU: 10.0, "network_receive_megabytes": 1.0}, {CPU: 20.0, "network_receive_megabytes": 3.0},
               {CPU: 33.0, "network_receive_megabytes": 4.0, "gpu_0_utilization_percentage": 50.0}]
    assert average(samples) == {CPU: 21.0, "network_receive_megabytes": 4.0, "gpu_0_utilization_percentage": 50.0}


def test_samples_per_step_averages_several_samples_into_one_step(run):
    uri, client, run_id = run
    sampler = sample_for(uri, run_id, seconds=1.3, samples_per_step=3)
    n = len(steps(client, run_id, f"system/{CPU}"))
    assert sampler.samples_per_step == 3 and 1 <= n <= 3   # ~6 samples: 2 full steps and the last partial one


def test_an_outage_keeps_the_samples_and_sends_them_numbered_once_the_server_answers(run, monkeypatch):
    uri, client, run_id = run
    sampler = SystemMetricsSampler(uri, run_id, interval=0.2)

    def down(*args, **kwargs):
        raise ConnectionError("tracking server down")

    with monkeypatch.context() as outage:
        outage.setattr(sampler.client, "log_batch", down)
        outage.setattr(sampler.client, "get_metric_history", down)
        time.sleep(1.0)
        assert len(sampler.steps_waiting) >= 2                     # sampled on, kept unnumbered
    time.sleep(0.6)                                                   # the server answers again
    sampler.stop(wait_s=5.0)
    logged = steps(client, run_id, f"system/{CPU}")
    assert len(logged) >= 4 and logged == list(range(len(logged)))   # nothing lost, nothing repeated
    assert not sampler.steps_waiting and not sampler.pending


def test_an_unreachable_server_does_not_stop_sampling_and_stop_returns_promptly(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)   # restored after the test:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)       # MetricBuffer sets them
    sampler = SystemMetricsSampler(f"http://127.0.0.1:{_free_port()}", "0" * 32, interval=0.1)
    deadline = time.monotonic() + 30          # polled, not slept: a loaded machine samples late, never less
    while len(sampler.steps_waiting) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    waiting = len(sampler.steps_waiting)
    assert waiting >= 3                                               # sampled on, kept in memory
    started = time.monotonic()
    sampler.stop(wait_s=0.5)
    assert time.monotonic() - started < 3.0
    stopped = len(sampler.steps_waiting)
    assert stopped >= waiting + 1                                     # the last partial step, kept
    time.sleep(0.3)
    assert len(sampler.steps_waiting) == stopped                      # no sampling after stop()


def test_gpu_metrics_through_nvml_when_a_gpu_answers(run, monkeypatch):
    """A stand-in pynvml with one GPU that reports memory and utilisation but not power."""
    def unsupported(handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    shut = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: shut.append(True), nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=4e9, total=16e9),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42),
        nvmlDeviceGetPowerUsage=unsupported, nvmlDeviceGetEnforcedPowerLimit=unsupported)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    uri, client, run_id = run
    sample_for(uri, run_id, seconds=0.5)
    logged = client.get_run(run_id).data.metrics
    assert logged["system/gpu_0_utilization_percentage"] == 42
    assert logged["system/gpu_0_memory_usage_megabytes"] == 4000
    assert logged["system/gpu_0_memory_usage_percentage"] == 25
    assert not [k for k in logged if "power" in k] and shut == [True]


def test_the_module_uses_no_private_or_internal_mlflow_api():
    """No MLflow import at all (the values go through MetricBuffer's public ``log_batch``), and no
    ``x._name`` access other than on the module's own ``self``/``cls`` (dunders such as ``__init__`` aside)."""
    tree = ast.parse(Path(system_metrics.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.startswith("mlflow")]
    private = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.endswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    assert private == []


def test_each_nodes_local_rank_0_samples_for_the_stage(run):
    """pipelines.system_metrics.for_stage: this sampler, one series per node on a cluster,
    at the stage's interval; none on other local ranks or when system metrics are off."""
    from pipelines.tracking import EpochLogger

    uri, client, run_id = run
    cfg = {"tracking_uri": uri, "run_id": run_id, "system_metrics": 0.2}
    assert system_metrics.for_stage(cfg, local_rank=1, node_rank=0, multi_node=True) is None
    assert system_metrics.for_stage({**cfg, "system_metrics": None}, local_rank=0, node_rank=0,
                                      multi_node=False) is None
    sampler = system_metrics.for_stage(cfg, local_rank=0, node_rank=1, multi_node=True)
    assert isinstance(sampler, SystemMetricsSampler) and sampler.interval == 0.2
    EpochLogger.finish(None, sampler)
    logged = steps(client, run_id, f"system/node_1/{CPU}")
    assert logged and logged == list(range(len(logged)))
