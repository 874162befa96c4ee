"""Python wrappers of kernels/cpu_attention.c (float32 CPU): causal attention over a contiguous run
of KV slots, rotary embedding in place, and the fused attention half of a decoder layer, beside
attention_ref. The library is built and loaded by kernels/cpu_native.py.
"""

from __future__ import annotations

import ctypes
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.cpu_native import load

QK_NORM_MODES = {"none": 0, "full": 1, "head": 2}  # cpu_attention.c's MS_QK_*


def attend_native(q: Tensor, k_cache: Tensor, v_cache: Tensor, first: int, keys: int, scale: float,
                  out: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """n float32 CPU queries of one sequence, q [n, nh, D], the last n of its `keys` keys and values at
    slots first..first+keys of contiguous caches [slots, nkv, D], each over the keys up to its own
    (causal); writes out [n, nh * D] (rows contiguous) and returns it. Masked SDPA with GQA
    (attention_ref)."""
    lib = lib or load()
    n, nh, d = q.shape
    nkv = k_cache.shape[1]
    _check_slots(k_cache, first, keys, n)
    row = nkv * d
    scores = torch.empty(nh * keys, dtype=torch.float32)
    q = q.contiguous()  # held: a temporary's memory would be freed before the call
    lib.ms_attend_causal(q.data_ptr(), n, k_cache.data_ptr() + 4 * first * row,
                         v_cache.data_ptr() + 4 * first * row, row, keys, nh, nkv, d, scale, out.data_ptr(),
                         out.stride(0), scores.data_ptr(), torch.get_num_threads())
    return out


def rope_native(x: Tensor, cos: Tensor, sin_signed: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
    """cluster/layers.py `apply_rope_rolled` in place on float32 CPU x [T, n, D] (each head's D values
    contiguous, heads D apart); cos, sin_signed: [T, 1, D] contiguous. Returns x."""
    lib = lib or load()
    t, n, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d:
        raise ValueError(f"rope_native needs each row's heads packed, got strides {x.stride()}")
    lib.ms_rope(x.data_ptr(), x.stride(0), t, n, d, cos.data_ptr(), sin_signed.data_ptr())
    return x


BLOCK_WEIGHTS = ("input_norm", "post_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o")


class BlockWeights:
    """A layer's attention-block weights as `attention_block_native` passes them to C: contiguous
    tensors (held here, so their memory outlives every call) and their addresses, worked out once
    per layer rather than at every token (two dict passes and a copy check per call)."""

    __slots__ = ("tensors", "ptr")

    def __init__(self, weights: Mapping[str, Tensor | None]) -> None:
        self.tensors = {name: None if weights[name] is None else weights[name].contiguous() for name in BLOCK_WEIGHTS}
        self.ptr = {name: None if t is None else t.data_ptr() for name, t in self.tensors.items()}


def attention_block_native(h: Tensor, weights: BlockWeights | Mapping[str, Tensor | None], eps: float, qk_norm: str,
                           clip: float | None, cos: Tensor, sin_signed: Tensor, k_cache: Tensor, v_cache: Tensor,
                           first: int, keys: int, num_heads: int, scale: float,
                           lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor]:
    """The attention half of a decoder layer for n float32 CPU tokens of one sequence, h [n, H]
    (kernels/cpu_attention.c; n <= 8): (h + o(attention(input_norm(h))), post_norm of that), their
    keys and values written to the last n of slots first..first+keys-1, each query attending the
    slots up to its own. `weights`: input_norm, post_norm, qkv, qkv_bias, q_norm, k_norm, o (the
    biases and q/k norms may be None), or a BlockWeights of them; qk_norm: "none", "full" or "head"; cos,
    sin_signed: [n, D] rows (contiguous) at the tokens' positions. The same bits as the unfused path
    through this module's kernels."""
    lib = lib or load()
    n, hid = h.shape
    nkv, d = k_cache.shape[1], k_cache.shape[2]
    _check_slots(k_cache, first, keys, n)
    held = weights if isinstance(weights, BlockWeights) else BlockWeights(weights)  # alive through the call
    ptr = held.ptr
    h_out, x_out = torch.empty(n, hid), torch.empty(n, hid)
    scratch = torch.empty(n * (2 * hid + (3 * num_heads + 2 * nkv) * d) + num_heads * keys)
    h = h.contiguous()
    lib.ms_attention_block(h.data_ptr(), h_out.data_ptr(), x_out.data_ptr(), n, hid, ptr["input_norm"],
                           ptr["post_norm"], eps, ptr["qkv"], ptr["qkv_bias"], ptr["q_norm"], ptr["k_norm"],
                           QK_NORM_MODES[qk_norm], clip or 0.0, cos.data_ptr(), sin_signed.data_ptr(),
                           k_cache.data_ptr(), v_cache.data_ptr(), first, keys, num_heads, nkv, d, scale,
                           ptr["o"], scratch.data_ptr(), torch.get_num_threads())
    return h_out, x_out


def _check_slots(cache: Tensor, first: int, keys: int, queries: int) -> None:
    """The keys lie in the cache and include the queries' own: C would read past it otherwise."""
    if not (0 <= first and queries <= keys and first + keys <= cache.shape[0]):
        raise ValueError(f"{keys} keys from slot {first} (for {queries} queries) do not fit a cache of "
                         f"{cache.shape[0]} slots")


def attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, first: int, keys: int, scale: float) -> Tensor:
    """`attend_native`'s reference: causal SDPA of q [n, nh, D] over cache rows first..first+keys
    -> [n, nh * D]."""
    n = q.shape[0]
    k, v = (c[first:first + keys].transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, nkv, keys, D]
    mask = torch.arange(keys)[None, :] <= torch.arange(keys - n, keys)[:, None]  # [n, keys]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(n, -1)
