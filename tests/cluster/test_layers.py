"""The attention worker's building blocks against their reference forms (same bits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cluster.batch import build_batch
from cluster.layers import apply_rope, apply_rope_rolled, paged_attention, rms_norm, rope_table, signed_sin
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
        assert torch.equal(rms_norm(x, w, eps), rms_norm_hf(x, w, eps))


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
    assert run.kv_run == 8
    assert _one_sequence((2, 5, 4), start=9, n=1).kv_run is None  # block 5 breaks the run
    pair = (ScheduledChunk(0, (1,), 3, (0,), True), ScheduledChunk(1, (1,), 3, (1,), True))
    two = build_batch(SchedulerOutput(pair), 4, None, torch.device("cpu"))
    assert two.kv_run is None  # several sequences are always gathered
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(24, 2, 8, generator=g), torch.randn(24, 2, 8, generator=g)
    for n, start in ((1, 9), (3, 7)):  # a decode step and a prefill chunk
        batch = _one_sequence((2, 3, 4), start, n)
        q = torch.randn(n, 4, 8, generator=g)
        gathered = paged_attention(q, k, v, dataclasses.replace(batch, kv_run=None), 0.3)
        assert torch.equal(paged_attention(q, k, v, batch, 0.3), gathered)
