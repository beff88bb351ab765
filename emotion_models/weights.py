"""Load a local state dict into a module, forgivingly (the timm ``load_checkpoint`` idea).

Nothing is ever downloaded: pretrained backbones come from a file the user brings (a timm or
torchvision ``state_dict``, a DDP / Lightning checkpoint, or this project's own checkpoint).
Key prefixes such as DDP's ``module.`` are stripped when that makes more keys match, tensors
whose shape differs (e.g. a classifier's ``fc`` for another class count) are dropped and
reported, and the rest is loaded with ``strict=False``. A file that matches *nothing* is an
error: silently training from random weights is the failure this module exists to prevent.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["LoadReport", "load_weights", "read_state_dict"]

_log = logging.getLogger(__name__)

# Where common checkpoint formats keep the weights, tried in order.
_CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict")
DEFAULT_PREFIXES = ("", "module.", "model.", "backbone.")


@dataclass
class LoadReport:
    """What :func:`load_weights` did: key names that were missing, unexpected, or shape-mismatched."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    loaded: int = 0

    def summary(self, limit: int = 3) -> str:
        """One line with the counts and the first ``limit`` names of each kind."""

        def part(label: str, names: list[str]) -> str:
            more = ", ..." if len(names) > limit else ""
            return f"{len(names)} {label}" + (f" ({', '.join(names[:limit])}{more})" if names else "")

        return "; ".join([f"loaded {self.loaded} tensors", part("missing", self.missing),
                          part("unexpected", self.unexpected), part("shape-mismatched", self.mismatched)])


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file on CPU (``weights_only=True``; ``.safetensors`` too).

    Accepts a raw state dict or a dict that keeps it under ``state_dict`` / ``model`` /
    ``model_state`` / ``model_state_dict``. Raises FileNotFoundError or a one-line ValueError
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
        obj = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: not a readable weights file ({reason})") from None
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: contains no tensors")
    return tensors


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state)
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _best_prefix(state: Mapping[str, torch.Tensor], target: set[str], candidates: Sequence[str]) -> str:
    """The prefix (or pair, e.g. ``module.backbone.``) whose removal makes the most keys match."""
    options = dict.fromkeys(a + b for a in candidates for b in candidates)  # ordered, unique
    return max(options, key=lambda p: len(target.intersection(_strip(state, p))))


def load_weights(
    module: nn.Module,
    path: Union[str, Path],
    *,
    strict: bool = False,
    prefix_candidates: Sequence[str] = DEFAULT_PREFIXES,
) -> LoadReport:
    """Load the weights in ``path`` into ``module`` and report what matched.

    ``strict=True`` turns any missing, unexpected or shape-mismatched key into a ValueError;
    by default they are only reported (a classifier checkpoint's ``fc.*`` keys are simply
    unexpected for a headless backbone). Loading nothing at all is always a ValueError.
    """
    state = read_state_dict(path)
    own = module.state_dict()
    state = _strip(state, _best_prefix(state, set(own), prefix_candidates))

    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    report = LoadReport(
        missing=[k for k in own if k not in usable],
        unexpected=[k for k in state if k not in own],
        mismatched=mismatched,
        loaded=len(usable),
    )
    if report.loaded == 0:
        raise ValueError(f"{path}: matches no parameter of {type(module).__name__} ({report.summary()})")
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(f"{path}: does not fit {type(module).__name__} exactly ({report.summary()})")
    module.load_state_dict(usable, strict=False)
    # Missing or mismatched tensors mean part of the model stays random: say so loudly.
    level = logging.WARNING if report.missing or report.mismatched else logging.INFO
    _log.log(level, "%s -> %s: %s", path, type(module).__name__, report.summary())
    return report
