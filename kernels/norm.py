"""RMSNorm: the torch reference (HF's form); kernels/cpu_native.py has the C one for float32 CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 like HF, weight applied in x.dtype. In float32
    `F.rms_norm` gives the same bits in one call (tests/cluster/test_layers.py); in bfloat16 it
    rounds differently from HF, so the explicit form stays."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
