"""What Ray Train costs: the pipeline's stage one, trained through Ray Train and through two bare loops.

    PYTHONPATH=$PWD python benchmarks/train_overhead.py [--shards DIR | --images-per-class 250] [--epochs 3]
        [--num-workers 2] [--batch-size 32] [--decode cpu|device] [--repeats 5]

Measures training samples/s (images through forward, backward and optimiser step per wall second)
of one and the same stage: ``pipelines/two_stage.py``'s stage one (``--mode one_stage``, single
task), its recipe resolved by the pipeline itself (``two_stage.configure`` / ``load_data`` /
``stage1``) from ``--recipe`` (default ``demo``) and this script's flags, on the embedded demo's
FI-like set (``--images-per-class`` per class, 8 classes) or on ``--shards``; weights from scratch.
``--batch-size`` is the global batch, as in the pipeline. Three peers:

(a) Ray Train: ``pipelines.train_loop.run_stage`` with ``--num-workers`` CPU workers of
    ``--cpus-per-worker`` (DDP over gloo), Ray Data feeding them the split's decoded uint8 pixels
    (``--decode cpu``) or the stored bytes decoded and augmented in the workers (``--decode device``).
    Its rate is rank 0's training samples/s times the workers (the split is divided evenly).
(b) Bare PyTorch: ``pipelines.core.train_one_epoch`` in this one process (torch on every core), batches
    from ``datasets_io.shards.iter_local_batches`` (pyarrow + the recipe's ``ImageTransform``).
(c) Bare DDP: the same core in ``--num-workers`` processes (``torch.multiprocessing``, gloo, no Ray),
    each decoding its share of the rows in-process, torch threads = cores / processes: what DDP on CPU
    costs by itself (gradient all-reduce on the same cores), so (a) / (c) is what Ray adds. Run only
    with ``--decode cpu``.

Model, objective, precision, optimiser and schedule are built for every peer the way the Ray Train
workers build them (``train_loop.build_for_device``, ``core.build_optimizer``, ``core.Schedule``).
Each peer's figure is its steady rate: the mean over epochs 2.. (epoch 1, with start-up and the
first decode, excluded). The peers run interleaved, ``--repeats`` rounds (a, b, c, a, b, c, ...), and
each figure is printed as ``median (min–max, n=rounds)``; the ratios Ray / bare and Ray / DDP are
taken round by round. On a shared machine one round proves nothing either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from repeats import add_repeats_arg, interleave, paired, print_table, steady

RATE = "samples/s"
UNITS = {RATE: ("samples/s", 1)}


def project_stage(args):
    """The pipeline's own plan and stage one for these flags: ``(plan, recipe, StageData)``."""
    from pipelines import cli, two_stage

    argv = ["--recipe", args.recipe, "--mode", "one_stage", "--task", "single", "--weights", "none",
            "--backbone", args.backbone, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--num-epochs", str(args.epochs), "--early-stop", "0", "--decode", args.decode,
            "--num-workers", str(args.num_workers), "--cpus-per-worker", str(args.cpus_per_worker)]
    argv += ["--dataname", args.shards] if args.shards else ["--demo-images-per-class", str(args.images_per_class)]
    flags = cli.parse_args(two_stage.build_parser(), argv)
    plan = two_stage.load_data(two_stage.configure(flags), flags)
    recipe, stage = two_stage.stage1(plan, name="bench", score_dimensional=False)
    return plan, recipe, stage


def train_epochs(recipe, shards: str, *, rank: int = 0, world: int = 1) -> list[float]:
    """Samples/s of each epoch of the bare loop (``world`` > 1: this rank's, in a DDP process group)."""
    from datasets_io.prep import ImageTransform
    from datasets_io.shards import iter_local_batches
    from pipelines import core
    from pipelines.train_loop import build_for_device

    model, objective, precision = build_for_device(recipe, torch.device("cpu"))
    optimizer = core.build_optimizer(model, recipe.optimizer, recipe.batch_size)
    schedule = core.Schedule(optimizer, recipe.schedule, recipe.epochs)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    transform = ImageTransform(recipe.prep, train=True, num_classes=len(recipe.classes))
    rates = []
    for epoch in range(recipe.epochs):
        if world > 1:
            torch.distributed.barrier()
        # Under DDP ranks may differ by one batch: train_one_epoch runs under DDP's join().
        batches = iter_local_batches(shards, "train", transform, batch_size=recipe.per_worker_batch(world),
                                     shuffle=True, seed=recipe.seed + epoch, part=(rank, world))
        stats = core.train_one_epoch(model, batches, optimizer, objective, precision, schedule=schedule)
        schedule.after_epoch(epoch)
        rates.append(stats["samples_per_s"] * world)
    return rates


def bare_loop(recipe, shards: str) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    return {RATE: steady(train_epochs(recipe, shards))}


def _ddp_rank(rank: int, recipe: dict, shards: str, world: int, init_method: str, out: str) -> None:
    from pipelines.recipe import StageRecipe

    torch.set_num_threads(max((os.cpu_count() or 1) // world, 1))
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    rates = train_epochs(StageRecipe.from_dict(recipe), shards, rank=rank, world=world)
    if rank == 0:
        Path(out).write_text(" ".join(f"{r:.3f}" for r in rates))
    torch.distributed.destroy_process_group()


def bare_ddp(recipe, shards: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rates.txt")
        torch.multiprocessing.spawn(_ddp_rank, args=(recipe.to_dict(), shards, world, f"file://{tmp}/rdv", out),
                                    nprocs=world, join=True)
        rates = [float(r) for r in Path(out).read_text().split()]
    return {RATE: steady(rates)}


def ray_train(recipe, stage, run) -> dict:
    from pipelines.train_loop import run_stage

    with tempfile.TemporaryDirectory() as tmp:   # a fresh run folder: run_stage would resume a finished one
        outcome = run_stage(recipe, stage, dataclasses.replace(run, storage_path=tmp), test=False)
    return {RATE: steady([h["train_samples_per_s"] * run.num_workers for h in outcome.history])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=None,
                   help="an ingested categorical shard folder (default: the demo's FI-like set)")
    p.add_argument("--images-per-class", type=int, default=250,
                   help="size of the generated demo set (8 classes; about 70%% of it trains)")
    p.add_argument("--recipe", default="demo", help="the two_stage recipe whose stage one is trained")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is excluded from the rate)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers and bare DDP processes")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch (divided among --num-workers)")
    p.add_argument("--decode", choices=["cpu", "device"], default="cpu",
                   help="Ray Train path: decode in Ray Data tasks (uint8 out) or in the workers (JPEG bytes out)")
    add_repeats_arg(p)
    args = p.parse_args(argv)

    plan, recipe, stage = project_stage(args)
    shards = plan.categorical.manifest["shards"]
    world = args.num_workers
    print(f"data {shards} ({plan.categorical.counts['train']} training images), {recipe.model.backbone} at "
          f"{recipe.prep.size} px, global batch {recipe.batch_size}, {recipe.epochs} epochs, recipe "
          f"{plan.recipe.name}, {os.cpu_count()} cores, {args.repeats} round(s)")
    peers = {"bare PyTorch loop": lambda: bare_loop(recipe, shards)}
    if args.decode == "cpu":
        peers["bare DDP (no Ray)"] = lambda: bare_ddp(recipe, shards, world)
    peers["Ray Train"] = lambda: ray_train(recipe, stage, plan.run)
    results = interleave(peers, args.repeats, UNITS)

    setup = {"bare PyTorch loop": f"1 process, {os.cpu_count()} threads",
             "bare DDP (no Ray)": f"{world} processes, gloo",
             "Ray Train": f"{world} workers x {args.cpus_per_worker} CPU, DDP/gloo, --decode {args.decode}"}
    rows = [[name, str(figures[RATE]), setup[name]] for name, figures in results.items()]
    ray_rate = results["Ray Train"][RATE]
    rows.append(["ratio Ray / bare", str(paired(ray_rate, results["bare PyTorch loop"][RATE])), "goal >= 0.9"])
    if "bare DDP (no Ray)" in results:
        rows.append(["ratio Ray / DDP", str(paired(ray_rate, results["bare DDP (no Ray)"][RATE])),
                     "what Ray adds over the same DDP"])
    print_table(["peer", "steady training rate, median (min–max, n=rounds)", "setup"], rows,
                title="epoch 1 excluded from every rate; ratios taken round by round")


if __name__ == "__main__":
    main()
