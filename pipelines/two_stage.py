"""Dimensional emotion (valence, arousal) from categorical data, in one or two stages, on Ray Train.

Stage one trains a CNN to predict VA on a categorical set (FI, Flickr, Instagram, FlickrLDL,
TwitterLDL), each category mapped to VA through the NRC-VAD lexicon; stage two starts from stage
one's selected checkpoint, freezes the early layers and fine-tunes on a small dimensional set
(Emotion6). Four frameworks: ``--task {single,multi}`` x ``--mode {one_stage,two_stage}``, plus the
baseline ``--mode dimensional`` (the backbone fine-tuned on the dimensional set alone).
``--frameworks all`` runs all five in one MLflow parent run, each task's stage one trained once, and
ends with a comparison table; ``--seeds 42 43 44`` repeats it and reports mean +- std.

How it trains is a recipe (``recipes/two_stage/``): ``--recipe published`` is the released code's
training, ``default`` the project's corrections of it; every flag below overrides one field.
With no data flags it runs the embedded demo end to end on CPU (the ``demo`` recipe)::

    python pipelines/two_stage.py
    python pipelines/two_stage.py --recipe published --frameworks all --backbone resnet10t --image-size 64

On a cluster::

    ray job submit --working-dir . -- python pipelines/two_stage.py --dataname /mnt/shared/data/FI \\
        --dimensional /mnt/shared/data/Emotion6 --num-workers 2 --use-gpu
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from datasets_io import layouts
from pipelines import cli
from pipelines.recipe import (EvalSet, Flag, Recipe, StageRecipe, add_flags, apply_overrides, flag_overrides,
                              select_flag)
from pipelines.registry import Pipeline, SweepField
from pipelines.train_loop import JOIN_KEY, POOL_KEY, TRAIN_KEY, RunOptions, StageData

SECTIONS = ("stage", "stage1", "stage1_single", "stage1_multi", "stage2", "stage2_single", "stage2_multi",
            "dimensional")
FRAMEWORKS = ("one_stage-single", "two_stage-single", "one_stage-multi", "two_stage-multi", "dimensional")
# The summary's headline metrics (result.json and MLflow hold every test metric).
HEADLINE = ("test_pearson_v", "test_pearson_a", "test_ccc_v", "test_ccc_a", "test_mse", "test_spearman_v",
            "test_spearman_a", "test_accuracy", "test_categorical_accuracy", "test_categorical_ldl_jaccard")
DEMO_DATA = dict(images_per_class=60, image_size=64, seed=0)

FLAGS = (
    Flag("--lr", ("stage.optimizer.lr",), "learning rate"),
    Flag("--stage2-lr", ("stage2.optimizer.lr",), "learning rate of stage two (default: --lr)"),
    Flag("--decay", ("stage.optimizer.weight_decay",), "weight decay"),
    Flag("--stage2-decay", ("stage2.optimizer.weight_decay",), "weight decay of stage two (default: --decay)"),
    Flag("--optimizer", ("stage.optimizer.name",)),
    Flag("--batch-size", ("stage.batch_size",), "the global batch, divided among --num-workers (it must divide)"),
    Flag("--num-epochs", ("stage.epochs",)),
    Flag("--stage2-epochs", ("stage2.epochs",), "epochs of stage two (default: --num-epochs)"),
    Flag("--early-stop", ("stage.select.patience",), "patience in epochs (0: never stop early)"),
    select_flag(),
    Flag("--seed", ("stage.seed",)),
    Flag("--backbone", ("stage.model.backbone",), "any timm model name, with or without a pretrained tag "
                                                  "(resnet101.tv_in1k)"),
    Flag("--weights", ("stage.model.weights",), "hub (timm's pretrained weights: the Hugging Face hub and its "
                                                "cache), none (train from scratch), or a local weights file"),
    Flag("--head", ("stage.model.head",), "the VA head: tanh onto [-1, 1], linear, or the published relu_linear"),
    Flag("--image-size", ("stage.prep.size",)),
    Flag("--max-side", ("stage.prep.max_side",), "longer side of the stored images at ingest (0: the originals)"),
    Flag("--crop-scale", ("stage.prep.scale",), "RandomResizedCrop scale range"),
    Flag("--val-augment", ("stage.prep.val_augment",), "layouts whose validation split takes the training "
                                                       "transform (published: emotion6 ldl; none: give no value)"),
    Flag("--decode", ("stage.prep.decode",), cli.DECODE_HELP),
    Flag("--schedule", ("stage.schedule.name",), "the learning-rate schedule"),
    Flag("--warmup-epochs", ("stage.schedule.warmup_epochs",)),
    Flag("--precision", ("stage.precision",), "auto: bf16 autocast on GPUs, fp32 on CPU"),
    Flag("--compile", ("stage.compile",), cli.COMPILE_HELP),
    Flag("--deterministic", ("stage.deterministic",), "a fixed row order and per-image augmentation: a resumed "
                                                      "run ends where an uninterrupted one does"),
    Flag("--va-weight", ("stage.loss.va_weight",), "VA weight of the multi-task loss in stage one: "
                                                   "(1 - alpha) CE + alpha VA (the published alpha)", ("--alpha",)),
    Flag("--stage2-va-weight", ("stage2.loss.va_weight",), "VA weight in stage two", ("--alpha2",)),
    Flag("--va-loss", ("stage.loss.va_loss",)),
    Flag("--va-loss-scale", ("stage.loss.va_scale",), "factor on the VA loss: 16 = the published MSE on the SAM "
                                                      "1..9 scale; 1 = MSE on the canonical [-1, 1] scale"),
    Flag("--ldl-va-target", ("stage.loss.ldl_va_target",), "LDL sets' VA target"),
    Flag("--ldl-category-loss", ("stage.loss.ldl_category_loss",), "LDL sets' category loss"),
    Flag("--anchor-decode", ("stage.loss.anchor_decode",), "how predicted VA becomes a category"),
    Flag("--ldl-test", ("stage.data.ldl_test",), "LDL sets' categorical test split"),
    Flag("--freeze-until", ("stage2.freeze", "dimensional.freeze"),
         "what stage two (and the baseline) freezes: published (resnet conv1 .. layer3; other backbones: "
         "through stride 16), all_but_last, a stage name, a count of stages, or none"),
    Flag("--freeze-bn", ("stage.freeze_bn",), "hold frozen BatchNorm layers in eval mode"),
    Flag("--stage2-batching", ("stage2_multi.batching",), "stage two multi-task batches: joined or the published pool"),
    Flag("--stage1-multi-val", ("stage1_multi.val",), "the validation set that selects stage one with --task multi"),
)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="two_stage.py", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_config_arg(p)
    cli.add_recipe_arg(p, "two_stage")
    d = p.add_argument_group("data")
    d.add_argument("--dataname", default=None,
                   help=f"{', '.join(layouts.dataset_names(lacking=frozenset({layouts.MEASURED_VA, layouts.STICKERS})))}"
                        ", or a dataset folder "
                        "(raw or ingested); default: the embedded demo")
    d.add_argument("--data-root", default=None, help="raw folder of --dataname when it is not ingested yet")
    d.add_argument("--dimensional", default=None,
                   help="the dimensional set: Emotion6 raw folder or ingested shards (default: demo's)")
    d.add_argument("--lexicon", default=None, help="a full NRC-VAD lexicon file for other category names")
    d.add_argument("--demo-images-per-class", type=int, default=DEMO_DATA["images_per_class"],
                   help="size of the generated demo sets (demo only)")
    d.add_argument("--demo-image-size", type=int, default=DEMO_DATA["image_size"],
                   help="side of the generated demo images (demo only)")
    r = p.add_argument_group("what runs")
    r.add_argument("--mode", choices=["one_stage", "two_stage", "dimensional"], default="two_stage",
                   help="dimensional: the baseline, trained on the dimensional set only")
    r.add_argument("--task", choices=["single", "multi"], default=None, help="default single")
    r.add_argument("--frameworks", nargs="+", default=None, metavar="FRAMEWORK",
                   help="run several frameworks in one parent run, sharing each task's stage one: 'all' or "
                        f"any of {', '.join(FRAMEWORKS)}; ends with a comparison table")
    r.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="repeat the run (or grid) for each seed and report mean +- std (default: the recipe's seed)")
    add_flags(p, FLAGS)
    cli.add_ray_args(p)
    cli.add_mlflow_args(p)
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # tests: "[hold:]stage:epoch:step:rank:marker[,...]"
    return p


def parse_frameworks(values: list[str]) -> list[str]:
    """``all`` or framework names (``two_stage-multi``, ``two_stage/multi``, ``dimensional``), in the grid's order."""
    wanted = set()
    for value in values:
        for item in value.split(","):
            item = item.strip().replace("/", "-").replace(":", "-")
            if not item:
                continue
            if item == "all":
                wanted.update(FRAMEWORKS)
            elif item in FRAMEWORKS:
                wanted.add(item)
            else:
                raise cli.UsageError(f"--frameworks: unknown framework {item!r}; known: all, {', '.join(FRAMEWORKS)}")
    if not wanted:
        raise cli.UsageError("--frameworks: name at least one framework (or 'all')")
    return [f for f in FRAMEWORKS if f in wanted]


@dataclass
class Plan:
    """Everything resolved before training starts: the recipe, where it runs, what runs, and the data."""

    recipe: Recipe
    run: RunOptions
    mode: str
    task: str
    frameworks: list[str]
    seeds: list[int]
    demo: bool
    dataname: str = ""
    categorical: Optional[object] = None      # pipelines.data.Shards
    dimensional: Optional[object] = None
    manifests: dict = field(default_factory=dict)

    @property
    def grid(self) -> bool:
        return len(self.frameworks) > 1 or len(self.seeds) > 1


def configure(args: argparse.Namespace) -> Plan:
    """The recipe (file + flags), the run options and what runs, checked; no data read, Ray not started."""
    demo = args.dataname is None and args.dimensional is None
    recipe = TWO_STAGE.load_recipe(args.recipe or ("demo" if demo else "default"))
    overrides = flag_overrides(args, FLAGS)
    if demo and "stage.model.weights" not in overrides and recipe.stage().model.weights == "hub":
        print("demo data: training from scratch (the recipe's hub weights are not used on the synthetic demo "
              "images; --weights PATH starts from a local file)")
        overrides["stage.model.weights"] = "none"
    recipe = apply_overrides(recipe, overrides, args, FLAGS)
    if args.frameworks:
        frameworks, task = parse_frameworks(args.frameworks), args.task or "single"
    elif args.mode == "dimensional":
        if args.task == "multi":
            raise cli.UsageError("--mode dimensional trains the VA head on the dimensional set only; "
                                 "it takes no --task multi")
        frameworks, task = ["dimensional"], "single"
    else:
        task = args.task or "single"
        frameworks = [f"{args.mode}-{task}"]
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [recipe.stage().seed]
    needs_categorical = any(f != "dimensional" for f in frameworks)
    needs_dimensional = any(f.startswith("two_stage") or f == "dimensional" for f in frameworks)
    if not demo and args.dataname is not None:
        from pipelines.data import check_dataname

        check_dataname(args.dataname, "--dataname")
    if not demo and needs_categorical and args.dataname is None:
        raise cli.UsageError(f"{', '.join(f for f in frameworks if f != 'dimensional')} with real data "
                             "needs --dataname (the categorical set)")
    if not demo and needs_dimensional and args.dimensional is None:
        raise cli.UsageError("--mode two_stage / dimensional with real data needs --dimensional "
                             "(the Emotion6 folder or shards)")
    run = cli.run_options(args)
    for section in ("stage1", "stage2", "dimensional"):
        recipe.stage(section).per_worker_batch(run.num_workers)
    return Plan(recipe=recipe, run=run, mode=args.mode, task=task, frameworks=frameworks, seeds=seeds, demo=demo)


def load_data(plan: Plan, args: argparse.Namespace) -> Plan:
    """Resolve, ingest and check the data (a name, a raw folder or shards; the demo generated once)."""
    from datasets_io.layouts import demo_key
    from datasets_io.lexicon import Lexicon
    from pipelines import data

    lexicon = Lexicon.from_file(args.lexicon) if args.lexicon else Lexicon.builtin()
    needs_categorical = any(f != "dimensional" for f in plan.frameworks)
    stage = plan.recipe.stage()
    reader = {"keep_duplicates": stage.data.keep_duplicates}
    if plan.demo:
        print("no --dataname: running the embedded demo (generated once, then cached)")
        shards = data.demo_shards(images_per_class=args.demo_images_per_class, image_size=args.demo_image_size,
                                  seed=DEMO_DATA["seed"])
        dim_path, plan.dataname = shards[demo_key("dimensional")], "demo-FI"
        cat_path = shards[demo_key("categorical")] if needs_categorical else None
    else:
        seed = plan.seeds[0]
        cat_path = data.resolve_shards(args.dataname, data_root=args.data_root, max_side=stage.prep.max_side,
                                       lexicon=args.lexicon, seed=seed, reader_options=reader) \
            if args.dataname is not None and needs_categorical else None
        dim_path = data.resolve_shards(args.dimensional, max_side=stage.prep.max_side, seed=seed,
                                       reader_options=reader) if args.dimensional else None
        source = args.dataname if cat_path is not None else args.dimensional
        plan.dataname = source if "/" not in source else Path(source).name
    if cat_path is not None:
        plan.categorical = data.Shards(data.check_shards(cat_path, role="categorical", need_labels=True), lexicon)
        plan.manifests["categorical"] = plan.categorical.manifest
    if dim_path is not None:
        plan.dimensional = data.Shards(data.check_shards(dim_path, role="dimensional", need_va=True), lexicon)
        plan.manifests["dimensional"] = plan.dimensional.manifest
    return plan


def _stage_recipe(plan: Plan, sections: tuple[str, ...], *, name: str, seed: int, task: str, shards, scored,
                  init_from: Optional[str] = None) -> StageRecipe:
    """One stage's recipe: the sections merged, the data's classes and anchors (``scored``: the set whose
    classes the stage's objective scores), the VA head's classes (``shards``), and images prepared as the
    backbone's pretrained_cfg says where the recipe leaves a value open, at the shards' stored size."""
    from emotion_models.va import data_config

    recipe = plan.recipe.stage(*sections, name=name, seed=seed, init_from=init_from, classes=list(scored.classes),
                               anchors=[list(a) for a in scored.anchors], head_classes=list(shards.classes),
                               model={"options": {"task": task, "num_classes": len(shards.classes)}})
    import timm

    if not timm.is_model(recipe.model.backbone):
        raise cli.UsageError(f"--backbone {recipe.model.backbone}: not a timm model name")
    prep = recipe.prep.resolve(data_config(recipe.model.backbone))
    if scored.max_side is not None:
        prep = replace(prep, max_side=int(scored.max_side))
    return recipe.replace(prep=prep)


def _categorical_test(plan: Plan, recipe: StageRecipe) -> dict:
    """The categorical test split, scored with the categorical classes (accuracy, LDL scores)."""
    cat = plan.categorical
    if cat is None:
        return {}
    if recipe.data.ldl_test == "training_images" and cat.layout == "ldl":
        dataset = cat.training_images(recipe.prep, recipe.seed)
    else:
        dataset = cat.datasets(recipe.prep, recipe.seed)["test"]
    return {"test_categorical": EvalSet(dataset, cat.classes, cat.anchors)}


def stage1(plan: Plan, *, task: Optional[str] = None, seed: Optional[int] = None, name: str = "stage1",
           score_dimensional: Optional[bool] = None) -> tuple[StageRecipe, StageData]:
    """Stage one: VA (and categories, multi) on the categorical set, validated on its own validation split
    or (``val: dimensional``, the published multi-task rule) on the dimensional one.

    ``score_dimensional`` (default: ``--mode one_stage``) also scores the dimensional test split: a
    one-stage model's VA is learned from categories only.
    """
    cat, dim = plan.categorical, plan.dimensional
    if cat is None:
        raise ValueError("stage one needs a categorical set (--dataname); --mode dimensional has none")
    task, seed = task or plan.task, plan.seeds[0] if seed is None else seed
    recipe = _stage_recipe(plan, ("stage1", f"stage1_{task}"), name=name, seed=seed, task=task, shards=cat,
                           scored=cat)
    sets = cat.datasets(recipe.prep, seed)
    datasets, val_scoring, val_layout = {TRAIN_KEY: sets["train"], "val": sets["val"]}, None, cat.layout
    if recipe.val == "dimensional":
        if dim is None:
            raise cli.UsageError("the recipe validates stage one on the dimensional set (stage1_multi.val: "
                                 "dimensional): pass --dimensional")
        datasets["val"] = dim.datasets(recipe.prep, seed)["val"]
        val_scoring, val_layout = (dim.classes, dim.anchors), dim.layout
    tests = _categorical_test(plan, recipe)
    if score_dimensional is None:
        score_dimensional = plan.mode == "one_stage"
    if score_dimensional and dim is not None:
        tests["test"] = EvalSet(dim.datasets(recipe.prep, seed)["test"], dim.classes, dim.anchors)
    return recipe, StageData(datasets, tests, val_augmented=recipe.prep.validates_like_training(val_layout),
                             val_scoring=val_scoring, local={TRAIN_KEY: cat.local_split(recipe.prep, seed)})


def stage2(plan: Plan, init_from: str, *, task: Optional[str] = None, seed: Optional[int] = None,
           name: str = "stage2") -> tuple[StageRecipe, StageData]:
    """Stage two: from ``init_from`` (stage one's selected checkpoint), early layers frozen, on the
    dimensional set; multi-task brings the categorical training set in (``joined`` or ``pool`` batches)."""
    cat, dim = plan.categorical, plan.dimensional
    task, seed = task or plan.task, plan.seeds[0] if seed is None else seed
    recipe = _stage_recipe(plan, ("stage2", f"stage2_{task}"), name=name, seed=seed, task=task, shards=cat,
                           scored=dim, init_from=init_from)
    sets = dim.datasets(recipe.prep, seed)
    datasets, rows = {TRAIN_KEY: sets["train"], "val": sets["val"]}, {}
    local = {TRAIN_KEY: dim.local_split(recipe.prep, seed)}
    if recipe.batching in ("joined", "pool"):
        key = JOIN_KEY if recipe.batching == "joined" else POOL_KEY
        datasets[key], local[key] = cat.datasets(recipe.prep, seed)["train"], cat.local_split(recipe.prep, seed)
    if recipe.batching == "pool":
        rows = {TRAIN_KEY: dim.counts["train"], POOL_KEY: cat.counts["train"]}
    tests = {"test": EvalSet(sets["test"]), **_categorical_test(plan, recipe)}
    return recipe, StageData(datasets, tests, rows=rows, val_augmented=recipe.prep.validates_like_training(dim.layout),
                             local=local)


def dimensional_stage(plan: Plan, *, seed: Optional[int] = None, name: str = "dimensional") -> tuple[StageRecipe, StageData]:
    """The baseline: the same VA model trained on the dimensional set alone (its starting weights as the
    recipe says), with the same selection and test split as stage two. With a categorical set at hand
    (the grid) its test split is scored too, by decoding VA to the categories' anchors."""
    dim = plan.dimensional
    seed = plan.seeds[0] if seed is None else seed
    recipe = _stage_recipe(plan, ("dimensional",), name=name, seed=seed, task="single", shards=dim, scored=dim)
    sets = dim.datasets(recipe.prep, seed)
    tests = {"test": EvalSet(sets["test"]), **_categorical_test(plan, recipe)}
    return recipe, StageData({TRAIN_KEY: sets["train"], "val": sets["val"]}, tests,
                             val_augmented=recipe.prep.validates_like_training(dim.layout),
                             local={TRAIN_KEY: dim.local_split(recipe.prep, seed)})


def _row(framework: str, seed: int, final: dict) -> dict:
    """One comparison row: the framework's final model on the dimensional and categorical test splits."""
    test = final["tests"].get("test", {})
    cat = final["tests"].get("test_categorical", {})
    row = {"framework": framework, "seed": seed}
    row.update({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float)) and k != "n"})
    row.update({f"test_categorical_{k}": v for k, v in cat.items() if isinstance(v, (int, float)) and k != "n"})
    row["best_checkpoint"] = final["outcome"]["best_checkpoint"]
    return row


def run_frameworks(plan: Plan, pipeline, seed: int, tag: str = "") -> list[dict]:
    """Train what ``plan.frameworks`` need for one seed, each task's stage one once; one row per framework.

    ``tag`` prefixes nothing in a single-framework run (stages ``stage1``, ``stage2``, ``dimensional``)
    and names the task (and the seed) in a grid (``single-stage1-s43``).
    """
    rows = []
    frameworks = plan.frameworks
    grid = len(frameworks) > 1 or bool(tag)
    for task in ("single", "multi"):
        wanted = [f for f in frameworks if f.endswith(f"-{task}")]
        if not wanted:
            continue
        prefix = f"{task}-" if grid else ""
        recipe, stage_data = stage1(plan, task=task, seed=seed, name=f"{prefix}stage1{tag}",
                                    score_dimensional=f"one_stage-{task}" in wanted)
        s1 = pipeline.stage(recipe, stage_data, manifests=plan.manifests)
        if f"one_stage-{task}" in wanted:
            rows.append(_row(f"one_stage-{task}", seed, s1))
        if f"two_stage-{task}" in wanted:
            recipe, stage_data = stage2(plan, s1["outcome"]["best_checkpoint"], task=task, seed=seed,
                                        name=f"{prefix}stage2{tag}")
            s2 = pipeline.stage(recipe, stage_data, manifests=plan.manifests)
            rows.append(_row(f"two_stage-{task}", seed, s2))
    if "dimensional" in frameworks:
        recipe, stage_data = dimensional_stage(plan, seed=seed, name=f"dimensional{tag}")
        sd = pipeline.stage(recipe, stage_data, manifests=plan.manifests)
        rows.append(_row("dimensional", seed, sd))
    order = {f: i for i, f in enumerate(FRAMEWORKS)}
    return sorted(rows, key=lambda r: order[r["framework"]])


class TwoStage(Pipeline):
    name = "two_stage"
    script = "pipelines/two_stage.py"
    sections = SECTIONS
    flags = FLAGS
    metric = "val_pearson_mean"
    not_sweepable = frozenset({"stage.prep.decode", "stage.compile", "stage.deterministic", "stage.seed",
                               "stage.model.backbone", "stage.model.weights", "stage.epochs", "stage2.epochs",
                               "stage.prep.max_side"})

    def build_parser(self):
        return build_parser()

    def plan(self, args) -> Plan:
        from pipelines.runner import require_tracking, require_weights

        plan = configure(args)
        require_tracking(plan.run)
        require_weights(*(plan.recipe.stage(s) for s in ("stage1", "stage2", "dimensional")))
        return load_data(plan, args)

    def main(self, argv=None) -> int:
        return main(argv)

    def stage_one(self, plan: Plan):
        if plan.mode != "two_stage":
            return None
        return stage1(plan)

    def trial(self, plan: Plan, init_from: Optional[str]):
        if plan.mode == "two_stage":
            return stage2(plan, init_from)
        return dimensional_stage(plan) if plan.mode == "dimensional" else stage1(plan)

    def trial_section(self, plan: Plan) -> str:
        return {"two_stage": "stage2", "one_stage": "stage1", "dimensional": "dimensional"}[plan.mode]

    def sweep_fields(self, plan: Plan) -> dict[str, SweepField]:
        section = self.trial_section(plan)
        fields = {"lr": SweepField(f"{section}.optimizer.lr", low=0.0),
                  "decay": SweepField(f"{section}.optimizer.weight_decay", low=0.0)}
        if plan.task == "multi" and plan.mode != "dimensional":   # the VA weight acts with a category head only
            fields["alpha"] = SweepField(f"{section}.loss.va_weight", "uniform", (0.1, 0.9), low=0.0, high=1.0)
        return fields


TWO_STAGE = TwoStage()


def main(argv=None) -> int:
    plan = TWO_STAGE.plan(cli.parse_args(build_parser(), argv))
    from pipelines.runner import PipelineRun

    mode = "grid" if plan.grid else plan.mode
    prefix = "two_stage-grid" if plan.grid else f"two_stage-{plan.mode}-{plan.task}"
    pipeline = PipelineRun.start(plan.run, pipeline="two_stage", run_name_prefix=prefix, recipe=plan.recipe,
                                 tags={"mode": mode, "task": plan.task, "dataname": plan.dataname,
                                       "demo": str(plan.demo), "frameworks": ",".join(plan.frameworks)})
    rows = []
    for seed in plan.seeds:
        tag = f"-s{seed}" if len(plan.seeds) > 1 else ""
        rows += run_frameworks(plan, pipeline, seed, tag)
    best = {n: st["outcome"]["best_checkpoint"] for n, st in pipeline.state["stages"].items()}

    if not plan.grid:
        # One framework, one seed: its test metrics at the top level, as always.
        result = {k: v for k, v in rows[0].items() if k.startswith("test_")}
        result.update(pipeline="two_stage", recipe=plan.recipe.name, mode=plan.mode, task=plan.task,
                      dataname=plan.dataname, best_checkpoints=best)
        path = pipeline.finish(result)
        pipeline.print_summary(result, path, f"two_stage {plan.mode} / {plan.task} on {plan.dataname} "
                                             f"(recipe {plan.recipe.name})", HEADLINE)
        return 0

    from pipelines.grid import comparison_figure, comparison_table, summarize

    summary = summarize(rows)
    table = comparison_table(summary)
    stage = plan.recipe.stage()
    title = (f"{plan.dataname}: {len(plan.frameworks)} frameworks x {len(plan.seeds)} seed(s) "
             f"({', '.join(map(str, plan.seeds))}), recipe {plan.recipe.name}, {stage.model.backbone} "
             f"{stage.prep.size}px")
    tracker = pipeline.tracker
    tracker.client.log_text(pipeline.parent_id, f"{title}\n\n{table}\n", "comparison.md")
    columns = ["framework", "seed", *dict.fromkeys(k for r in rows for k in r if k.startswith("test_"))]
    tracker.client.log_table(pipeline.parent_id, data={k: [r.get(k) for r in rows] for k in columns},
                             artifact_file="comparison_table.json")
    tracker.log_figure(pipeline.parent_id, comparison_figure(summary, title), "comparison.png")
    flat = {f"{f}.{k}_{stat}": v[stat] for f, metrics in summary.items() for k, v in metrics.items()
            for stat in ("mean", "std")}
    tracker.log_metrics(pipeline.parent_id, flat)
    result = {"pipeline": "two_stage", "recipe": plan.recipe.name, "mode": mode, "frameworks": plan.frameworks,
              "seeds": plan.seeds, "dataname": plan.dataname, "rows": rows, "summary": summary, "table": table,
              "best_checkpoints": best}
    path = pipeline.finish(result)
    print(f"\n{title}\n\n{table}\n")
    pipeline.print_summary(result, path, "two_stage grid")
    return 0


PIPELINE = TWO_STAGE

if __name__ == "__main__":
    sys.exit(cli.run_main(main))
