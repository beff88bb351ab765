"""The valence-arousal regressor of the two-stage paper: a timm backbone with a VA head.

Stage one trains it on a categorical set (``task="multi"``: VA + category logits, VA targets from
the lexicon anchors); stage two fine-tunes it on a dimensional set with the early layers frozen
(the published fine-tune trains only ResNet's ``layer4`` and the heads). Any timm model name works
as the backbone, with or without a pretrained tag (``resnet101.tv_in1k``); stages are found from
timm's ``feature_info`` so freezing is not resnet-specific.
"""
from __future__ import annotations

from typing import Optional, Union

import timm
import torch
import torch.nn as nn

from emotion_models.errors import ModelConfigError
from emotion_models.registry import HUB, NONE, register_model
from emotion_models.weights import hub_pretrained_kwargs, load_weights

__all__ = ["VARegressor", "build_va", "backbone_stages", "published_cut", "data_config"]

FreezeSpec = Union[int, str, None]
TASKS = ("single", "multi")
HEADS = ("tanh", "linear", "relu_linear")


def backbone_stages(backbone: nn.Module) -> list[str]:
    """Module names of the backbone's stages, in order, from timm's ``feature_info``.

    ``feature_info`` also lists stem outputs (resnet ``act1``, regnet ``stem``) and final norms
    (densenet ``norm5``); a stage is an entry that holds blocks, i.e. whose parameters sit at
    least two modules deep, and is not named ``stem``. Models where no entry qualifies (vgg)
    fall back to every ``feature_info`` entry.
    """
    entries = [info["module"] for info in getattr(backbone, "feature_info", [])]
    if not entries:
        raise ModelConfigError(f"{type(backbone).__name__} has no timm feature_info; freeze by module name instead")

    def is_stage(name: str) -> bool:
        if name.rsplit(".", 1)[-1].startswith("stem"):
            return False
        return any(p.count(".") >= 2 for p, _ in backbone.get_submodule(name).named_parameters())

    return [name for name in entries if is_stage(name)] or entries


def published_cut(backbone: nn.Module) -> str:
    """The module that ends the published freeze: the last ``feature_info`` entry at stride <= 16.

    The published fine-tune (``src/train.py``, ``get_params(model, feature_extract=4)``) freezes every
    parameter before the first one named ``resnet.7`` (``layer4``): conv1, bn1, ``layer1``, ``layer2``
    and ``layer3``, the stages through stride 16. Other backbones take the same cut by stride;
    those whose ``feature_info`` has no stride-16 entry fall back to all but the last stage.
    """
    infos = list(getattr(backbone, "feature_info", []))
    at16 = [info["module"] for info in infos if info.get("reduction", 0) <= 16]
    stages = backbone_stages(backbone)
    if at16 and any(info.get("reduction") == 16 for info in infos):
        return at16[-1]
    return stages[max(len(stages) - 2, 0)]


def data_config(backbone: str) -> dict:
    """How images are prepared for ``backbone``: timm's ``resolve_data_config`` of its pretrained_cfg.

    Returns ``{"mean", "std", "interpolation", "crop_pct"}`` (e.g. ``tf_efficientnet_lite0``:
    mean = std = 0.5). No model is built and nothing is downloaded.
    """
    from timm.data import resolve_data_config

    cfg = timm.get_pretrained_cfg(backbone)
    resolved = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    return {"mean": [float(v) for v in resolved["mean"]], "std": [float(v) for v in resolved["std"]],
            "interpolation": str(resolved["interpolation"]), "crop_pct": float(resolved["crop_pct"])}


def _freeze_end(backbone: nn.Module, names: list[str], until: Union[int, str]) -> int:
    """Index into ``names`` (``named_modules`` order) of the last module to freeze."""
    stages = backbone_stages(backbone)
    if isinstance(until, str) and until.isdigit():
        until = int(until)
    if until == "published":
        until = published_cut(backbone)
    if until == "all_but_last":
        until = len(stages) - 1
    if isinstance(until, bool) or not isinstance(until, (int, str)):
        raise TypeError(f"freeze: expected an int, a module name or 'all_but_last', got {until!r}")
    if isinstance(until, int):
        if not 0 <= until <= len(stages):
            raise ModelConfigError(f"freeze: {until} stages requested, the backbone has {len(stages)} "
                                   f"({', '.join(stages)})")
        if until == 0:  # the stem: everything registered before the first stage
            return names.index(stages[0]) - 1
        until = stages[until - 1]
    if not until or until not in names:
        raise ModelConfigError(f"freeze: unknown stage {until!r}; valid: {', '.join(stages)}, 'published', "
                               f"'all_but_last', 0..{len(stages)} or any module name of the backbone")
    return max(i for i, n in enumerate(names) if n == until or n.startswith(until + "."))


class VARegressor(nn.Module):
    """Pooled backbone features → ``{"va": (N, 2)}`` (+ ``"logits": (N, num_classes)`` if multi-task).

    ``head``: ``"tanh"`` squashes VA onto the project's canonical [-1, 1] scale; ``"linear"`` leaves
    it unbounded; ``"relu_linear"`` is the published head (``FC_va(relu(features))``, unbounded; the
    ReLU is the identity after a ResNet's pooling, not after every backbone's). The output is a
    dict so that every model goes through the same training loop.
    """

    def __init__(self, backbone: nn.Module, task: str = "single", num_classes: int = 8,
                 head: str = "tanh", drop_rate: float = 0.0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if head not in HEADS:
            raise ModelConfigError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if task == "multi" and num_classes < 1:
            raise ValueError(f"task 'multi' needs num_classes >= 1, got {num_classes}")
        self.task = task
        self.num_classes = num_classes
        self.head = head
        self.backbone = backbone
        num_features = backbone.num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.va_head = nn.Linear(num_features, 2)
        self.cls_head = nn.Linear(num_features, num_classes) if task == "multi" else None
        self._frozen: list[str] = []  # fully frozen backbone modules (see freeze)
        self._eval_frozen = True      # hold them in eval mode (BatchNorm statistics fixed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (N, num_features)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.head_drop(self.forward_features(x))
        if self.head == "relu_linear":
            features = torch.relu(features)
        va = self.va_head(features)
        out = {"va": torch.tanh(va) if self.head == "tanh" else va}
        if self.cls_head is not None:
            out["logits"] = self.cls_head(features)
        return out

    def freeze(self, until: FreezeSpec, freeze_bn: bool = True) -> "VARegressor":
        """Freeze the backbone up to and including ``until``; the rest and the heads stay trainable.

        ``until``: an int n (the stem and the first n stages; 0 = stem only; a string of digits
        too), a stage or any backbone module name (``"layer3"``: everything registered up to the
        end of it), ``"published"`` (the published fine-tune's cut, see :func:`published_cut`) or
        ``"all_but_last"`` (stem + every stage but the last). ``None`` or ``"none"`` unfreezes everything.
        Frozen parameters get ``requires_grad=False``. With ``freeze_bn`` fully frozen modules stay
        in eval mode through :meth:`train`, so their BatchNorm statistics do not move; without it
        (the published code: the whole model is in train mode) the statistics keep updating.
        Module registration order is taken as execution order, which holds for timm's models.
        """
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = []
        self._eval_frozen = bool(freeze_bn)
        if until is not None and until != "none":
            modules = list(self.backbone.named_modules())
            names = [n for n, _ in modules]
            end = _freeze_end(self.backbone, names, until)
            # Containers of anything after the cut (the root, "stages") are only partly frozen:
            # their own direct parameters (a ViT's pos_embed) count as stem, their children decide.
            holders = {".".join(n.split(".")[:k]) for n in names[end + 1:] for k in range(n.count(".") + 1)}
            for name, module in modules[:end + 1]:
                if name in holders:
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(False)
                elif not any(name.startswith(f + ".") for f in self._frozen):
                    module.requires_grad_(False)
                    self._frozen.append(name)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "VARegressor":
        super().train(mode)
        for name in (self._frozen if getattr(self, "_eval_frozen", True) else []):
            self.backbone.get_submodule(name).eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser should get (those not frozen)."""
        return [p for p in self.parameters() if p.requires_grad]


@register_model("va")
def build_va(
    backbone: str = "resnet101",
    task: str = "single",
    num_classes: int = 8,
    head: str = "tanh",
    weights: Optional[str] = NONE,
    drop_rate: float = 0.0,
    **timm_kwargs,
) -> VARegressor:
    """Build the VA regressor on any timm backbone.

    ``weights``: ``"hub"`` loads the backbone's pretrained weights the way timm does (the Hugging Face
    hub and its local cache; a cached file is read without any network request), ``"none"`` (or
    None) starts from scratch, any other value is a local backbone state dict (timm / torchvision
    style, DDP or Lightning prefixes allowed; a classifier checkpoint's head keys are reported and
    ignored). Extra keyword arguments go to ``timm.create_model`` (e.g. ``drop_path_rate``).
    Freezing is :meth:`VARegressor.freeze`, called after any weights are loaded.
    """
    if not timm.is_model(backbone):
        raise ModelConfigError(f"unknown timm backbone {backbone!r}")
    pretrained = hub_pretrained_kwargs(backbone) if weights == HUB else {}
    net = timm.create_model(backbone, num_classes=0, global_pool="avg", **pretrained, **timm_kwargs)
    model = VARegressor(net, task=task, num_classes=num_classes, head=head, drop_rate=drop_rate)
    if weights not in (None, NONE, HUB):
        load_weights(model.backbone, weights)
    return model
