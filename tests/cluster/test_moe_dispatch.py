"""Dispatch/combine across shards, as tensors: equal to the single-bank reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.moe_dispatch import (HEADER_BYTES, combine, fold_outputs, max_message_nbytes, message_nbytes,
                                  pack_parts, read_header, received_nbytes, split_route, unpack, unpack_hint)
from experts.expert_bank import ExpertBank
from experts.shard import ExpertShard
from kernels import cpu_native
from kernels.dispatch import select_kernels
from kernels.fused_moe import fused_moe_ref

E, H, I, K, T = 8, 16, 12, 3, 10


def pack(x, sl, hint=None) -> torch.Tensor:
    """The message for one shard in one tensor, as the gloo plane joins it (Transport.isend_parts)."""
    return torch.from_numpy(np.concatenate(pack_parts(x, sl, hint)))


def _bank(expert_ids, weights, dtype=torch.float32):
    bank = ExpertBank.empty(0, tuple(expert_ids), E, H, I, dtype)
    for row, e in enumerate(expert_ids):
        bank.set_expert(row, *weights[e])
    return bank


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g))
               for _ in range(E)]
    x = torch.randn(T, H, generator=g)
    scores = torch.randn(T, E, generator=g).softmax(-1)
    w, ids = scores.topk(K, dim=-1)
    return weights, x, ids, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("owner", [[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 0, 1, 2, 0, 1], [1] * 8, [0, 0, 1, 1, 0, 0, 1, 1]])
def test_sharded_moe_equals_one_bank_bitwise(case, owner, dtype):
    """Folded rows (a shard holding a token's lowest experts) included: the same bits however the
    experts are spread over shards, and the reference's (through the same projections) where the
    shards compute through them (bfloat16: torch; float32 pairs go to the C kernel, whose SwiGLU is
    its own: close)."""
    weights, x, ids, w = case
    weights = [tuple(m.to(dtype) for m in trio) for trio in weights]
    x = x.to(dtype)
    ops = select_kernels("cpu", "torch", dtype)  # the production kernels
    got, folded = _sharded(weights, x, ids, w, owner, dtype, ops)
    assert torch.equal(got, _sharded(weights, x, ids, w, [0] * E, dtype, ops)[0])
    full = _bank(range(E), weights, dtype)
    expected = fused_moe_ref(x, full.w_gate_up, full.w_down, ids, w, ops.linear)
    if dtype == torch.float32 and cpu_native.load() is not None:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:
        assert torch.equal(got, expected)
    if len(set(owner)) == 1:
        assert folded == T * (K - 1)  # one shard holds everything: one row per token


def _sharded(weights, x, ids, w, owner, dtype, ops):
    """The shards' messages, pair outputs, folds and the attention side's combine -> ([T, H], rows folded)."""
    num_shards = max(owner) + 1
    owner_t = torch.tensor(owner)
    outputs = []
    folded = 0
    for s, sl in enumerate(split_route(ids, w, owner_t, num_shards)):
        message = pack(x, sl)
        n, p, e = read_header(message)
        assert n == len(set((sl.pair_flat // K).tolist())) and p == int((owner_t[ids] == s).sum()) and e == 0
        assert message.numel() == message_nbytes(n, p, H, dtype) <= max_message_nbytes(T, K, H, dtype, E)
        if n == 0:
            assert message.numel() == HEADER_BYTES
            continue
        inbox = torch.full((max_message_nbytes(T, K, H, dtype, E) + 8,), 255, dtype=torch.uint8)
        inbox[: message.numel()] = message  # a shard's receive buffer holds more than the message
        xs, pair_row, pair_expert, fold, weight = unpack(inbox, n, p, H, dtype)
        assert torch.equal(fold, sl.fold) and torch.equal(weight, w.reshape(-1)[sl.pair_flat])
        shard = ExpertShard({0: _bank([e for e in range(E) if owner[e] == s], weights, dtype)}, ops)
        out = fold_outputs(shard.pair_outputs(0, xs, pair_row, pair_expert), pair_row, pair_expert, fold, weight)
        assert out.shape[0] == sl.out_rows <= p
        folded += p - out.shape[0]
        outputs.append((sl, out))
    return combine(outputs, ids, w, dtype), folded


@pytest.mark.parametrize("owner", [[0] * 4 + [1] * 4, [1] * 8])  # shard 0 gets tokens; shard 0 gets none
def test_a_message_carries_the_next_layers_hint_after_its_tokens(case, owner):
    _, x, ids, w = case
    sl = list(split_route(ids, w, torch.tensor(owner), 2))[0]
    hint = torch.bincount(ids.reshape(-1).flip(0), minlength=E)  # any [E] counts
    message = pack(x, sl, hint)
    n, p, e = read_header(message)
    assert e == E
    assert message.numel() == received_nbytes(message, H, torch.float32) == message_nbytes(n, p, H, torch.float32, E)
    inbox = torch.zeros(max_message_nbytes(T, K, H, torch.float32, E) + 8, dtype=torch.uint8)
    inbox[: message.numel()] = message
    assert unpack_hint(inbox, n, p, e, H, torch.float32) == hint.tolist()
    if n:
        assert torch.equal(unpack(inbox, n, p, H, torch.float32)[0], x[sl.rows])  # the tokens are untouched


def test_each_token_is_sent_once_per_shard(case):
    _, x, ids, _ = case
    owner = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    slices = list(split_route(ids, torch.ones(ids.shape), owner, 2))
    for s, sl in enumerate(slices):
        has = (owner[ids] == s).any(dim=1).nonzero().squeeze(1)
        assert torch.equal(sl.rows, has)
        assert torch.equal(owner[sl.pair_expert], torch.full_like(sl.pair_expert, s))
    assert sum(sl.pair_flat.numel() for sl in slices) == T * K


def test_shard_refuses_experts_it_does_not_hold(case):
    weights, x, _, _ = case
    shard = ExpertShard({0: _bank([0, 1], weights)}, select_kernels("cpu", "torch"))
    with pytest.raises(ValueError, match=r"experts \[5\] are not on this shard"):
        shard.pair_outputs(0, x[:1], torch.tensor([0]), torch.tensor([5]))
