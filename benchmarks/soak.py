"""Soak: the demo command N times in a row, checking after each run what it left behind.

    python benchmarks/soak.py                 # 20 runs of the default demo (minutes each on a 2-core CPU)
    python benchmarks/soak.py --runs 3 --quick

Each run is a fresh process, ``python pipelines/two_stage.py <demo flags>``, with its own local Ray
(``RAY_ADDRESS=local``: never another user's cluster) and ``TMPDIR`` pointing at one soak folder, so
that what the runs leave in the temp folder (Ray's sessions under ``<tmp>/ray``, the project's own
temporary files) is told apart from what other programs on the machine write. After each run:

* **Ray processes**: every process that still carries this soak's marker in its environment
  (``raylet``, ``gcs_server``, ``default_worker``, ``ray::...`` workers, dashboard, ...), after a
  grace period for Ray's asynchronous shutdown. Expected: 0.
* **Ray sessions**: the ``session_*`` folders under ``<tmp>/ray``, count and size. Ray keeps one per
  ``ray.init`` (its logs) and never deletes old ones: they grow by one session per run; that is Ray's
  documented behaviour (clean them with ``rm -rf <tmp>/ray/session_2*``), reported, not a leak here.
* **Other temp entries**: anything else under ``<tmp>`` (the project's ``tempfile`` folders, ...),
  except caches that are reused rather than added per run (``torchinductor_<user>``) and the empty
  ``pymp-*`` folder Ray's dashboard leaves per start (``RAY_LEFTOVERS``: counted and reported
  apart). Expected: 0.
* **New Ray sessions per run**: expected 1 (a second one means something started Ray again).
* **Open MLflow runs**: runs of the soak's MLflow store still ``RUNNING``. Expected: 0.

It prints one table row per run and a verdict; exit code 1 when a check failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MARKER = "EMOTION_RAY_SOAK"
QUICK = ["--demo-images-per-class", "12", "--demo-image-size", "32", "--image-size", "32", "--backbone", "resnet10t",
         "--batch-size", "8", "--num-workers", "2", "--cpus-per-worker", "0.5", "--mode", "one_stage", "--task",
         "single", "--num-epochs", "1", "--stage2-epochs", "1"]


def marked_processes(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries this soak's marker (the runs and all they started)."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    names = []
    for p in procs:
        try:
            names.append(f"{p.name()}[{p.pid}]")
        except psutil.Error:
            continue
    return ", ".join(names)


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def ray_sessions(tmp: Path) -> tuple[int, float]:
    sessions = [p for p in (tmp / "ray").glob("session_*") if p.is_dir() and not p.is_symlink()
                and p.name != "session_latest"]
    return len(sessions), sum(folder_size(p) for p in sessions) / 1e6


# Caches that programs reuse from run to run (one folder, not one per run): reported, not failures.
CACHES = ("torchinductor_",)
# Left by Ray itself, one per local Ray start: Ray's dashboard starts its subprocess modules through a
# multiprocessing forkserver (ray/dashboard/subprocesses/handle.py, select_start_method; ray-project/ray
# PR #65159), whose listener folder is <tmp>/pymp-*; Ray kills the dashboard at shutdown, so Python's
# exit hook that would remove the folder never runs. Traced (a sitecustomize hook on
# multiprocessing.util.get_temp_dir): the only caller in a demo run is the dashboard process. Reported
# apart, like the session folders, not counted as the project's.
RAY_LEFTOVERS = ("pymp-",)


def other_temp_entries(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir()
                  if p.name != "ray" and not p.name.startswith(CACHES + RAY_LEFTOVERS))


def ray_leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(RAY_LEFTOVERS))


def cache_entries(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(CACHES))


def running_mlflow_runs(uri: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return 0
    return len(client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny settings (32 px, 12 images per class, 1 epoch)")
    p.add_argument("--dir", default=None, help="the soak's folder: temp dir, runs, MLflow store "
                                               "(default: a new folder under the system temp dir)")
    p.add_argument("--grace", type=float, default=15.0, help="seconds to wait for Ray's processes to exit")
    p.add_argument("--keep", action="store_true", help="keep the soak folder at the end")
    args, extra = p.parse_known_args(argv)

    # Short: Ray's socket paths live under <tmp>/ray/session_*/sockets and are limited to 107 bytes.
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ersoak-"))
    tmp, runs, store = root / "t", root / "runs", root / "mlflow.db"
    for d in (tmp, runs):
        d.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store}"
    token = uuid.uuid4().hex[:12]
    env = {**os.environ, MARKER: token, "TMPDIR": str(tmp), "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("RAY_TMPDIR", None)
    demo = (QUICK if args.quick else []) + extra
    print(f"soak: {args.runs} runs of: python pipelines/two_stage.py {' '.join(demo)}")
    print(f"soak folder {root} (TMPDIR={tmp}, MLflow {uri}); marker {MARKER}={token}")
    header = (f"{'run':>4} {'exit':>4} {'seconds':>8} {'ray procs left':>14} {'new sessions':>12} "
              f"{'ray sessions':>12} {'sessions MB':>11} {'other tmp':>9} {'mlflow RUNNING':>14}")
    print(header)
    print("-" * len(header))
    rows, failures = [], []
    baseline_other = other_temp_entries(tmp)
    sessions_before = ray_sessions(tmp)[0]
    for i in range(1, args.runs + 1):
        started = time.monotonic()
        log = root / f"run-{i:02d}.log"
        with open(log, "w") as out:
            rc = subprocess.call([sys.executable, str(REPO / "pipelines" / "two_stage.py"), *demo,
                                  "--storage-path", str(runs), "--mlflow-uri", uri, "--run-name", f"soak-{i:02d}"],
                                 cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - started
        deadline = time.monotonic() + args.grace
        left = marked_processes(token)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = marked_processes(token)
        sessions, mb = ray_sessions(tmp)
        other = other_temp_entries(tmp)
        open_runs = running_mlflow_runs(uri)
        new_sessions, sessions_before = sessions - sessions_before, sessions
        rows.append({"rc": rc, "left": len(left), "sessions": sessions, "mb": mb, "other": len(other),
                     "open": open_runs, "new_sessions": new_sessions})
        print(f"{i:>4} {rc:>4} {seconds:>8.1f} {len(left):>14} {new_sessions:>12} {sessions:>12} {mb:>11.1f} "
              f"{len(other):>9} {open_runs:>14}", flush=True)
        if rc:
            failures.append(f"run {i} exited with {rc} (log: {log})")
        if left:
            failures.append(f"run {i} left Ray processes: {describe(left)}")
            for proc in left:   # this soak's own leftovers only, by pid, so the next run starts clean
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        if open_runs:
            failures.append(f"run {i}: {open_runs} MLflow runs still RUNNING")
        if new_sessions > 1:
            failures.append(f"run {i} started {new_sessions} Ray sessions (one expected; see its log: {log})")
        new_other = sorted(set(other) - set(baseline_other))
        if new_other:
            failures.append(f"run {i} left temp entries: {', '.join(new_other[:8])}")
            baseline_other = other

    print("-" * len(header))
    first, last = rows[0], rows[-1]
    growth = (last["mb"] - first["mb"]) / max(1, len(rows) - 1)
    print(f"checked after each run: processes carrying the soak's marker (Ray's raylet, gcs_server, workers, ...) "
          f"after up to {args.grace:.0f} s; session_* folders under {tmp / 'ray'}; other entries under {tmp}; "
          f"RUNNING runs in {uri}")
    print(f"Ray processes left behind: {sum(r['left'] for r in rows)} in {len(rows)} runs")
    print(f"Ray session folders: {first['sessions']} after run 1, {last['sessions']} after run {len(rows)} "
          f"({last['mb']:.1f} MB; {growth:+.2f} MB per run): Ray keeps one log folder per session and does not "
          f"delete old ones")
    print(f"Ray dashboard forkserver folders (pymp-*, one per Ray start, empty; Ray's, see RAY_LEFTOVERS): "
          f"{len(ray_leftovers(tmp))}")
    print(f"other temp entries: {last['other']} (0 expected); caches reused across runs: "
          f"{', '.join(cache_entries(tmp)) or 'none'}")
    print(f"MLflow runs still RUNNING: {last['open']}")
    for line in failures:
        print(f"FAILED: {line}")
    print("verdict:", "clean" if not failures else f"{len(failures)} problem(s)")
    if not args.keep and not failures and not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
