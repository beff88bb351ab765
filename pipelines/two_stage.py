"""Dimensional emotion (valence, arousal) from categorical data, in one or two stages, on Ray Train.

Stage one trains a CNN to predict VA on a categorical set (FI, Flickr, Instagram, FlickrLDL,
TwitterLDL), each category mapped to VA through the NRC-VAD lexicon; stage two starts from stage
one's *best* checkpoint, freezes the early layers and fine-tunes on a small dimensional set
(Emotion6). Four frameworks: ``--task {single,multi}`` x ``--mode {one_stage,two_stage}``.

With no arguments it runs the embedded demo end to end on CPU::

    python pipelines/two_stage.py

On a cluster::

    ray job submit --working-dir . -- python pipelines/two_stage.py --dataname /mnt/shared/data/FI \\
        --dimensional /mnt/shared/data/Emotion6 --num-workers 8 --use-gpu
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the project importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import cli  # noqa: E402

# The paper's settings, used for real data.
PAPER_DEFAULTS = dict(mode="two_stage", task="single", lr=1e-5, decay=1e-5, batch_size=10, early_stop=5,
                      num_epochs=100, stage2_epochs=None, backbone="resnet101", image_size=448, optimizer="adam",
                      warmup_epochs=0)
# The embedded demo: a small backbone trained from scratch on 64 px images, so it fits a 2-core CPU.
DEMO_DEFAULTS = dict(mode="two_stage", task="single", lr=2e-3, decay=1e-4, batch_size=32, early_stop=4,
                     num_epochs=6, stage2_epochs=8, backbone="resnet10t", image_size=64, optimizer="adamw",
                     warmup_epochs=0)
DEMO_DATA = dict(images_per_class=60, image_size=64, seed=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="two_stage.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_config_arg(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataname", default=None,
                   help="FI, Flickr, Instagram, FlickrLDL, TwitterLDL, or a dataset folder "
                        "(raw or ingested); default: the embedded demo")
    d.add_argument("--data-root", default=None, help="raw folder of --dataname when it is not ingested yet")
    d.add_argument("--dimensional", default=None,
                   help="the dimensional set: Emotion6 raw folder or ingested shards (default: demo's)")
    d.add_argument("--lexicon", default=None, help="a full NRC-VAD lexicon file for other category names")
    d.add_argument("--max-side", type=int, default=512, help="longer side of images stored at ingest")
    d.add_argument("--demo-images-per-class", type=int, default=DEMO_DATA["images_per_class"],
                   help="size of the generated demo sets (demo only)")
    d.add_argument("--demo-image-size", type=int, default=DEMO_DATA["image_size"],
                   help="side of the generated demo images (demo only)")
    t = p.add_argument_group("training (defaults: the paper's for real data, small presets for the demo)")
    t.add_argument("--mode", choices=["one_stage", "two_stage"], default=None)
    t.add_argument("--task", choices=["single", "multi"], default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--decay", type=float, default=None, help="weight decay")
    t.add_argument("--batch-size", type=int, default=None, help="per worker")
    t.add_argument("--early-stop", type=int, default=None, help="patience in epochs (0: off)")
    t.add_argument("--num-epochs", type=int, default=None)
    t.add_argument("--stage2-epochs", type=int, default=None, help="epochs of stage two (default: --num-epochs)")
    t.add_argument("--stage2-lr", type=float, default=None, help="learning rate of stage two (default: --lr)")
    t.add_argument("--stage2-decay", type=float, default=None, help="weight decay of stage two (default: --decay)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--backbone", default=None, help="any timm model name")
    t.add_argument("--image-size", type=int, default=None)
    t.add_argument("--weights", default=None, help="local pretrained backbone weights (timm/torchvision state dict)")
    t.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None)
    t.add_argument("--warmup-epochs", type=int, default=None)
    t.add_argument("--alpha", type=float, default=0.5, help="category weight of the multi-task loss, stage one")
    t.add_argument("--alpha2", type=float, default=0.9, help="category weight of the multi-task loss, stage two")
    t.add_argument("--va-loss", choices=["mse", "ccc", "mse+ccc"], default="mse")
    t.add_argument("--freeze-until", default="all_but_last",
                   help="stage two freezes up to this stage: all_but_last, a stage name (layer3) or a count")
    cli.add_ray_args(p)
    cli.add_mlflow_args(p)
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # tests: "stage:epoch:step:rank:marker"
    return p


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.demo = args.dataname is None
    for key, value in (DEMO_DEFAULTS if args.demo else PAPER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for stage2_key, key in (("stage2_epochs", "num_epochs"), ("stage2_lr", "lr"), ("stage2_decay", "decay")):
        if getattr(args, stage2_key) is None:
            setattr(args, stage2_key, getattr(args, key))
    if not args.demo:
        from pipelines.data import check_dataname

        check_dataname(args.dataname, "--dataname")
    if not args.demo and args.mode == "two_stage" and args.dimensional is None:
        raise cli.UsageError("--mode two_stage with real data needs --dimensional (the Emotion6 folder or shards)")
    for key in ("lr", "stage2_lr", "batch_size", "num_epochs", "stage2_epochs", "image_size"):
        if getattr(args, key) <= 0:
            raise cli.UsageError(f"--{key.replace('_', '-')} must be positive, not {getattr(args, key)}")
    if not 0.0 <= args.alpha <= 1.0 or not 0.0 <= args.alpha2 <= 1.0:
        raise cli.UsageError("--alpha and --alpha2 must lie in [0, 1]")
    return args


def _fault(args, stage: str):
    if not args.fault:
        return None
    name, epoch, step, rank, marker = args.fault.split(":", 4)
    return {"epoch": int(epoch), "step": int(step), "rank": int(rank), "marker": marker} if name == stage else None


def stage_spec(args, *, name: str, head_classes: list[str], classes: list[str], objective: dict, epochs: int,
               lr: float, decay: float, monitor: str, init_from=None, freeze_until=None, mix=False) -> dict:
    """The spec of one stage (see :mod:`pipelines.specs`)."""
    return {
        "name": name,
        "model": {"name": "va", "backbone": args.backbone, "task": args.task, "num_classes": len(head_classes),
                  "bounded": True, **({"weights": args.weights} if args.weights and init_from is None else {})},
        "objective": objective,
        "init_from": init_from,
        "freeze_until": freeze_until,
        "optimizer": {"name": args.optimizer, "lr": lr, "weight_decay": decay},
        "scheduler": {"name": "cosine", "warmup_epochs": args.warmup_epochs},
        "epochs": epochs,
        "early_stop": args.early_stop,
        "monitor": monitor,
        "monitor_mode": "max",
        "batch_size": args.batch_size,
        "seed": args.seed,
        "classes": classes,
        "head_classes": head_classes,
        "image_size": args.image_size,
        "mix_categorical": mix,
        "fault": _fault(args, name),
    }


def va_objective(task: str, alpha: float, va_loss: str, classes: list[str], anchors, accuracy_from: str) -> dict:
    return {"kind": "va", "task": task, "alpha": alpha, "va_loss": va_loss, "num_classes": len(classes),
            "anchors": anchors, "accuracy_from": accuracy_from}


@dataclass
class Plan:
    """Everything resolved before training starts: data, classes, anchors, datasets."""

    args: argparse.Namespace
    dataname: str
    classes: list
    anchors: list
    manifests: dict
    cat_sets: dict
    dim_classes: Optional[list] = None
    dim_anchors: Optional[list] = None
    dim_sets: Optional[dict] = None


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve, ingest and check the data, then build the Ray Datasets; raises before any training."""
    from datasets_io.lexicon import Lexicon
    from pipelines import data

    lexicon = Lexicon.from_file(args.lexicon) if args.lexicon else Lexicon.builtin()
    if args.demo:
        print("no --dataname: running the embedded demo (generated once, then cached)")
        shards = data.demo_shards(images_per_class=args.demo_images_per_class, image_size=args.demo_image_size,
                                  seed=DEMO_DATA["seed"])
        cat_path, dim_path, dataname = shards["fi"], shards["emotion6"], "demo-FI"
    else:
        cat_path = data.resolve_shards(args.dataname, data_root=args.data_root, max_side=args.max_side,
                                       lexicon=args.lexicon, seed=args.seed)
        dim_path = data.resolve_shards(args.dimensional, max_side=args.max_side, seed=args.seed) \
            if args.dimensional else None
        dataname = args.dataname if "/" not in args.dataname else Path(args.dataname).name
    cat_manifest = data.check_shards(cat_path, role="categorical", need_labels=True)
    classes = cat_manifest["classes"]
    lexicon.check(classes)
    plan = Plan(args=args, dataname=dataname, classes=classes, anchors=lexicon.va_many(classes).tolist(),
                manifests={"categorical": cat_manifest},
                cat_sets=data.training_datasets(cat_path, image_size=args.image_size, num_classes=len(classes),
                                                seed=args.seed, splits=("train", "val", "test")))
    if dim_path is not None:
        dim_manifest = data.check_shards(dim_path, role="dimensional", need_va=True)
        plan.manifests["dimensional"] = dim_manifest
        plan.dim_classes = dim_manifest["classes"]
        plan.dim_anchors = lexicon.va_many(plan.dim_classes).tolist()
        plan.dim_sets = data.training_datasets(dim_path, image_size=args.image_size,
                                               num_classes=len(plan.dim_classes), seed=args.seed,
                                               splits=("train", "val", "test"))
    return plan


def _dimensional_objective(plan: Plan) -> dict:
    a = plan.args
    return va_objective(a.task, a.alpha2, a.va_loss, plan.dim_classes, plan.dim_anchors, "anchors")


def stage1(plan: Plan) -> tuple[dict, dict, dict]:
    """Stage one: VA (and categories, multi) on the categorical set. Returns (spec, datasets, tests)."""
    a = plan.args
    spec = stage_spec(a, name="stage1", head_classes=plan.classes, classes=plan.classes, epochs=a.num_epochs,
                      lr=a.lr, decay=a.decay,
                      monitor="pearson_mean" if a.task == "single" else "accuracy",
                      objective=va_objective(a.task, a.alpha, a.va_loss, plan.classes, plan.anchors,
                                             "anchors" if a.task == "single" else "logits"))
    tests = {"test_categorical": (plan.cat_sets["test"], None)}
    if a.mode == "one_stage" and plan.dim_sets is not None:
        # One-stage models are scored on the dimensional test split too (VA learned from categories only).
        tests["test"] = (plan.dim_sets["test"], {"objective": _dimensional_objective(plan),
                                                 "classes": plan.dim_classes})
    return spec, {"train": plan.cat_sets["train"], "val": plan.cat_sets["val"]}, tests


def stage2(plan: Plan, init_from: str) -> tuple[dict, dict, dict]:
    """Stage two: from ``init_from`` (stage one's best checkpoint), early layers frozen, on the
    dimensional set; multi-task mixes the categorical stream into every batch."""
    from pipelines.train_loop import MIX_KEY

    a = plan.args
    spec = stage_spec(a, name="stage2", head_classes=plan.classes, classes=plan.dim_classes,
                      epochs=a.stage2_epochs, lr=a.stage2_lr, decay=a.stage2_decay, monitor="pearson_mean",
                      init_from=init_from,
                      freeze_until=a.freeze_until, mix=a.task == "multi", objective=_dimensional_objective(plan))
    datasets = {"train": plan.dim_sets["train"], "val": plan.dim_sets["val"]}
    if a.task == "multi":
        datasets[MIX_KEY] = plan.cat_sets["train"]
    return spec, datasets, {"test": (plan.dim_sets["test"], None)}


def main(argv=None) -> int:
    args = apply_defaults(cli.parse_args(build_parser(), argv))
    from pipelines.runner import PipelineRun

    plan = make_plan(args)
    pipeline = PipelineRun.from_args(args, pipeline="two_stage", run_name_prefix=f"two_stage-{args.mode}-{args.task}",
                                     tags={"mode": args.mode, "task": args.task, "dataname": plan.dataname,
                                           "demo": str(args.demo)})
    spec, datasets, tests = stage1(plan)
    s1 = final = pipeline.stage(spec, datasets, manifests=plan.manifests, classes=plan.classes, tests=tests)
    if args.mode == "two_stage":
        spec, datasets, tests = stage2(plan, s1["outcome"]["best_checkpoint"])
        final = pipeline.stage(spec, datasets, manifests=plan.manifests, classes=plan.dim_classes, tests=tests)

    # The dimensional test metrics, the categorical accuracy, and where everything is.
    test = final["tests"].get("test", {})
    result = {f"test_{k}": test.get(k) for k in ("pearson_v", "pearson_a", "ccc_v", "ccc_a", "mse",
                                                    "spearman_v", "spearman_a", "accuracy")}
    result["test_categorical_accuracy"] = s1["tests"]["test_categorical"].get("accuracy")
    result.update(pipeline="two_stage", mode=args.mode, task=args.task, dataname=plan.dataname,
                  best_checkpoints={n: st["outcome"]["best_checkpoint"] for n, st in pipeline.state["stages"].items()})
    path = pipeline.finish(result)
    pipeline.print_summary(result, path, f"two_stage {args.mode} / {args.task} on {plan.dataname}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
