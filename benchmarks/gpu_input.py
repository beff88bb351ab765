"""Where training images/s are lost: the model step alone, the input path alone, and both together.

    python benchmarks/gpu_input.py --device cpu --models va --backbone resnet10t --image-size 64 --images 200
    python benchmarks/gpu_input.py --device cuda            # resnet101 VA and LORA-V at 448 px, batch 128

Rows, per model (``va``: the VA model on ``--backbone``; ``lora_v``: LORA-V) and mode (``eager``,
``compile``: ``torch.compile``; its warm-up, compilation included, is its own column):

(a) ``synthetic``: one uint8 batch already in memory, through ``pipelines.core.train_one_epoch`` (the
    project's step: to device, normalise there, forward, loss, backward, optimiser).
(b) ``decode cpu`` / ``decode device``: decode + augment alone, no model: ``ImageTransform`` in
    ``--cpu-workers`` processes (the Ray Data path's work per row), and ``DeviceImagePipeline`` on
    ``--device`` (batched ``decode_jpeg`` + v2 ops; nvJPEG on CUDA).
(c) ``dataloader``: a plain torchvision ``DataLoader`` (PIL decode, RandomResizedCrop, flip;
    ``--cpu-workers`` workers, pinned memory on CUDA) feeding the same step.
(d) ``ray train``: the project's whole path, ``pipelines.train_loop.run_stage`` on a generated,
    ingested set (Ray Data -> Ray Train, 1 worker; ``--decode cpu`` and ``device``); only when
    ``import ray`` works. Epoch 1 (start-up, compilation) is excluded.

Images for (a)-(c) are ``--images`` generated JPEGs of ``--source-size`` px held in memory (no Ray, no
disk). On CUDA, a thread samples ``nvidia-smi`` during each row and the table shows the mean GPU
utilisation. Figures are single runs; on a shared machine treat them as indicative.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import tempfile
import threading
import time

import numpy as np
import torch

from pipelines import core
from pipelines.recipe import StageRecipe, build_model, build_objective

DEFAULTS = {"cpu": dict(image_size=64, source_size=128, batch_size=32, images=200, steps=4),
            "cuda": dict(image_size=448, source_size=512, batch_size=128, images=2048, steps=20)}


def jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` smooth random JPEGs (size x 3/4 size), like photos in what a decoder has to do."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size * 3 // 4), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def recipe_for(args, model: str) -> StageRecipe:
    if model == "va":
        return StageRecipe(name="bench", model={"name": "va", "backbone": args.backbone, "task": "multi",
                                                "num_classes": 8},
                           objective={"kind": "va", "num_classes": 8, "alpha": 0.5, "accuracy_from": "logits"},
                           optimizer={"name": "adamw", "lr": 1e-4, "weight_decay": 0.0}, scheduler={"name": "constant"},
                           batch_size=args.batch_size, image_size=args.image_size, monitor="accuracy",
                           compile=False)
    small = {"trunk": {"embed_dims": [16, 32, 48, 64], "depths": [2, 2, 2, 1], "num_heads": [1, 1, 1, 1]},
             "hidden_dim": 64, "fuse_heads": 2, "fuse_mlp_dim": 128, "alpha": 2} if args.small_lora else {}
    return StageRecipe(name="bench", model={"name": "lora_v", "num_classes": 7, "img_size": args.image_size, **small},
                       objective={"kind": "classify", "num_classes": 7, "use_text": False},
                       optimizer={"name": "adamw", "lr": 1e-4, "weight_decay": 0.05}, scheduler={"name": "constant"},
                       batch_size=args.batch_size, image_size=args.image_size, monitor="accuracy",
                       augmentation={"augment": "randaugment", "auto_augment": "rand-m9-mstd0.5-inc1",
                                     "crop_scale": [0.08, 1.0]})


class GpuUtil:
    """Mean GPU utilisation (nvidia-smi, every 200 ms) while the block runs; None without a GPU."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.samples: list[float] = []

    def __enter__(self):
        if self.on:
            try:
                self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                              "-lms", "200", "-i", str(torch.cuda.current_device())],
                                             stdout=subprocess.PIPE, text=True)
                self.reader = threading.Thread(target=self._read, daemon=True)
                self.reader.start()
            except OSError:
                self.on = False
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.on:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=2)

    @property
    def mean(self):
        return f"{np.mean(self.samples):.0f}" if self.samples else "n/a"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, model_name: str, mode: str, device: torch.device):
    recipe = recipe_for(args, model_name)
    core.seed_everything(0)
    model = build_model(recipe)
    precision = core.Precision.for_device(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    optimizer = core.build_optimizer(model.parameters(), **recipe.optimizer)
    step_model = torch.compile(model) if mode == "compile" else model
    return recipe, step_model, optimizer, build_objective(recipe), precision


def targets(n: int, num_classes: int) -> dict:
    g = torch.Generator().manual_seed(n)
    label = torch.randint(0, num_classes, (n,), generator=g)
    return {"label": label, "has_label": torch.ones(n, dtype=torch.bool),
            "label_dist": torch.nn.functional.one_hot(label, num_classes).float(), "has_dist": torch.ones(n, dtype=torch.bool),
            "valence": torch.rand(n, generator=g) * 2 - 1, "arousal": torch.rand(n, generator=g) * 2 - 1,
            "has_va": torch.ones(n, dtype=torch.bool)}


def timed_epoch(model, batches, optimizer, objective, precision, device) -> tuple[float, float]:
    """(images/s, seconds) of one pass of core.train_one_epoch, the device synchronised at the end."""
    start = time.perf_counter()
    stats = core.train_one_epoch(model, batches, optimizer, objective, precision)
    _sync(device)
    seconds = time.perf_counter() - start
    return stats["samples"] / seconds, seconds


def synthetic(args, model_name, mode, device):
    recipe, model, opt, objective, precision = build(args, model_name, mode, device)
    n = args.batch_size
    batch = {"image": torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8),
             **targets(n, 8 if model_name == "va" else 7)}
    start = time.perf_counter()
    timed_epoch(model, [batch] * 2, opt, objective, precision, device)   # warm-up (compilation)
    warm = time.perf_counter() - start
    with GpuUtil(device) as util:
        rate, _ = timed_epoch(model, [batch] * args.steps, opt, objective, precision, device)
    return rate, warm, util.mean


def _transform_chunk(payload):
    from datasets_io.shards import ImageTransform

    size, aug, chunk = payload
    t = ImageTransform(size, train=True, num_classes=8, augment=aug)
    return t({"image": np.array(chunk, dtype=object)})["image"].shape[0]


def decode_cpu(args, data: list[bytes], augment: str) -> float:
    import multiprocessing as mp

    chunks = [(args.image_size, augment, data[i:i + args.batch_size]) for i in range(0, len(data), args.batch_size)]
    with mp.get_context("spawn").Pool(args.cpu_workers) as pool:
        pool.map(_transform_chunk, chunks[:args.cpu_workers])   # workers started and warm
        start = time.perf_counter()
        n = sum(pool.map(_transform_chunk, chunks))
    return n / (time.perf_counter() - start)


def decode_device(args, data: list[bytes], augment: str, device) -> tuple[float, str]:
    from datasets_io.pixels import DeviceImagePipeline

    pipe = DeviceImagePipeline(args.image_size, train=True, device=device, augment=augment, scale=(0.08, 1.0))
    ids = [f"i{i}" for i in range(len(data))]
    pipe(data[:args.batch_size], ids[:args.batch_size])
    _sync(device)
    with GpuUtil(device) as util:
        start = time.perf_counter()
        n = 0
        for i in range(0, len(data), args.batch_size):
            n += pipe(data[i:i + args.batch_size], ids[i:i + args.batch_size], epoch=1)[0].shape[0]
        _sync(device)
    return n / (time.perf_counter() - start), util.mean


class _JpegSet(torch.utils.data.Dataset):
    def __init__(self, data, size):
        from torchvision import transforms as T

        self.data = data
        self.t = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                            T.RandomHorizontalFlip(), T.PILToTensor()])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(io.BytesIO(self.data[i])) as img:
            return self.t(img.convert("RGB")), i


def dataloader(args, data, model_name, mode, device):
    recipe, model, opt, objective, precision = build(args, model_name, mode, device)
    loader = torch.utils.data.DataLoader(_JpegSet(data, args.image_size), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.cpu_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.cpu_workers > 0)
    nc = 8 if model_name == "va" else 7

    def batches():
        for images, idx in loader:
            yield {"image": images, **targets(len(idx), nc)}

    start = time.perf_counter()
    timed_epoch(model, batches(), opt, objective, precision, device)  # warm-up: workers, compilation
    warm = time.perf_counter() - start
    with GpuUtil(device) as util:
        rate, _ = timed_epoch(model, batches(), opt, objective, precision, device)
    return rate, warm, util.mean


def ray_path(args, model_name, mode, decode, device):
    from pipelines import data
    from pipelines.train_loop import RunOptions, run_stage

    shards = data.demo_shards(images_per_class=max(args.images // 6, 4), image_size=args.source_size,
                              show_progress=False)["fi"]
    recipe = recipe_for(args, model_name).replace(epochs=args.ray_epochs, compile=mode == "compile", decode=decode)
    if model_name == "va":
        recipe = recipe.replace(monitor="pearson_mean")
    sets = data.training_datasets(shards, image_size=args.image_size, num_classes=8, seed=0, decode=decode,
                                  augment=(recipe.augmentation or {}).get("augment", "basic"))
    if model_name != "va":  # LORA-V scores the FI-like set's 8 classes
        recipe = recipe.replace(model={**recipe.model, "num_classes": 8},
                                objective={**recipe.objective, "num_classes": 8})
    with tempfile.TemporaryDirectory() as tmp, GpuUtil(device) as util:
        run = RunOptions(storage_path=tmp, num_workers=1, use_gpu=device.type == "cuda",
                         cpus_per_worker=1 if device.type == "cuda" else 0.5)
        outcome = run_stage(recipe, sets, run)
    rates = [h["train_samples_per_s"] for h in outcome.history]
    first = outcome.history[0]["epoch_seconds"] if outcome.history else float("nan")
    return sum(rates[1:]) / max(len(rates) - 1, 1), first, util.mean


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=["va", "lora_v"], default=["va", "lora_v"])
    p.add_argument("--backbone", default=None, help="VA backbone (resnet101 on cuda, resnet10t on cpu)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    p.add_argument("--paths", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c", "d"])
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--source-size", type=int, default=None, help="longer side of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps of (a)")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1, help="processes of (b) cpu and (c)")
    p.add_argument("--ray-epochs", type=int, default=3)
    p.add_argument("--small-lora", action="store_true", help="a tiny PVT trunk for LORA-V (CPU smoke runs)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.backbone = args.backbone or ("resnet101" if args.device == "cuda" else "resnet10t")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    data = jpegs(args.images, args.source_size)
    print(f"device {args.device}, {args.image_size} px, batch {args.batch_size}, {args.images} JPEGs of "
          f"{args.source_size} px, {args.cpu_workers} CPU workers, torch {torch.__version__}")
    rows = []

    def add(row, what, model="", mode="", rate=float("nan"), warm=None, util="n/a"):
        rows.append([row, what, model, mode, f"{rate:,.0f}" if rate == rate else "n/a",
                     "" if warm is None else f"{warm:.1f}", util])
        print("  " + " | ".join(rows[-1]), flush=True)

    if "b" in args.paths:
        for aug in ("basic", "randaugment"):
            add("b", f"decode cpu ({aug}, {args.cpu_workers} proc)", rate=decode_cpu(args, data, aug))
            rate, util = decode_device(args, data, aug, device)
            add("b", f"decode device ({aug})", rate=rate, util=util)
    for model_name in args.models:
        label = f"va/{args.backbone}" if model_name == "va" else "lora_v"
        for mode in args.modes:
            if "a" in args.paths:
                add("a", "synthetic", label, mode, *synthetic(args, model_name, mode, device))
            if "c" in args.paths:
                add("c", f"dataloader ({args.cpu_workers} workers)", label, mode,
                    *dataloader(args, data, model_name, mode, device))
            if "d" in args.paths:
                try:
                    import ray
                except ImportError:
                    add("d", "ray train: skipped (no ray)", label, mode)
                    continue
                if not ray.is_initialized():
                    import pipelines  # noqa: F401 - Ray Train V2 env before Ray starts

                    ray.init(log_to_driver=False, configure_logging=False)
                    from ray.data import DataContext

                    DataContext.get_current().enable_progress_bars = False
                for decode in ("cpu", "device"):
                    add("d", f"ray train (--decode {decode})", label, mode,
                        *ray_path(args, model_name, mode, decode, device))
    header = ["", "what", "model", "mode", "images/s", "warm-up s", "GPU util %"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
