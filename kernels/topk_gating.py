"""Torch reference for MoE router gating: softmax over experts, then top-k.

Semantics follow the HF transformers routers (Mixtral, Qwen-MoE, ...): the
softmax is taken in float32 over all experts, the k largest probabilities are
picked (sorted descending, as ``torch.topk`` returns them) and, optionally,
renormalized so that each token's k weights sum to one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_gating_args(logits: Tensor, top_k: int) -> None:
    """Validate the arguments shared by every gating implementation."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")


def topk_gating_ref(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Route each token to its ``top_k`` most probable experts.

    Args:
        logits: router logits ``[T, E]`` in any floating-point dtype.
        top_k: number of experts per token, ``1 <= top_k <= E``.
        renormalize: divide the k selected probabilities by their sum.

    Returns:
        ``(weights, ids)``: float32 ``[T, K]`` and int64 ``[T, K]``, sorted by
        descending weight.
    """
    check_gating_args(logits, top_k)
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K], [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
