"""Dispatch and combine of one MoE layer across expert shards, as tensors (no transport here).

A token goes once to every shard holding at least one of its experts. The attention side sums
each token's weighted expert outputs in ascending expert id, the order `fused_moe_ref` adds them
in, so the result does not depend on which shard holds which expert. A shard that holds a token's
lowest c >= 2 experts ("folded" pairs) returns their weighted sum, added in that same order, as
one row: the attention side starts the token's sum from it, with the same bits; for every other
pair the shard returns the unweighted expert output.

Wire format, attention -> shard: one uint8 message, header int64 [3] = (n tokens, P pairs, E hint
entries), then (when n > 0) the payload: int32 [P, 3] (row in the n tokens, global expert id,
folded) | float32 [P] gate weights | x rows [n, H]; then (when E > 0, with expert-cache prefetch)
the hint: int32 [E] tokens pre-gating predicts for each expert of the next MoE layer, so the
shard's cache can load them while the attention worker computes that layer's attention. One
message, not a header and then a payload: the shard could post the payload's receive only once
the header was in, and waiting for the payload after the header took 1.56 ms of the 2.54 ms median
per-layer latency (measured in bench/cluster_engine.py). The shard receives into a buffer sized
for the step's largest micro-batch (`max_message_nbytes`); gloo accepts a shorter message.
Shard -> attention: [P_u + F, H] in the hidden dtype: the outputs of the P_u unfolded pairs in pair
order, then one row per folded token in ascending row order. A header with (n, P) = (-1, -1)
aborts the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

ABORT = (-1, -1)  # (n, P) of a message that ends the step
HEADER_BYTES = 24  # int64 (n, P, E hint entries)


@dataclass(frozen=True, slots=True)
class ShardSlice:
    """The part of one layer's routing that one shard serves: numpy views of the route's split,
    as torch tensors on demand."""

    rows_np: np.ndarray  # [n] int64 token indices (ascending) sent to the shard
    meta: np.ndarray  # [P, 3] int32 (pair_row, expert, fold): the pair table as it goes on the wire
    flat_np: np.ndarray  # [P] int64 flat slot t * K + j of each pair in the [T, K] route
    weight_np: np.ndarray  # [P] float32 gate weight of each pair
    out_rows: int  # rows the shard returns: unfolded pairs plus one per folded token

    @property
    def rows(self) -> torch.Tensor:
        return torch.from_numpy(self.rows_np)

    @property
    def pair_row(self) -> torch.Tensor:  # [P] int64 index into rows of each (token, expert) pair
        return torch.from_numpy(self.meta[:, 0].astype(np.int64))

    @property
    def pair_expert(self) -> torch.Tensor:  # [P] int64 global expert id of each pair
        return torch.from_numpy(self.meta[:, 1].astype(np.int64))

    @property
    def pair_flat(self) -> torch.Tensor:
        return torch.from_numpy(self.flat_np)

    @property
    def pair_weight(self) -> torch.Tensor:
        return torch.from_numpy(self.weight_np)

    @property
    def fold(self) -> torch.Tensor:  # [P] bool: one of its token's lowest c >= 2 experts, all held here
        return torch.from_numpy(self.meta[:, 2].astype(bool))


def split_route(ids: torch.Tensor, weights: torch.Tensor, owner: np.ndarray | torch.Tensor,
                num_shards: int) -> Iterator[ShardSlice]:
    """ids, weights: [T, K] (CPU); owner: [E] shard index of each expert -> one slice per shard, in shard
    order. Every shard's pairs come out of one pass over the route, sorted by shard (stably, so
    each shard's pairs stay grouped by token); a slice is views of that pass. Few, whole-route
    numpy steps, because between two layers' dispatches the attention computation evicts the
    caches and each extra step pays for that: cutting both shards' slices and packing them took
    0.23 ms on a cold cache against 0.41 ms for one pass per shard (8 tokens, top-4, 2 shards)."""
    num_tokens, top_k = ids.shape
    ids_np = ids.cpu().numpy()
    flat = ids_np.reshape(-1)  # [T*K]
    rank = (ids_np[:, :, None] > ids_np[:, None, :]).sum(2).reshape(-1)  # [T*K] place in ascending id
    shard = np.asarray(owner)[flat]  # [T*K]
    order = np.argsort(shard, kind="stable")  # by shard, then by flat slot
    token = np.arange(flat.size) // top_k
    cell = token * num_shards + shard  # (token, shard) of each pair
    held = np.bincount(cell, minlength=num_tokens * num_shards)  # pairs of each token on each shard
    ranks = np.bincount(cell, weights=np.left_shift(1, rank), minlength=num_tokens * num_shards)
    folds = (held >= 2) & (ranks == np.left_shift(1, held) - 1)  # holds exactly the token's lowest experts
    has = (held > 0).reshape(num_tokens, num_shards)
    row = (np.cumsum(has, axis=0) - 1).reshape(-1)[cell]  # [T*K] the pair's token's row on its shard
    meta = np.empty((flat.size, 3), dtype=np.int32)
    meta[:, 0], meta[:, 1], meta[:, 2] = row[order], flat[order], folds[cell][order]
    weight = weights.reshape(-1).float().cpu().numpy()[order]
    bounds = np.searchsorted(shard[order], np.arange(num_shards + 1))
    folded_tokens = folds.reshape(num_tokens, num_shards).sum(0)
    for s in range(num_shards):
        a, b = bounds[s], bounds[s + 1]
        yield ShardSlice(np.flatnonzero(has[:, s]), meta[a:b], order[a:b], weight[a:b],
                         int(b - a - meta[a:b, 2].sum() + folded_tokens[s]))


def header_message(n: int, p: int) -> torch.Tensor:
    """A message without payload or hint: (0, 0) when the shard gets nothing, ABORT to end the step."""
    return torch.tensor([n, p, 0], dtype=torch.int64).view(torch.uint8)


def pack_parts(x: torch.Tensor, sl: ShardSlice, hint: torch.Tensor | None = None) -> list[np.ndarray]:
    """-> the message for one shard as byte arrays to send one after the other (a transport that
    can gathers them without a copy); `hint`: int32 [E] next-layer expert counts, or None."""
    n, p = sl.rows_np.size, sl.meta.shape[0]
    e = 0 if hint is None else hint.numel()
    parts = [np.array([n, p, e], dtype=np.int64).view(np.uint8)]
    if n > 0:
        rows = x.cpu().contiguous().view(torch.uint8).numpy()[sl.rows_np]  # [n, H * itemsize], any dtype
        parts += [sl.meta.view(np.uint8).reshape(-1), sl.weight_np.view(np.uint8), rows.reshape(-1)]
    if hint is not None:
        parts.append(hint.to(device="cpu", dtype=torch.int32).numpy().view(np.uint8))
    return parts



def read_header(message: torch.Tensor) -> tuple[int, int, int]:
    """-> (n tokens, P pairs, E hint entries) of a received message."""
    n, p, e = message[:HEADER_BYTES].view(torch.int64).tolist()
    return n, p, e


def fold_outputs(out: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor, fold: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """Shard side. out: [P, H] unweighted pair outputs -> [P_u + F, H] (wire order, see above)."""
    idx = fold.nonzero().squeeze(1)
    if idx.numel() == 0:
        return out
    idx = idx[torch.argsort(pair_row[idx] * (int(pair_expert.max()) + 1) + pair_expert[idx])]  # by (row, id)
    parts = (out[idx] * weight[idx, None]).to(out.dtype)  # [Pf, H], as combine weighs them
    _, counts = torch.unique_consecutive(pair_row[idx], return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    total = parts[start].clone()
    for j in range(1, int(counts.max())):
        more = counts > j
        total[more] += parts[start[more] + j]
    return torch.cat([out[~fold], total])


def payload_nbytes(n: int, p: int, hidden: int, dtype: torch.dtype) -> int:
    return p * 4 * 4 + n * hidden * dtype.itemsize


def message_nbytes(n: int, p: int, hidden: int, dtype: torch.dtype, hint: int = 0) -> int:
    return HEADER_BYTES + (payload_nbytes(n, p, hidden, dtype) if n > 0 else 0) + 4 * hint


def max_message_nbytes(tokens: int, top_k: int, hidden: int, dtype: torch.dtype, num_experts: int) -> int:
    """The largest message a micro-batch of `tokens` tokens can send one shard (hint included)."""
    return message_nbytes(tokens, tokens * top_k, hidden, dtype, num_experts)


def received_nbytes(message: torch.Tensor, hidden: int, dtype: torch.dtype) -> int:
    """The size of the message at the front of a receive buffer, from its header."""
    n, p, e = read_header(message)
    return message_nbytes(max(n, 0), p, hidden, dtype, e)


def unpack_hint(message: torch.Tensor, n: int, p: int, e: int, hidden: int, dtype: torch.dtype) -> list[int]:
    """The next layer's predicted tokens per expert [E] carried by a message with e > 0 hint entries."""
    end = message_nbytes(n, p, hidden, dtype, e)
    return message[end - 4 * e: end].view(torch.int32).tolist()


def unpack(message: torch.Tensor, n: int, p: int, hidden: int, dtype: torch.dtype):
    """message uint8 (n > 0) -> (x [n, H], pair_row [P] int64, pair_expert [P] int64, fold [P] bool,
    weight [P] float32), views of the message where the types allow."""
    payload = message[HEADER_BYTES: message_nbytes(n, p, hidden, dtype)]
    meta = payload[: p * 12].view(torch.int32).view(p, 3).long()
    weight = payload[p * 12: p * 16].view(torch.float32)
    x = payload[p * 16:].view(dtype).view(n, hidden)
    return x, meta[:, 0], meta[:, 1], meta[:, 2].bool(), weight


def combine(outputs: list[tuple[ShardSlice, torch.Tensor]], ids: torch.Tensor,
            weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every shard's outputs -> [T, H] weighted sum over each token's experts, in ascending expert id
    (a folded row stands for the first terms of that sum; the folded pairs' own terms are zero)."""
    t, k = ids.shape
    hidden = outputs[0][1].shape[1] if outputs else 0
    y = torch.zeros(t * k, hidden, dtype=dtype)  # [T*K, H]
    partial: list[tuple[torch.Tensor, torch.Tensor]] = []  # (token indices, their folded rows)
    for sl, out in outputs:
        fold = sl.meta[:, 2].astype(bool)
        count = fold.size - int(fold.sum())
        y[torch.from_numpy(sl.flat_np[~fold])] = out[:count]
        if count < out.shape[0]:  # pairs come grouped by token: one folded row per distinct pair_row
            partial.append((torch.from_numpy(sl.rows_np[np.unique(sl.meta[fold, 0])]), out[count:]))
    order = torch.argsort(ids, dim=1, stable=True)  # [T, K] ascending expert id
    parts = (y.view(t, k, hidden) * weights[..., None]).to(dtype)  # [T, K, H]
    parts = torch.take_along_dim(parts, order[..., None], dim=1)
    for tokens, rows in partial:
        parts[tokens, 0] = rows
    total = parts[:, 0].clone()
    for j in range(1, k):
        total += parts[:, j]
    return total
