"""What Ray Train costs: the same training core, model and data, through Ray Train or a bare loop.

    python benchmarks/train_overhead.py [--shards DIR | --images-per-class 250] [--epochs 3] [--num-workers 2]

(a) Ray Train: ``pipelines.train_loop.run_stage`` with ``--num-workers`` CPU workers (DDP over gloo),
    the split's JPEG bytes held in Ray's object store (``datasets_io.ray_data.load_split``; streamed
    from the files with ``EMOTION_RAY_IN_MEMORY_MB=0``), decoded in Ray Data's ``map_batches`` (uint8
    pixels to the workers), or with ``--decode device`` decoded and augmented in the workers.
(b) Bare PyTorch: ``pipelines.core.train_one_epoch`` in this one process, batches from
    ``datasets_io.shards.iter_local_batches`` (pyarrow + the same ImageTransform), torch using every core.
(c) Bare DDP: the same core in ``--num-workers`` processes (``torch.multiprocessing``, gloo, no Ray),
    each decoding its own share of the rows in-process, torch threads = cores / processes. The peer
    that isolates what Ray adds from what DDP on CPU costs (gradient all-reduce on the same cores).

Both run the same number of epochs on the same demo shards; the first epoch (start-up, first
decode) is excluded from both rates. It prints training samples/s for each and their ratio.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


import torch

from pipelines import core
from pipelines.recipe import StageRecipe, build_model, build_objective


def recipe_for(args, num_classes: int) -> StageRecipe:
    return StageRecipe(
        name="bench", model={"name": "va", "backbone": args.backbone, "task": "single", "num_classes": num_classes},
        objective={"kind": "va", "num_classes": num_classes},
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        scheduler={"name": "constant"}, epochs=args.epochs, monitor="pearson_mean", batch_size=args.batch_size)


def training_parts(args, num_classes: int, wrap=lambda model: model):
    """Model (``wrap``ped, e.g. in DDP), objective, optimizer, CPU precision and train transform of the bare peers."""
    from datasets_io.shards import ImageTransform

    recipe = recipe_for(args, num_classes)
    model = wrap(build_model(recipe))
    return (model, build_objective(recipe), core.build_optimizer(model.parameters(), lr=1e-3),
            core.Precision.for_device("cpu"), ImageTransform(args.image_size, train=True, num_classes=num_classes))


def steady_rate(rates: list[float]) -> float:
    """Mean samples/s without epoch 1 (start-up, first decode)."""
    return sum(rates[1:]) / max(len(rates) - 1, 1)


def bare_loop(args, shards: Path, num_classes: int) -> float:
    from datasets_io.shards import iter_local_batches

    torch.set_num_threads(os.cpu_count() or 1)
    model, objective, optimizer, precision, transform = training_parts(args, num_classes)
    rates = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        stats = core.train_one_epoch(model, iter_local_batches(
            shards, "train", transform, batch_size=args.batch_size, shuffle=True, seed=epoch),
            optimizer, objective, precision)
        rates.append(stats["samples"] / (time.perf_counter() - start))
        print(f"  bare epoch {epoch + 1}: {rates[-1]:.1f} samples/s")
    return steady_rate(rates)


def _ddp_rank(rank: int, args, shards: str, num_classes: int, init_method: str, out: str) -> None:
    import torch.distributed as dist

    from datasets_io.shards import iter_local_batches

    world = args.num_workers
    torch.set_num_threads(max((os.cpu_count() or 1) // world, 1))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.manual_seed(0)
    model, objective, optimizer, precision, transform = training_parts(
        args, num_classes, wrap=torch.nn.parallel.DistributedDataParallel)
    rates = []
    for epoch in range(args.epochs):
        dist.barrier()
        start = time.perf_counter()
        # Ranks may differ by one batch: train_one_epoch runs under DDP's join().
        stats = core.train_one_epoch(model, iter_local_batches(shards, "train", transform, batch_size=args.batch_size,
                                                               shuffle=True, seed=epoch, part=(rank, world)),
                                     optimizer, objective, precision)
        rates.append(stats["samples"] * world / (time.perf_counter() - start))
    if rank == 0:
        Path(out).write_text(" ".join(f"{r:.3f}" for r in rates))
    dist.destroy_process_group()


def bare_ddp(args, shards: Path, num_classes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rates.txt")
        torch.multiprocessing.spawn(_ddp_rank, args=(args, str(shards), num_classes, f"file://{tmp}/rdv", out),
                                    nprocs=args.num_workers, join=True)
        rates = [float(r) for r in Path(out).read_text().split()]
    for epoch, rate in enumerate(rates):
        print(f"  ddp  epoch {epoch + 1}: {rate:.1f} samples/s ({args.num_workers} processes)")
    return steady_rate(rates)


def ray_train(args, shards: Path, num_classes: int) -> float:
    from pipelines import data
    from pipelines.train_loop import RunOptions, run_stage

    sets = data.training_datasets(shards, image_size=args.image_size, num_classes=num_classes, seed=0,
                                  decode=args.decode)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunOptions(storage_path=tmp, num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker)
        outcome = run_stage(recipe_for(args, num_classes).replace(decode=args.decode), sets, run)
    # Rank 0's rate times the world size: the train split is divided evenly between the workers.
    rates = [h["train_samples_per_s"] * args.num_workers for h in outcome.history]
    for epoch, rate in enumerate(rates):
        print(f"  ray  epoch {epoch + 1}: {rate:.1f} samples/s ({args.num_workers} workers)")
    return steady_rate(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None, help="ingested shard folder (default: the demo FI-like set)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode", choices=["cpu", "device"], default="cpu",
                   help="Ray Train path: decode in Ray Data tasks (uint8 out) or in the workers (JPEG bytes out)")
    p.add_argument("--images-per-class", type=int, default=250,
                   help="size of the generated demo set (8 classes; about 70%% of it trains)")
    args = p.parse_args()

    import ray
    from datasets_io.records import read_manifest
    from pipelines import data

    # One quiet local Ray for the demo ingest and the Ray Train run (workers' lines stay in Ray's logs).
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)  # dashboard on: Ray Train V2 needs it
    shards = Path(args.shards) if args.shards else data.demo_shards(
        images_per_class=args.images_per_class, show_progress=False)["fi"]
    num_classes = len(read_manifest(shards)["classes"])
    print(f"data {shards}, model {args.backbone} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, {os.cpu_count()} cores")
    bare = bare_loop(args, shards, num_classes)
    ddp = bare_ddp(args, shards, num_classes) if args.decode == "cpu" else None
    ray_rate = ray_train(args, shards, num_classes)
    print(f"\nbare PyTorch loop : {bare:8.1f} samples/s (1 process, {torch.get_num_threads()} threads)")
    if ddp is not None:
        print(f"bare DDP (no Ray) : {ddp:8.1f} samples/s ({args.num_workers} processes, gloo)")
    print(f"Ray Train         : {ray_rate:8.1f} samples/s ({args.num_workers} workers x "
          f"{args.cpus_per_worker} CPU, DDP/gloo)")
    print(f"ratio Ray / bare  : {ray_rate / bare:8.2f}  (goal >= 0.9; epoch 1 excluded from all)")
    if ddp is not None:
        print(f"ratio Ray / DDP   : {ray_rate / ddp:8.2f}  (what Ray adds over the same DDP without Ray)")


if __name__ == "__main__":
    main()
