"""The torch backend's MoE expert computation, the CPU production path.

Same contract as `fused_moe_ref`, and the same computation: each active expert runs once on its
tokens, through `linear` (select_kernels passes the CPU float32 path of kernels/linear.py, fastest
on the banks' contiguous HF-orientation expert weights). A single token on CPU (batch-1 decode)
skips the grouping ops: its experts run in a plain loop over its ids (0.28 ms per layer of the
bench model otherwise).

A padded batched matmul over all experts (every expert padded to the busiest one's rows, one `bmm`
per projection) used to serve layers where most experts had tokens. Against this loop it measured
(2-core VM, 8 MoE layers of the bench model): float32, random routes, 72-77 against 56-59 ms at 32
tokens and 86-91 against 98-100 ms at 64; float32 engine prefill of 512 and 1024 tokens, where the
bench model's random router loads experts unevenly (busiest expert 2-5x the mean), 630-707 against
324-338 ms and 1197-1335 against 643-672 ms; bfloat16 with skewed routes, 264 against 65 ms at 32
tokens and 510 against 136 ms at 256. It was removed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.fused_moe import check_moe_args, expert_mlp, expert_pair_outputs_ref, fused_moe_ref
from kernels.linear import Linear, linear_ref

# Tokens up to which a MoE layer goes to the C kernel (kernels/cpu_native.py `moe_native`): 8 MoE
# layers of bench/decode.py's model took 31.5, 48.0, 72.7 and 92.5 ms through it at 8, 16, 32 and 48
# tokens, against 37.3, 54.0, 75.9 and 101.1 ms through the torch path (2-core VM)
MAX_TOKENS = 48


def fused_moe_torch(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor,
                    topk_weights: Tensor, linear: Linear = linear_ref, few_tokens=None) -> Tensor:
    """`few_tokens`: the kernel for up to MAX_TOKENS float32 tokens on CPU with contiguous experts
    (kernels/cpu_native.py `moe_native`); None: the loop below for one token, else the reference."""
    if x.device.type == "cpu" and few_tokens is not None and x.shape[0] <= MAX_TOKENS and x.dtype == torch.float32:
        check_moe_args(x, w_gate_up, w_down, topk_ids, topk_weights)
        if _experts_contiguous(w_gate_up, w_down):
            return few_tokens(x, w_gate_up, w_down, topk_ids, topk_weights)
    if x.shape[0] == 1 and x.device.type == "cpu":
        check_moe_args(x, w_gate_up, w_down, topk_ids, topk_weights)
        return _one_token(x, w_gate_up, w_down, topk_ids, topk_weights, linear)
    return fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights, linear)


MAX_PAIRS = 4 * MAX_TOKENS  # (token, expert) pairs up to which an expert shard's outputs go to the C kernel


def pair_outputs_torch(x: Tensor, w_gate_up: Tensor, w_down: Tensor, pair_row: Tensor, pair_expert: Tensor,
                       linear: Linear = linear_ref, few_pairs=None) -> Tensor:
    """`expert_pair_outputs_ref` (an expert shard's unweighted outputs per pair); `few_pairs`: the
    kernel for up to MAX_PAIRS float32 pairs on CPU with contiguous experts (kernels/cpu_native.py
    `pair_outputs_native`), else the reference through `linear`."""
    if (few_pairs is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and pair_row.numel() <= MAX_PAIRS and _experts_contiguous(w_gate_up, w_down)):
        return few_pairs(x, w_gate_up, w_down, pair_row, pair_expert)
    return expert_pair_outputs_ref(x, w_gate_up, w_down, pair_row, pair_expert, linear)


def _experts_contiguous(w_gate_up: Tensor, w_down: Tensor) -> bool:
    """Each expert's [2I, H] and [H, I] matrices contiguous (the banks' layout), rows unit-strided."""
    return (w_gate_up.stride()[1:] == (w_gate_up.shape[2], 1)
            and w_down.stride()[1:] == (w_down.shape[2], 1))


def _one_token(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
               linear: Linear) -> Tensor:
    """`fused_moe_ref` for x [1, H], the same bits: experts in ascending id order, each output
    weighted and added to the running sum as `index_add_` would."""
    ids, weights = topk_ids[0].tolist(), topk_weights[0]
    out = torch.zeros_like(x)
    for j in sorted(range(len(ids)), key=ids.__getitem__):
        if ids[j] >= 0:
            out += (expert_mlp(x, w_gate_up[ids[j]], w_down[ids[j]], linear) * weights[j]).to(x.dtype)
    return out
