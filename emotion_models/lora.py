"""LORA and LORA-V: sticker emotion recognition with local re-attention (SER30K, ACM MM'22).

The visual trunk is timm's PVT-v2 (``pvt_v2_b2`` widths and depths by default) with timm's module
names (``patch_embed``, ``stages.N.downsample``, ``stages.N.blocks.M.*``, ``stages.N.norm``), so a timm
``pvt_v2_*`` state dict loads into it unchanged. Stages without re-attention are timm's own
:class:`~timm.models.pvt_v2.PyramidVisionTransformerStage` (fused SDPA). A re-attending stage
(:class:`QueryStage`) prepends a learnable query token to its patch tokens and computes attention
explicitly so that the probabilities are available:

* queries are ``[query, patches]``; keys/values are ``[query, reduced patches]`` where the patches
  go through PVT's strided spatial-reduction conv (``sr > 1``) and the query token, which has no
  spatial position, bypasses the conv and joins the reduced tokens before the shared LayerNorm (the
  paper's code does the same). With ``sr = 1`` keys are ``[query, patches]`` unchanged.
* in the depth-wise-conv MLP the query token skips the 3x3 conv (it is not on the feature map) and
  shares the two linear layers with the patches.

After the stage, :mod:`emotion_models.reattention` rolls the query's attention through the stage's
blocks and keeps, per head, the ``k = alpha * sr**2`` most attended patch tokens, capped at the
stage's token count at ``img_size`` (at 64 px every token of every stage is kept with ``alpha = 8``).
``k`` and hence the fusion's token count are fixed at build time: larger images select the same
``k`` per stage, smaller ones that cannot supply ``k`` tokens raise a ValueError. The last stage
always re-attends (its query token is the classifier token; as in the paper's code), ``locals``
switches the earlier stages on or off (``locals[-1]`` is therefore ignored).

Fusion: each stage's query token and its selected tokens are projected to ``fusion_dim`` by
stage-specific two-layer MLPs; text tokens (:mod:`emotion_models.text`) by a linear layer. One
pre-norm transformer block runs over ``[stage queries (stage order), local tokens, text tokens]``
with learned type embeddings (query / local / text) and position embeddings sized from the real
token counts of ``img_size`` and ``max_text_len``; padded text positions are masked out as keys.
The classifier reads the last stage's query token. LORA-V is the same model without the text branch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm, Mlp, calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models.pvt_v2 import (
    Attention, MlpWithDepthwiseConv, OverlapPatchEmbed, PyramidVisionTransformerStage,
)
from timm.models.vision_transformer import Block

from emotion_models.reattention import gather_tokens, query_rollout, select_topk
from emotion_models.registry import register_model
from emotion_models.text import PAD_ID, build_text_encoder
from emotion_models.weights import load_weights

__all__ = ["Lora", "QueryStage", "QueryBlock", "QueryAttention", "QueryMlp", "stage_feature_sizes", "build_lora",
           "build_lora_v"]

_NUM_PREFIX = 1  # one query token per re-attending stage


class QueryAttention(Attention):
    """timm PVT-v2 spatial-reduction attention with a prefix query token and explicit softmax.

    Returns the block output and the attention probabilities ``(B, heads, 1+N, 1+M)`` (detached;
    keys ordered ``[query, reduced cells]``) for the re-attention rollout.
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, **kwargs) -> None:
        if kwargs.get("linear_attn"):
            raise ValueError("linear (pooled) PVT attention has no token-aligned keys; use linear_attn=False")
        super().__init__(dim, num_heads=num_heads, sr_ratio=sr_ratio, **kwargs)
        self.sr_ratio = sr_ratio

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, channels = x.shape
        q = self.q(x).reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr is not None:
            prefix, patches = x[:, :_NUM_PREFIX], x[:, _NUM_PREFIX:]
            patches = patches.transpose(1, 2).reshape(batch, channels, *feat_size)
            reduced = self.sr(patches).flatten(2).transpose(1, 2)
            x = self.norm(torch.cat([prefix, reduced], dim=1))
        kv = self.kv(x).reshape(batch, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(batch, length, channels)
        return self.proj_drop(self.proj(out)), attn.detach()


class QueryMlp(MlpWithDepthwiseConv):
    """timm PVT-v2 MLP; the prefix query token skips the depth-wise conv (it has no grid position)."""

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        x = self.fc1(x)
        prefix, patches = x[:, :_NUM_PREFIX], x[:, _NUM_PREFIX:]
        batch, _, channels = patches.shape
        patches = self.relu(patches.transpose(1, 2).reshape(batch, channels, *feat_size))
        patches = self.dwconv(patches).flatten(2).transpose(1, 2)
        x = self.drop(self.act(torch.cat([self.relu(prefix), patches], dim=1)))
        return self.drop(self.fc2(x))


class QueryBlock(nn.Module):
    """PVT-v2 block over ``[query, patches]``; same attribute names as timm's ``Block``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, sr_ratio: int = 1,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: type[nn.Module] = LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = QueryAttention(dim, num_heads=num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = QueryMlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = self.attn(self.norm1(x), feat_size)
        x = x + self.drop_path1(out)
        x = x + self.drop_path2(self.mlp(self.norm2(x), feat_size))
        return x, attn


class QueryStage(nn.Module):
    """PVT-v2 stage (timm layout ``downsample``, ``blocks``, ``norm``) plus a learnable ``query_token``.

    ``forward(x)`` returns the NCHW feature map for the next stage, the normed tokens
    ``(B, 1+N, C)`` (query first) and the per-block attention probabilities.
    """

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool = True, num_heads: int = 8,
                 sr_ratio: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Union[list[float], float] = 0.0,
                 norm_layer: type[nn.Module] = LayerNorm) -> None:
        super().__init__()
        self.sr_ratio = sr_ratio
        self.downsample = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=dim, embed_dim=dim_out) \
            if downsample else None
        self.blocks = nn.ModuleList([QueryBlock(
            dim_out, num_heads, mlp_ratio=mlp_ratio, sr_ratio=sr_ratio, qkv_bias=qkv_bias,
            proj_drop=proj_drop, attn_drop=attn_drop,
            drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
            norm_layer=norm_layer) for i in range(depth)])
        self.norm = norm_layer(dim_out)
        self.query_token = nn.Parameter(torch.zeros(1, _NUM_PREFIX, dim_out))
        trunc_normal_(self.query_token, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if self.downsample is not None:
            x = self.downsample(x)  # NCHW -> NHWC
        batch, height, width, channels = x.shape
        x = torch.cat([self.query_token.expand(batch, -1, -1), x.reshape(batch, -1, channels)], dim=1)
        attns = []
        for block in self.blocks:
            x, attn = block(x, (height, width))
            attns.append(attn)
        x = self.norm(x)
        fmap = x[:, _NUM_PREFIX:].reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
        return fmap, x, attns


def stage_feature_sizes(img_size: Union[int, Sequence[int]], num_stages: int) -> list[tuple[int, int]]:
    """Feature-map size of each PVT-v2 stage: a 7x7/4 stem (padding 3), then 3x3/2 (padding 1)."""
    size = tuple((s - 1) // 4 + 1 for s in to_2tuple(img_size))
    sizes = [size]
    for _ in range(num_stages - 1):
        size = tuple((s - 1) // 2 + 1 for s in size)
        sizes.append(size)
    return sizes


def _projection(in_dim: int, out_dim: int) -> Mlp:
    # Stage tokens -> fusion width: Linear-ReLU-Linear as in the paper's code.
    return Mlp(in_dim, in_dim, out_dim, act_layer=nn.ReLU)


def _init_weights(module: nn.Module) -> None:
    # timm PVT-v2's init: truncated-normal linear layers, fan-out normal convs.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Lora(nn.Module):
    """LORA: PVT-v2 trunk + local re-attention + text branch + one fusion block (see module doc).

    ``forward(images, text_ids=None, text_mask=None) -> {"logits": (B, num_classes)}``; without a text
    encoder (LORA-V) or without ``text_ids`` only the visual tokens are fused.
    """

    def __init__(
            self,
            alpha: int = 8,
            locals: Sequence[int] = (1, 1, 1, 0),  # noqa: A002 - the paper's name
            num_classes: int = 7,
            img_size: Union[int, Sequence[int]] = 448,
            in_chans: int = 3,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (3, 4, 6, 3),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            fusion_dim: int = 256,
            fusion_heads: int = 4,
            fusion_mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            text_encoder: Optional[str] = "bytes",
            max_text_len: int = 32,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        for name, values in (("embed_dims", embed_dims), ("num_heads", num_heads),
                             ("sr_ratios", sr_ratios), ("mlp_ratios", mlp_ratios), ("locals", locals)):
            if len(values) != num_stages:
                raise ValueError(f"{name} has {len(values)} entries; depths has {num_stages} stages")
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}")
        for dim, heads in (*zip(embed_dims, num_heads), (fusion_dim, fusion_heads)):
            if dim % heads:
                raise ValueError(f"width {dim} is not divisible by its {heads} attention heads")
        self.num_classes = num_classes
        self.img_size = img_size
        self.reattend = tuple(bool(flag) or i == num_stages - 1 for i, flag in enumerate(locals))
        feat_sizes = stage_feature_sizes(img_size, num_stages)
        for i, ((height, width), sr) in enumerate(zip(feat_sizes, sr_ratios)):
            if min(height, width) < sr:
                raise ValueError(f"img_size={img_size} is too small: stage {i} is {height}x{width}, "
                                 f"below its sr_ratio {sr}")

        self.patch_embed = OverlapPatchEmbed(
            patch_size=7, stride=4, in_chans=in_chans, embed_dim=embed_dims[0])
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.stages = nn.ModuleList()
        for i in range(num_stages):
            stage_cls = QueryStage if self.reattend[i] else PyramidVisionTransformerStage
            self.stages.append(stage_cls(
                dim=embed_dims[max(i - 1, 0)], dim_out=embed_dims[i], depth=depths[i], downsample=i > 0,
                num_heads=num_heads[i], sr_ratio=sr_ratios[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                proj_drop=drop_rate, drop_path=dpr[i]))

        # Tokens kept per head: alpha * sr^2, capped at the stage's token count.
        self.num_selected = {i: min(alpha * sr_ratios[i] ** 2, feat_sizes[i][0] * feat_sizes[i][1])
                             for i in range(num_stages) if self.reattend[i]}
        self.query_proj = nn.ModuleDict(
            {str(i): _projection(embed_dims[i], fusion_dim) for i in self.num_selected})
        self.local_proj = nn.ModuleDict(
            {str(i): _projection(embed_dims[i], fusion_dim) for i in self.num_selected})
        self.num_query_tokens = len(self.num_selected)
        num_local = sum(num_heads[i] * k for i, k in self.num_selected.items())
        self.num_visual_tokens = self.num_query_tokens + num_local

        self.max_text_len = max_text_len if text_encoder is not None else 0
        self.type_embed = nn.Parameter(torch.zeros(3 if text_encoder is not None else 2, fusion_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_visual_tokens + self.max_text_len, fusion_dim))
        self.fusion = Block(
            fusion_dim, fusion_heads, mlp_ratio=fusion_mlp_ratio, qkv_bias=True, proj_drop=drop_rate)
        self.norm = nn.LayerNorm(fusion_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(fusion_dim, num_classes)
        self.apply(_init_weights)
        trunc_normal_(self.type_embed, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

        # Built after the init above so that a pretrained BERT keeps its weights.
        self.text_encoder = build_text_encoder(text_encoder, fusion_dim, max_text_len)
        self.text_proj = None
        if self.text_encoder is not None:
            self.text_proj = nn.Linear(self.text_encoder.dim, fusion_dim)
            _init_weights(self.text_proj)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "type_embed", "text_encoder.pos_embed"}
        return names | {f"stages.{i}.query_token" for i in self.num_selected}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Visual fusion tokens ``(B, num_visual_tokens, fusion_dim)``: stage queries, then local tokens."""
        x = self.patch_embed(images)
        queries, local = [], []
        for i, stage in enumerate(self.stages):
            if not self.reattend[i]:
                x = stage(x)
                continue
            x, tokens, attns = stage(x)
            rollout = query_rollout(attns, tuple(x.shape[-2:]), stage.sr_ratio, _NUM_PREFIX)
            indices = select_topk(rollout, self.num_selected[i])
            queries.append(self.query_proj[str(i)](tokens[:, 0]))
            local.append(self.local_proj[str(i)](gather_tokens(tokens[:, _NUM_PREFIX:], indices)))
        queries = torch.stack(queries, dim=1) + self.type_embed[0]
        visual = torch.cat([queries, torch.cat(local, dim=1) + self.type_embed[1]], dim=1)
        if visual.shape[1] != self.num_visual_tokens:
            raise ValueError(
                f"images of {images.shape[-2]}x{images.shape[-1]} px give {visual.shape[1]} visual tokens; "
                f"this LORA was built for img_size={self.img_size} ({self.num_visual_tokens} tokens)")
        return visual + self.pos_embed[:, :self.num_visual_tokens]

    def forward_text(self, text_ids: torch.Tensor, text_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Text fusion tokens ``(B, L, fusion_dim)``; ``L <= max_text_len``."""
        length = text_ids.shape[1]
        if length > self.max_text_len:
            raise ValueError(
                f"text has {length} tokens; this LORA was built for max_text_len={self.max_text_len}")
        text = self.text_proj(self.text_encoder(text_ids, text_mask)) + self.type_embed[2]
        start = self.num_visual_tokens
        return text + self.pos_embed[:, start:start + length]

    def forward(self, images: torch.Tensor, text_ids: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        x = self.forward_features(images)
        attn_mask = None
        if self.text_encoder is not None and text_ids is not None:
            if text_mask is None:
                text_mask = (text_ids != PAD_ID).long()
            visible = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            attn_mask = torch.cat([visible, text_mask.bool()], dim=1)[:, None, None, :]
            x = torch.cat([x, self.forward_text(text_ids, text_mask)], dim=1)
        x = self.norm(self.fusion(x, attn_mask=attn_mask))
        # Stage queries come first in stage order: the last stage's query is the classifier token.
        return {"logits": self.head(self.head_drop(x[:, self.num_query_tokens - 1]))}


def _load(model: Lora, weights: Optional[str]) -> Lora:
    if weights is not None:
        load_weights(model, weights)
    return model


@register_model("lora")
def build_lora(text_encoder: Optional[str] = "bytes", weights: Optional[str] = None, **kwargs) -> Lora:
    """LORA (visual + text). ``kwargs`` are :class:`Lora`'s (pvt_v2_b2 defaults, 448 px, 7 classes).

    ``weights``: a local state dict (a LORA checkpoint or a timm ``pvt_v2_*`` trunk) loaded by name.
    """
    return _load(Lora(text_encoder=text_encoder, **kwargs), weights)


@register_model("lora_v")
def build_lora_v(weights: Optional[str] = None, **kwargs) -> Lora:
    """LORA-V: :func:`build_lora` without the text branch."""
    if kwargs.pop("text_encoder", None) is not None:
        raise ValueError("lora_v has no text branch; use create_model('lora', text_encoder=...)")
    return _load(Lora(text_encoder=None, **kwargs), weights)
