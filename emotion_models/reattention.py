"""Local re-attention (LORA, ACM MM'22): which patch tokens a stage's query token looks at.

Every re-attending LORA stage runs its blocks over ``[query, patch_1 .. patch_N]`` and keeps each
block's attention probabilities ``A_b`` of shape ``(B, heads, 1+N, 1+M)``. PVT attention is
*spatial-reduction* attention: the keys are ``[query, cell_1 .. cell_M]`` where a cell is an
``sr x sr`` patch of tokens reduced by a strided conv (``M = N / sr**2``; ``sr = 1`` means keys are
the tokens themselves). To roll attention through blocks the key space is mapped back to token
space: :func:`spread_keys` gives each token ``1 / sr**2`` of its cell's attention (uniform spread,
mass preserving). That is why a stage selects ``k = alpha * sr**2`` tokens per head: one cell's
worth of attention covers ``sr**2`` tokens. Tokens on a right/bottom border that the strided conv
drops (when ``sr`` does not divide the feature map) belong to no cell and receive zero attention.

Rollout rule (Abnar & Zuidema, 2020), with ``S`` the spread: ``Â_b = rownorm((S(A_b) + I) / 2)``
and ``R = Â_L · ... · Â_1`` (last block leftmost). Only the query's row of ``R`` is needed, so
:func:`query_rollout` computes ``e_0ᵀ Â_L Â_{L-1} ... Â_1`` as vector-matrix products starting
from the last block, costing ``O(N·M)`` memory per block instead of the ``(1+N)^2`` matrices that
:func:`naive_rollout` (and the original implementation) forms: at 448 px stage 1 has 12,545
tokens, i.e. 630 MB per image and head per matrix. The original code rolls with a different,
ad-hoc product of (transposed) maps; the rule here is the standard one, written out exactly.

The selection is not differentiable (top-k indices); gradients flow into the gathered tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["spread_keys", "query_rollout", "naive_rollout", "select_topk", "gather_tokens"]


def spread_keys(
        key_attn: torch.Tensor,
        feat_size: tuple[int, int],
        sr_ratio: int,
        num_prefix: int = 1,
) -> torch.Tensor:
    """Map attention over keys ``[prefix, cells]`` (``..., P+M``) to tokens ``(..., P+H*W)``.

    Prefix (query) keys are kept as they are; each reduced cell's value is divided by ``sr**2`` and
    copied to the ``sr x sr`` tokens it was reduced from; border tokens outside every cell get 0.
    """
    if sr_ratio == 1:
        return key_attn
    height, width = feat_size
    cells_h, cells_w = height // sr_ratio, width // sr_ratio
    prefix, cells = key_attn[..., :num_prefix], key_attn[..., num_prefix:]
    if cells.shape[-1] != cells_h * cells_w:
        raise ValueError(
            f"attention has {cells.shape[-1]} reduced keys; feature map {height}x{width} with "
            f"sr={sr_ratio} gives {cells_h * cells_w}")
    lead = cells.shape[:-1]
    cells = cells.reshape(-1, cells_h, cells_w) / sr_ratio ** 2
    cells = cells.repeat_interleave(sr_ratio, dim=-2).repeat_interleave(sr_ratio, dim=-1)
    cells = F.pad(cells, (0, width - cells_w * sr_ratio, 0, height - cells_h * sr_ratio))
    return torch.cat([prefix, cells.reshape(*lead, height * width)], dim=-1)


def _as_float(attn: torch.Tensor) -> torch.Tensor:
    # Low-precision (autocast) maps are rolled in fp32; fp64 inputs stay fp64.
    return attn.to(torch.promote_types(attn.dtype, torch.float32))


@torch.no_grad()
def query_rollout(
        attn_list: Sequence[torch.Tensor],
        feat_size: tuple[int, int],
        sr_ratio: int,
        num_prefix: int = 1,
) -> torch.Tensor:
    """Query row of the attention rollout, without forming any token x token matrix.

    Args:
        attn_list: per block (first to last) attention probabilities ``(B, heads, P+N, P+M)``.
        feat_size: the stage's feature map ``(H, W)`` with ``H * W = N``.
        sr_ratio: the stage's spatial-reduction ratio.
        num_prefix: number of prefix tokens; the query is token 0.

    Returns:
        ``(B, heads, N)``: rolled attention from the query to each patch token.

    With ``d = rowsum(Â_b)`` before normalisation (``= (rowsum(A_b) + 1) / 2``, the spread keeps row
    sums) each step is ``w = v / d; v = (S(w · A_b) + w) / 2``, which equals ``v · Â_b`` exactly.
    """
    if not attn_list:
        raise ValueError("query_rollout needs the attention of at least one block")
    first = attn_list[-1]
    batch, heads, tokens = first.shape[0], first.shape[1], first.shape[2]
    v = first.new_zeros((batch, heads, 1, tokens), dtype=_as_float(first).dtype)
    v[..., 0] = 1.0
    for attn in reversed(attn_list):
        attn = _as_float(attn)
        w = v / ((attn.sum(-1) + 1.0) / 2.0).unsqueeze(-2)
        v = (spread_keys(w @ attn, feat_size, sr_ratio, num_prefix) + w) / 2.0
    return v[..., 0, num_prefix:]


@torch.no_grad()
def naive_rollout(
        attn_list: Sequence[torch.Tensor],
        feat_size: tuple[int, int],
        sr_ratio: int,
        num_prefix: int = 1,
) -> torch.Tensor:
    """Reference rollout forming the full ``(P+N) x (P+N)`` products (tests and benchmarks only)."""
    if not attn_list:
        raise ValueError("naive_rollout needs the attention of at least one block")
    result = None
    for attn in attn_list:
        mixed = spread_keys(_as_float(attn), feat_size, sr_ratio, num_prefix)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)  # rownorm((S(A) + I) / 2)
        result = mixed if result is None else mixed @ result
    return result[..., 0, num_prefix:]


@torch.no_grad()
def select_topk(rollout_row: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, heads, k')`` of the ``k' = min(k, N)`` most attended tokens per head.

    ``k`` is capped at the number of tokens ``N`` (small images: a stage then keeps every token).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return rollout_row.topk(min(k, rollout_row.shape[-1]), dim=-1).indices


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``tokens (B, N, C)`` at ``indices (B, heads, k)`` -> ``(B, heads*k, C)``, head-major.

    The same token picked by several heads appears several times (as in the paper's code).
    """
    flat = indices.flatten(1).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return tokens.gather(1, flat)
