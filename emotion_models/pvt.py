"""PVT-v1 with local re-attention: the visual trunk of LORA / LORA-V, as published.

The Pyramid Vision Transformer (v1, Wang et al. 2021; whai362/PVT) as the SER30K code extends it
(``pvt_local_final.py`` in nku-shengzheliu/SER30K). Module and parameter names are the published
ones (``patch_embed1``, ``pos_embed1``, ``block1.0.attn.kv``, ``cls_token1``, ``local_proj1.0``, ...),
so ImageNet ``pvt_small.pth`` and the released LORA checkpoints load by name.

Per stage ``i`` (1-based in names): a non-overlapping patch embedding (4x4 for the first stage,
2x2 after, then LayerNorm), a learned position embedding sized for 224 px images and bilinearly
resized to the actual grid, ``depths[i]`` pre-norm blocks of spatial-reduction attention (keys and
values from an ``sr x sr`` strided conv of the tokens) and a GELU MLP. With ``locals[i] = 1`` the
stage also carries its own cls token (it skips the strided conv and joins the reduced keys), and
after the stage :mod:`emotion_models.reattention` keeps each head's ``alpha * sr**2`` most attended
tokens, projected to the last stage's width by ``local_proj``; the stage's cls token, projected by
``global_proj``, is the stage's *global* token. The last stage always has a cls token (``cls_token``)
and always selects (``alpha`` tokens per head, no projection).

Output: ``(B, T, 512)`` normed tokens, globals first (last stage first), then every local token in
reverse order of selection (the published ``flip``); ``T = 1 + sum(locals) + alpha * (sum of
heads * sr**2 over selecting stages)``: 996 for PVT-small with ``locals = 1 1 1 0`` and ``alpha = 8``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from emotion_models.errors import ModelConfigError
from emotion_models.reattention import select_tokens, selection_scores

__all__ = ["PyramidVisionTransformer", "PVT_SMALL", "PRETRAINED_NEW", "stage_grids"]

# PVT-v1 small (whai362/PVT ``pvt_small``), the trunk of LORA.
PVT_SMALL = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1))


# An ImageNet PVT file (pvt_small.pth) has none of these: local re-attention adds them to PVT.
PRETRAINED_NEW = (r"^cls_token\d+$", r"^local_proj\d+\.", r"^global_proj\d+\.")


def stage_grids(img_size: int, patch_size: int, num_stages: int) -> list[tuple[int, int]]:
    """Token grid of every stage for square ``img_size`` images (a conv with stride = kernel)."""
    side = img_size // patch_size
    grids = [(side, side)]
    for _ in range(num_stages - 1):
        side //= 2
        grids.append((side, side))
    return grids


class Attention(nn.Module):
    """Spatial-reduction attention that also returns its probabilities ``(B, heads, L, L_kv)``.

    ``has_cls``: the first token is a cls token that bypasses the reduction conv and is
    prepended to the reduced keys (then LayerNorm over all of them).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1, has_cls: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.has_cls = has_cls
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(batch, length, heads, dim // heads).transpose(1, 2)
        keys = x
        if self.sr_ratio > 1:
            prefix = x[:, :1] if self.has_cls else x[:, :0]
            patches = x[:, prefix.shape[1]:].transpose(1, 2).reshape(batch, dim, *grid)
            reduced = self.sr(patches).flatten(2).transpose(1, 2)
            keys = self.norm(torch.cat([prefix, reduced], dim=1))
        k, v = self.kv(keys).reshape(batch, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out)), probs


class Block(nn.Module):
    """Pre-norm transformer block over spatial-reduction attention; returns ``(x, probabilities)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, sr_ratio: int = 1, has_cls: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              sr_ratio=sr_ratio, has_cls=has_cls)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        out, probs = self.attn(self.norm1(x), grid)
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x))), probs


class PatchEmbed(nn.Module):
    """Non-overlapping patches (conv with stride = kernel) + LayerNorm; remembers its 224 px grid."""

    def __init__(self, grid: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


def _resize_pos_embed(pos: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    if source == target:
        return pos
    grid = pos.reshape(1, *source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class PyramidVisionTransformer(nn.Module):
    """PVT-v1 trunk with local re-attention (see module doc); ``forward(images) -> (B, T, C_last)``.

    ``pos_size`` is the image size the position embeddings are laid out for (224, as in the
    ImageNet weights and the released checkpoints); other input sizes resize them on the fly.
    """

    def __init__(self, *, patch_size: int = 4, in_chans: int = 3, embed_dims: Sequence[int] = PVT_SMALL["embed_dims"],
                 num_heads: Sequence[int] = PVT_SMALL["num_heads"], mlp_ratios: Sequence[float] = PVT_SMALL["mlp_ratios"],
                 depths: Sequence[int] = PVT_SMALL["depths"], sr_ratios: Sequence[int] = PVT_SMALL["sr_ratios"],
                 locals: Sequence[int] = (1, 1, 1, 0), alpha: int = 8, qkv_bias: bool = True,  # noqa: A002
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 pos_size: int = 224) -> None:
        super().__init__()
        self.num_stages = num_stages = len(depths)
        for name, values in (("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios),
                             ("sr_ratios", sr_ratios), ("locals", locals)):
            if len(values) != num_stages:
                raise ModelConfigError(f"{name} has {len(values)} entries for {num_stages} stages")
        if locals[-1]:
            raise ModelConfigError("locals[-1] must be 0: the last stage always selects, through its own cls token")
        if alpha < 1:
            raise ModelConfigError(f"alpha must be >= 1, got {alpha}")
        if any(flag and depth < 2 for flag, depth in zip(locals, depths)):
            raise ModelConfigError("a stage with locals=1 needs at least two blocks (one block's map scores reduced "
                                   "cells, not tokens)")
        self.embed_dims = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.sr_ratios = tuple(sr_ratios)
        self.locals = tuple(int(bool(flag)) for flag in locals)
        self.alpha = alpha
        self.patch_size = patch_size
        width = embed_dims[-1]

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        grids = stage_grids(pos_size, patch_size, num_stages)
        for i in range(num_stages):
            n = i + 1
            last = i == num_stages - 1
            setattr(self, f"patch_embed{n}", PatchEmbed(grids[i], patch_size if i == 0 else 2,
                                                        in_chans if i == 0 else embed_dims[i - 1], embed_dims[i]))
            tokens = grids[i][0] * grids[i][1] + (1 if last else 0)
            setattr(self, f"pos_embed{n}", nn.Parameter(torch.zeros(1, tokens, embed_dims[i])))
            setattr(self, f"pos_drop{n}", nn.Dropout(drop_rate))
            first = sum(depths[:i])
            setattr(self, f"block{n}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias=qkv_bias, drop=drop_rate,
                      attn_drop=attn_drop_rate, drop_path=rates[first + j], sr_ratio=sr_ratios[i],
                      has_cls=bool(self.locals[i]))
                for j in range(depths[i])]))
            if self.locals[i]:
                setattr(self, f"cls_token{n}", nn.Parameter(torch.zeros(1, 1, embed_dims[i])))
                setattr(self, f"local_proj{n}", _projection(embed_dims[i], width))
                setattr(self, f"global_proj{n}", _projection(embed_dims[i], width))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))

        for name, param in self.named_parameters():
            if name.startswith(("pos_embed", "cls_token")):
                trunc_normal_(param, std=0.02)
        self.apply(_init_weights)

    # -- what the trunk hands the fusion block -------------------------------------------------
    def selected_per_head(self, stage: int) -> int:
        """Tokens each head of ``stage`` (0-based) keeps: ``alpha * sr**2`` (``alpha`` in the last)."""
        return self.alpha * (1 if stage == self.num_stages - 1 else self.sr_ratios[stage] ** 2)

    def selecting_stages(self) -> list[int]:
        return [i for i in range(self.num_stages) if self.locals[i] or i == self.num_stages - 1]

    @property
    def num_tokens(self) -> int:
        """Tokens per image in the output: globals plus every selected local token."""
        stages = self.selecting_stages()
        return len(stages) + sum(self.num_heads[i] * self.selected_per_head(i) for i in stages)

    def check_image_size(self, img_size: int) -> None:
        """Raise a one-line ValueError when ``img_size`` cannot supply the tokens the model expects."""
        grids = stage_grids(img_size, self.patch_size, self.num_stages)
        for i in self.selecting_stages():
            (height, width), sr, keep = grids[i], self.sr_ratios[i], self.selected_per_head(i)
            if sr > 1 and (height % sr or width % sr or height * width == sr * sr):
                raise ModelConfigError(f"img_size={img_size}: stage {i + 1}'s {height}x{width} grid must be a "
                                       f"multiple of its reduction ratio {sr}, and larger than it, for local "
                                       "re-attention")
            if height * width < keep:
                raise ModelConfigError(f"img_size={img_size}: stage {i + 1} has {height * width} tokens, too few to "
                                       f"keep alpha*sr^2 = {keep} per head; use a larger image or a smaller alpha")

    def weight_targets(self) -> dict:
        """A pretrained PVT file fits this trunk without the re-attention additions (see ``load_weights``)."""
        return {"": (self, PRETRAINED_NEW)}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.startswith(("pos_embed", "cls_token"))}

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        x = images
        global_tokens, local_tokens = [], []
        for i in range(self.num_stages):
            n = i + 1
            last = i == self.num_stages - 1
            patch_embed = getattr(self, f"patch_embed{n}")
            pos = getattr(self, f"pos_embed{n}")
            x, grid = patch_embed(x)
            if last:
                cls = self.cls_token
                pos = torch.cat([pos[:, :1], _resize_pos_embed(pos[:, 1:], patch_embed.grid, grid)], dim=1)
            elif self.locals[i]:
                cls = getattr(self, f"cls_token{n}")
                # The stage's cls token takes the first patch position's (unresized) embedding.
                pos = torch.cat([pos[:, :1], _resize_pos_embed(pos, patch_embed.grid, grid)], dim=1)
            else:
                cls = None
                pos = _resize_pos_embed(pos, patch_embed.grid, grid)
            if cls is not None:
                x = torch.cat([cls.expand(batch, -1, -1), x], dim=1)
            x = getattr(self, f"pos_drop{n}")(x + pos)
            probs = []
            for block in getattr(self, f"block{n}"):
                x, p = block(x, grid)
                probs.append(p)
            if cls is not None:
                scores = selection_scores(probs, last=last)
                picked = select_tokens(x, scores, self.selected_per_head(i))
                if not last:
                    picked = getattr(self, f"local_proj{n}")(picked)
                local_tokens.append(picked)
            if last:
                global_tokens.append(x[:, 0])
            else:
                if cls is not None:
                    global_tokens.append(getattr(self, f"global_proj{n}")(x[:, 0]))
                    x = x[:, 1:]
                x = x.transpose(1, 2).reshape(batch, -1, *grid)
        globals_ = torch.stack(global_tokens[::-1], dim=1)
        locals_ = torch.cat(local_tokens, dim=1).flip(1)
        return self.norm(torch.cat([globals_, locals_], dim=1))


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    # Linear-ReLU-Linear; Sequential so that the names are ``.0`` and ``.2`` as published.
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


def _init_weights(module: nn.Module) -> None:
    # PVT's init: truncated-normal linear layers with zero bias, unit LayerNorms, default convs.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
