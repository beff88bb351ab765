"""The logged MLflow model: a code-based pyfunc over the weights and the recipe, no pickle.

MLflow logs this file as the model's code (``mlflow.pyfunc.log_model(python_model=<this file>)``,
"models from code"), the project's packages as ``code_paths``, and one artifact, ``checkpoint``:
``meta.json`` (the stage's recipe that rebuilds the model and prepares images) and
``state.pt`` (``{"model": state_dict}``, read with ``torch.load(weights_only=True)``). Loading
runs no unpickling of arbitrary objects.

Input: a DataFrame with an ``image`` column (the image file's bytes; over HTTP, base64) and, for
LORA, an optional ``text`` column. Output, one row per image: ``valence``, ``arousal`` (canonical
[-1, 1]), ``valence_sam``, ``arousal_sam`` (SAM 1..9), ``nearest_category`` (and ``head_category``
for multi-task models), or for sticker models ``class`` and ``p_<class>`` per class; ``error`` is
empty, or says why that row's image could not be read (the other rows are still predicted). When no
row at all can be read, predict raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which
``mlflow models serve`` answers with HTTP 400 and a message naming the rows (the server stays up).

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/emotion-va@candidate")      # or runs:/<run id>/model
    model.predict(pd.DataFrame({"image": [open("photo.jpg", "rb").read()]}))
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

CHECKPOINT = "checkpoint"
ERROR = "error"


class EmotionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipelines.checkpoints import load_model

        self.model, self.meta = load_model(context.artifacts[CHECKPOINT])
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from pipelines.predict import load_images, predict_rows

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError(f"the input needs an 'image' column (image bytes); got columns {list(frame.columns)}")
        recipe = self.meta["recipe"]
        texts = frame["text"].tolist() if "text" in frame.columns else [None] * len(frame)
        rows = []
        for value, text in zip(frame["image"].tolist(), texts):
            data = _as_bytes(value)
            ok, batch, bad = load_images([_Blob(data)], recipe.prep) if data is not None \
                else ([], None, [(None, "not image bytes")])
            if not ok:
                rows.append({ERROR: f"unreadable image: {bad[0][1]}"})
                continue
            rows.append({**predict_rows(self.model, self.meta, batch, text if isinstance(text, str) else None)[0],
                         ERROR: ""})
        if rows and all(row[ERROR] for row in rows):
            raise_unreadable(rows)
        return pd.DataFrame(rows)


def raise_unreadable(rows: list[dict]) -> None:
    """Every row of the request is unreadable: a client error (HTTP 400 from the scoring server)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    shown = "; ".join(f"row {i}: {row[ERROR]}" for i, row in enumerate(rows[:10]))
    more = f" (and {len(rows) - 10} more)" if len(rows) > 10 else ""
    raise MlflowException(f"no image in the request could be read: {shown}{more}",
                          error_code=INVALID_PARAMETER_VALUE)


class _Blob:
    """Bytes that :func:`pipelines.predict.load_images` reads like a file path."""

    def __init__(self, data: bytes):
        self.data = data

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return "<image bytes>"


def _as_bytes(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value and Path(value).is_file():  # a local path (Python callers)
        return Path(value).read_bytes()
    return None


mlflow.models.set_model(EmotionModel())
