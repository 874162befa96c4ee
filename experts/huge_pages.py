"""Host buffers on 2 MiB pages: weights and KV caches that a CPU decode step streams.

A batch-1 decode step reads every weight it uses once, from memory. On 4 KiB pages that is a TLB
miss every 4 KiB (about 60,000 a step for bench/decode.py's model), and under a hypervisor each
miss walks two page tables. Linux backs a region with transparent huge pages where the region is
advised `MADV_HUGEPAGE` before it is touched and the system's setting is `madvise` or `always`
(`/sys/kernel/mm/transparent_hugepage/enabled`; with `never`, nothing changes).

`empty` over-allocates by one huge page, advises the 2 MiB-aligned part that holds the tensor and
returns a view of it: the slack is never touched, so it costs address space, not memory. Anything
smaller than a huge page, anything not on the CPU, and everything when `MOE_SERVE_HUGE_PAGES=0` is a
plain `torch.empty`. The bytes are the same either way; only where they lie changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
from functools import cache

import torch

HUGE_PAGE = 2 << 20
ENV_SWITCH = "MOE_SERVE_HUGE_PAGES"


@cache
def _madvise():
    """libc's madvise, or None where there is no such call or no MADV_HUGEPAGE (not Linux)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    name = ctypes.util.find_library("c")
    if advice is None or name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lambda address, length: libc.madvise(address, length, advice) == 0


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0" and _madvise() is not None


def _plain(nbytes: int, device: torch.device | str) -> bool:
    """Whether `nbytes` on `device` stay on ordinary pages: off the CPU, under a huge page, or switched off."""
    return torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not enabled()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, on huge pages where it can be (see above)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if _plain(nbytes, device):
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    _madvise()(raw.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE)  # a refusal leaves 4 KiB pages
    return raw[start:start + nbytes].view(dtype).view(shape)


def copy(t: torch.Tensor) -> torch.Tensor:
    """`t` itself where `empty` would give a plain tensor, else a contiguous copy on huge pages."""
    if _plain(t.numel() * t.element_size(), t.device):
        return t
    return empty(t.shape, t.dtype).copy_(t)
