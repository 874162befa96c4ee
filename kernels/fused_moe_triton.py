"""Triton grouped-GEMM implementation of the MoE expert computation.

Same contract as :func:`kernels.fused_moe.fused_moe_ref`. The token-slot pairs
``(t, k)`` (slot id ``s = t * K + k``) are sorted by expert and each expert's
group is padded to a multiple of ``BLOCK_M``, so every ``BLOCK_M`` block of the
sorted list belongs to exactly one expert. Two launches follow:

1. gate/up GEMM with fused SwiGLU: ``act[s] = silu(x[t] @ Wg[e].T) * (x[t] @ Wu[e].T)``
2. down GEMM scaled by the routing weight: ``y[s] = (act[s] @ Wd[e].T) * w[s]``

and ``y`` is summed over K. Weights are addressed through their strides, so
views into a per-expert parameter bank work without copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.fused_moe import check_moe_args

_BLOCK_N = 64
_BLOCK_K = 64


@triton.jit
def _tile_matmul(
    a_ptr, a_rows, row_ok, stride_ar, stride_ak,
    b_ptr, b_cols, col_ok, stride_bn, stride_bk,
    depth,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``A[a_rows, :] @ B[b_cols, :].T``."""
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_ptr + a_rows[:, None] * stride_ar + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + b_cols[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        k_ok = offs_k < depth - k0  # [BK]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bfloat16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_slots_ptr, block_expert_ptr,
    num_slots, top_k, hidden, inter,
    stride_xt, stride_xh,
    stride_we, stride_wn, stride_wh,
    stride_as, stride_ai,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``act[s, n] = silu(gate) * up`` for one block of sorted slots x BLOCK_N columns of I."""
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if expert < 0:
        return
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)  # [BM], padding = num_slots
    row_ok = slots < num_slots
    tokens = slots // top_k  # [BM]
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = offs_n < inter
    gate_ptr = w_ptr + expert * stride_we  # rows [0, I) of this expert's [2I, H]
    up_ptr = gate_ptr + inter * stride_wn  # rows [I, 2I)
    gate = _tile_matmul(x_ptr, tokens, row_ok, stride_xt, stride_xh,
                        gate_ptr, offs_n, col_ok, stride_wn, stride_wh,
                        hidden, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)  # [BM, BN]
    up = _tile_matmul(x_ptr, tokens, row_ok, stride_xt, stride_xh,
                      up_ptr, offs_n, col_ok, stride_wn, stride_wh,
                      hidden, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)  # [BM, BN]
    act = gate / (1.0 + tl.exp(-gate)) * up  # [BM, BN], silu(gate) * up in fp32
    act_ptrs = act_ptr + slots[:, None] * stride_as + offs_n[None, :] * stride_ai
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr, w_ptr, out_ptr, topk_weights_ptr, sorted_slots_ptr, block_expert_ptr,
    num_slots, hidden, inter,
    stride_as, stride_ai,
    stride_we, stride_wh, stride_wi,
    stride_os, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``out[s, n] = (act[s] @ Wd[e].T)[n] * topk_weights[s]`` for one block x BLOCK_N of H."""
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    if expert < 0:
        return
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)  # [BM], padding = num_slots
    row_ok = slots < num_slots
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = offs_n < hidden
    acc = _tile_matmul(act_ptr, slots, row_ok, stride_as, stride_ai,
                       w_ptr + expert * stride_we, offs_n, col_ok, stride_wh, stride_wi,
                       inter, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)  # [BM, BN]
    route_w = tl.load(topk_weights_ptr + slots, mask=row_ok, other=0.0)  # [BM] fp32
    out = (acc * route_w[:, None]).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + slots[:, None] * stride_os + offs_n[None, :] * stride_oh
    tl.store(out_ptrs, out, mask=row_ok[:, None] & col_ok[None, :])


def align_slots_by_expert(
    topk_ids: Tensor, num_experts: int, block_m: int
) -> tuple[Tensor, Tensor]:
    """Sort slot ids by expert and pad each expert's group to a multiple of ``block_m``.

    Runs without host synchronisation; the output size is an upper bound.

    Returns:
        ``sorted_slots`` int32 ``[B * block_m]``: slot ids (``t * K + k``) grouped
        by expert, padding entries equal to ``T * K``; and ``block_expert`` int32
        ``[B]``: the expert of each block, ``-1`` for unused trailing blocks.
    """
    flat = topk_ids.reshape(-1)  # [S]
    num_slots = flat.numel()
    device = flat.device
    key = torch.where(flat >= 0, flat, num_experts)  # [S], "no expert" sorts last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_end = torch.cumsum(padded, 0)  # [E]
    order = torch.argsort(key, stable=True)  # [S]
    sorted_key = key[order]  # [S]
    expert = sorted_key.clamp(max=num_experts - 1)  # [S]
    rank = torch.arange(num_slots, device=device) - (torch.cumsum(counts, 0) - counts)[expert]
    num_blocks = triton.cdiv(num_slots + min(num_experts, num_slots) * (block_m - 1), block_m)
    dump = num_blocks * block_m  # scatter target for "no expert" slots
    dest = torch.where(sorted_key < num_experts, pad_end[expert] - padded[expert] + rank, dump)
    sorted_slots = torch.full((dump + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device) * block_m  # [B]
    block_expert = torch.searchsorted(pad_end, block_start, right=True)  # [B]
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_slots[:dump], block_expert.to(torch.int32)


def _launch_config(x: Tensor, num_slots: int) -> dict[str, int | str | bool]:
    """Compile-time kernel parameters for this call.

    BLOCK_M is small for decode-sized batches; fp32 inputs use exact ("ieee")
    dot products; under the Triton interpreter tiles are upcast to fp32.
    """
    interpreted = not isinstance(_moe_gate_up_kernel, triton.runtime.JITFunction)
    return {
        "BLOCK_M": 16 if num_slots <= 64 else 64,
        "BLOCK_N": _BLOCK_N,
        "BLOCK_K": _BLOCK_K,
        "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
        "UPCAST": interpreted,
    }


def fused_moe_triton(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor
) -> Tensor:
    """Triton version of :func:`kernels.fused_moe.fused_moe_ref`.

    Args:
        x: hidden states ``[T, H]`` (float32 or bfloat16).
        w_gate_up: ``[E, 2I, H]``, any strides; dtype must equal ``x.dtype``.
        w_down: ``[E, H, I]``, any strides; dtype must equal ``x.dtype``.
        topk_ids: int64 ``[T, K]`` expert ids; ``-1`` means "no expert".
        topk_weights: float32 ``[T, K]`` routing weights.

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    check_moe_args(x, w_gate_up, w_down, topk_ids, topk_weights)
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"expert weights must have x's dtype {x.dtype}")
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = w_gate_up.shape[0], w_down.shape[2], topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(x)
    blocks = _launch_config(x, num_slots)
    sorted_slots, block_expert = align_slots_by_expert(topk_ids, num_experts, blocks["BLOCK_M"])
    route_w = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [S]
    act = torch.empty((num_slots, inter), dtype=x.dtype, device=x.device)  # [S, I]
    out = torch.zeros((num_slots, hidden), dtype=x.dtype, device=x.device)  # [S, H]
    grid = (block_expert.numel(), triton.cdiv(inter, _BLOCK_N))
    _moe_gate_up_kernel[grid](
        x, w_gate_up, act, sorted_slots, block_expert,
        num_slots, top_k, hidden, inter,
        x.stride(0), x.stride(1), *w_gate_up.stride(), *act.stride(), **blocks,
    )
    grid = (block_expert.numel(), triton.cdiv(hidden, _BLOCK_N))
    _moe_down_kernel[grid](
        act, w_down, out, route_w, sorted_slots, block_expert,
        num_slots, hidden, inter,
        *act.stride(), *w_down.stride(), *out.stride(), **blocks,
    )
    return out.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, H]
