"""The attention worker's building blocks against their reference forms (same bits)."""

from __future__ import annotations

import pytest
import torch

from cluster.layers import apply_rope, apply_rope_rolled, rms_norm, rope_table, signed_sin


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
