"""What ``--deterministic`` costs: the same two-stage demo command with and without it, interleaved.

    PYTHONPATH=$PWD python benchmarks/deterministic_cost.py [--images-per-class 12] [--image-size 32]
        [--epochs 3] [--num-workers 2] [--batch-size 16] [--repeats 3]

Two peers, the pipeline's own entry point (``pipelines.two_stage.main``) with the same flags, in this
process on one local Ray (started by the warm-up run, which also generates and ingests the demo once;
not counted), each run with a fresh ``--run-name``, storage folder and MLflow store:

(a) streaming (the default): Ray Data streams each worker's share of the training split and decodes and
    augments it in its own tasks;
(b) ``--deterministic``: each worker reads the split itself (``pipelines.batches.LocalSplit``: a permutation
    per epoch seeded by (seed, epoch), every image's augmentation seeded, decoding in the worker) and torch
    runs its deterministic kernels: what makes a resumed epoch repeat the interrupted one exactly.

Figures per run, from the stages' epoch history (``pipeline_state.json``, the rows rank 0 reports): the
steady seconds per epoch (training and validation; each stage's first epoch, which pays the worker group's
start-up and the first read, left out), the steady training images/s of the whole group (rank 0's rate times
the workers: the split is divided evenly), and the command's wall time (start-up, both stages, testing,
MLflow). The peers run interleaved, ``--repeats`` rounds (a, b, a, b, ...: see ``repeats.py``); every figure is
printed as ``median (min–max, n=rounds)``, and the ratios deterministic / streaming are taken round by round.
On a shared machine one round proves nothing either way.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from repeats import WALL, add_repeats_arg, interleave, paired, print_table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EPOCH, RATE = "s/epoch", "train img/s"
UNITS = {EPOCH: ("s", 2), RATE: ("img/s", 1)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images-per-class", type=int, default=12, help="size of the generated demo sets")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each stage (the first is left out of the rates)")
    p.add_argument("--batch-size", type=int, default=16, help="the global batch")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--workdir", default=None, help="where the runs and MLflow stores go (default: a temporary folder)")
    p.add_argument("--show-output", action="store_true", help="print the pipeline's console output")
    add_repeats_arg(p, default=3)
    return p.parse_args(argv)


def demo_argv(args, workdir: Path, name: str, deterministic: bool) -> list[str]:
    return ["--demo-images-per-class", str(args.images_per_class), "--image-size", str(args.image_size),
            "--backbone", args.backbone, "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
            "--cpus-per-worker", str(args.cpus_per_worker), "--mode", "two_stage", "--task", "single",
            "--num-epochs", str(args.epochs), "--stage2-epochs", str(args.epochs), "--early-stop", "0",
            "--seed", "3", "--storage-path", str(workdir / "runs"),
            "--mlflow-uri", f"sqlite:///{workdir / (name + '.db')}", "--run-name", name,
            *(["--deterministic"] if deterministic else [])]


def run_once(args, workdir: Path, name: str, deterministic: bool) -> dict:
    """One run of the demo command; its steady s/epoch and training rate over both stages."""
    from pipelines import two_stage

    out = io.StringIO()
    with (contextlib.nullcontext() if args.show_output else contextlib.redirect_stdout(out)):
        rc = two_stage.main(demo_argv(args, workdir, name, deterministic))
    if rc != 0:
        raise SystemExit(f"{name}: exit {rc}\n{out.getvalue()[-3000:]}")
    state = json.loads((workdir / "runs" / name / "pipeline_state.json").read_text())
    seconds, rates = [], []
    for stage in state["stages"].values():
        history = sorted(stage["outcome"]["history"], key=lambda row: row["epoch"])[1:]   # first epoch out
        seconds += [row["epoch_seconds"] for row in history]
        rates += [row["train_samples_per_s"] * args.num_workers for row in history]
    if not seconds:
        raise SystemExit("--epochs must be at least 2: each stage's first epoch is left out")
    return {EPOCH: sum(seconds) / len(seconds), RATE: sum(rates) / len(rates)}


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deterministic-cost-"))
    from pipelines import two_stage

    print(f"two_stage demo ({args.images_per_class} images/class, {args.image_size} px, {args.backbone}, "
          f"{args.epochs} epochs per stage, global batch {args.batch_size}, {args.num_workers} workers x "
          f"{args.cpus_per_worker} CPU), {os.cpu_count()} cores, {args.repeats} round(s); warm-up run first",
          flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        two_stage.main(demo_argv(args, workdir, "warmup", False))
    counter = {"streaming": 0, "deterministic": 0}

    def peer(deterministic: bool):
        key = "deterministic" if deterministic else "streaming"

        def run() -> dict:
            counter[key] += 1
            return run_once(args, workdir, f"{key}-{counter[key]}", deterministic)
        return run

    peers = {"streaming (default)": peer(False), "--deterministic": peer(True)}
    results = interleave(peers, args.repeats, UNITS, log=lambda line: print(line, flush=True))
    rows = [[name, str(f[EPOCH]), str(f[RATE]), str(f[WALL])] for name, f in results.items()]
    det, base = results["--deterministic"], results["streaming (default)"]
    rows.append(["ratio deterministic / streaming", str(paired(det[EPOCH], base[EPOCH], unit="x")),
                 str(paired(det[RATE], base[RATE], unit="x")), str(paired(det[WALL], base[WALL], unit="x"))])
    print_table(["setting", "steady s/epoch", "steady train img/s (all workers)", "command wall time"], rows,
                title="median (min–max, n=rounds); each stage's first epoch left out of the rates; "
                      "ratios taken round by round")
    print(f"\nruns and MLflow stores: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
