"""Projections `y = x @ w^T (+ b)` (dense layers and experts, weights in the HF orientation): the
torch reference and the CPU float32 paths.

On CPU, `F.linear` in float32 goes to the BLAS sgemm with a transposed operand, which on this class
of machine (AMD EPYC, MKL) reaches roughly half of what oneDNN's inner-product primitive does (for
[32, 512] x [512, 50304]: 25 ms against 11 ms). Decode-sized inputs go through the C kernel where it is
built (kernels/cpu_native.py; up to NATIVE_M rows), else as `(w @ x^T)^T` (`linear_weight_major`; up
to SMALL_M rows); larger ones through oneDNN. The CPU path is chosen once at start-up, oneDNN after checking that it
exists in this torch build and agrees with the reference.
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


SMALL_M = 8  # rows up to which a float32 projection on CPU runs as (w @ x^T)^T (without the C kernels)
NATIVE_M = 16  # rows up to which it runs in the C kernel (kernels/cpu_native.c) where that is built


def linear_weight_major(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """Same contract as `linear_ref`, computed as `(w @ x^T)^T` (+ b): the BLAS streams the rows of a
    contiguous w once for all of x's rows. For decode-sized x this read expert projections of 1-2
    rows ([1024, 512] weights, 160 distinct ones) at 36-54 GB/s against 18-41 through oneDNN and
    26-38 as `x @ w^T` on input-major weights, and attention projections ([1536, 512], [512, 512])
    36-47% faster than oneDNN at one row and 73-128% at two (1 and 2 threads, the 2-core VM). A
    single row is computed as two: alone it would take the BLAS's matrix-vector path, at half that
    speed. x must be row-major for `x^T` to be the column-major operand the BLAS streams fastest: an
    expert's down projection gets `silu(gate) * up`, column-major since it is computed from the
    transposed gate_up output, and [512, 512] @ x^T took 160-168 us for 2-8 rows of such an x
    against 40-84 us once x was copied row-major."""
    if x.shape[0] == 1:
        y = (w @ torch.cat([x, x]).T).T[:1]
    else:
        y = (w @ x.contiguous().T).T
    return y if bias is None else y + bias


def select_linear(device: torch.device, dtype: torch.dtype) -> Linear:
    """Float32 on CPU: the C kernel up to NATIVE_M rows of x [T, in] where it is built, else
    `linear_weight_major` up to SMALL_M rows; above that oneDNN when it is present and correct
    (prefill shapes: about 10% faster than the weight-major form), else the reference. The C kernel
    multiplies four of x's rows at a time (ms_dot4): from 9 to 16 rows it matched or beat oneDNN on
    the bench model's projections (50,304 x 512 at 16 rows: 2.9 against 4.2 ms), past that oneDNN's
    blocking wins. The reference elsewhere."""
    if device.type != "cpu" or dtype != torch.float32:
        return linear_ref
    large = linear_onednn if _onednn_works() else linear_ref
    from kernels import cpu_native  # imports this module: loaded here, not at the top
    small = functools.partial(cpu_native.linear_native, lib=lib) if (lib := cpu_native.load()) else None

    def linear_cpu(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        if x.dim() == 2 and x.shape[0] <= NATIVE_M:
            if small is not None and w.is_contiguous() and (bias is None or bias.is_contiguous()):
                return small(x, w, bias)
            if x.shape[0] <= SMALL_M:
                return linear_weight_major(x, w, bias)
        return large(x, w, bias)

    return linear_cpu


@functools.cache
def _onednn_works() -> bool:
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((3, 8), (5, 8), (5,)))
    try:
        got = linear_onednn(x, w, b)
    except (AttributeError, RuntimeError):
        return False
    return torch.allclose(got, linear_ref(x, w, b), atol=1e-5, rtol=1e-5)
