"""Sticker emotion (SER30K, 7 classes) with LORA (vision + text) or LORA-V (vision only), on Ray Train.

Same training core, Ray glue, MLflow logger and CLI skeleton as ``pipelines/two_stage.py``; this
file adds only what differs: the model, the loss (label-smoothed cross-entropy), the original
recipe (AdamW, lr scaled by total batch / 512, cosine with warm-up, RandAugment) and the sticker
text, tokenised inside the Ray Data pipeline.

    python pipelines/sticker.py                                   # embedded demo, LORA, 2 CPU workers
    python pipelines/sticker.py --data-root SER_Dataset --use-gpu --num-workers 8
    python pipelines/sticker.py --eval --checkpoint RUN_OR_CKPT    # score a checkpoint on the test split
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import cli  # noqa: E402

# The original recipe, for real data.
PAPER_DEFAULTS = dict(image_size=448, batch_size=16, num_epochs=50, lr=None, decay=0.05, warmup_epochs=5,
                      embed_dims=None, depths=None, num_heads=None, fusion_dim=256, early_stop=0)
# The embedded demo: a narrow, shallow PVT at 64 px so that it trains on a 2-core CPU in minutes.
DEMO_DEFAULTS = dict(image_size=64, batch_size=32, num_epochs=12, lr=2e-3, decay=0.05, warmup_epochs=1,
                     embed_dims=[24, 48, 96, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 4], fusion_dim=96,
                     early_stop=0)
DEMO_DATA = dict(images_per_class=60, image_size=64, seed=0)


class TokenizeText:
    """Ray Data batch step: the sticker text column becomes ``text_ids`` / ``text_mask`` arrays
    (the byte tokenizer, or a local BERT's, matching ``--text-encoder``). LORA-V drops the text."""

    def __init__(self, encoder: str | None, max_len: int):
        self.encoder, self.max_len = encoder, max_len
        self._tokenizer = None  # built on first use in the Ray task, once, not per batch (BERT's loads files)

    def __call__(self, batch: dict) -> dict:
        from emotion_models.text import make_tokenizer

        batch = dict(batch)
        texts = [str(t) if t is not None else "" for t in batch.pop("text")]
        if self._tokenizer is None and self.encoder is not None:
            self._tokenizer = make_tokenizer(self.encoder, self.max_len)
        if self._tokenizer is not None:
            batch["text_ids"], batch["text_mask"] = self._tokenizer(texts)
        return batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sticker.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_config_arg(p)
    d = p.add_argument_group("data")
    d.add_argument("--data-root", default=None,
                   help="SER30K folder (the real layout) or its ingested shards; default: the embedded demo")
    d.add_argument("--max-side", type=int, default=512)
    d.add_argument("--demo-images-per-class", type=int, default=DEMO_DATA["images_per_class"])
    d.add_argument("--demo-image-size", type=int, default=DEMO_DATA["image_size"])
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=["lora", "lora_v"], default="lora")
    m.add_argument("--alpha", type=int, default=8, help="local tokens per head = alpha x sr^2")
    m.add_argument("--locals", type=int, nargs=4, default=[1, 1, 1, 0], help="stages with local re-attention")
    m.add_argument("--text-encoder", default="bytes", help="bytes | bert:PATH (a local BERT folder)")
    m.add_argument("--max-text-len", type=int, default=32)
    m.add_argument("--weights", default=None, help="local PVT-v2 (pvt_v2_b2) weights for the visual trunk")
    m.add_argument("--embed-dims", type=int, nargs=4, default=None, help="PVT widths (default pvt_v2_b2's)")
    m.add_argument("--depths", type=int, nargs=4, default=None, help="PVT depths (default pvt_v2_b2's)")
    m.add_argument("--num-heads", type=int, nargs=4, default=None,
                   help="attention heads per stage, each dividing its width (default pvt_v2_b2's 1 2 5 8)")
    m.add_argument("--fusion-dim", type=int, default=None)
    t = p.add_argument_group("training (defaults: the original recipe for real data, small presets for the demo)")
    t.add_argument("--image-size", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None, help="per worker")
    t.add_argument("--num-epochs", type=int, default=None)
    t.add_argument("--lr", type=float, default=None, help="default 1e-3 x total batch / 512")
    t.add_argument("--decay", type=float, default=None, help="AdamW weight decay")
    t.add_argument("--warmup-epochs", type=int, default=None)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--early-stop", type=int, default=None, help="patience in epochs (0: off)")
    t.add_argument("--augment", choices=["randaugment", "basic", "none"], default="randaugment")
    t.add_argument("--seed", type=int, default=42)
    e = p.add_argument_group("evaluation only")
    e.add_argument("--eval", action="store_true", help="only score --checkpoint on the test split")
    e.add_argument("--checkpoint", default=None, help="checkpoint folder or run folder (with --eval)")
    cli.add_ray_args(p)
    cli.add_mlflow_args(p)
    return p


def apply_defaults(args):
    args.demo = args.data_root is None
    for key, value in (DEMO_DEFAULTS if args.demo else PAPER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:  # the original recipe: 1e-3 scaled by the total batch
        args.lr = 1e-3 * args.batch_size * args.num_workers / 512
    if args.eval and not args.checkpoint:
        raise cli.UsageError("--eval needs --checkpoint")
    if args.model == "lora_v":
        args.text_encoder = None
    return args


def sticker_spec(args, classes: list[str]) -> dict:
    model = {"name": args.model, "alpha": args.alpha, "locals": list(args.locals), "num_classes": len(classes),
             "img_size": args.image_size, "max_text_len": args.max_text_len, "fusion_dim": args.fusion_dim}
    if args.embed_dims:
        model["embed_dims"] = list(args.embed_dims)
    if args.depths:
        model["depths"] = list(args.depths)
    if args.num_heads:
        model["num_heads"] = list(args.num_heads)
    if args.model == "lora":
        model["text_encoder"] = args.text_encoder
    if args.weights:
        model["weights"] = args.weights
    return {
        "name": args.model,
        "model": model,
        "objective": {"kind": "classify", "num_classes": len(classes), "label_smoothing": args.label_smoothing,
                      "use_text": args.model == "lora"},
        "init_from": None,
        "freeze_until": None,
        "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": args.decay},
        "scheduler": {"name": "cosine", "warmup_epochs": args.warmup_epochs},
        "epochs": args.num_epochs,
        "early_stop": args.early_stop,
        "monitor": "accuracy",
        "monitor_mode": "max",
        "batch_size": args.batch_size,
        "seed": args.seed,
        "grad_clip": 5.0,
        "classes": classes,
        "image_size": args.image_size,
    }


def sticker_datasets(path, *, image_size: int, num_classes: int, seed: int, augment: str, max_text_len: int,
                     text_encoder: str | None, splits=("train", "val", "test")) -> dict:
    from pipelines import data

    sets = data.training_datasets(path, image_size=image_size, num_classes=num_classes, seed=seed, augment=augment,
                                  splits=splits, keep_text=True)
    return {k: ds.map_batches(TokenizeText(text_encoder, max_text_len), batch_format="numpy") for k, ds in sets.items()}


def classification_result(metrics: dict) -> dict:
    return {"test_acc": metrics.get("accuracy"), "test_macro_f1": metrics.get("macro_f1"),
            "test_per_class_acc": metrics.get("per_class_acc")}


def make_plan(args) -> dict:
    """Resolve, ingest and check the SER30K data; build its Ray Datasets. Raises before any training."""
    from pipelines import data

    if args.demo:
        print("no --data-root: running the embedded SER30K-like demo (generated once, then cached)")
        path = data.demo_shards(images_per_class=args.demo_images_per_class, image_size=args.demo_image_size,
                                seed=DEMO_DATA["seed"])["ser30k"]
    else:
        root = Path(args.data_root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such SER30K folder (--data-root)")
        path = data.resolve_shards(str(root), max_side=args.max_side, seed=args.seed)
    manifest = data.check_shards(path, role="sticker", need_labels=True)
    if manifest.get("layout") != "ser30k":
        raise ValueError(f"{path}: a sticker dataset must have the SER30K layout, not {manifest.get('layout')!r}")
    classes = manifest["classes"]
    datasets = sticker_datasets(path, image_size=args.image_size, num_classes=len(classes), seed=args.seed,
                                augment=args.augment, max_text_len=args.max_text_len, text_encoder=args.text_encoder,
                                splits=("test",) if args.eval else ("train", "val", "test"))
    return {"args": args, "manifest": manifest, "classes": classes, "datasets": datasets}


def sticker_stage(plan: dict) -> tuple[dict, dict, dict]:
    """(spec, datasets, tests) of the one training stage."""
    sets = plan["datasets"]
    return (sticker_spec(plan["args"], plan["classes"]), {"train": sets["train"], "val": sets["val"]},
            {"test": (sets["test"], None)})


def main(argv=None) -> int:
    args = apply_defaults(cli.parse_args(build_parser(), argv))
    from pipelines.runner import PipelineRun

    eval_ckpt = None
    if args.eval:  # score a checkpoint as it was trained: its size, text length and encoder
        from pipelines.predict import resolve_checkpoint
        from pipelines.specs import read_meta

        eval_ckpt = resolve_checkpoint(args.checkpoint)
        trained = read_meta(eval_ckpt)["spec"]
        args.image_size = trained["image_size"]
        args.max_text_len = trained["model"].get("max_text_len", args.max_text_len)
        args.text_encoder = trained["model"].get("text_encoder")
    plan = make_plan(args)
    if args.eval:
        return evaluate_only(args, eval_ckpt, plan["datasets"]["test"])

    pipeline = PipelineRun.from_args(args, pipeline="sticker", run_name_prefix=f"sticker-{args.model}",
                                     tags={"model": args.model, "dataname": "demo-SER30K" if args.demo else "SER30K",
                                           "demo": str(args.demo)})
    spec, datasets, tests = sticker_stage(plan)
    stage = pipeline.stage(spec, datasets, manifests={"ser30k": plan["manifest"]}, classes=plan["classes"],
                           tests=tests)
    result = {**classification_result(stage["tests"]["test"]), "pipeline": "sticker", "model": args.model,
              "classes": plan["classes"], "best_checkpoints": {args.model: stage["outcome"]["best_checkpoint"]}}
    path = pipeline.finish(result)
    pipeline.print_summary(result, path, f"sticker {args.model} on {'demo ' if args.demo else ''}SER30K")
    return 0


def evaluate_only(args, ckpt, test_dataset) -> int:
    """``--eval --checkpoint``: the checkpoint's own spec, scored on the test split, printed."""
    import json

    from pipelines.specs import read_meta
    from pipelines.train_loop import RunOptions, evaluate_checkpoint

    cli.init_ray(args.address)
    spec = read_meta(ckpt)["spec"]
    run = RunOptions(storage_path=str(cli.storage_root(args.storage_path) / "eval"), num_workers=args.num_workers,
                     use_gpu=args.use_gpu, cpus_per_worker=cli.cpus_per_worker(args))
    metrics = evaluate_checkpoint(spec, str(ckpt), test_dataset, run)["metrics"]
    result = classification_result(metrics)
    print(json.dumps({"checkpoint": str(ckpt), **{k: v for k, v in result.items()}}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
