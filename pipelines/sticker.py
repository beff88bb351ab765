"""Sticker emotion (SER30K, 7 classes) with LORA (vision + text) or LORA-V (vision only), on Ray Train.

Same training core, Ray glue, MLflow logger and CLI skeleton as ``pipelines/two_stage.py``; this
file adds only what differs: the model, the loss (label-smoothed cross-entropy) and the sticker text,
tokenised inside the Ray Data pipeline. How it trains is a recipe (``recipes/sticker/``):
``--recipe published`` is the released SER30K training (timm AdamW, lr scaled by the batch, DeiT's
cosine stepped one epoch late, fp16 with a GradScaler, RandAugment, repeated augmentation),
``default`` the project's corrections; without ``--data-root`` the embedded demo (``demo``).

    python pipelines/sticker.py                                   # embedded demo, LORA, 2 CPU workers
    python pipelines/sticker.py --data-root SER_Dataset --weights pvt_small.pth \\
        --text-encoder bert:BERT_DIR --use-gpu --num-workers 2
    python pipelines/sticker.py --eval --checkpoint RUN_OR_CKPT    # score a checkpoint on val and test
    python pipelines/sticker.py --eval --checkpoint checkpoint_v.pth --model lora_v --data-root SER_Dataset
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from pipelines import cli
from pipelines.recipe import EvalSet, Flag, Recipe, StageRecipe, add_flags, apply_overrides, flag_overrides
from pipelines.registry import Pipeline, SweepField
from pipelines.train_loop import TRAIN_KEY, RunOptions, StageData

DEMO_DATA = dict(images_per_class=60, image_size=64, seed=0)
OPTIONS = "stage.model.options"

FLAGS = (
    Flag("--model", ("stage.model.name",), "the registered model: lora (vision + text) or lora_v (vision only)"),
    Flag("--weights", ("stage.model.weights",), "a local file: the published pvt_small.pth (the trunk) or a LORA "
                                                "checkpoint.pth; none: train from scratch"),
    Flag("--local-tokens", (f"{OPTIONS}.alpha",), "local re-attention: tokens per head = this x sr^2 (the "
                                                  "published --alpha: 8)", ("--alpha",), type=int),
    Flag("--locals", (f"{OPTIONS}.locals",), "stages with local re-attention (1 1 1 0)", type=int, nargs=4),
    Flag("--text-encoder", (f"{OPTIONS}.text_encoder",), "bert:PATH (a local bert-base-uncased folder; required "
                                                         "for LORA on real data) | bytes (the demo's)", type=str),
    Flag("--max-text-len", (f"{OPTIONS}.max_text_len",), "text tokens (30 published)", type=int),
    Flag("--embed-dims", (f"{OPTIONS}.trunk.embed_dims",), "PVT widths (PVT-small's 64 128 320 512)", type=int, nargs=4),
    Flag("--depths", (f"{OPTIONS}.trunk.depths",), "PVT depths (3 4 6 3)", type=int, nargs=4),
    Flag("--num-heads", (f"{OPTIONS}.trunk.num_heads",), "attention heads per stage (1 2 5 8)", type=int, nargs=4),
    Flag("--fusion-dim", (f"{OPTIONS}.hidden_dim",), "fusion width (768)", type=int),
    Flag("--fuse-heads", (f"{OPTIONS}.fuse_heads",), "fusion attention heads (12)", type=int),
    Flag("--fuse-mlp-dim", (f"{OPTIONS}.fuse_mlp_dim",), "fusion MLP width (3072)", type=int),
    Flag("--drop-path", (f"{OPTIONS}.drop_path_rate",), "stochastic depth rate (0.1)", type=float),
    Flag("--drop", (f"{OPTIONS}.drop_rate",), "dropout rate (0)", type=float),
    Flag("--image-size", ("stage.prep.size",)),
    Flag("--max-side", ("stage.prep.max_side",), "longer side of the stored images at ingest (0: the originals)"),
    Flag("--batch-size", ("stage.batch_size",), "the global batch (published: 2 GPUs x 16 = 32), divided among "
                                                "--num-workers"),
    Flag("--num-epochs", ("stage.epochs",)),
    Flag("--lr", ("stage.optimizer.lr",), "the learning rate (default: --base-lr x batch / 512)",
         also={"stage.optimizer.base_lr": None}),
    Flag("--base-lr", ("stage.optimizer.base_lr",), "lr = this x global batch / 512 (published 1e-3)",
         also={"stage.optimizer.lr": None}),
    Flag("--decay", ("stage.optimizer.weight_decay",), "AdamW weight decay"),
    Flag("--decay-exempt", ("stage.optimizer.decay_exempt",), "parameters without weight decay"),
    Flag("--schedule", ("stage.schedule.name",)),
    Flag("--warmup-epochs", ("stage.schedule.warmup_epochs",)),
    Flag("--warmup-lr", ("stage.schedule.warmup_lr",), "lr of the first warm-up epoch"),
    Flag("--min-lr", ("stage.schedule.min_lr",), "lr at the end of the cosine"),
    Flag("--schedule-step", ("stage.schedule.step_arg",), "after epoch e the schedule steps to e + 1 (next_epoch) "
                                                          "or to e (finished_epoch: the published step(epoch))"),
    Flag("--label-smoothing", ("stage.loss.label_smoothing",)),
    Flag("--early-stop", ("stage.select.patience",), "patience in epochs (0: off)"),
    Flag("--augment", ("stage.prep.augment",)),
    Flag("--auto-augment", ("stage.prep.auto_augment",), "timm RandAugment policy (rand-m9-mstd0.5-inc1)"),
    Flag("--crop-scale", ("stage.prep.scale",), "RandomResizedCrop scale (0.08 1)"),
    Flag("--repeated-aug", ("stage.prep.repeated_aug",), "DeiT's repeated augmentation: copies per image (3; 1: off)"),
    Flag("--decode", ("stage.prep.decode",), cli.DECODE_HELP),
    Flag("--grad-clip", ("stage.grad_clip",), "gradient-norm clip (0: none, as published)"),
    Flag("--precision", ("stage.precision",), "fp16 (the published autocast + GradScaler), bf16, fp32, or auto"),
    Flag("--grad-scaler", ("stage.grad_scaler",), "fp16: one GradScaler for the run, or a new one every epoch "
                                                  "(published)"),
    Flag("--test-every-epoch", ("stage.test_every_epoch",), "score test every epoch to report the published "
                                                            "protocol's best test accuracy (never used to select)"),
    Flag("--keep-duplicates", ("stage.data.keep_duplicates",), "annotation entries listed twice trained on twice "
                                                               "(published)"),
    Flag("--seed", ("stage.seed",)),
    Flag("--compile", ("stage.compile",), cli.COMPILE_HELP),
    Flag("--deterministic", ("stage.deterministic",)),
)


class TokenizeText:
    """Ray Data batch step: the sticker text column becomes ``text_ids`` / ``text_mask`` arrays
    (the byte tokenizer, or a local BERT's, matching the model's text encoder). LORA-V drops the text."""

    def __init__(self, encoder: str | None, max_len: int):
        self.encoder, self.max_len = encoder, max_len
        self._tokenizer = None  # built on first use in the Ray task, once, not per batch (BERT's loads files)

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        texts = [str(t) if t is not None else "" for t in batch.pop("text")]
        if self._tokenizer is None and self.encoder is not None:
            from emotion_models.text import make_tokenizer

            self._tokenizer = make_tokenizer(self.encoder, self.max_len)
        if self._tokenizer is not None:
            batch["text_ids"], batch["text_mask"] = self._tokenizer(texts)
        return batch


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="sticker.py", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_config_arg(p)
    cli.add_recipe_arg(p, "sticker")
    d = p.add_argument_group("data")
    d.add_argument("--data-root", default=None,
                   help="SER30K folder (the real layout) or its ingested shards; default: the embedded demo")
    d.add_argument("--demo-images-per-class", type=int, default=DEMO_DATA["images_per_class"])
    d.add_argument("--demo-image-size", type=int, default=DEMO_DATA["image_size"])
    add_flags(p, FLAGS)
    e = p.add_argument_group("evaluation only")
    e.add_argument("--eval", action="store_true", help="only score --checkpoint on the val and test splits")
    e.add_argument("--checkpoint", default=None,
                   help="with --eval: a checkpoint or run folder of this project, or a published checkpoint.pth "
                        "(then --model, --text-encoder and --data-root say what it is and what to score)")
    cli.add_ray_args(p)
    cli.add_mlflow_args(p)
    return p


def published_args_overrides(checkpoint: str, given: dict) -> dict:
    """``--eval`` of a published ``checkpoint.pth``: alpha, locals and the image size from its saved
    ``args`` (an ``argparse.Namespace``) wherever the command line left them open."""
    from emotion_models.weights import read_checkpoint

    saved = read_checkpoint(Path(checkpoint).expanduser())
    saved = saved.get("args") if isinstance(saved, dict) else None
    if not isinstance(saved, argparse.Namespace):
        return {}
    taken = {}
    for path, theirs in ((f"{OPTIONS}.alpha", "alpha"), (f"{OPTIONS}.locals", "locals"),
                         ("stage.prep.size", "input_size")):
        value = getattr(saved, theirs, None)
        if path not in given and value is not None:
            taken[path] = tuple(value) if isinstance(value, list) else value
    if taken:
        print(f"{checkpoint}: published checkpoint; from its saved args: "
              f"{', '.join(f'{k.rsplit(chr(46), 1)[-1]} {v}' for k, v in taken.items())}")
    return taken


@dataclass
class Plan:
    recipe: Recipe
    run: RunOptions
    demo: bool
    shards: Optional[object] = None          # pipelines.data.Shards
    manifests: dict = field(default_factory=dict)

    @property
    def classes(self) -> tuple:
        return self.shards.classes


def configure(args: argparse.Namespace) -> Plan:
    """The recipe (file + flags) and the run options, checked; no data read, Ray not started."""
    demo = args.data_root is None
    overrides = flag_overrides(args, FLAGS)
    if args.eval:
        if not args.checkpoint:
            raise cli.UsageError("--eval needs --checkpoint")
        if Path(args.checkpoint).expanduser().is_file():
            overrides.update(published_args_overrides(args.checkpoint, overrides))
    recipe = apply_overrides(STICKER.load_recipe(args.recipe or ("demo" if demo else "default")), overrides, args,
                             FLAGS)
    stage = recipe.stage()
    if stage.model.name == "lora_v":
        recipe = recipe.with_overrides({f"{OPTIONS}.text_encoder": None})
    elif stage.model.options.get("text_encoder") is None and not (args.eval and Path(args.checkpoint).is_dir()):
        raise cli.UsageError("LORA on real SER30K data needs BERT: pass --text-encoder bert:PATH "
                             "(a local bert-base-uncased folder), or use --model lora_v")
    text = recipe.stage().model.options.get("text_encoder")
    if text and text.startswith("bert:"):
        from emotion_models.text import make_tokenizer

        try:
            make_tokenizer(text)  # checks the folder and transformers, in one line
        except ImportError as exc:
            raise cli.UsageError(str(exc)) from None
    run = cli.run_options(args)
    recipe.stage().per_worker_batch(run.num_workers)
    return Plan(recipe=recipe, run=run, demo=demo)


def load_data(plan: Plan, args: argparse.Namespace) -> Plan:
    """Resolve, ingest and check the SER30K data (the demo generated once)."""
    from datasets_io.layouts import STICKERS, demo_key, require
    from datasets_io.lexicon import Lexicon
    from pipelines import data

    stage = plan.recipe.stage()
    if plan.demo:
        print("no --data-root: running the embedded SER30K-like demo (generated once, then cached)")
        path = data.demo_shards(images_per_class=args.demo_images_per_class, image_size=args.demo_image_size,
                                seed=DEMO_DATA["seed"])[demo_key("sticker")]
    else:
        root = Path(args.data_root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such SER30K folder (--data-root)")
        path = data.resolve_shards(str(root), max_side=stage.prep.max_side, seed=stage.seed,
                                   reader_options={"keep_duplicates": stage.data.keep_duplicates})
    manifest = data.check_shards(path, role="sticker", need_labels=True)
    require(manifest, STICKERS, path, "sticker")
    plan.shards = data.Shards(manifest, Lexicon.builtin())
    plan.manifests["ser30k"] = manifest
    return plan


def sticker_recipe(plan: Plan) -> StageRecipe:
    """The one stage's recipe: the model takes the dataset's classes and the image size."""
    stage = plan.recipe.stage()
    recipe = plan.recipe.stage(name=stage.model.name, classes=list(plan.classes),
                               model={"options": {"num_classes": len(plan.classes), "img_size": stage.prep.size}})
    prep = recipe.prep.resolve()
    if plan.shards.max_side is not None:
        prep = replace(prep, max_side=int(plan.shards.max_side))
    return recipe.replace(prep=prep)


def tokenizer(recipe: StageRecipe) -> TokenizeText:
    options = recipe.model.options
    return TokenizeText(options.get("text_encoder"), options.get("max_text_len", 30))


def sticker_datasets(plan: Plan, recipe: StageRecipe, splits=("train", "val", "test")) -> dict:
    """Ray Datasets of tensors + tokenised text per split, prepared as the recipe says."""
    tokenize = tokenizer(recipe)
    sets = plan.shards.datasets(recipe.prep, recipe.seed, splits=splits, keep_text=True)
    return {k: sets[k].map_batches(tokenize, batch_format="numpy") for k in splits}


def sticker_stage(plan: Plan) -> tuple[StageRecipe, StageData]:
    recipe = sticker_recipe(plan)
    sets = sticker_datasets(plan, recipe)
    local = {TRAIN_KEY: plan.shards.local_split(recipe.prep, recipe.seed, keep_text=True, post=tokenizer(recipe))}
    return recipe, StageData({TRAIN_KEY: sets["train"], "val": sets["val"]}, {"test": EvalSet(sets["test"])},
                             local=local)


def classification_result(metrics: dict, split: str = "test") -> dict:
    return {f"{split}_acc": metrics.get("accuracy"), f"{split}_macro_f1": metrics.get("macro_f1"),
            f"{split}_per_class_acc": metrics.get("per_class_acc")}


def published_protocol(history: list[dict]) -> dict:
    """The published code's reported figure: the best test accuracy over epochs (it selects the
    epoch on test). Recorded for comparison with the paper only; this project selects on val."""
    from pipelines.train_loop import EPOCH_TEST_KEY

    scored = [(h[EPOCH_TEST_KEY], h["epoch"]) for h in history if h.get(EPOCH_TEST_KEY) is not None]
    if not scored:
        return {}
    best, epoch = max(scored, key=lambda t: (t[0], -t[1]))
    return {"published_protocol_best_test_accuracy": best, "published_protocol_best_test_epoch": epoch + 1}


class Sticker(Pipeline):
    name = "sticker"
    script = "pipelines/sticker.py"
    flags = FLAGS
    metric = "val_accuracy"
    not_sweepable = frozenset({"stage.model.name", "stage.model.weights", "stage.prep.decode", "stage.compile",
                               "stage.deterministic", "stage.seed", "stage.epochs", "stage.prep.max_side",
                               "stage.test_every_epoch", "stage.data.keep_duplicates",
                               f"{OPTIONS}.text_encoder", f"{OPTIONS}.max_text_len"})

    def build_parser(self):
        return build_parser()

    def plan(self, args) -> Plan:
        from pipelines.runner import require_tracking, require_weights

        if getattr(args, "eval", False):
            raise cli.UsageError("--eval scores one checkpoint; it cannot be swept")
        plan = configure(args)
        require_tracking(plan.run)
        require_weights(plan.recipe.stage())
        return load_data(plan, args)

    def main(self, argv=None) -> int:
        return main(argv)

    def trial(self, plan: Plan, init_from: Optional[str]):
        return sticker_stage(plan)

    def sweep_fields(self, plan: Plan) -> dict[str, SweepField]:
        stage = plan.recipe.stage()
        lr = "stage.optimizer.lr" if stage.optimizer.lr is not None else "stage.optimizer.base_lr"
        # The demo's 64 px images supply alpha * sr^2 tokens per head only up to alpha 4.
        tokens = (1, 4) if plan.demo else (2, 16)
        return {"lr": SweepField(lr, low=0.0), "decay": SweepField("stage.optimizer.weight_decay", low=0.0),
                "alpha": SweepField(f"{OPTIONS}.alpha", "int", tokens, low=1, integer=True)}


STICKER = Sticker()


def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if args.eval:
        return evaluate_only(args)
    plan = STICKER.plan(args)
    from pipelines.runner import PipelineRun

    recipe, stage_data = sticker_stage(plan)
    model = recipe.model.name
    pipeline = PipelineRun.start(plan.run, pipeline="sticker", run_name_prefix=f"sticker-{model}", recipe=plan.recipe,
                                 tags={"model": model, "dataname": "demo-SER30K" if plan.demo else "SER30K",
                                       "demo": str(plan.demo)})
    stage = pipeline.stage(recipe, stage_data, manifests=plan.manifests)
    published = published_protocol(stage["outcome"]["history"])
    if published:
        pipeline.tracker.log_metrics(pipeline.parent_id, published)
    result = {**classification_result(stage["tests"]["test"]), **published, "pipeline": "sticker",
              "recipe": plan.recipe.name, "model": model, "classes": list(plan.classes),
              "best_checkpoints": {model: stage["outcome"]["best_checkpoint"]}}
    path = pipeline.finish(result)
    pipeline.print_summary(result, path, f"sticker {model} on {'demo ' if plan.demo else ''}SER30K "
                                         f"(recipe {plan.recipe.name})", ("test_acc", "test_macro_f1"))
    if published:
        print(f"published protocol (best TEST accuracy over epochs, epoch chosen on test; for comparison with "
              f"the paper's 70.73 / 69.22 only): {published['published_protocol_best_test_accuracy']:.4f} "
              f"at epoch {published['published_protocol_best_test_epoch']}")
    return 0


def evaluate_only(args) -> int:
    """``--eval --checkpoint``: score a checkpoint on val and test, print accuracy, macro-F1, per-class.

    A project checkpoint (or run) folder is scored as it was trained (its recipe: size, text length,
    encoder). A file is taken as a published ``checkpoint.pth``: the model is built from the recipe and
    flags (real data: 448 px) and the weights must fit it exactly. The eval transform is the recipe's
    (published: resize the shorter side to 512, bicubic, centre crop 448, ImageNet mean/std).
    """
    import json

    from pipelines.checkpoints import read_meta
    from pipelines.predict import resolve_checkpoint
    from pipelines.runner import require_tracking
    from pipelines.train_loop import evaluate_splits

    given = Path(args.checkpoint or "").expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such checkpoint file or folder (--checkpoint)")
    plan = configure(args)
    require_tracking(plan.run)
    plan = load_data(plan, args)
    if given.is_file():
        ckpt_dir, weights = None, str(given.resolve())
        recipe = sticker_recipe(plan)
        from emotion_models.errors import ModelConfigError
        from emotion_models.registry import NONE, build_model
        from emotion_models.weights import load_weights

        # A file that does not fit the model exactly stops here, in one line, before Ray starts.
        report = load_weights(build_model(replace(recipe.model, weights=NONE)), weights)
        if report.skipped_head:
            raise ModelConfigError(f"{weights}: its classifier does not have the dataset's {len(plan.classes)} "
                                   f"classes ({', '.join(report.skipped_head)} of another size)")
        if report.target or report.new:  # scoring needs every tensor from the file
            left = report.new or [f"everything outside {report.target}"]
            raise ModelConfigError(f"{weights}: not a whole {recipe.model.name} checkpoint ({', '.join(left[:4])} "
                                   "not in it)")
    else:
        ckpt_dir, weights = resolve_checkpoint(str(given)), None
        recipe = read_meta(ckpt_dir)["recipe"]
    cli.init_ray(plan.run.address)
    run = replace(plan.run, storage_path=str(Path(plan.run.storage_path) / "eval"))
    scored = evaluate_splits(recipe, sticker_datasets(plan, recipe, splits=("val", "test")), run,
                             checkpoint_dir=str(ckpt_dir) if ckpt_dir else None, weights=weights)
    result = {"checkpoint": str(ckpt_dir or weights)}
    for split in ("val", "test"):
        metrics = scored[split]["metrics"]
        result.update(classification_result(metrics, split))
        per_class = ", ".join(f"{c} {a:.4f}" for c, a in zip(plan.classes, metrics["per_class_acc"]))
        print(f"{split}: accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
              f"({metrics['n']} images)\n  per-class accuracy: {per_class}")
    print(json.dumps(result, indent=1, default=float))
    return 0


PIPELINE = STICKER

if __name__ == "__main__":
    sys.exit(cli.run_main(main))
