"""Triton kernel for MoE router gating (softmax + top-k + renormalize).

Same contract as :func:`kernels.topk_gating.topk_gating_ref`. Each program
handles ``BLOCK_T`` rows; the expert axis is padded to a power of two and
masked. Top-k is ``K`` rounds of argmax, ties going to the lowest index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.topk_gating import check_gating_args

# Upper bound on BLOCK_T * BLOCK_E, i.e. on the elements one program holds.
_MAX_TILE = 2048
_MAX_BLOCK_T = 16


@triton.jit
def _topk_gating_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    num_rows, num_experts,
    stride_lt, stride_le,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_E)  # [BE]
    row_ok = rows < num_rows
    col_ok = cols < num_experts
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :] * stride_le
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    logits = logits.to(tl.float32)  # [BT, BE]
    row_max = tl.max(logits, axis=1)  # [BT]
    row_max = tl.where(row_ok, row_max, 0.0)  # fully masked rows stay finite
    exps = tl.exp(logits - row_max[:, None])  # [BT, BE], 0 on masked columns
    denom = tl.where(row_ok, tl.sum(exps, axis=1), 1.0)  # [BT]
    probs = exps / denom[:, None]
    # Probabilities are >= 0, so -1 marks padded or already-chosen experts.
    probs = tl.where(col_ok[None, :], probs, -1.0)

    slots = tl.arange(0, BLOCK_K)  # [BK]
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)  # [BT]
        hit = probs == best[:, None]  # [BT, BE]
        best_idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # [BT]
        top_w = tl.where(slots[None, :] == k, best[:, None], top_w)
        top_i = tl.where(slots[None, :] == k, best_idx[:, None].to(tl.int64), top_i)
        probs = tl.where(cols[None, :] == best_idx[:, None], -1.0, probs)
    if RENORMALIZE:
        kept = tl.where(slots[None, :] < TOP_K, top_w, 0.0)
        kept_sum = tl.where(row_ok, tl.sum(kept, axis=1), 1.0)  # [BT]
        top_w = top_w / kept_sum[:, None]

    out_offs = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]  # [BT, BK]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offs, top_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i, mask=out_mask)


def topk_gating_triton(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`kernels.topk_gating.topk_gating_ref`.

    Args:
        logits: router logits ``[T, E]`` in any floating-point dtype.
        top_k: number of experts per token, ``1 <= top_k <= E``.
        renormalize: divide the k selected probabilities by their sum.

    Returns:
        ``(weights, ids)``: float32 ``[T, K]`` and int64 ``[T, K]``.
    """
    check_gating_args(logits, top_k)
    num_rows, num_experts = logits.shape
    weights = torch.empty((num_rows, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_rows, top_k), dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(_MAX_BLOCK_T, _MAX_TILE // block_e))
    grid = (triton.cdiv(num_rows, block_t),)
    _topk_gating_kernel[grid](
        logits, weights, ids,
        num_rows, num_experts,
        logits.stride(0), logits.stride(1),
        TOP_K=top_k, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
    )
    return weights, ids
