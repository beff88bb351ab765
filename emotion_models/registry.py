"""One registry, one ``create_model`` (the timm pattern), and the recipe's ``model`` section.

Model modules register a builder with :func:`register_model`; importing :mod:`emotion_models`
imports every module of the package, so a new model is one new file with a decorated builder.
Callers build models with :func:`create_model` (by name and keyword arguments) or
:func:`build_model` (from a :class:`ModelSpec`, the ``model`` section of a stage recipe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

import torch.nn as nn

from emotion_models.errors import ModelConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Where a model's initial weights come from (ModelSpec.weights), besides a local file's path.
HUB = "hub"      # timm's ordinary pretrained loading: the Hugging Face hub and its local cache
NONE = "none"    # random initialisation: training from scratch, said in the console and in MLflow


@dataclass(frozen=True)
class ModelSpec:
    """Which model a stage trains and where its initial weights come from.

    ``weights``: ``"hub"`` (the backbone's pretrained weights through timm, from the Hugging Face
    hub or its cache: ``resnet101.tv_in1k`` names a tag, ``resnet101`` the default one),
    ``"none"`` (from scratch) or the path of a local weights file. ``backbone`` and ``head``
    (``tanh`` onto [-1, 1], an unbounded ``linear``, or the published ``relu_linear``) are the VA
    model's; ``options`` are further keyword arguments of the model's builder (LORA's ``alpha``,
    ``locals``, ``text_encoder``, ...).
    """

    name: str = "va"
    backbone: Optional[str] = None
    weights: str = HUB
    head: Optional[Literal["tanh", "linear", "relu_linear"]] = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def from_scratch(self) -> bool:
        return self.weights == NONE

    @property
    def weights_file(self) -> Optional[str]:
        """The local weights file, when ``weights`` names one."""
        return None if self.weights in (HUB, NONE) else self.weights

    def kwargs(self) -> dict:
        """Keyword arguments of the model's builder."""
        given = {"backbone": self.backbone, "head": self.head}
        return {**dict(self.options), **{k: v for k, v in given.items() if v is not None}, "weights": self.weights}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create_model("va", backbone="resnet18", weights="none")``."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    return builder(**kwargs)


def build_model(spec: ModelSpec, **extra) -> nn.Module:
    """The model a :class:`ModelSpec` names, with its initial weights; ``extra``: data-given arguments
    (``num_classes``, ``task``)."""
    return create_model(spec.name, **spec.kwargs(), **extra)
