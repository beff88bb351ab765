"""One registry, one ``create_model`` (the timm pattern).

Model modules register a builder with :func:`register_model`; callers only ever use
:func:`create_model`. Nothing here downloads weights: ``pretrained`` is always False and
``weights=PATH`` loads a local state dict instead.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from emotion_models.errors import ModelConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create_model("va", backbone="resnet18")``."""
    _import_builtin_models()
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True would download weights; pass weights=PATH to a local file instead")
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return builder(**kwargs)


def _import_builtin_models() -> None:
    # Imported lazily so that importing the registry never pulls in every model.
    from emotion_models import va  # noqa: F401
    from emotion_models import lora  # noqa: F401
