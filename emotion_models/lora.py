"""LORA and LORA-V: sticker emotion recognition with local re-attention (SER30K, ACM MM'22), as published.

The architecture of nku-shengzheliu/SER30K (``model.py``, ``model_V.py``, ``block.py``), rebuilt with
the published module and parameter names so that its files load whole:

* ``vision_model``: PVT-v1 small with local re-attention (:mod:`emotion_models.pvt`), 996 tokens of
  width 512 at ``alpha = 8``, ``locals = 1 1 1 0``;
* ``v_proj`` (512 -> 768) and, for LORA, ``text_model`` + ``l_proj`` (768 -> 768): the sticker text as
  30 BERT-base-uncased tokens, the mean of BERT's last four layers, frozen;
* ``pos_embed``: one learned position per fused token (996 visual [+ 30 text]);
* ``fusion_model``: one pre-norm transformer block (width 768, 12 heads, MLP 3072, no attention
  mask: padded text positions take part, as published); its output at token 0 (the last stage's
  global token) goes to ``head``.

``forward`` returns ``{"logits": (B, num_classes)}``. ``text_encoder="bytes"`` swaps BERT for the small
byte-level encoder of :mod:`emotion_models.text` (the offline demo and tests; it has no published
counterpart and its checkpoints differ accordingly).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from emotion_models.errors import ModelConfigError
from emotion_models.pvt import PRETRAINED_NEW, PVT_SMALL, PyramidVisionTransformer
from emotion_models.registry import HUB, NONE, register_model
from emotion_models.text import TEXT_LEN, build_text_model, text_features
from emotion_models.weights import load_weights

__all__ = ["Lora", "FuseBlock", "build_lora", "build_lora_v"]



class FuseAttention(nn.Module):
    """Multi-head self-attention with the published names (``query``, ``key``, ``value``, ``out``)."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(attn_drop)
        self.proj_dropout = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        probs = (q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)).softmax(dim=-1)
        out = (self.attn_dropout(probs) @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj_dropout(self.out(out))


class FuseMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act_fn = nn.GELU()
        self.dropout = nn.Dropout(drop)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act_fn(self.fc1(x)))))


class FuseBlock(nn.Module):
    """One pre-norm transformer block over the fused tokens; returns token 0 ``(B, dim)``."""

    def __init__(self, dim: int = 768, heads: int = 12, mlp_dim: int = 3072, drop: float = 0.1,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FuseAttention(dim, heads, attn_drop)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FuseMlp(dim, mlp_dim, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        x = x + self.ffn(self.ffn_norm(x))
        return x[:, 0]


class Lora(nn.Module):
    """LORA (``text_encoder`` set) or LORA-V (``text_encoder=None``); see the module doc.

    ``img_size`` only validates that images of that size supply the tokens the fusion expects
    (the position embeddings stay laid out for ``pos_size`` = 224 px, as in the published files).
    ``trunk`` overrides PVT-small's widths/depths/heads/ratios (small test models).
    """

    def __init__(self, num_classes: int = 7, img_size: int = 448, alpha: int = 8,
                 locals: Sequence[int] = (1, 1, 1, 0), drop_rate: float = 0.0,  # noqa: A002 - published name
                 drop_path_rate: float = 0.1, hidden_dim: int = 768, fuse_heads: int = 12, fuse_mlp_dim: int = 3072,
                 fuse_dropout: float = 0.1, fuse_attn_dropout: float = 0.0, text_encoder: Optional[str] = None,
                 max_text_len: int = TEXT_LEN, tune_text: bool = False, pos_size: int = 224,
                 trunk: Optional[dict] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.vision_model = PyramidVisionTransformer(**{**PVT_SMALL, **(trunk or {})}, locals=locals, alpha=alpha,
                                                     drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                                     pos_size=pos_size)
        self.vision_model.check_image_size(img_size)
        self.num_visual_tokens = self.vision_model.num_tokens
        self.text_kind = None
        self.text_spec = text_encoder
        self.max_text_len = 0
        self.tune_text = tune_text
        if text_encoder is not None:
            self.text_kind, self.text_model, text_dim = build_text_model(text_encoder, max_text_len)
            self.max_text_len = max_text_len
            if not tune_text:
                self.text_model.requires_grad_(False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_visual_tokens + self.max_text_len, hidden_dim))
        self.v_proj = nn.Linear(self.vision_model.embed_dims[-1], hidden_dim)
        if text_encoder is not None:
            self.l_proj = nn.Linear(text_dim, hidden_dim)
        self.fusion_model = FuseBlock(hidden_dim, fuse_heads, fuse_mlp_dim, fuse_dropout, fuse_attn_dropout)
        self.head = nn.Linear(hidden_dim, num_classes)
        for proj in (self.v_proj, getattr(self, "l_proj", None), self.head):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
                nn.init.normal_(proj.bias, std=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)

    def weight_targets(self) -> dict:
        """Parts a pretrained file may initialise alone (see :func:`emotion_models.weights.load_weights`)."""
        return {"vision_model": (self.vision_model, PRETRAINED_NEW)}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings and cls tokens (biases and norms are exempt by the optimiser factory)."""
        return {"pos_embed"} | {f"vision_model.{n}" for n in self.vision_model.no_weight_decay()}

    def tokenizer(self):
        """Texts -> numpy ``(ids, mask)`` for this model's text branch (``None`` for LORA-V)."""
        from emotion_models.text import make_tokenizer

        return None if self.text_kind is None else make_tokenizer(self.text_spec, self.max_text_len)

    def forward(self, images: torch.Tensor, text_ids: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        x = self.v_proj(self.vision_model(images))
        if self.text_kind is not None:
            if text_ids is None:
                raise ValueError("LORA needs the sticker text (text_ids, text_mask); use lora_v for images alone")
            if text_ids.shape[1] != self.max_text_len:
                raise ValueError(f"text has {text_ids.shape[1]} tokens; this LORA takes {self.max_text_len}")
            if text_mask is None:
                text_mask = (text_ids != 0).long()
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.tune_text):  # frozen: no graph
                text = text_features(self.text_kind, self.text_model, text_ids, text_mask)
            x = torch.cat([x, self.l_proj(text)], dim=1)
        x = self.fusion_model(x + self.pos_embed)
        return {"logits": self.head(x)}


def _build(weights: Optional[str], **kwargs) -> Lora:
    """The model, from scratch (``weights`` None or ``"none"``) or from a local file; PVT v1 has no hub weights."""
    if weights == HUB:
        raise ModelConfigError("LORA's PVT-v1 trunk has no weights on the timm hub: pass --weights PATH (e.g. the "
                               "published pvt_small.pth or checkpoint.pth) or --weights none (train from scratch)")
    model = Lora(**kwargs)
    if weights and weights != NONE:
        load_weights(model, weights)
    return model


@register_model("lora")
def build_lora(text_encoder: str = "bytes", weights: Optional[str] = None, **kwargs) -> Lora:
    """LORA: ``text_encoder="bert:PATH"`` (a local bert-base-uncased folder) as published, ``"bytes"`` offline.

    ``weights``: a LORA checkpoint (the published ``checkpoint.pth`` too) or an ImageNet PVT trunk.
    """
    if text_encoder is None:
        raise ModelConfigError("lora needs a text encoder ('bert:PATH' or 'bytes'); lora_v is the image-only model")
    return _build(weights, text_encoder=text_encoder, **kwargs)


@register_model("lora_v")
def build_lora_v(weights: Optional[str] = None, **kwargs) -> Lora:
    """LORA-V: LORA without the text branch (``checkpoint_v.pth`` or an ImageNet PVT trunk as ``weights``)."""
    if kwargs.pop("text_encoder", None) is not None:
        raise ModelConfigError("lora_v has no text branch; use create_model('lora', text_encoder=...)")
    return _build(weights, **kwargs)
