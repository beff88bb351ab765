"""Import a checkpoint trained with the published two-stage code into a project checkpoint.

The published code (sange1104/Dimensional-image-emotion-detection) saves a bare ``state_dict`` as
``{mode}_{task}_{data}_rs_{seed}.pt``: a torchvision ResNet-101 without its ``fc``, wrapped as
``resnet`` (an ``nn.Sequential``: 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4-7 layer1-4, 8 avgpool), then
a ReLU, ``FC_va`` (features -> 2, VA on the SAM 1..9 scale, no activation) and, for the multi-task
model, ``FC_cat`` (features -> classes). Its forward is ``FC_va(relu(flatten(resnet(x))))``.

The project's VA model predicts VA on the canonical [-1, 1] scale, ``canonical = (sam - 5) / 4``.
A linear head maps exactly: ``W' = W / 4``, ``b' = (b - 5) / 4``. The imported model has the published
head (``head="relu_linear"``: ``FC_va(relu(features))``, unbounded), recorded in the checkpoint's recipe.
Images are prepared as the published evaluation did: the original file, ``Resize(448)`` (bilinear) +
``CenterCrop(448)`` (crop fraction 1.0), ImageNet mean and std.

    python -m pipelines.import_published two_stage_multi_FI_rs_42.pt OUT_DIR [--backbone resnet101]
    python -m pipelines.predict --checkpoint two_stage_multi_FI_rs_42.pt --backbone resnet101 photos/
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional


import torch

from datasets_io.prep import ImagePrep
from emotion_models.errors import ModelConfigError
from emotion_models.losses import LossSpec
from emotion_models.registry import ModelSpec
from pipelines import cli
from pipelines.recipe import StageRecipe

NAME = re.compile(r"(?P<mode>one_stage|two_stage)_(?P<task>single|multi)_(?P<data>.+)_rs_(?P<seed>\d+)$")
# resnet.<i> of the published Sequential -> the timm / torchvision ResNet module name.
PREFIXES = {"resnet.0.": "conv1.", "resnet.1.": "bn1.", "resnet.4.": "layer1.", "resnet.5.": "layer2.",
            "resnet.6.": "layer3.", "resnet.7.": "layer4."}
SAM_CENTRE, SAM_HALF_RANGE = 5.0, 4.0
# The order of FC_cat's outputs in the published training. FI / Flickr / Instagram: sorted folder
# names (``label_to_int``); FlickrLDL / TwitterLDL: the code's ``emo_ctg`` list.
_FI_SORTED = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
_LDL_ORDER = ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]
HEAD_CLASSES = {"fi": _FI_SORTED, "flickrldl": _LDL_ORDER, "twitterldl": _LDL_ORDER,
                "flickr": ["negative", "neutral", "positive"], "instagram": ["negative", "neutral", "positive"]}
# How the published code prepared evaluation images (src/dataset.py: the original file, Resize(448) +
# CenterCrop(448), ImageNet mean and std).
PUBLISHED_PREP = ImagePrep(size=448, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
                           crop_pct=1.0, max_side=0)


def parse_name(path: Path) -> dict:
    """``{mode, task, data, seed}`` from ``{mode}_{task}_{data}_rs_{seed}.pt`` (empty if it does not match)."""
    m = NAME.match(path.stem)
    return {**m.groupdict(), "seed": int(m["seed"])} if m else {}


def convert_state(state: dict, source: str = "checkpoint") -> tuple[dict, Optional[int]]:
    """Published state dict -> the project model's state dict; returns (state, FC_cat rows or None)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for key in ("FC_va.weight", "FC_va.bias"):
        if key not in state:
            raise ModelConfigError(f"{source}: not a published VA checkpoint (no {key}; keys start "
                                   f"{', '.join(sorted(state)[:3])})")
    out = {}
    for key, value in state.items():
        if key.startswith("FC_va."):
            # sam = W f + b  ->  canonical = (sam - 5) / 4 = (W / 4) f + (b - 5) / 4
            value = value / SAM_HALF_RANGE if key.endswith("weight") else (value - SAM_CENTRE) / SAM_HALF_RANGE
            out["va_head." + key.split(".", 1)[1]] = value
        elif key.startswith("FC_cat."):
            out["cls_head." + key.split(".", 1)[1]] = value
        else:
            prefix = next((p for p in PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise ModelConfigError(f"{source}: unexpected key {key!r} for a published VA checkpoint")
            out["backbone." + PREFIXES[prefix] + key[len(prefix):]] = value
    classes = int(state["FC_cat.weight"].shape[0]) if "FC_cat.weight" in state else None
    return out, classes


def import_checkpoint(path: str | Path, backbone: str = "resnet101", dataname: Optional[str] = None):
    """Load a published ``.pt`` as ``(model, meta)``, like :func:`pipelines.recipe.load_model_from_checkpoint`."""
    from datasets_io.lexicon import CATEGORY_SETS, Lexicon
    from emotion_models.va import build_va

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such published checkpoint")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported with its name
        from pipelines.checkpoints import load_error_reason

        raise ModelConfigError(f"{path}: not a readable torch state dict ({type(exc).__name__}: "
                               f"{load_error_reason(exc)})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: expected a bare state dict (published checkpoints are), "
                               f"got {type(raw).__name__}")
    state, num_classes = convert_state(raw, str(path))
    info = parse_name(path)
    data = (dataname or info.get("data") or "").strip()
    task = "multi" if num_classes else "single"
    head_classes = HEAD_CLASSES.get(data.lower()) if num_classes else None
    if num_classes and (head_classes is None or len(head_classes) != num_classes):
        head_classes = [f"class_{i}" for i in range(num_classes)]
    set_name = next((k for k in CATEGORY_SETS if k.lower() == data.lower()), "FI")
    classes = list(CATEGORY_SETS[set_name])
    model = build_va(backbone, task=task, num_classes=num_classes or 8, head="relu_linear")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes (e.g. a ResNet-50 file with --backbone resnet101)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # torch's first line is only "Error(s) in loading ..."
        raise ModelConfigError(f"{path}: does not fit --backbone {backbone} ({detail})") from None
    mismatch = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if mismatch:
        raise ModelConfigError(f"{path}: does not fit --backbone {backbone} ({len(mismatch)} keys differ, e.g. "
                               f"{', '.join(mismatch[:3])})")
    model.eval()
    anchors = Lexicon.builtin().va_many(classes).tolist()
    recipe = StageRecipe(
        name="published", source=str(path.resolve()),
        model=ModelSpec(name="va", backbone=backbone, weights="none", head="relu_linear",
                        options={"task": task, "num_classes": num_classes or 8}),
        prep=PUBLISHED_PREP, loss=LossSpec(va_weight=0.9, va_scale=16.0, anchor_decode="cosine_sam"),
        classes=tuple(classes), head_classes=tuple(head_classes) if head_classes else None,
        anchors=tuple(tuple(a) for a in anchors))
    published = {"source": str(path.resolve()), **info, "va_head": "W/4, (b-5)/4 (SAM 1..9 -> [-1, 1])"}
    return model, {"recipe": recipe, "epoch": None, "published": published}


def save_project_checkpoint(model, meta: dict, out_dir: str | Path) -> Path:
    """Write ``meta.json`` + ``state.pt`` (``{"model": state_dict}``): a project checkpoint folder."""
    from pipelines.checkpoints import STATE_FILE, save_state, write_meta

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_state(out / STATE_FILE, {"model": model.state_dict()})
    write_meta(out, **meta)
    return out


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m pipelines.import_published", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the published {mode}_{task}_{data}_rs_{seed}.pt")
    p.add_argument("out", help="folder to write the project checkpoint to (meta.json + state.pt)")
    p.add_argument("--backbone", default="resnet101", help="timm name of the published backbone")
    p.add_argument("--dataname", default=None, help="categorical set it was trained on (default: from the file name)")
    args = p.parse_args(argv)
    model, meta = import_checkpoint(args.checkpoint, args.backbone, args.dataname)
    out = save_project_checkpoint(model, meta, args.out)
    print(f"imported {args.checkpoint} ({meta['recipe'].model.options['task']}, {args.backbone}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
