"""Dispatch and combine of one MoE layer across expert shards, as tensors (no transport here).

A token goes once to every shard holding at least one of its experts; the shard returns one
expert output per (token, expert) pair, and the attention side sums each token's weighted
outputs in ascending expert id, the order `fused_moe_ref` adds them in. So the result does not
depend on which shard holds which expert.

Wire format, attention -> shard: header int64 [2] = (n tokens, P pairs), then (when n > 0) one
uint8 payload = int32 [P, 2] (row in the n tokens, global expert id) | x rows [n, H]. Shard ->
attention: expert outputs [P, H] in the hidden dtype. A header of (-1, -1) aborts the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ABORT = (-1, -1)


@dataclass(slots=True)
class ShardSlice:
    """The part of one layer's routing that one shard serves."""

    rows: torch.Tensor  # [n] int64 token indices (ascending) sent to the shard
    pair_row: torch.Tensor  # [P] int64 index into rows of each (token, expert) pair
    pair_expert: torch.Tensor  # [P] int64 global expert id of each pair
    pair_flat: torch.Tensor  # [P] int64 flat slot t * K + j of each pair in the [T, K] route


def split_route(ids: torch.Tensor, owner: torch.Tensor, num_shards: int) -> list[ShardSlice]:
    """ids: [T, K] global expert ids; owner: [E] shard index of each expert -> one slice per shard."""
    top_k = ids.shape[1]
    flat = ids.reshape(-1)  # [T*K]
    shard = owner[flat]  # [T*K]
    slices = []
    for s in range(num_shards):
        pair_flat = (shard == s).nonzero().squeeze(1)  # ascending: grouped by token
        tokens = pair_flat // top_k
        rows = torch.unique_consecutive(tokens)
        slices.append(ShardSlice(rows, torch.searchsorted(rows, tokens), flat[pair_flat], pair_flat))
    return slices


def pack(x: torch.Tensor, sl: ShardSlice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (header int64 [2], payload uint8 or None when the shard gets nothing)."""
    n, p = sl.rows.numel(), sl.pair_row.numel()
    header = torch.tensor([n, p], dtype=torch.int64)
    if n == 0:
        return header, None
    meta = torch.stack([sl.pair_row, sl.pair_expert], 1).to(torch.int32)  # [P, 2]
    rows = x[sl.rows].contiguous()  # [n, H]
    return header, torch.cat([meta.view(-1).view(torch.uint8), rows.view(-1).view(torch.uint8)])


def payload_nbytes(n: int, p: int, hidden: int, dtype: torch.dtype) -> int:
    return p * 2 * 4 + n * hidden * dtype.itemsize


def unpack(payload: torch.Tensor, n: int, p: int, hidden: int,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """payload uint8 -> (x [n, H], pair_row [P] int64, pair_expert [P] int64)."""
    meta = payload[: p * 8].view(torch.int32).view(p, 2).long()
    x = payload[p * 8:].view(dtype).view(n, hidden)
    return x, meta[:, 0], meta[:, 1]


def combine(outputs: list[tuple[ShardSlice, torch.Tensor]], ids: torch.Tensor,
            weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-pair expert outputs from every shard -> [T, H] weighted sum over each token's experts."""
    t, k = ids.shape
    hidden = outputs[0][1].shape[1] if outputs else 0
    y = torch.zeros(t * k, hidden, dtype=dtype)  # [T*K, H]
    for sl, out in outputs:
        y[sl.pair_flat] = out
    order = torch.argsort(ids, dim=1, stable=True)  # [T, K] ascending expert id
    parts = (y.view(t, k, hidden) * weights[..., None]).to(dtype)  # [T, K, H]
    parts = torch.take_along_dim(parts, order[..., None], dim=1)
    total = parts[:, 0].clone()
    for j in range(1, k):
        total += parts[:, j]
    return total
