"""Predict with a trained checkpoint: VA models (valence, arousal, nearest category) or sticker models.

    python -m pipelines.predict --checkpoint CKPT_OR_RUN_DIR IMAGE_OR_DIR [--out predictions.csv]
    python -m pipelines.predict --checkpoint STICKER_CKPT sticker.png --text "so happy today"
    python -m pipelines.predict --checkpoint two_stage_multi_FI_rs_42.pt --backbone resnet101 photos/

``CKPT_OR_RUN_DIR`` is a checkpoint folder (``meta.json`` + ``state.pt``), a run folder holding
``result.json`` (its last stage's best checkpoint is used), or a checkpoint of the published code
(a ``.pt`` file, imported on the fly by :mod:`pipelines.import_published`). Images are prepared
exactly as evaluation prepared them in training: shrunk to the ingest's ``max_side`` and
re-encoded (as the ingest did), then the backbone's eval transform (mean, std, interpolation,
crop), all read from the checkpoint's recipe. Unreadable images are reported on stderr, skipped,
and counted.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path


import numpy as np
import torch

from datasets_io.readers import IMAGE_EXTENSIONS
from pipelines import cli


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder's last stage's selected checkpoint (local or on object storage)."""
    from datasets_io import storage
    from pipelines.checkpoints import META_FILE, RESULT_FILE

    p = storage.local(path)
    if storage.is_file(storage.join(p, META_FILE)):
        return p
    if storage.is_file(storage.join(p, RESULT_FILE)):
        best = json.loads(storage.read_text(storage.join(p, RESULT_FILE))).get("best_checkpoints") or {}
        if best:
            return list(best.values())[-1]
    raise FileNotFoundError(f"{p}: neither a checkpoint folder (meta.json) nor a run folder (result.json)")


def load_any(checkpoint: str, *, backbone: str = "resnet101", dataname: str | None = None):
    """``(model, meta)`` from a project checkpoint or run folder (local or a URI), or a published ``.pt`` file."""
    p = Path(checkpoint).expanduser()
    if "://" not in checkpoint and p.is_file():
        from pipelines.import_published import import_checkpoint

        return import_checkpoint(p, backbone=backbone, dataname=dataname)
    from pipelines.checkpoints import load_model

    return load_model(resolve_checkpoint(checkpoint))


def list_images(target: str) -> list[Path]:
    p = Path(target).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"{p}: no such image or folder")


def stored_bytes(data: bytes, max_side: int) -> bytes:
    """An image as the ingest stored it: validated, shrunk to ``max_side`` and re-encoded (0: the original
    bytes, validated by decoding them, as the published codes read their files)."""
    from datasets_io.images import decode_image, prepare_image

    if max_side:
        return prepare_image(data, max_side=max_side)
    decode_image(data)
    return data


def load_images(paths: list[Path], prep) -> tuple[list[Path], torch.Tensor, list[tuple[Path, str]]]:
    """Decode with the same validation and eval transform as training; returns (ok paths, batch, bad).

    ``prep`` is the recipe's :class:`datasets_io.prep.ImagePrep`: images are stored as the ingest stored
    them (``max_side``), then take the evaluation transform and the normalisation the workers apply.
    """
    from datasets_io.images import BadImage
    from datasets_io.prep import ImageTransform

    ok, stored, bad = [], [], []
    for path in paths:
        try:
            stored.append(stored_bytes(path.read_bytes(), prep.max_side))
            ok.append(path)
        except (BadImage, OSError, ValueError) as exc:
            bad.append((path, str(exc) or type(exc).__name__))
    if not stored:
        return ok, torch.empty(0, 3, prep.size, prep.size), bad
    transform = ImageTransform(prep, train=False, num_classes=1)
    pixels = transform({"image": np.array(stored + [None], dtype=object)[:len(stored)]})["image"]
    # Normalised as the workers normalise on their device: the same ImageNorm, the recipe's mean/std.
    return ok, prep.resolve().norm()(torch.from_numpy(pixels)), bad


@torch.no_grad()
def predict_rows(model, meta: dict, images: torch.Tensor, text: str | None = None) -> list[dict]:
    """One dict per image: VA on both scales and the nearest category, or class probabilities."""
    from datasets_io.lexicon import Lexicon, canonical_to_sam
    from emotion_models.losses import nearest_anchor

    recipe = meta["recipe"]
    model.eval()
    classes = list(recipe.classes or [])
    if recipe.loss.kind == "classify":
        kwargs = {}
        options = recipe.model.options
        if options.get("text_encoder"):
            from emotion_models.text import make_tokenizer

            tokenizer = make_tokenizer(options["text_encoder"], options.get("max_text_len", 30))
            ids, mask = tokenizer([text or ""] * len(images))
            kwargs = {"text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask)}
        prob = torch.softmax(model(images, **kwargs)["logits"], dim=1).numpy()
        return [{"class": classes[int(p.argmax())] if classes else int(p.argmax()),
                 **{f"p_{c}": float(v) for c, v in zip(classes or range(len(p)), p)}} for p in prob]
    out = model(images)
    va = out["va"].numpy()
    anchors = np.asarray(recipe.anchors or Lexicon.builtin().va_many(classes), dtype=np.float32)
    nearest = nearest_anchor(va, anchors)
    rows = []
    for i, (v, a) in enumerate(va):
        row = {"valence": float(v), "arousal": float(a), "valence_sam": float(canonical_to_sam(v)),
               "arousal_sam": float(canonical_to_sam(a)), "nearest_category": classes[int(nearest[i])]}
        if "logits" in out and recipe.head_classes:
            row["head_category"] = recipe.head_classes[int(out["logits"][i].argmax())]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m pipelines.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="an image or a folder of images")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder, or a run folder with result.json")
    p.add_argument("--model", default=None,
                   help="instead of --checkpoint: a logged MLflow model, e.g. models:/NAME@candidate or "
                        "runs:/RUN_ID/model (tracking server from MLFLOW_TRACKING_URI, else the local default)")
    p.add_argument("--out", default=None, help="write a CSV here instead of printing")
    p.add_argument("--text", default=None, help="the sticker's text (LORA models)")
    p.add_argument("--image-size", type=int, default=None, help="default: the size the model was trained at")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet101", help="published .pt checkpoints: the timm backbone name")
    p.add_argument("--dataname", default=None,
                   help="published .pt checkpoints: the categorical set (default: from the file name)")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.model is None):
        raise cli.UsageError("give exactly one of --checkpoint and --model")
    if args.model:
        rows, bad = predict_with_mlflow_model(args.model, list_images(args.target), args.text, args.batch_size)
        return _write(rows, bad, args.out)

    model, meta = load_any(args.checkpoint, backbone=args.backbone, dataname=args.dataname)
    prep = meta["recipe"].prep
    if args.image_size:
        prep = replace(prep, size=args.image_size)
    paths = list_images(args.target)
    rows, bad = [], []
    for start in range(0, len(paths), args.batch_size):
        ok, batch, bad_now = load_images(paths[start:start + args.batch_size], prep)
        bad += bad_now
        if ok:
            rows += [{"image": str(path), **row} for path, row in zip(ok, predict_rows(model, meta, batch, args.text))]
    return _write(rows, bad, args.out)


def predict_with_mlflow_model(uri: str, paths: list[Path], text: str | None, batch_size: int):
    """Rows and unreadable images from a logged pyfunc (:mod:`pipelines.mlflow_model`)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(None))
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing model
        raise FileNotFoundError(f"--model {uri}: cannot load it: {str(exc).splitlines()[0]}") from None
    rows, bad = [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        frame = pd.DataFrame({"image": [p.read_bytes() for p in chunk]})
        if text is not None:
            frame["text"] = text
        try:
            predicted = model.predict(frame).to_dict("records")
        except MlflowException as exc:  # the model refuses a chunk in which no image is readable
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            bad += [(path, "unreadable image") for path in chunk]
            continue
        for path, row in zip(chunk, predicted):
            error = row.pop("error", "")
            if error:
                bad.append((path, error))
            else:
                rows.append({"image": str(path), **row})
    return rows, bad


def _write(rows: list[dict], bad: list, out) -> int:
    for path, reason in bad:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if out:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["image"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} predictions to {out} ({len(bad)} unreadable images skipped)")
    else:
        for row in rows:
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        print(f"{len(rows)} images predicted, {len(bad)} unreadable skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
