"""The attention worker's building blocks against their reference forms (same bits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cluster.batch import build_batch
from cluster.layers import apply_rope, apply_rope_rolled, paged_attention, rope_table, signed_sin
from kernels.norm import rms_norm_ref
from cluster.scheduler import ScheduledChunk, SchedulerOutput


def rms_norm_hf(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, weight applied in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 512), (7, 48), (33, 4096), (5, 3, 64)])
def test_rms_norm_is_the_bits_of_the_hf_form(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    for eps in (1e-5, 1e-6):
        x = (torch.randn(*shape, generator=g) * 7).to(dtype)
        w = torch.randn(shape[-1], generator=g).to(dtype)
        assert torch.equal(rms_norm_ref(x, w, eps), rms_norm_hf(x, w, eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rope_is_the_bits_of_rotate_half(dtype):
    cos, sin = rope_table(64, 10000.0, 256)
    cos, sin = cos.to(dtype), sin.to(dtype)
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 256, (9,), generator=g)
    x = torch.randn(9, 4, 64, generator=g).to(dtype)
    want = apply_rope(x, cos[pos], sin[pos])
    got = apply_rope_rolled(x, cos[pos][:, None, :], signed_sin(sin)[pos][:, None, :])
    assert torch.equal(got, want)


def _one_sequence(blocks: tuple[int, ...], start: int, n: int):
    out = SchedulerOutput((ScheduledChunk(0, tuple(range(n)), start, blocks, True),))
    return build_batch(out, 4, None, torch.device("cpu"))


def test_a_lone_sequence_in_consecutive_slots_is_read_in_place_with_the_same_bits():
    run = _one_sequence((2, 3, 4), start=9, n=1)  # keys in slots 8..17: consecutive
    assert run.kv_runs == (8,) and run.kv_lens == (10,) and run.q_lens == (1,)
    assert _one_sequence((2, 5, 4), start=9, n=1).kv_runs is None  # block 5 breaks the run
    assert _one_sequence((2, 3, 9), start=5, n=1).kv_runs == (8,)  # block 9 holds none of its keys yet
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    for n, start in ((1, 9), (3, 7)):  # a decode step and a prefill chunk
        batch = _one_sequence((2, 3, 4), start, n)
        q = torch.randn(n, 4, 8, generator=g)
        gathered = paged_attention(q, k, v, dataclasses.replace(batch, kv_runs=None), 0.3)
        assert torch.equal(paged_attention(q, k, v, batch, 0.3), gathered)


@pytest.mark.parametrize("window", [None, 4])
def test_long_contexts_are_attended_in_place_each_sequence_with_its_lone_bits(monkeypatch, window):
    """Several sequences in consecutive slots, decoding and prefilling: each gets exactly the bits
    it gets alone, and the values of the gathered path (also with a sliding window shorter than
    the contexts, where a lone decode query must still be masked)."""
    import cluster.layers as layers

    bs, g = 4, torch.Generator().manual_seed(1)
    seqs = [((0, 1, 2), 9, 1), ((5, 6), 2, 3), ((3, 4), 6, 1)]  # (blocks, start, new tokens)
    chunks = tuple(ScheduledChunk(i, tuple(range(n)), start, blocks, True) for i, (blocks, start, n) in enumerate(seqs))
    batch = build_batch(SchedulerOutput(chunks), bs, window, torch.device("cpu"))
    assert batch.kv_runs == (0, 20, 12) and batch.kv_lens == (10, 5, 7) and batch.q_lens == (1, 3, 1)
    k, v = torch.randn(32, 2, 8, generator=g), torch.randn(32, 2, 8, generator=g)
    q = torch.randn(5, 4, 8, generator=g)
    calls = []
    real = layers._attention_in_place
    monkeypatch.setattr(layers, "_attention_in_place", lambda *a: calls.append(1) or real(*a))
    gather = 3 * 10 * 2 * 8 * 4  # bytes: 3 sequences padded to 10 keys of 2 heads x 8 floats
    monkeypatch.setattr(layers, "GATHER_MAX_BYTES", gather)  # not above it: gathered
    gathered = paged_attention(q, k, v, batch, 0.3)
    assert not calls
    monkeypatch.setattr(layers, "GATHER_MAX_BYTES", gather - 1)
    in_place = paged_attention(q, k, v, batch, 0.3)
    assert calls
    torch.testing.assert_close(in_place, gathered, rtol=1e-6, atol=1e-6)
    row = 0
    for (blocks, start, n), chunk in zip(seqs, chunks):
        alone = build_batch(SchedulerOutput((chunk,)), bs, window, torch.device("cpu"))
        assert torch.equal(in_place[row:row + n], paged_attention(q[row:row + n], k, v, alone, 0.3))
        row += n
