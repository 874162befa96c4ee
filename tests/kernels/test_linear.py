"""The dense-projection dispatch: oneDNN path against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.linear import linear_onednn, linear_ref, select_linear


@pytest.mark.parametrize("m, k, n, bias", [(1, 64, 300, False), (7, 48, 40, True), (32, 512, 1000, False)])
def test_onednn_matches_reference(m, k, n, bias):
    if select_linear(torch.device("cpu"), torch.float32) is linear_ref:
        pytest.skip("this torch build has no working oneDNN linear")
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(linear_onednn(x, w, b), linear_ref(x, w, b), atol=1e-4, rtol=1e-5)


def test_reference_chosen_off_cpu_or_for_bfloat16():
    assert select_linear(torch.device("cpu"), torch.bfloat16) is linear_ref
    assert select_linear(torch.device("meta"), torch.float32) is linear_ref
