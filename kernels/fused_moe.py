"""Torch reference for the MoE expert computation (SwiGLU experts).

Semantics follow HF transformers: for every expert ``e`` that received tokens,

    h = x[tok] @ w_gate_up[e].T          # [n, 2I]
    gate, up = h.chunk(2, -1)            # [n, I] each
    y = (silu(gate) * up) @ w_down[e].T  # [n, H]
    out[tok] += (y * weight).to(x.dtype)

Token-slot pairs are grouped by expert with one argsort, so each expert runs
once on all of its tokens and its weights are read once; the outputs are
weighted in one pass at the end and, in float32 on CPU, added in one pass too,
in the same order (the same bits as adding each expert's as it is computed,
with a few ops fewer per expert; in bfloat16 one pass would round the sum less
often than HF does, and on CUDA a token's outputs would meet in atomic adds of
no fixed order, so there each expert's outputs are added in turn). The weight tensors
may be strided views into a per-expert parameter bank; they are never copied.
`linear` computes each projection: the torch reference by default; the CPU
production path (kernels/fused_moe_torch.py) passes the linear chosen at
start-up (kernels/linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.linear import Linear, linear_ref


def check_moe_args(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> None:
    """Validate shapes shared by every fused-MoE implementation."""
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("expected x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I]")
    num_tokens, hidden = x.shape
    num_experts, two_inter, gate_hidden = w_gate_up.shape
    inter = two_inter // 2
    if gate_hidden != hidden or two_inter != 2 * inter:
        raise ValueError(f"w_gate_up must be [E, 2I, {hidden}], got {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"w_down must be [{num_experts}, {hidden}, {inter}], got {tuple(w_down.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [{num_tokens}, K], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError("topk_weights and topk_ids must have the same shape [T, K]")


def expert_mlp(x_e: Tensor, w_gate_up_e: Tensor, w_down_e: Tensor, linear: Linear) -> Tensor:
    """SwiGLU MLP of one expert: ``x_e [n, H]`` -> ``[n, H]`` in x_e's dtype."""
    gate, up = linear(x_e, w_gate_up_e).chunk(2, dim=-1)  # [n, I] each
    return linear(F.silu(gate) * up, w_down_e)  # [n, H]


def fused_moe_ref(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
    linear: Linear = linear_ref,
) -> Tensor:
    """Apply the routed experts to ``x`` and combine them with the routing weights.

    Args:
        x: hidden states ``[T, H]`` (float32 or bfloat16).
        w_gate_up: ``[E, 2I, H]``; rows ``:I`` are the gate, ``I:`` the up projection.
        w_down: ``[E, H, I]``.
        topk_ids: int64 ``[T, K]`` expert ids; ``-1`` means "no expert".
        topk_weights: float32 ``[T, K]`` routing weights.
        linear: ``linear(x, w)`` = ``x @ w.T`` for each projection (kernels/linear.py).

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    check_moe_args(x, w_gate_up, w_down, topk_ids, topk_weights)
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # [T*K], slot indices grouped by expert
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    tokens = order // top_k  # [T*K] token of each slot, grouped by expert
    ys = x.new_empty(order.numel(), x.shape[1])  # [T*K, H] expert outputs, grouped the same way
    groups, start = [], 0  # (start, count) of each expert's slots
    for expert, count in zip(experts.tolist(), counts.tolist()):
        if expert >= 0:
            rows = tokens[start : start + count]  # [n]
            ys[start : start + count] = expert_mlp(x[rows], w_gate_up[expert], w_down[expert], linear)
            groups.append((start, count))
        start += count
    out = torch.zeros_like(x)  # [T, H]
    if not groups:
        return out
    first = groups[0][0]  # -1 (no expert) sorts first
    weights = topk_weights.reshape(-1)[order[first:], None]  # [P, 1]
    weighted = (ys[first:] * weights).to(x.dtype)  # promoted to float32, then x's dtype
    if x.dtype == torch.float32 and x.device.type == "cpu":  # one pass adds slot after slot, in expert order
        out.index_add_(0, tokens[first:], weighted)
    else:  # expert after expert: bfloat16 rounds the sum after each, as HF does; CUDA adds a
        # token's K outputs of one pass with atomics, in no fixed order
        for begin, count in groups:
            out.index_add_(0, tokens[begin : begin + count], weighted[begin - first : begin - first + count])
    return out


def expert_pair_outputs_ref(x: Tensor, w_gate_up: Tensor, w_down: Tensor, pair_row: Tensor,
                            pair_expert: Tensor, linear: Linear = linear_ref) -> Tensor:
    """Unweighted expert outputs of (token, expert) pairs: ``[P, H]`` in ``x.dtype``.

    ``pair_row`` [P] indexes rows of ``x`` [n, H]; ``pair_expert`` [P] bank rows. Each expert runs
    once on its rows in pair order, so with pairs in ascending token order an expert sees exactly
    the rows `fused_moe_ref` gives it and its outputs are the same bits (with the same `linear`).
    """
    out = x.new_empty(pair_row.numel(), x.shape[1])  # [P, H]
    order = torch.argsort(pair_expert, stable=True)
    experts, counts = torch.unique_consecutive(pair_expert[order], return_counts=True)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        pairs = order[start : start + count]
        start += count
        out[pairs] = expert_mlp(x[pair_row[pairs]], w_gate_up[expert], w_down[expert], linear)
    return out
