"""Models, losses and metrics for image emotion (imports only torch, timm and numpy).

Build models by name with :func:`create_model` (``"va"``: the two-stage paper's VA regressor;
``"lora"`` / ``"lora_v"``: the sticker models) or from a recipe's ``model`` section with
:func:`build_model`. Importing the package imports every module in it, so each model module's
``@register_model`` builders are registered: a new model is one new file.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from emotion_models import losses, metrics, weights
from emotion_models.errors import ModelConfigError
from emotion_models.registry import ModelSpec, build_model, create_model, list_models, register_model

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["create_model", "build_model", "ModelSpec", "list_models", "register_model", "losses", "metrics",
           "weights", "ModelConfigError"]
