"""Regenerate the documentation's pictures (docs/images/*.png) from a real demo run.

    python scripts/docs_pictures.py                      # a fresh demo grid run in a temporary folder
    python scripts/docs_pictures.py --reuse DIR          # an EMOTION_RAY_HOME that already holds a grid run

Steps:

1. Unless ``--reuse`` is given, run the demo grid into a temporary ``EMOTION_RAY_HOME`` (the demo data
   cached in ``<home>/cache``; nothing is written to your home folder)::

       python pipelines/two_stage.py --frameworks all --num-epochs 2 --stage2-epochs 2

   One grid run gives all four pictures: the parent run's comparison chart, the run list (the parent and
   its five stage runs), and a stage run (``multi-stage2``, two_stage multi) with curves and a VA scatter.
2. Start a real ``mlflow server`` on 127.0.0.1 (a free port) over that run's sqlite store.
3. Take screenshots with a locally installed headless Chromium (Debian's ``chromium``), every URL with
   ``workflowType=machine_learning`` (MLflow's model-training view; the ``mlflow.experimentKind`` tag alone
   did not switch it): the experiment's run list, sorted by ``test_pearson_v`` (sorted by date, MLflow
   nests the stage runs under their parent, collapsed), and the stage run's metric page with its
   validation and training curves.
4. Copy the stage run's ``plots/va_scatter_test.png`` and the parent's ``comparison.png``.
5. Shrink every PNG to at most 300 KB (Pillow), write them to ``docs/images/``, stop the server.

The React UI renders after the page loads: ``--budget-ms`` is Chromium's virtual time budget (raise it
if a screenshot shows an empty page or a spinner). Chromium reaches the server under the name
``mlflow.emotion-ray.test`` (mapped to 127.0.0.1 by ``--host-resolver-rules``; the server allows that
host and origin): MLflow 3.17 opens its assistant panel over a third of the page for a client on
localhost, and not for another host name. Needs ``chromium`` on the PATH (``apt-get install -y
chromium``) and the project installed (``pip install -e '.[dev]'``). Run from the repository root.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "pipelines/two_stage.py", "--frameworks", "all", "--num-epochs", "2", "--stage2-epochs", "2"]
STAGE = "multi-stage2"          # the stage run pictured: two_stage multi's stage two
MAX_BYTES = 300 * 1024
HOST = "mlflow.emotion-ray.test"     # the server's name for Chromium (see the module docstring)
CURVES = ["val_pearson_mean", "val_pearson_v", "val_pearson_a", "train_loss"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(home: Path) -> None:
    # PYTHONPATH: this checkout's code, also when another checkout of the project is the installed one.
    env = {**os.environ, "EMOTION_RAY_HOME": str(home), "EMOTION_RAY_CACHE": str(home / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"demo grid run into {home} (minutes on a 2-core CPU): {' '.join(DEMO[1:])}", flush=True)
    subprocess.run(DEMO, cwd=REPO, env=env, check=True)


def find_runs(uri: str):
    """The experiment, the newest finished grid parent run, and its stage run ``STAGE``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("emotion-ray")
    if experiment is None:
        sys.exit(f"{uri}: no emotion-ray experiment (run the demo grid first, or drop --reuse)")
    parents = client.search_runs([experiment.experiment_id], "tags.mode = 'grid' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"{uri}: no finished grid run (python pipelines/two_stage.py --frameworks all ...)")
    parent = parents[0]
    stages = client.search_runs([experiment.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = '{STAGE}'")
    if not stages:
        sys.exit(f"the grid run {parent.info.run_id} has no stage run {STAGE!r}")
    return client, experiment.experiment_id, parent, stages[0]


class Server:
    """``mlflow server`` on 127.0.0.1 over ``uri``, in its own process group, stopped on exit."""

    def __init__(self, uri: str, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"           # for this script
        self.browser_url = f"http://{HOST}:{port}"      # for Chromium
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                                      "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                      "--allowed-hosts", f"{HOST}:{port},127.0.0.1:{port},localhost:{port}",
                                      "--cors-allowed-origins", self.browser_url],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"mlflow server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        sys.exit(f"mlflow server did not answer within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)   # the server and the workers it started, nothing else
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def screenshot(url: str, out: Path, budget_ms: int, profile: Path, size: str = "1400,900") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found on the PATH (Debian: apt-get install -y chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--host-resolver-rules=MAP {HOST} 127.0.0.1", f"--user-data-dir={profile}",
                    f"--window-size={size}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    if not out.is_file():
        sys.exit(f"chromium wrote no screenshot of {url}")


def shrink(data: bytes, limit: int = MAX_BYTES) -> bytes:
    """The PNG at most ``limit`` bytes: optimised; then as 256 colours; then scaled down step by step."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    image = image.convert("RGB")

    def encode(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
        return buf.getvalue()

    out = encode(image)
    if len(out) <= limit:
        return out
    while True:
        out = encode(image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
        if len(out) <= limit:
            return out
        image = image.resize((int(image.width * 0.85), int(image.height * 0.85)), Image.Resampling.LANCZOS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", default=None, help="an EMOTION_RAY_HOME holding a finished demo grid run")
    p.add_argument("--out", default=str(REPO / "docs" / "images"), help="where the PNGs go (default docs/images)")
    p.add_argument("--budget-ms", type=int, default=30000, help="Chromium's virtual time budget per page")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (the demo run) at the end")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="emotion-ray-pictures-"))
    home = Path(args.reuse).expanduser().resolve() if args.reuse else work / "home"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if not args.reuse:
            run_demo(home)
        uri = f"sqlite:///{home / 'mlflow.db'}"
        client, experiment_id, parent, stage = find_runs(uri)
        server = Server(uri, free_port(), work / "mlflow-server.log")
        server.wait()
        ui = f"{server.browser_url}/#"
        runs = {"orderByKey": "metrics.`test_pearson_v`", "orderByAsc": "false", "workflowType": "machine_learning"}
        curves = {"runs": json.dumps([stage.info.run_id]), "metric": json.dumps(CURVES[0]),
                  "experiments": json.dumps([experiment_id]), "plot_metric_keys": json.dumps(CURVES),
                  "plot_layout": "{}", "x_axis": "step", "y_axis_scale": "linear", "line_smoothness": "1",
                  "show_point": "true", "deselected_curves": "[]", "last_linear_y_axis_range": "[]",
                  "workflowType": "machine_learning"}
        pages = {  # name: (URL, window size)
            "mlflow-runs.png": (f"{ui}/experiments/{experiment_id}/runs?{urlencode(runs)}", "1400,560"),
            "mlflow-stage-curves.png": (f"{ui}/metric/{CURVES[0]}?{urlencode(curves)}", "1400,760"),
        }
        pictures = {}
        for name, (url, size) in pages.items():
            raw = work / name
            print(f"screenshot {url}", flush=True)
            screenshot(url, raw, args.budget_ms, work / f"chromium-{raw.stem}", size)
            pictures[name] = raw.read_bytes()
        for name, run, artifact in (("va-scatter.png", stage, "plots/va_scatter_test.png"),
                                    ("grid-comparison.png", parent, "comparison.png")):
            local = client.download_artifacts(run.info.run_id, artifact, str(work))
            pictures[name] = Path(local).read_bytes()
        for name, data in pictures.items():
            small = shrink(data)
            (out / name).write_bytes(small)
            print(f"{out / name}: {len(small) / 1024:.0f} KB")
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
