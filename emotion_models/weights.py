"""Load local weights into a model by name, all or nothing.

Nothing is ever downloaded: pretrained trunks and published checkpoints come from files the user
brings. Files are read with ``torch.load(..., weights_only=True)``; the one non-tensor type a
published format needs, ``argparse.Namespace`` (the ``args`` of SER30K's ``checkpoint.pth``), is
allowlisted and nothing else is ever unpickled.

:func:`load_weights` accepts a whole-model file (this project's, or a published checkpoint in the
same names) or a pretrained *trunk* file for a part the model declares in ``weight_targets()``
(LORA's ``vision_model`` takes ImageNet ``pvt_small.pth``). It picks the target that the file's
names fit best, strips wrapper prefixes such as DDP's ``module.``, and then loads only if the file
fits: every tensor of the target comes from the file, except

* a classifier head of another size or absent from the target (``head``, ``fc``, ``classifier``,
  ``head_dist``): skipped, and the report says so;
* the tensors the target declares as new (e.g. LORA's per-stage cls tokens and projections, which
  no ImageNet trunk has) and BatchNorm's ``num_batches_tracked`` counters.

Anything else missing, unexpected or of another shape stops with one ``ValueError`` naming the file
and listing what did not fit: no silent partial loads.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from emotion_models.errors import ModelConfigError

__all__ = ["LoadReport", "load_weights", "read_checkpoint", "read_state_dict", "HEAD_PATTERN"]

_log = logging.getLogger(__name__)

# Where checkpoint formats keep the weights, tried in order (SER30K's main.py: "model").
_CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict")
_PREFIXES = ("", "module.", "model.", "backbone.")
# A classifier's final layer: may be skipped when its size differs or the target has none.
HEAD_PATTERN = re.compile(r"^(head|head_dist|fc|classifier|last_linear)\.(weight|bias)$")
_ALWAYS_OPTIONAL = re.compile(r"(^|\.)num_batches_tracked$")
# The one non-tensor type a published checkpoint needs (SER30K's main.py saves its argparse args).
SAFE_GLOBALS = [argparse.Namespace]


@dataclass
class LoadReport:
    """What :func:`load_weights` loaded: into which target, how many tensors, what it skipped."""

    target: str = ""
    loaded: int = 0
    in_file: int = 0
    skipped_head: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    def summary(self) -> str:
        where = f" into {self.target}" if self.target else ""
        text = f"used {self.loaded} of the file's {self.in_file} tensors{where}"
        if self.skipped_head:
            text += f"; skipped the classifier head ({', '.join(self.skipped_head)}: another size or none here)"
        if self.new:
            text += f"; {len(self.new)} tensors are new in this model and keep their initialisation"
        return text


def read_checkpoint(path: Union[str, Path]) -> Any:
    """The whole object in a checkpoint file, read with ``weights_only=True`` (``.safetensors`` too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelConfigError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(f"{path}: not a readable weights file ({reason})") from None


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a bare state dict or one kept under ``model`` / ``state_dict`` / ..."""
    obj = read_checkpoint(path)
    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ModelConfigError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelConfigError(f"{path}: contains no tensors")
    return tensors


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state)
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _fit(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """The prefix (or prefix pair, e.g. ``module.model.``) whose removal makes the most names match."""
    options = dict.fromkeys(a + b for a in _PREFIXES for b in _PREFIXES)
    prefix = max(options, key=lambda p: len(own.keys() & _strip(state, p).keys()))
    return prefix, _strip(state, prefix)


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, Sequence[str]]]:
    targets = {"": (model, ())}
    declared = getattr(model, "weight_targets", None)
    if callable(declared):
        targets.update(declared())
    return targets


def _names(names: list[str], limit: int = 6) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(model: nn.Module, path: Union[str, Path]) -> LoadReport:
    """Load ``path`` into ``model`` (or the declared part it fits) if and only if it fits; see module doc.

    ``model.weight_targets()`` may return ``{name: (submodule, new_patterns)}``: a trunk file for
    ``submodule``, where parameters whose names match one of the regex ``new_patterns`` are expected
    to be absent from such a file.
    """
    state = read_state_dict(path)
    candidates = []
    for name, (module, new_patterns) in _targets(model).items():
        own = module.state_dict()
        _, stripped = _fit(state, own)
        candidates.append((len(own.keys() & stripped.keys()), name == "", name, module, new_patterns, stripped))
    matched, _, name, module, new_patterns, state = max(candidates, key=lambda c: (c[0], c[1]))
    if matched == 0:
        raise ModelConfigError(f"{path}: matches no parameter of {type(model).__name__} "
                               f"(file has e.g. {_names(sorted(state), 3)})")

    own = module.state_dict()
    new = [re.compile(p) for p in new_patterns]
    skipped = sorted(k for k in state if HEAD_PATTERN.match(k) and (k not in own or own[k].shape != state[k].shape))
    usable = {k: v for k, v in state.items() if k in own and k not in skipped}
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in usable.items()
                   if v.shape != own[k].shape]
    unexpected = sorted(k for k in state if k not in own and k not in skipped)
    absent = [k for k in own if k not in usable]
    optional = [k for k in absent if _ALWAYS_OPTIONAL.search(k) or HEAD_PATTERN.match(k)
                or any(p.search(k) for p in new)]
    missing = [k for k in absent if k not in optional]
    label = f"{type(model).__name__}{'.' + name if name else ''}"
    if wrong_shape or unexpected or missing:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
        if wrong_shape:
            problems.append(f"other shape {len(wrong_shape)}: {_names(wrong_shape, 3)}")
        raise ModelConfigError(f"{path}: does not fit {label} ({'; '.join(problems)})")

    module.load_state_dict(usable, strict=False)
    report = LoadReport(target=name, loaded=len(usable), in_file=len(state), skipped_head=skipped,
                        new=[k for k in optional if not _ALWAYS_OPTIONAL.search(k)])
    _log.info("%s -> %s: %s", path, label, report.summary())
    return report


# ----------------------------------------------------------------------------- timm's hub weights

_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repository


def hub_repo(model_name: str) -> str:
    """The Hugging Face repository of a timm model's pretrained weights (``timm/resnet101.tv_in1k``);
    ``resnet101`` names the architecture's default tag."""
    import timm

    if not timm.is_model(model_name):
        raise ModelConfigError(f"unknown timm model {model_name!r}")
    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ModelConfigError(f"{model_name}: timm knows no hub weights for it; pass --weights PATH (a local "
                               "weights file) or --weights none (train from scratch)")
    return cfg.hf_hub_id


def cached_hub_file(model_name: str) -> Optional[str]:
    """The local cache's copy of the model's hub weights, or None (no network is used)."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_repo(model_name)
    for filename in _HUB_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def require_hub_weights(model_name: str) -> str:
    """The model's pretrained weights in the local hub cache, downloaded into it first when they are not
    there; one line naming both ways out (a local file, or training from scratch) when neither works.

    Called by the driver before Ray starts or any data is read, so a missing file never costs a run.
    """
    found = cached_hub_file(model_name)
    if found:
        return found
    repo = hub_repo(model_name)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    reason = "the hub has neither model.safetensors nor pytorch_model.bin for it"
    for filename in _HUB_FILES:
        try:
            return hf_hub_download(repo, filename)
        except LocalEntryNotFoundError as exc:   # offline (HF_HUB_OFFLINE) or the hub unreachable
            reason = " ".join(str(exc).split())[:160]
            break
        except EntryNotFoundError:
            continue   # the hub answered: this repository keeps its weights under the other name
        except Exception as exc:  # noqa: BLE001 - no route, refused, timed out: all one answer
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
            break
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ModelConfigError(f"{model_name}: its pretrained weights ({repo}) are not in the local hub cache "
                           f"({HF_HUB_CACHE}) and could not be downloaded ({reason}); pass --weights PATH (a local "
                           "weights file) or --weights none (train from scratch)")


def hub_pretrained_kwargs(model_name: str) -> dict:
    """``timm.create_model`` arguments that load the hub weights: from the local cache's file when it is
    there (no network request at all), else timm's ordinary download."""
    found = cached_hub_file(model_name)
    return {"pretrained": True, **({"pretrained_cfg_overlay": {"file": found}} if found else {})}
