"""System metrics of this node (CPU, memory, disk, network and, where NVML answers, each GPU's
utilisation, memory and power) for a stage's MLflow run, sampled with psutil inside a Ray Train worker
and logged under MLflow's own metric names, so that the run's "System metrics" tab shows them.

Why psutil and not MLflow's public switch: ``mlflow.start_run(log_system_metrics=True)`` (or
``mlflow.enable_system_metrics_logging()``) runs MLflow's monitor only between ``start_run`` and
``end_run``, so a worker would have to resume the driver's run (which sets its status to RUNNING) and
end it (which sets it to FINISHED; MLflow's ``atexit`` hook does so too when the worker exits), and the
run belongs to the driver. The monitor behind the switch also stops for good at the first request the
tracking server does not answer (it reads the run at every sample), so an outage ends the sampling
instead of buffering it, and it drops the samples of the last, partial interval, so a stage shorter
than one interval logs nothing. Here psutil (and NVML through ``pynvml``) are read directly and the
values go, by run id, through :class:`~pipelines.tracking.MetricBuffer` (public
``MlflowClient.log_batch``, kept in memory while the server is down).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import psutil

from pipelines.tracking import MetricBuffer

log = logging.getLogger("emotion_ray.system_metrics")

# Counters since the sampler started: a step logs their latest value, not a mean (as MLflow does).
CUMULATIVE = ("network_receive_megabytes", "network_transmit_megabytes")


def average(samples: list[dict]) -> dict:
    """One step's values from its samples: each metric's mean (the counters' latest value), rounded
    to 0.1 as MLflow's monitors do."""
    step = {}
    for key in dict.fromkeys(k for sample in samples for k in sample):
        series = [sample[key] for sample in samples if key in sample]
        step[key] = round(series[-1] if key in CUMULATIVE else sum(series) / len(series), 1)
    return step


class NvmlGpus:
    """This node's NVIDIA GPUs through NVML (``pynvml``, from the optional ``nvidia-ml-py``).
    :meth:`open` gives None when pynvml does not import or no GPU answers: no GPU metrics then."""

    def __init__(self, nvml, count: int):
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    @classmethod
    def open(cls) -> Optional["NvmlGpus"]:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - not installed, no driver: no GPU metrics
            return None
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count:
                return cls(pynvml, count)
        except Exception:  # noqa: BLE001
            pass
        cls.shutdown(pynvml)
        return None

    def sample(self) -> dict:
        """Each GPU's values under MLflow's names (``gpu_<i>_utilization_percentage``, ...); a reading
        a GPU does not offer (power on some boards) is left out."""
        values = {}
        for i, handle in enumerate(self.handles):
            for read in (self._memory, self._utilization, self._power):
                try:
                    values.update({f"gpu_{i}_{name}": value for name, value in read(handle).items()})
                except Exception:  # noqa: BLE001
                    pass
        return values

    def _memory(self, handle) -> dict:
        memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        return {"memory_usage_percentage": memory.used / memory.total * 100,
                "memory_usage_megabytes": memory.used / 1e6}

    def _utilization(self, handle) -> dict:
        return {"utilization_percentage": self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu}

    def _power(self, handle) -> dict:
        watts = self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000
        limit = self.nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        return {"power_usage_watts": watts, "power_usage_percentage": watts / limit * 100}

    def close(self) -> None:
        self.shutdown(self.nvml)

    @staticmethod
    def shutdown(nvml) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


class SystemMetricsSampler(MetricBuffer):
    """Samples this node every ``interval`` seconds in a daemon thread and logs the mean of each
    ``samples_per_step`` samples (default: ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``, else 1)
    as one step of the run ``run_id``: ``system/<name>``, or ``system/<node_id>/<name>`` (one series
    per node). The run is only written to, never started, ended or read for its status.

    It is the run's :class:`MetricBuffer` for these values: while the server does not answer they
    stay in memory and go once it answers. Steps continue after the run's last system-metrics step
    (a resumed stage); until the server has said which that is, averaged steps wait unnumbered in
    :attr:`steps_waiting`. Nothing here raises into the stage.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, node_id: Optional[str] = None, interval: float = 5.0,
                 samples_per_step: Optional[int] = None):
        super().__init__(tracking_uri, run_id)
        self.prefix = "system/" + (f"{node_id}/" if node_id else "")
        self.interval = interval
        self.samples_per_step = max(1, int(samples_per_step or
                                           os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING") or 1))
        self.next_step: Optional[int] = None
        self.steps_waiting: list[dict] = []
        self._samples: list[dict] = []
        self._sampling_lock = threading.Lock()   # the thread's and stop()'s samples and steps
        self._gpus = NvmlGpus.open()
        psutil.cpu_percent()                     # primes psutil's CPU counter (its first reading is 0)
        network = psutil.net_io_counters()
        self._network_start = (network.bytes_recv, network.bytes_sent)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emotion-ray-system-metrics", daemon=True)
        self._thread.start()

    def sample(self) -> dict:
        """One reading of this node under MLflow's metric names (without the prefix)."""
        memory, disk, network = psutil.virtual_memory(), psutil.disk_usage(os.sep), psutil.net_io_counters()
        values = {
            "cpu_utilization_percentage": psutil.cpu_percent(),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
            "disk_usage_percentage": disk.percent,
            "disk_usage_megabytes": disk.used / 1e6,
            "disk_available_megabytes": disk.free / 1e6,
            "network_receive_megabytes": (network.bytes_recv - self._network_start[0]) / 1e6,
            "network_transmit_megabytes": (network.bytes_sent - self._network_start[1]) / 1e6,
        }
        if self._gpus is not None:
            values.update(self._gpus.sample())
        return values

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._tick(last=False)

    def _tick(self, *, last: bool) -> None:
        """Take a sample; when a step is complete (or at the last, partial one) average it and send."""
        try:
            with self._sampling_lock:
                self._samples.append(self.sample())
                if not last and len(self._samples) < self.samples_per_step:
                    return
                self.steps_waiting.append(average(self._samples))
                self._samples.clear()
            self.flush()
        except Exception as e:  # noqa: BLE001 - system metrics must never end a stage
            log.debug("system metrics sample failed: %s", e)

    def _first_step(self) -> Optional[int]:
        """The step after the run's last system-metrics step, 0 for a new series; None while the
        server does not answer."""
        try:
            history = self.client.get_metric_history(self.run_id, self.prefix + "cpu_utilization_percentage")
        except Exception:  # noqa: BLE001
            return None
        return max((m.step for m in history), default=-1) + 1

    def flush(self) -> bool:
        """Number the waiting steps (once the run's last step is known), then send what is pending;
        True when nothing is left."""
        first = self._first_step() if self.next_step is None and self.steps_waiting else None  # outside the lock
        with self._sampling_lock:
            if self.next_step is None:
                self.next_step = first
            if self.next_step is not None:
                for values in self.steps_waiting:
                    self.add({self.prefix + name: value for name, value in values.items()}, self.next_step)
                    self.next_step += 1
                self.steps_waiting.clear()
            numbered = not self.steps_waiting
        return super().flush() and numbered

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop sampling and log the last, partial step (so even a stage shorter than ``interval`` gets
        a point); send what is pending, trying for up to ``wait_s`` seconds while the server is down."""
        self._stopped.set()
        self._thread.join(timeout=wait_s)
        self._tick(last=True)
        self.flush_patiently(wait_s)
        if self._gpus is not None:
            self._gpus.close()


def interval() -> Optional[float]:
    """Seconds between system-metrics samples for the stage runs, or None when they are off
    (``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``). ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` sets it;
    the default is 5 s, so short stages still get a curve."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0", "no"):
        return None
    return float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 5.0)


def for_stage(cfg: Optional[dict], *, local_rank: int, node_rank: int, multi_node: bool):
    """On each node's local rank 0: a :class:`SystemMetricsSampler` for the stage's run (``cfg``: the
    worker's ``{"tracking_uri", "run_id", "system_metrics": interval}``), sampled until its ``stop()`` (or
    until Ray ends this worker); one series per node (``system/node_<rank>/...``) when the stage spans
    several nodes. None elsewhere, or when they are off."""
    seconds = (cfg or {}).get("system_metrics")
    if not cfg or not cfg.get("run_id") or not seconds or local_rank != 0:
        return None
    try:
        return SystemMetricsSampler(cfg["tracking_uri"], cfg["run_id"], node_id=f"node_{node_rank}" if multi_node
                                    else None, interval=float(seconds))
    except Exception as e:  # noqa: BLE001 - e.g. psutil missing on this node: train without them
        log.warning("system metrics off on this node: %s", e)
        return None
