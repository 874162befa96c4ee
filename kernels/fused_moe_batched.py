"""Batched torch path of the MoE expert computation, the CPU production path.

Same contract as `fused_moe_ref`. A single token on CPU (batch-1 decode) runs its experts in a
plain loop over the ids, without the grouping ops (0.28 ms per layer of the bench model otherwise).
When most experts of the bank have tokens and, with a small-row linear, they average more than
`loop_mean_rows` rows each (prefill, large decode batches), tokens are scattered into a padded
[E, M, H] block and every expert runs in one `bmm` per projection: one call per layer instead of
two per expert, but every expert padded to the busiest one's rows. Otherwise it is the reference's
loop over the active experts, which reads only their weights, with each projection through
`linear` (select_kernels passes the CPU float32 path of kernels/linear.py, fastest on the banks'
HF-orientation expert weights up to 8 rows, and loop_mean_rows=6: 8 MoE layers of the bench model,
random routes, took 56-59 ms in the loop against 72-77 ms batched at 32 tokens, 71-79 against
79-87 at 40-48 tokens, and 98-100 against 86-91 ms at 64 tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.fused_moe import expert_mlp, check_moe_args, fused_moe_ref
from kernels.linear import Linear, linear_ref

DENSE_FRACTION = 0.75  # run all experts batched once at least this share of them has tokens


def fused_moe_batched(x: Tensor, w_gate_up: Tensor, w_down: Tensor, topk_ids: Tensor,
                      topk_weights: Tensor, linear: Linear = linear_ref, loop_mean_rows: float = 0.0) -> Tensor:
    check_moe_args(x, w_gate_up, w_down, topk_ids, topk_weights)
    if x.shape[0] == 1 and x.device.type == "cpu":
        return _one_token(x, w_gate_up, w_down, topk_ids, topk_weights, linear)
    num_experts = w_gate_up.shape[0]
    flat = topk_ids.reshape(-1)  # [T*K]
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts)  # [E]
    active = int((counts > 0).sum())
    if active < DENSE_FRACTION * num_experts or int(counts.sum()) <= loop_mean_rows * active:
        return fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights, linear)
    top_k = topk_ids.shape[1]
    valid = (flat >= 0).nonzero().squeeze(1)  # [S] slots with an expert
    experts = flat[valid]
    order = torch.argsort(experts, stable=True)
    valid, experts = valid[order], experts[order]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank = torch.arange(valid.numel(), device=x.device) - starts[experts]  # [S] row within expert
    tokens = valid // top_k
    x_pad = x.new_zeros(num_experts, int(counts.max()), x.shape[1])  # [E, M, H]
    x_pad[experts, rank] = x[tokens]
    gate, up = torch.bmm(x_pad, w_gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [E, M, I] each
    y = torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2))  # [E, M, H]
    weighted = y[experts, rank] * topk_weights.reshape(-1)[valid, None]  # [S, H] float32
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, weighted.to(x.dtype))
    return out


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
