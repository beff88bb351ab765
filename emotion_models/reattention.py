"""Local re-attention (LORA, ACM MM'22): which tokens a PVT stage keeps for the fusion block.

A re-attending stage runs its blocks over ``[cls, patch_1 .. patch_N]`` and keeps each block's
attention probabilities ``A_b`` of shape ``(B, heads, 1+N, 1+M)``: PVT attention is
spatial-reduction attention, so the keys are ``[cls, cell_1 .. cell_M]`` with ``M = N / sr**2``
(``sr = 1``: the keys are the tokens themselves, ``M = N``).

The published selection (``Local_ReAttention`` in nku-shengzheliu/SER30K) multiplies the maps of
a stage's ``L`` blocks in a fixed alternating pattern and reads the cls row of the product:

* the last stage (``sr = 1``, square maps): ``P = A_{L-1} ... A_1 A_0``;
* an earlier stage: ``P = F_{L-1} ... F_1 F_0`` with ``F_b = A_bᵀ`` for even ``b`` and ``F_b = A_b``
  for odd ``b`` (``A_2ᵀ A_1 A_0ᵀ`` for three blocks; the transposes make the rectangular maps
  chain). A single block's ``P`` is ``A_0``.

Row 0 of ``P`` without its first entry scores the ``N`` patch tokens; each head keeps its
``k = alpha * sr**2`` best (``alpha * (1+N) // M`` in the original, equal wherever the model's
token counts are defined), in descending order of score. The original forms ``P`` itself: at
448 px stage 1 that is a ``12545 x 12545`` matrix per image and head (630 MB in fp32), twice.
:func:`selection_scores` computes the same row as a chain of vector-matrix products, ``O(N·M)``
memory, in float64 whatever the autocast dtype. At random initialisation the scores of a stage are
nearly tied, so any two ways of computing them (the published code itself at batch 1 and batch 2)
order a few tokens differently; float64 keeps this implementation's share of that noise negligible. :func:`naive_selection_scores` forms ``P`` as published; tests compare the two on small maps.

Selection is not differentiable (top-k indices); gradients reach the trunk through the gathered
tokens, as in the original.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["selection_scores", "naive_selection_scores", "select_tokens", "CHAIN_DTYPE"]

# The chain is a few vector-matrix products: float64 costs little and keeps our own rounding far
# below the published float32 product's, so the top-k order is as close to it as any order can be.
CHAIN_DTYPE = torch.float64


def _check(attns: Sequence[torch.Tensor], last: bool) -> None:
    if not attns:
        raise ValueError("local re-attention needs the attention maps of at least one block")
    rows, cols = attns[0].shape[-2:]
    if last and rows != cols:
        raise ValueError(f"the last stage's attention maps must be square, got {rows}x{cols}")


@torch.no_grad()
def selection_scores(attns: Sequence[torch.Tensor], last: bool) -> torch.Tensor:
    """Row 0 of the published product, without its cls entry: ``(B, heads, tokens)`` in :data:`CHAIN_DTYPE`.

    ``attns``: the stage's per-block probabilities, ``(B, heads, 1+N, 1+M)`` each.
    """
    _check(attns, last)
    maps = list(attns)
    depth = len(maps)

    def factor(b: int) -> torch.Tensor:
        # Published chain: F_b = A_bᵀ for even b, A_b for odd b (the last stage: A_b throughout).
        a = maps[b].to(CHAIN_DTYPE)
        return a if last or b % 2 else a.transpose(-2, -1)

    if depth == 1 and not last:                         # the product is A_0 itself
        return maps[0][..., 0, 1:].to(CHAIN_DTYPE)
    top = maps[-1]                                      # e_0ᵀ F_{L-1}: its cls row, or its cls column
    row = (top[..., :1, :] if last or (depth - 1) % 2 else top[..., :, :1].transpose(-2, -1)).to(CHAIN_DTYPE)
    for b in range(depth - 2, -1, -1):
        row = row @ factor(b)
    return row[..., 0, 1:]


@torch.no_grad()
def naive_selection_scores(attns: Sequence[torch.Tensor], last: bool) -> torch.Tensor:
    """The published product formed matrix by matrix, in the maps' dtype (tests and small maps only)."""
    _check(attns, last)
    maps = list(attns)
    product = maps[0]
    for b in range(1, len(maps)):
        if last:
            product = maps[b] @ product
        elif b == 1:
            product = maps[1] @ product.transpose(-2, -1)
        elif b % 2 == 0:
            product = maps[b].transpose(-2, -1) @ product
        else:
            product = maps[b] @ product
    return product[..., 0, 1:]


def select_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Gather each head's ``k`` best-scoring patch tokens: ``(B, heads * k, C)``.

    ``tokens``: ``(B, 1+N, C)`` with the cls token first; ``scores``: ``(B, heads, N)``. Heads come
    in order, each head's tokens in descending score (``torch.topk``'s order), as published.
    """
    if k > scores.shape[-1]:
        raise ValueError(f"cannot keep {k} tokens per head out of {scores.shape[-1]}")
    index = scores.topk(k, dim=-1).indices.flatten(1) + 1   # skip the cls token
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
