"""Ingest speed: the Ray Data ingest against a plain process pool doing the same work.

    python benchmarks/ingest.py --images 2000 --size 640 --repeats 3      (from the repository root)

Writes (or reuses) ``--dir``: a folder-layout dataset of ``--images`` JPEGs of ``--size`` px (three
class folders). The peer is a plain ``multiprocessing.Pool(--processes)`` doing the same work as the
ingest on the same records: read each file, :func:`datasets_io.images.prepare_image` (decode,
convert, shrink, re-encode), write Parquet per chunk and split. Two comparisons, each peer run
``--repeats`` times, interleaved (A, B, A, B, ...) so that a neighbour's load hits both alike:

(a) the whole process: ``python -m datasets_io ingest`` against the pool, each as its own
    subprocess (interpreter start, imports, starting Ray and shutting it down included);
(b) the execution alone: ``ingest()`` in this process with Ray already started (after one untimed
    warm-up run of each peer) against the pool in this process.

Each time and each ratio (pool time / Ray time = Ray's throughput as a fraction of the pool's;
goals: (a) >= 0.5, (b) >= 0.8) is printed as its median and range.

The pool's processes run at Ray's worker niceness (``--pool-niceness``, default 15, Ray's default
``RAY_worker_niceness``; (b) prints what Ray's workers actually run at): on an idle machine this
changes nothing, on a shared one it keeps the comparison about the work, not about who yields the
CPU to the neighbours first. ``--pool-niceness 0`` gives the pool the driver's priority.

This file puts its own checkout first on ``sys.path`` and runs the subprocesses and Ray's workers
from it, so that the code measured is this checkout's even where another copy of the project is
installed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from datasets_io.demo import render_va  # noqa: E402
from datasets_io.images import prepare_image  # noqa: E402
from datasets_io.layouts import read_dataset  # noqa: E402
from datasets_io.records import COLUMNS, SHARD_SCHEMA, SPLITS  # noqa: E402

CLASSES = ("negative", "neutral", "positive")
PEER = "plain-peer"  # argv[1] that makes this script run the plain pool once (the subprocess of (a))
RAY_WORKER_NICENESS = 15  # Ray's default niceness of its worker processes (RAY_worker_niceness)


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs, spread over the class folders; existing files are reused."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / CLASSES[index % len(CLASSES)] / f"{index:06d}.jpg"
        if not path.is_file():
            valence, arousal = rng.uniform(-1, 1, 2)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_va(valence, arousal, rng, size)).save(path, quality=90)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- the plain peer

def plain_ingest(root: Path, out: Path, max_side: int, processes: int, niceness: int) -> int:
    """The peer: the folder reader's records, read + prepare_image + Parquet in a plain process pool.

    The records are cut into ``4 * processes`` chunks (as the ingest makes about 4 tasks per CPU);
    each chunk writes one file per split. The pool's processes run at ``niceness``. Returns the
    rows written.
    """
    rows = [asdict(record) for record in read_dataset("folder", root).records]
    size = -(-len(rows) // (4 * processes))
    chunks = [(index, str(root), str(out), max_side, rows[start:start + size])
              for index, start in enumerate(range(0, len(rows), size))]
    pool = multiprocessing.Pool(processes, initializer=os.setpriority, initargs=(os.PRIO_PROCESS, 0, niceness))
    try:
        return sum(pool.imap_unordered(_plain_chunk, chunks))
    finally:  # close + join, not the context manager's terminate(): no SIGTERM to children of a Ray driver
        pool.close()
        pool.join()


def _plain_chunk(chunk: tuple) -> int:
    index, root, out, max_side, rows = chunk
    for row in rows:
        row["image"] = prepare_image((Path(root) / row["path"]).read_bytes(), max_side=max_side)
        row["image_id"] = row["path"]
    table = pa.Table.from_pylist(rows).select(list(COLUMNS)).cast(SHARD_SCHEMA)
    for split in SPLITS:
        part = table.filter(pc.equal(table["split"], split))
        if part.num_rows:
            (Path(out) / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(part, Path(out) / split / f"part-{index:05d}.parquet")
    return table.num_rows


def _peer_main(argv: list[str]) -> None:
    """``benchmarks/ingest.py plain-peer ROOT OUT MAX_SIDE PROCESSES NICENESS``: one plain run, as a process."""
    root, out, max_side, processes, niceness = argv
    plain_ingest(Path(root), Path(out), int(max_side), int(processes), int(niceness))


# ----------------------------------------------------------------------------- timing

def timed(run: Callable[[], object], out: Path) -> float:
    """Seconds ``run()`` takes, ``out`` removed first (untimed)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(peers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each peer's seconds, ``repeats`` times, the peers taking turns (A, B, A, B, ...)."""
    times: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(repeats):
        for name, run in peers.items():
            times[name].append(run())
    return times


def spread(values: list[float]) -> str:
    """``median (min - max)``."""
    return f"{statistics.median(values):6.2f} ({min(values):.2f} - {max(values):.2f})"


def report(times: dict[str, list[float]], images: int) -> None:
    """Each peer's seconds and images/s, and pool / Ray (per interleaved pair) as median and range."""
    for name, values in times.items():
        rates = [images / t for t in values]
        print(f"  {name:<22} {spread(values)} s   {spread(rates)} images/s")
    ratios = [plain / ray for plain, ray in zip(times["plain pool"], times["ray ingest"])]
    print(f"  {'ratio pool / ray':<22} {spread(ratios)}")


def whole_process(root: Path, scratch: Path, max_side: int, processes: int, niceness: int, repeats: int) -> dict:
    """(a): ``python -m datasets_io ingest`` and the plain pool, each as a fresh subprocess."""
    def run(command: list[str]) -> None:
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ray_out, plain_out = scratch / "cli-shards", scratch / "cli-plain"
    ray_cli = [sys.executable, "-m", "datasets_io", "ingest", "--layout", "folder", "--root", str(root),
               "--out", str(ray_out), "--max-side", str(max_side)]
    plain_cli = [sys.executable, str(Path(__file__).resolve()), PEER, str(root), str(plain_out), str(max_side),
                 str(processes), str(niceness)]
    return interleaved({"plain pool": lambda: timed(lambda: run(plain_cli), plain_out),
                        "ray ingest": lambda: timed(lambda: run(ray_cli), ray_out)}, repeats)


def execution_alone(root: Path, scratch: Path, max_side: int, processes: int, niceness: int, repeats: int) -> dict:
    """(b): ``ingest()`` with Ray started (and warmed up) against the pool, both in this process."""
    import ray

    from datasets_io.ingest import ingest
    from datasets_io.quiet_ray import init_ray

    os.chdir(REPO)  # Ray's workers import this checkout
    init_ray(dashboard=False)
    worker_niceness = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
    print(f"  (Ray's workers run at niceness {worker_niceness}, the pool's processes at {niceness})")
    ray_out, plain_out = scratch / "shards", scratch / "plain"

    def ray_run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            ingest("folder", root, ray_out, max_side=max_side, show_progress=False)

    peers = {"plain pool": lambda: timed(lambda: plain_ingest(root, plain_out, max_side, processes, niceness),
                                         plain_out),
             "ray ingest": lambda: timed(ray_run, ray_out)}
    interleaved(peers, 1)  # warm-up, untimed: Ray's workers started, page cache and codecs warm
    return interleaved(peers, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=640, help="side of the square source JPEGs")
    parser.add_argument("--dir", default=None, help="dataset folder to create or reuse (default: a temp folder)")
    parser.add_argument("--max-side", type=int, default=512, help="as the ingest's --max-side (default 512)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the plain pool")
    parser.add_argument("--pool-niceness", type=int, default=RAY_WORKER_NICENESS,
                        help="niceness of the pool's processes (default 15: that of Ray's workers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each peer, interleaved")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        root = Path(args.dir).resolve() if args.dir else scratch / "images"
        paths = make_images(root, args.images, args.size)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} JPEGs of {args.size} px ({megabytes:.1f} MB) in {root}; max_side {args.max_side}; "
              f"plain pool of {args.processes} processes at niceness {args.pool_niceness}; {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.1f}; {args.repeats} interleaved repeats: median (range)")
        print("(a) whole process: python -m datasets_io ingest vs the pool, each a subprocess")
        report(whole_process(root, scratch, args.max_side, args.processes, args.pool_niceness, args.repeats),
               len(paths))
        print("(b) execution alone: ingest() with Ray started vs the pool, in this process")
        report(execution_alone(root, scratch, args.max_side, args.processes, args.pool_niceness, args.repeats),
               len(paths))
        print(f"load average {os.getloadavg()[0]:.1f}; goals: (a) >= 0.5, (b) >= 0.8")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == PEER:
        _peer_main(sys.argv[2:])
    else:
        main()
