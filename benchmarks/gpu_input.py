"""Where training images/s are lost: the model step alone, the input path alone, and both together.

    PYTHONPATH=$PWD python benchmarks/gpu_input.py --device cpu --models va --backbone resnet10t \\
        --image-size 64 --images 200 --repeats 3
    PYTHONPATH=$PWD python benchmarks/gpu_input.py --device cuda   # resnet101 VA and LORA-V at 448 px, batch 128

Rows, per model (``va``: the two-stage VA model, multi-task over 8 classes, on ``--backbone``;
``lora_v``: LORA-V over 7 classes) and mode (``eager``, ``compile``: ``nn.Module.compile``; its
warm-up, compilation included, is its own column). Figures are training images/s (images through
forward, backward and optimiser step, or through decode + augment alone, per wall second):

(a) ``synthetic``: one uint8 batch already in memory, through ``pipelines.core.train_one_epoch`` (the
    project's step: to device, normalise there, forward, loss, backward, optimiser).
(b) ``decode cpu`` / ``decode device``: decode + augment alone, no model: ``datasets_io.prep.ImageTransform``
    in ``--cpu-workers`` processes (the Ray Data path's work per row), and
    ``datasets_io.prep.DeviceImagePipeline`` on ``--device`` (batched ``decode_jpeg`` + v2 ops; nvJPEG
    on CUDA); with the VA recipe's crop and ``basic`` or ``randaugment`` augmentation.
(c) ``dataloader``: a plain torchvision ``DataLoader`` (PIL decode, the recipe's RandomResizedCrop and
    flip; ``--cpu-workers`` workers, pinned memory on CUDA) feeding the same step.
(d) ``ray train``: the project's whole path, ``pipelines.train_loop.run_stage`` on the embedded demo's
    FI-like set (about ``--images`` images of ``--source-size`` px, ingested; Ray Data -> Ray Train,
    1 worker; ``--decode cpu`` and ``device``), ``--ray-epochs`` epochs, epoch 1 (start-up,
    compilation) excluded from the rate and shown as the warm-up; only when ``import ray`` works.

The stage recipes are typed :class:`pipelines.recipe.StageRecipe` sections (no recipe file, so that
(a)-(c) need neither Ray nor PyYAML): the model, the image preparation and the loss of the two
pipelines' recipes, weights from scratch, precision ``auto`` (bf16 autocast on CUDA), the optimiser
sections' defaults (what the step costs does not depend on their values). Images for (a)-(c) are
``--images`` generated JPEGs of ``--source-size`` px held in memory (no Ray, no disk). On CUDA, a
thread samples ``nvidia-smi`` during each row and the table shows the mean GPU utilisation.

``--repeats N`` runs every row once per round, all rows in order (a, b, c, d, a, b, c, d, ...), and
prints each figure as ``median (min–max, n=N)``.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import replace

import numpy as np
import torch

from repeats import add_repeats_arg, interleave, print_table, steady

DEFAULTS = {"cpu": dict(image_size=64, source_size=128, batch_size=32, images=200, steps=4),
            "cuda": dict(image_size=448, source_size=512, batch_size=128, images=2048, steps=20)}
RATE, WARM, UTIL = "images/s", "warm-up", "GPU util"
UNITS = {RATE: ("images/s", 0), WARM: ("s", 1), UTIL: ("%", 0)}
# --small-lora: a narrow PVT trunk and fusion, for CPU smoke runs of LORA-V.
SMALL_LORA = {"trunk": {"embed_dims": [16, 32, 48, 64], "depths": [2, 2, 2, 1], "num_heads": [1, 1, 1, 1]},
              "hidden_dim": 64, "fuse_heads": 2, "fuse_mlp_dim": 128, "alpha": 2}


def recipe_for(args, model: str, classes: tuple[str, ...]):
    """The stage recipe of ``model`` scoring ``classes``, as typed sections."""
    from datasets_io.prep import ImagePrep
    from emotion_models.losses import LossSpec
    from emotion_models.registry import ModelSpec
    from emotion_models.va import data_config
    from pipelines.core import SelectSpec
    from pipelines.recipe import StageRecipe

    common = dict(name=f"bench-{model}", batch_size=args.batch_size, classes=classes)
    if model == "va":   # the two-stage default recipe's model, crop and loss
        return StageRecipe(model=ModelSpec("va", args.backbone, weights="none", head="tanh",
                                           options={"task": "multi", "num_classes": len(classes)}),
                           prep=ImagePrep(size=args.image_size, scale=(0.5, 1.0)).resolve(data_config(args.backbone)),
                           loss=LossSpec(kind="va"), head_classes=classes, **common)
    # The sticker recipe's LORA-V: bicubic, RandAugment, label smoothing.
    options = {"num_classes": len(classes), "img_size": args.image_size, **(SMALL_LORA if args.small_lora else {})}
    return StageRecipe(model=ModelSpec("lora_v", weights="none", options=options),
                       prep=ImagePrep(size=args.image_size, interpolation="bicubic", crop_pct=0.875,
                                      augment="randaugment", auto_augment="rand-m9-mstd0.5-inc1").resolve(),
                       loss=LossSpec(kind="classify", label_smoothing=0.2), select=SelectSpec(metric="accuracy"),
                       **common)


def class_names(model: str) -> tuple[str, ...]:
    """Placeholder class names for (a)-(c): 8 like FI for the VA model, 7 like SER30K for LORA-V."""
    return tuple(f"class{i}" for i in range(8 if model == "va" else 7))


def jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` smooth random JPEGs (size x 3/4 size), like photos in what a decoder has to do."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size * 3 // 4), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class GpuUtil:
    """Mean GPU utilisation (nvidia-smi, every 200 ms) while the block runs; NaN without a GPU."""

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
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(recipe, mode: str, device: torch.device):
    """Model, optimiser, objective and precision of ``recipe`` on ``device``, as a Ray Train worker builds them."""
    from pipelines import core
    from pipelines.checkpoints import build_stage_model
    from pipelines.objectives import build_objective

    core.seed_everything(recipe.seed)
    model = build_stage_model(recipe)
    precision = core.Precision.for_device(device, recipe.precision, recipe.prep.norm(), recipe.grad_scaler)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    optimizer = core.build_optimizer(model, recipe.optimizer, recipe.batch_size)
    if mode == "compile":
        model.compile()
    return model, optimizer, build_objective(recipe), precision


def targets(n: int, num_classes: int) -> dict:
    g = torch.Generator().manual_seed(n)
    label = torch.randint(0, num_classes, (n,), generator=g)
    return {"label": label, "has_label": torch.ones(n, dtype=torch.bool),
            "label_dist": torch.nn.functional.one_hot(label, num_classes).float(), "has_dist": torch.ones(n, dtype=torch.bool),
            "valence": torch.rand(n, generator=g) * 2 - 1, "arousal": torch.rand(n, generator=g) * 2 - 1,
            "has_va": torch.ones(n, dtype=torch.bool)}


def timed_epoch(model, batches, optimizer, objective, precision, device) -> float:
    """Images/s of one pass of core.train_one_epoch, the device synchronised at the end."""
    from pipelines import core

    start = time.perf_counter()
    stats = core.train_one_epoch(model, batches, optimizer, objective, precision)
    _sync(device)
    return stats["samples"] / (time.perf_counter() - start)


def synthetic(args, recipe, mode, device) -> dict:
    model, opt, objective, precision = build(recipe, mode, device)
    n = args.batch_size
    batch = {"image": torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8),
             **targets(n, len(recipe.classes))}
    start = time.perf_counter()
    timed_epoch(model, [batch] * 2, opt, objective, precision, device)   # warm-up (compilation)
    warm = time.perf_counter() - start
    with GpuUtil(device) as util:
        rate = timed_epoch(model, [batch] * args.steps, opt, objective, precision, device)
    return {RATE: rate, WARM: warm, UTIL: util.mean}


def _transform_chunk(payload) -> int:
    from datasets_io.prep import ImageTransform

    prep, chunk = payload
    return ImageTransform(prep, train=True, num_classes=8)({"image": np.array(chunk, dtype=object)})["image"].shape[0]


def decode_cpu(args, data: list[bytes], prep) -> dict:
    import multiprocessing as mp

    chunks = [(prep, data[i:i + args.batch_size]) for i in range(0, len(data), args.batch_size)]
    with mp.get_context("spawn").Pool(args.cpu_workers) as pool:
        pool.map(_transform_chunk, chunks[:args.cpu_workers])   # workers started and warm
        start = time.perf_counter()
        n = sum(pool.map(_transform_chunk, chunks))
    return {RATE: n / (time.perf_counter() - start)}


def decode_device(args, data: list[bytes], prep, device) -> dict:
    from datasets_io.prep import DeviceImagePipeline

    pipe = DeviceImagePipeline(prep, train=True, device=device, seed=0)
    ids = [f"i{i}" for i in range(len(data))]
    pipe(data[:args.batch_size], ids[:args.batch_size])
    _sync(device)
    with GpuUtil(device) as util:
        start = time.perf_counter()
        n = 0
        for i in range(0, len(data), args.batch_size):
            n += pipe(data[i:i + args.batch_size], ids[i:i + args.batch_size], epoch=1)[0].shape[0]
        _sync(device)
    return {RATE: n / (time.perf_counter() - start), UTIL: util.mean}


class _JpegSet(torch.utils.data.Dataset):
    """The JPEGs through plain torchvision: PIL decode, the recipe's RandomResizedCrop and flip, uint8 out."""

    def __init__(self, data, prep):
        from torchvision import transforms as T

        self.data = data
        self.t = T.Compose([T.RandomResizedCrop(prep.size, scale=prep.scale, ratio=prep.ratio,
                                                interpolation=T.InterpolationMode(prep.interpolation)),
                            T.RandomHorizontalFlip(prep.hflip), T.PILToTensor()])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(io.BytesIO(self.data[i])) as img:
            return self.t(img.convert("RGB")), i


def dataloader(args, data, recipe, mode, device) -> dict:
    model, opt, objective, precision = build(recipe, mode, device)
    loader = torch.utils.data.DataLoader(_JpegSet(data, recipe.prep), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.cpu_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.cpu_workers > 0)
    num_classes = len(recipe.classes)

    def batches():
        for images, idx in loader:
            yield {"image": images, **targets(len(idx), num_classes)}

    start = time.perf_counter()
    timed_epoch(model, batches(), opt, objective, precision, device)  # warm-up: workers, compilation
    warm = time.perf_counter() - start
    with GpuUtil(device) as util:
        rate = timed_epoch(model, batches(), opt, objective, precision, device)
    return {RATE: rate, WARM: warm, UTIL: util.mean}


def demo_fi(args):
    """The embedded demo's FI-like set (8 classes), about ``--images`` images of ``--source-size`` px."""
    from datasets_io.layouts import demo_key
    from datasets_io.lexicon import Lexicon
    from pipelines import data

    path = data.demo_shards(images_per_class=max(args.images // 8, 4), image_size=args.source_size,
                            show_progress=False)[demo_key("categorical")]
    return data.Shards(data.check_shards(path, role="categorical", need_labels=True), Lexicon.builtin())


def ray_path(args, model_name, mode, decode, device, shards) -> dict:
    from pipelines.train_loop import RunOptions, StageData, run_stage

    recipe = recipe_for(args, model_name, shards.classes)
    options = {**recipe.model.options, "num_classes": len(shards.classes)}
    recipe = recipe.replace(epochs=args.ray_epochs, compile=mode == "compile", anchors=shards.anchors,
                            model=replace(recipe.model, options=options),
                            prep=replace(recipe.prep, decode=decode, max_side=shards.max_side or recipe.prep.max_side))
    sets = shards.datasets(recipe.prep, recipe.seed, splits=("train", "val"))
    with tempfile.TemporaryDirectory() as tmp, GpuUtil(device) as util:
        run = RunOptions(storage_path=tmp, num_workers=1, use_gpu=device.type == "cuda",
                         cpus_per_worker=1 if device.type == "cuda" else 0.5)
        outcome = run_stage(recipe, StageData({"train": sets["train"], "val": sets["val"]}), run, test=False)
    history = outcome.history
    return {RATE: steady([h["train_samples_per_s"] for h in history]),
            WARM: history[0]["epoch_seconds"] if history else float("nan"), UTIL: util.mean}


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
    add_repeats_arg(p)
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
          f"{args.source_size} px, {args.cpu_workers} CPU workers, torch {torch.__version__}, {args.repeats} round(s)")

    rows: list[tuple[str, str, str, str, str]] = []   # (row, what, model, mode, peer key or "" when skipped)
    peers = {}

    def add(row, what, peer=None, model="", mode=""):
        key = " ".join(p for p in (f"({row}) {what}", model, mode) if p)
        rows.append((row, what, model, mode, key if peer else ""))
        if peer:
            peers[key] = peer

    if "b" in args.paths:
        va_prep = recipe_for(args, "va", class_names("va")).prep
        for aug in ("basic", "randaugment"):
            prep = replace(va_prep, augment=aug)
            add("b", f"decode cpu ({aug}, {args.cpu_workers} proc)", lambda prep=prep: decode_cpu(args, data, prep))
            add("b", f"decode device ({aug})", lambda prep=prep: decode_device(args, data, prep, device))
    ray_ok, shards = "d" in args.paths, None
    if ray_ok:
        try:
            import ray  # noqa: F401
        except ImportError:
            ray_ok = False
            add("d", "ray train: skipped (no ray)")
    for model_name in args.models:
        label = f"va/{args.backbone}" if model_name == "va" else "lora_v"
        recipe = recipe_for(args, model_name, class_names(model_name))
        for mode in args.modes:
            if "a" in args.paths:
                add("a", "synthetic", lambda r=recipe, m=mode: synthetic(args, r, m, device), label, mode)
            if "c" in args.paths:
                add("c", f"dataloader ({args.cpu_workers} workers)",
                    lambda r=recipe, m=mode: dataloader(args, data, r, m, device), label, mode)
            if ray_ok:
                shards = shards or demo_fi(args)
                for decode in ("cpu", "device"):
                    add("d", f"ray train (--decode {decode})",
                        lambda n=model_name, m=mode, d=decode, s=shards: ray_path(args, n, m, d, device, s),
                        label, mode)
    results = interleave(peers, args.repeats, UNITS)

    header = ["", "what", "model", "mode", "images/s, median (min–max, n)",
              "warm-up (a, c: 2 steps / 1 pass; d: epoch 1)", "GPU util"]
    table = []
    for row, what, model, mode, key in rows:
        figures = results.get(key, {})
        table.append([row, what, model, mode, *(str(figures[f]) if f in figures else "" for f in (RATE, WARM, UTIL))])
    print_table(header, table)


if __name__ == "__main__":
    main()
