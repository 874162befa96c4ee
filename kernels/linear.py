"""Dense projections `y = x @ w^T (+ b)`: torch reference and the oneDNN CPU path.

On CPU, `F.linear` in float32 goes to the BLAS sgemm, which on this class of machine (AMD EPYC,
MKL) reaches roughly half of what oneDNN's inner-product primitive does for decode shapes (measured
for [32, 512] x [512, 50304]: 25 ms against 11 ms). The oneDNN path is chosen once at start-up,
after checking that it exists in this torch build and agrees with the reference.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Linear = Callable[..., Tensor]


def linear_ref(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: [T, in]; w: [out, in] (HF orientation); bias: [out] -> [T, out]."""
    return F.linear(x, w, bias)


def linear_onednn(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """Same contract as `linear_ref`, through oneDNN's inner product (CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


SMALL_M = 8  # rows up to which an expert projection runs as (w @ x^T)^T


def linear_weight_major(x: Tensor, w: Tensor) -> Tensor:
    """`x @ w^T` for decode-sized x, computed as `(w @ x^T)^T`: the BLAS then streams the rows of a
    contiguous w once for all of x's rows. One expert projection of 1-2 rows ([1024, 512] weights,
    160 distinct ones) read 36-54 GB/s this way against 18-41 through oneDNN and 26-38 as `x @ w^T`
    on input-major weights (1 and 2 threads, measured on the 2-core development VM). A single row is
    computed as two: alone it would take the BLAS's matrix-vector path, at half that speed."""
    if x.shape[0] == 1:
        return (w @ torch.cat([x, x]).T).T[:1]
    return (w @ x.T).T


def select_expert_linear(device: torch.device, dtype: torch.dtype) -> Linear:
    """The projection of expert MLPs (contiguous HF-orientation weights, no bias): on CPU in float32,
    `linear_weight_major` up to SMALL_M rows, above that `select_linear`'s choice (oneDNN read prefill
    shapes 10% faster); the reference elsewhere."""
    if device.type != "cpu" or dtype != torch.float32:
        return linear_ref
    large = select_linear(device, dtype)

    def expert_linear(x: Tensor, w: Tensor) -> Tensor:
        return linear_weight_major(x, w) if x.shape[0] <= SMALL_M else large(x, w)

    return expert_linear


def select_linear(device: torch.device, dtype: torch.dtype) -> Linear:
    """oneDNN for float32 on CPU when it is present and correct; the reference otherwise."""
    if device.type != "cpu" or dtype != torch.float32 or not _onednn_works():
        return linear_ref
    return linear_onednn


@functools.cache
def _onednn_works() -> bool:
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((3, 8), (5, 8), (5,)))
    try:
        got = linear_onednn(x, w, b)
    except (AttributeError, RuntimeError):
        return False
    return torch.allclose(got, linear_ref(x, w, b), atol=1e-5, rtol=1e-5)
