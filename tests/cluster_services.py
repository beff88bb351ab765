"""Test services for the object-storage and cluster tests: a moto S3 server, a real ``mlflow server`` whose
artifacts go to that S3, and a Ray cluster of several nodes on this machine, each node its own
``ray start`` process group (raylet, agents, workers). All are subprocesses: the test session's own Ray
(``tests/conftest.py``'s ``ray_session``) is never touched, whatever order the tests run in.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
BUCKET = "emotion-ray"
_taken: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above the Ray worker ports used here
    (20000-20999): ports that bind(0) hands out are ephemeral, so any process's next outgoing connection
    could take one before the service binds it."""
    rng = random.Random()
    while True:
        port = rng.randint(21000, 32000)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port


def wait_for(check: Callable[[], object], what: str, timeout: float, poll: float = 0.2,
             alive: Optional[subprocess.Popen] = None, log: Optional[Path] = None):
    """``check()``'s first truthy value, polled; fails naming ``what`` (and the tail of ``log``) on timeout
    or when ``alive`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({alive.returncode}) first\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail}")
        time.sleep(poll)


def stop(proc: Optional[subprocess.Popen]) -> None:
    """Kill a process group this module started (``start_new_session``), and wait for its leader."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


class S3:
    """``python -m moto.server`` on 127.0.0.1 with one bucket; ``env`` is what a process needs to use it
    (pyarrow, boto3, and MLflow's S3 artifact store). Started here; :meth:`ready` waits for it and makes
    the bucket (the services start side by side: on a loaded machine each takes minutes)."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "moto.log"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> "S3":
        wait_for(self._up, "the moto S3 server", 300, alive=self.proc, log=self.log)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket (read with boto3, not with the product's pyarrow)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def close(self) -> None:
        stop(self.proc)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1: sqlite backend in ``tmp``, artifacts proxied to
    ``s3://<bucket>/mlflow`` (clients log through the server; only the server talks to S3). Started
    here; :meth:`ready` waits for it."""

    def __init__(self, tmp: Path, s3: S3):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "mlflow-server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            env={**os.environ, **s3.env}, cwd=tmp, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def ready(self) -> "MlflowServer":
        wait_for(self._up, "the mlflow server", 600, poll=0.5, alive=self.proc, log=self.log)
        return self

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def close(self) -> None:
        stop(self.proc)


class RayNodes:
    """A Ray cluster on this machine: a head with no CPUs (the drivers attach to it, nothing trains there)
    and worker nodes, each ``ray start --block`` in its own process group with its own raylet and ports,
    so one can be lost (its process group killed, as a machine going away) and another added.

    Every node is started from ``env`` (the S3 endpoint and credentials, Ray's auth token from the
    test session), which its workers inherit. Worker nodes carry a custom resource ``er_node_<i>`` that
    names them in the state API."""

    WORKER_CPUS = 2     # a train worker (0.5 CPU) and Ray Data's 1-CPU tasks beside it

    def __init__(self, tmp: Path, env: dict):
        self.ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        self.tmp = tmp
        # One temp folder per node (each node's sockets apart: nodes started at once picked the same
        # plasma-store socket name in a shared one), short: Ray's unix socket paths must fit 107 bytes.
        self.temp_root = tempfile.mkdtemp(prefix="er-c-", dir="/tmp")
        # Ray's memory monitor reads the whole machine's memory: on a machine shared with other test runs it
        # killed this cluster's actors for memory other processes used. The kernel's OOM killer still applies.
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_memory_monitor_refresh_ms": "0"}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}    # name -> its `ray start --block`
        self._count = 0
        self.head = self._start("head", ["--head", "--num-cpus", "0", "--port", str(self.gcs_port),
                                         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                         "--include-dashboard", "true", f"--ray-client-server-port={free_port()}"])

    def ready(self) -> "RayNodes":
        """Wait for the head's dashboard (the state API and Ray Train's placement-group cleaner need it)."""
        wait_for(self._dashboard_up, "the head node's dashboard", 600, poll=0.5, alive=self.head,
                 log=self.tmp / "node-head.log")
        return self

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        index = self._count
        self._count += 1
        if index > 9:
            raise RuntimeError("at most 10 node starts: worker ports 20000-20999 are split in blocks of 100")
        own_ports = [f"--{p}={free_port()}" for p in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
        low = 20000 + 100 * index
        proc = subprocess.Popen(
            [self.ray, "start", "--block", *args, *own_ports, "--min-worker-port", str(low),
             "--max-worker-port", str(low + 99), "--object-store-memory", str(150 * 2**20),
             "--temp-dir", f"{self.temp_root}/{index}", "--disable-usage-stats"],
            env=self.env, cwd=self.tmp, stdout=(self.tmp / f"node-{name}.log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.nodes[name] = proc
        return proc

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:   # it answers (token auth refuses a request without the token)
            return True
        except OSError:
            return False

    def add_workers(self, count: int, tries: int = 3) -> list[str]:
        """Start ``count`` worker nodes at once and wait until the cluster sees them alive; returns their
        names. A node whose ``ray start`` gives up (it waits 30 s for its raylet to register, which a
        loaded machine can exceed) is started again, up to ``tries`` times."""
        pending = {self._start_worker(): 1 for _ in range(count)}
        ready = []
        deadline = time.monotonic() + 240 * tries
        while pending:
            alive = self.alive()
            for name, attempt in list(pending.items()):
                if name in alive:
                    del pending[name]
                    ready.append(name)
                elif self.nodes[name].poll() is not None:
                    log = (self.tmp / f"node-{name}.log").read_text()[-2000:]
                    assert attempt < tries, f"worker node {name} did not start ({tries} tries):\n{log}"
                    del pending[name]
                    pending[self._start_worker()] = attempt + 1
            assert time.monotonic() < deadline, f"worker nodes {sorted(pending)} not alive in time"
            time.sleep(0.5)
        return ready

    def _start_worker(self) -> str:
        name = f"er_node_{self._count}"
        self._start(name, ["--address", self.address, "--num-cpus", str(self.WORKER_CPUS),
                           "--resources", json.dumps({name: 1})])
        return name

    def alive(self) -> dict[str, str]:
        """``{node name: node id}`` of the worker nodes the cluster sees alive (``head`` for the head)."""
        from ray.util.state.common import StateResource

        try:
            nodes = self._state(StateResource.NODES, [("state", "=", "ALIVE")])
        except Exception:  # noqa: BLE001 - the dashboard not answering yet
            return {}
        named = {}
        for node in nodes:
            names = [r for r in (node.resources_total or {}) if r.startswith("er_node_")]
            named[names[0] if names else ("head" if node.is_head_node else node.node_id)] = node.node_id
        return named

    def _state(self, resource, filters: list) -> list:
        """Ray's state API on this cluster, with its token sent explicitly: the test process's own Ray
        settings (token auth mode, read once per process) are not this cluster's."""
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions

        client = StateApiClient(address=self.dashboard,
                                headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        return client.list(resource, options=ListApiOptions(detail=True, filters=filters),
                           raise_on_missing_output=False)

    def actors(self, name: str) -> list:
        """The live actors named ``name`` (``ray.util.state``'s ActorState: ``node_id``, ``pid``, ...)."""
        from ray.util.state.common import StateResource

        return self._state(StateResource.ACTORS, [("name", "=", name), ("state", "=", "ALIVE")])

    def kill(self, node_id: str) -> str:
        """Lose the worker node ``node_id`` at once: its whole process group (raylet, agents, workers)
        killed. Returns its name."""
        name = {v: k for k, v in self.alive().items()}.get(node_id)
        if name is None or name == "head" or name not in self.nodes:
            raise AssertionError(f"node {node_id} ({name}) is not a live worker node of this cluster")
        stop(self.nodes[name])
        return name

    def close(self) -> None:
        for proc in reversed(list(self.nodes.values())):
            stop(proc)
        shutil.rmtree(self.temp_root, ignore_errors=True)
