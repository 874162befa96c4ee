"""Single dispatch point for the MoE kernels, chosen once at start-up.

``select_kernels(device, backend)`` returns a :class:`KernelOps` bundle whose
callables share the signatures of the torch references:

    fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights) -> Tensor [T, H]
    topk_gating(logits, top_k, renormalize) -> (weights [T, K], ids [T, K])

Triton is imported lazily, so the torch backend works without it installed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.fused_moe import expert_pair_outputs_ref
from kernels.fused_moe_torch import fused_moe_torch, pair_outputs_torch
from kernels.linear import linear_ref, select_linear
from kernels.norm import rms_norm_ref
from kernels.topk_gating import topk_gating_ref

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True, slots=True)
class KernelOps:
    """The kernel implementations the engine calls."""

    backend: str  # "torch" or "triton"
    fused_moe: Callable[..., Tensor]
    topk_gating: Callable[..., tuple[Tensor, Tensor]]
    linear: Callable[..., Tensor] = linear_ref  # projections y = x @ w^T (+ b): dense layers and experts
    rms_norm: Callable[..., Tensor] = rms_norm_ref  # (x, weight, eps) -> normed x
    attend: Callable[..., Tensor] | None = None  # attention of a sequence's few new queries (cluster/layers.py)
    rope_in_place: Callable[..., Tensor] | None = None  # apply_rope_rolled in place (cluster/attention_worker.py)
    attention_block: Callable[..., tuple[Tensor, Tensor]] | None = None  # a lone sequence's chunk's attention half
    block_weights: Callable[..., object] | None = None  # a layer's weights in the form attention_block takes
    pair_outputs: Callable[..., Tensor] = expert_pair_outputs_ref  # an expert shard's unweighted outputs per pair


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_triton_allowed(device: torch.device) -> None:
    """Raise ValueError unless Triton kernels can run on ``device``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernel backend 'triton' needs a CUDA device, got {device}; on CPU it only "
            "runs under the Triton interpreter (set TRITON_INTERPRET=1 before start-up)"
        )
    if not _triton_importable():
        raise ValueError(
            "kernel backend 'triton' requested but the triton package cannot be imported"
        )


def _triton_ops() -> KernelOps:
    from kernels.fused_moe_triton import fused_moe_triton
    from kernels.topk_gating_triton import topk_gating_triton

    return KernelOps(backend="triton", fused_moe=fused_moe_triton, topk_gating=topk_gating_triton)


def _native(device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """KernelOps fields from the C kernels for float32 on CPU (kernels/cpu_native.py); {} where they
    cannot run."""
    if device.type != "cpu" or dtype != torch.float32:
        return {}
    from kernels import cpu_attention, cpu_native
    lib = cpu_native.load()
    if lib is None:
        return {}
    return {"few_tokens": functools.partial(cpu_native.moe_native, lib=lib),
            "few_pairs": functools.partial(cpu_native.pair_outputs_native, lib=lib),
            "rms_norm": functools.partial(cpu_native.rms_norm_native, lib=lib),
            "attend": functools.partial(cpu_attention.attend_native, lib=lib),
            "rope_in_place": functools.partial(cpu_attention.rope_native, lib=lib),
            "attention_block": functools.partial(cpu_attention.attention_block_native, lib=lib),
            "block_weights": cpu_attention.BlockWeights}


def select_kernels(device: torch.device | str, backend: str = "auto",
                   dtype: torch.dtype = torch.float32) -> KernelOps:
    """Pick the kernel implementations for ``device``.

    Args:
        device: where the model runs, e.g. ``"cuda:0"`` or ``torch.device("cpu")``.
        backend: ``"auto"`` (Triton on CUDA when importable, else torch),
            ``"torch"`` (always available) or ``"triton"`` (CUDA, or CPU with
            ``TRITON_INTERPRET=1``).

    Raises:
        ValueError: unknown backend name, a CUDA device where torch sees none, or Triton forced
            where it cannot run.
    """
    if backend not in BACKENDS:
        choices = ", ".join(BACKENDS)
        raise ValueError(f"unknown kernel backend {backend!r}; valid choices: {choices}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: this torch build sees no CUDA GPU")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if backend == "torch":  # projections through the fastest correct linear for the device and dtype
        linear = select_linear(device, dtype)
        native = _native(device, dtype)
        moe = functools.partial(fused_moe_torch, linear=linear, few_tokens=native.pop("few_tokens", None))
        pairs = functools.partial(pair_outputs_torch, linear=linear, few_pairs=native.pop("few_pairs", None))
        return KernelOps(backend="torch", fused_moe=moe, topk_gating=topk_gating_ref, linear=linear,
                         pair_outputs=pairs, **native)
    _check_triton_allowed(device)
    return _triton_ops()
