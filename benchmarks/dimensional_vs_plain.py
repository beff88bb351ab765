"""Does the project's dimensional baseline reach what a plain PyTorch loop reaches, on valence and arousal?

    PYTHONPATH=$PWD python benchmarks/dimensional_vs_plain.py                       # the demo, from scratch
    PYTHONPATH=$PWD python benchmarks/dimensional_vs_plain.py --dimensional ../shared/data/emotion6-sample
    PYTHONPATH=$PWD python benchmarks/dimensional_vs_plain.py --dimensional /data/Emotion6 --weights hub \\
        --backbone resnet101 --image-size 448 --epochs 20 --batch-size 32 --repeats 3

Measures the test-split Pearson correlation of valence and of arousal (unitless, -1..1) of the model
each peer selects, and each run's wall time in seconds, on one dimensional set (an Emotion6 raw
folder, ingested once into ``<EMOTION_RAY_HOME>/data`` as the pipeline would, or ingested shards;
default: the embedded demo's Emotion6-like shards, ``pipelines.data.demo_shards()``). Two peers
with the same backbone, weights, image size, epochs, optimiser and global batch:

(A) the project: ``python pipelines/two_stage.py --mode dimensional --dimensional <shards> --recipe
    default`` with ``--backbone --weights --image-size --num-epochs --batch-size [--lr] [--decay]
    --num-workers --seed`` (``--use-gpu`` when given), in a subprocess with its own ``--storage-path``
    and ``--mlflow-uri`` in a temporary folder; its figures are ``test_pearson_v`` and
    ``test_pearson_a`` of its ``result.json``.
(B) a plain PyTorch loop in this process, with no project training code: a ``torch.utils.data.Dataset``
    over the same shards' ``train`` / ``val`` / ``test`` Parquet files (pyarrow; columns ``image``,
    ``valence``, ``arousal``), torchvision transforms (training: ``RandomResizedCrop(size, scale, ratio,
    interpolation)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize(mean, std)``; evaluation:
    ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)``), ``timm.create_model(backbone,
    pretrained=..., num_classes=0)`` + ``nn.Linear(features, 2)`` + ``tanh``, the recipe's optimiser
    (Adam, its lr and weight decay) and a per-epoch cosine to ``min_lr_ratio x lr``
    (``CosineAnnealingLR``), ``va_scale x nn.MSELoss()``, the global batch in one process
    (``drop_last``), validation mean Pearson every epoch (the recipe's patience), the best epoch's
    weights tested.

B's numbers are read from the recipe A trains with: ``Recipe.load("two_stage", "default")`` with
the same flags' overrides, its ``dimensional`` stage, ``prep.resolve(data_config(backbone))``; reading
the recipe is all B takes from the project (it stops with one line when the recipe asks for something
it does not implement: a freeze, another head, loss, schedule or selection rule). What still differs,
by design: A runs DDP over ``--num-workers`` (BatchNorm statistics per worker, each worker's half of the
global batch), shuffles through Ray Data, decodes evaluation images at a reduced JPEG scale when the
shards were stored smaller (``ImagePrep.max_side``), and draws other random numbers.

``--repeats N`` runs N rounds, A then B in each (A, B, A, B, ...), round r with seed ``--seed + r - 1``
for both, and prints every figure as ``median (min–max, n=N)``, plus the paired difference A - B.
The ingested split is the same in every round. On a few dozen images (the demo, or the 48 images of
``../shared/data/emotion6-sample``) the figures are noise; only the full Emotion6 (1,980 images) with
pretrained weights answers the question.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from repeats import WALL, add_repeats_arg, interleave, paired, print_table

REPO = Path(__file__).resolve().parents[1]
V, A = "test Pearson V", "test Pearson A"
UNITS = {V: ("", 3), A: ("", 3)}
PROJECT, PLAIN = "(A) project: two_stage.py --mode dimensional", "(B) plain PyTorch loop"


# ----------------------------------------------------------------------------- shared settings

def recipe_flags(args, seed: Optional[int]) -> list[str]:
    """The flags both peers share, as ``pipelines/two_stage.py`` takes them (``seed`` None: the recipe's)."""
    flags = ["--recipe", "default", "--backbone", args.backbone, "--weights", args.weights, "--image-size",
             str(args.image_size), "--num-epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    flags += ["--lr", str(args.lr)] if args.lr is not None else []
    flags += ["--decay", str(args.decay)] if args.decay is not None else []
    return flags + (["--seed", str(seed)] if seed is not None else [])


def stage_recipe(args, seed: Optional[int]):
    """The dimensional stage's recipe as A resolves it from the same flags (read here for its numbers)."""
    from emotion_models.va import data_config
    from pipelines import cli, two_stage
    from pipelines.recipe import flag_overrides

    flags = cli.parse_args(two_stage.build_parser(), recipe_flags(args, seed))
    recipe = two_stage.TWO_STAGE.load_recipe("default").with_overrides(flag_overrides(flags, two_stage.FLAGS))
    stage = recipe.stage("dimensional")
    return stage.replace(prep=stage.prep.resolve(data_config(stage.model.backbone)))


def not_plain(recipe, layout: str) -> list[str]:
    """What the recipe asks for that the plain loop does not implement (empty: B trains what A trains)."""
    prep, opt, sched, sel, loss, model = (recipe.prep, recipe.optimizer, recipe.schedule, recipe.select,
                                          recipe.loss, recipe.model)
    selection = (sel.metric, sel.mode, sel.keep, sel.floor, sel.stop)
    checks = {
        f"model {model.name} with head {model.head}": (model.name, model.head) == ("va", "tanh"),
        f"freeze {recipe.freeze}": recipe.freeze in (None, "none"),
        f"loss {loss.kind}/{loss.va_loss}": (loss.kind, loss.va_loss) == ("va", "mse"),
        f"optimizer {opt.name} (decay_exempt {opt.decay_exempt})": opt.name in ("adam", "adamw")
        and opt.decay_exempt == "none",
        f"schedule {sched.name} (warm-up {sched.warmup_epochs})": sched.name == "cosine_after_warmup"
        and not sched.warmup_epochs,
        f"selection {selection}": selection == ("pearson_mean", "max", "best", None, "patience_reached"),
        f"augment {prep.augment} x{prep.repeated_aug}": prep.augment == "basic" and prep.repeated_aug == 1,
        f"validation augmented ({layout} in val_augment)": layout not in prep.val_augment,
        f"grad_clip {recipe.grad_clip}": not recipe.grad_clip,
    }
    return [what for what, ok in checks.items() if not ok]


def resolve_shards(args, recipe) -> str:
    """The ingested shards of ``--dimensional`` (a raw folder is ingested once, as the pipeline would)."""
    from datasets_io.layouts import demo_key
    from pipelines import data

    if args.dimensional is None:
        return str(data.demo_shards(show_progress=False)[demo_key("dimensional")])
    path = data.resolve_shards(args.dimensional, max_side=recipe.prep.max_side, seed=args.seed,
                               reader_options={"keep_duplicates": recipe.data.keep_duplicates}, show_progress=False)
    return str(path)


# ----------------------------------------------------------------------------- (A) the project

def project_run(args, shards: str, seed: int) -> dict:
    """One ``two_stage.py --mode dimensional`` run in a subprocess; its test Pearson V and A."""
    with tempfile.TemporaryDirectory(prefix="dvp-") as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        log = Path(tmp, "two_stage.log")
        with open(log, "w") as out:
            command = [sys.executable, str(REPO / "pipelines" / "two_stage.py"), "--mode", "dimensional",
                       "--dimensional", shards, *recipe_flags(args, seed), "--num-workers", str(args.num_workers),
                       *(["--use-gpu"] if args.use_gpu else []), "--storage-path", os.path.join(tmp, "runs"),
                       "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db", "--run-name", "bench"]
            rc = subprocess.call(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        if rc:
            tail = log.read_text().splitlines()[-25:]
            raise RuntimeError(f"two_stage.py exited with {rc}; the last lines of its output:\n" + "\n".join(tail))
        result = json.loads(Path(tmp, "runs", "bench", "result.json").read_text())
    return {V: result["test_pearson_v"], A: result["test_pearson_a"]}


# ----------------------------------------------------------------------------- (B) the plain loop

class VASplit(torch.utils.data.Dataset):
    """One split of ingested shards: its Parquet files read with pyarrow, images decoded with PIL,
    targets ``(valence, arousal)`` on [-1, 1] (rows without both are left out)."""

    def __init__(self, shards: str, split: str, transform):
        import pyarrow.parquet as pq

        self.images, targets = [], []
        for path in sorted(Path(shards, split).glob("*.parquet")):
            rows = pq.read_table(path, columns=["image", "valence", "arousal"]).to_pydict()
            for image, v, a in zip(rows["image"], rows["valence"], rows["arousal"]):
                if image is not None and v is not None and a is not None:
                    self.images.append(image)
                    targets.append((v, a))
        self.targets = torch.tensor(targets, dtype=torch.float32).reshape(-1, 2)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(io.BytesIO(self.images[i])) as img:
            return self.transform(img.convert("RGB")), self.targets[i]


def transforms(prep, train: bool):
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(prep.interpolation)
    if train:
        geometry = [T.RandomResizedCrop(prep.size, scale=prep.scale, ratio=prep.ratio, interpolation=interpolation),
                    T.RandomHorizontalFlip(prep.hflip)]
    else:
        geometry = [T.Resize(math.floor(prep.size / prep.crop_pct), interpolation=interpolation),
                    T.CenterCrop(prep.size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(prep.mean, prep.std)])


class PlainVA(nn.Module):
    """A timm backbone (pooled features) and a linear VA head squashed by tanh onto [-1, 1]."""

    def __init__(self, backbone: str, weights: str):
        import timm

        super().__init__()
        file = {} if weights in ("none", "hub") else {"pretrained_cfg_overlay": {"file": weights}}
        self.backbone = timm.create_model(backbone, pretrained=weights != "none", num_classes=0, **file)
        self.head = nn.Linear(self.backbone.num_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.backbone(x)))


def pearson(model: nn.Module, loader, device: torch.device, autocast) -> tuple[float, float]:
    """Pearson correlation of predicted and true valence, then arousal, over a split (NaN if constant)."""
    model.eval()
    preds, trues = [], []
    with torch.no_grad(), autocast():
        for images, va in loader:
            preds.append(model(images.to(device)).float().cpu())
            trues.append(va)
    pred, true = torch.cat(preds).numpy(), torch.cat(trues).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return tuple(float(np.corrcoef(pred[:, k], true[:, k])[0, 1]) for k in (0, 1))


def plain_run(recipe, shards: str, seed: int, device: torch.device, loader_workers: int) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    prep, opt_spec = recipe.prep, recipe.optimizer
    train_set = VASplit(shards, "train", transforms(prep, train=True))
    if len(train_set) < recipe.batch_size:
        raise ValueError(f"{len(train_set)} training images: fewer than one global batch of {recipe.batch_size}")
    loader = dict(num_workers=loader_workers, pin_memory=device.type == "cuda")
    train = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                                        generator=torch.Generator().manual_seed(seed), **loader)
    val, test = (torch.utils.data.DataLoader(VASplit(shards, split, transforms(prep, train=False)),
                                             batch_size=recipe.batch_size, **loader) for split in ("val", "test"))
    model = PlainVA(recipe.model.backbone, recipe.model.weights).to(device)
    lr = opt_spec.effective_lr(recipe.batch_size)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt_spec.name](
        model.parameters(), lr=lr, weight_decay=opt_spec.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs,
                                                          eta_min=recipe.schedule.min_lr_ratio * lr)
    mse = nn.MSELoss()
    bf16 = device.type == "cuda" and recipe.precision in ("auto", "bf16")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)

    best, best_state, bad = None, None, 0
    for epoch in range(recipe.epochs):
        model.train()
        for images, va in train:
            with autocast():
                out = model(images.to(device))
            loss = recipe.loss.va_scale * mse(out.float(), va.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        score = sum(pearson(model, val, device, autocast)) / 2
        improved = not math.isnan(score) and (best is None or score > best)
        if improved:
            best, best_state, bad = score, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
        print(f"    plain epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.4f}, val mean Pearson {score:.4f}"
              f"{' *' if improved else ''}", flush=True)
        if recipe.select.patience and bad >= recipe.select.patience:
            break
    if best_state is not None:   # never improved (NaN throughout): the last epoch's model, as the project keeps
        model.load_state_dict(best_state)
    v, a = pearson(model, test, device, autocast)
    return {V: v, A: a}


# ----------------------------------------------------------------------------- the comparison

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dimensional", default=None,
                   help="an Emotion6 raw folder or ingested shards (default: the embedded demo's Emotion6-like shards)")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--weights", default="none", help="none (from scratch), hub (timm's pretrained weights), or a "
                                                     "local weights file (timm's format for the plain loop)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch (A divides it among --num-workers)")
    p.add_argument("--lr", type=float, default=None, help="default: the default recipe's")
    p.add_argument("--decay", type=float, default=None, help="weight decay; default: the default recipe's")
    p.add_argument("--num-workers", type=int, default=2, help="A's Ray Train workers (B: one process)")
    p.add_argument("--use-gpu", action="store_true", help="A's workers take a GPU each; B runs on cuda")
    p.add_argument("--loader-workers", type=int, default=0, help="B's DataLoader worker processes")
    p.add_argument("--seed", type=int, default=None, help="round r's seed is this + r - 1 (default: the recipe's)")
    add_repeats_arg(p)
    args = p.parse_args(argv)

    recipe = stage_recipe(args, args.seed)
    args.seed = recipe.seed
    shards = resolve_shards(args, recipe)
    import ray

    if ray.is_initialized():   # started by an ingest here: A starts its own
        ray.shutdown()
    manifest = json.loads(Path(shards, "manifest.json").read_text())
    missing = not_plain(recipe, manifest.get("layout", ""))
    if missing:
        sys.exit(f"the plain loop does not implement the recipe's {'; '.join(missing)}")
    counts = manifest.get("counts", {})
    device = torch.device("cuda" if args.use_gpu else "cpu")
    prep, opt = recipe.prep, recipe.optimizer
    print(f"data {shards} ({', '.join(f'{k} {v}' for k, v in counts.items())} images); {recipe.model.backbone}, "
          f"weights {recipe.model.weights}, {prep.size} px (crop scale {list(prep.scale)}, {prep.interpolation}, "
          f"crop_pct {prep.crop_pct}), {recipe.epochs} epochs, global batch {recipe.batch_size}, {opt.name} lr "
          f"{opt.effective_lr(recipe.batch_size):g} decay {opt.weight_decay:g}, cosine per epoch, MSE x "
          f"{recipe.loss.va_scale:g}, patience {recipe.select.patience}; A on {args.num_workers} Ray workers, "
          f"B in one process on {device}; {args.repeats} round(s), seeds {args.seed}..{args.seed + args.repeats - 1}")
    seeds = {peer: iter(range(args.seed, args.seed + args.repeats)) for peer in (PROJECT, PLAIN)}  # run k: seed + k - 1

    def plain():
        seed = next(seeds[PLAIN])
        return plain_run(stage_recipe(args, seed), shards, seed, device, args.loader_workers)

    results = interleave({PROJECT: lambda: project_run(args, shards, next(seeds[PROJECT])), PLAIN: plain},
                         args.repeats, UNITS)
    a, b = results[PROJECT], results[PLAIN]
    difference = [paired(a[k], b[k], lambda x, y: x - y, digits=3) for k in (V, A)]
    print_table(["peer", V, A, WALL], [[PROJECT, a[V], a[A], a[WALL]], [PLAIN, b[V], b[A], b[WALL]],
                                        ["difference A - B", *difference, ""]],
                title="test-split Pearson correlation of the selected model (unitless, -1..1), "
                      "median (min–max, n=rounds)")


if __name__ == "__main__":
    main()
