"""The projection dispatch: the CPU paths (C kernel, weight-major, oneDNN) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_native
from kernels.cpu_native import linear_native
from kernels.linear import NATIVE_M, SMALL_M, _onednn_works, linear_onednn, linear_ref, linear_weight_major, select_linear


@pytest.mark.parametrize("m, k, n, bias", [(1, 64, 300, False), (7, 48, 40, True), (32, 512, 1000, False)])
def test_onednn_matches_reference(m, k, n, bias):
    if not _onednn_works():
        pytest.skip("this torch build has no working oneDNN linear")
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(linear_onednn(x, w, b), linear_ref(x, w, b), atol=1e-4, rtol=1e-5)


def test_reference_chosen_off_cpu_or_for_bfloat16():
    assert select_linear(torch.device("cpu"), torch.bfloat16) is linear_ref
    assert select_linear(torch.device("meta"), torch.float32) is linear_ref


@pytest.mark.parametrize("m", [1, 2, 5, SMALL_M, SMALL_M + 1, NATIVE_M, NATIVE_M + 1, 40])  # decode ... prefill
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_matches_reference(m, bias):
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 96, generator=g), torch.randn(200, 96, generator=g)
    b = torch.randn(200, generator=g) if bias else None
    want = linear_ref(x, w, b)
    linear = select_linear(torch.device("cpu"), torch.float32)
    for got in (linear(x, w, b), linear_weight_major(x, w, b)):
        assert got.shape == (m, 200)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    native = cpu_native.load() is not None
    if m <= (NATIVE_M if native else SMALL_M):  # decode-sized: the C kernel, else the weight-major form, bit for bit
        small = linear_native if native else linear_weight_major
        assert torch.equal(linear(x, w, b), small(x, w, b))
        assert torch.equal(linear(x.T.contiguous().T, w, b), small(x, w, b))  # column-major x: same bits
