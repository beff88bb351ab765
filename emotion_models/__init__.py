"""Models, losses and metrics for image emotion (imports only torch, timm and numpy).

Build models by name with :func:`create_model` (``"va"``: the two-stage paper's VA regressor;
``"lora"`` / ``"lora_v"``: the sticker models). Model modules are imported lazily by the registry.
"""
from emotion_models import losses, metrics, weights
from emotion_models.errors import ModelConfigError
from emotion_models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model", "losses", "metrics", "weights", "ModelConfigError"]
