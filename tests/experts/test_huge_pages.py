"""experts/huge_pages.py: big host buffers start on a 2 MiB boundary inside a region advised
MADV_HUGEPAGE; small ones, and all of them with the switch off, are plain tensors."""

from __future__ import annotations

import sys

import pytest
import torch

from experts import huge_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or not huge_pages.enabled(),
                           reason="MADV_HUGEPAGE is Linux's")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(p, 16) for p in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux
def test_big_buffer_is_aligned_and_advised():
    t = huge_pages.empty((3, huge_pages.HUGE_PAGE // 4 + 5), torch.float32)
    assert t.shape == (3, huge_pages.HUGE_PAGE // 4 + 5) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t.data_ptr())  # smaps' name for MADV_HUGEPAGE
    t.fill_(1.5)  # every byte of the tensor is usable
    assert float(t.sum()) == 1.5 * t.numel()


@linux
def test_copy_keeps_values_and_small_tensors():
    big = torch.randn(1100, 1024, dtype=torch.bfloat16)  # 2.2 MB
    moved = huge_pages.copy(big)
    assert moved is not big and moved.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert torch.equal(moved, big) and moved.dtype == big.dtype
    small = torch.randn(10, 10)
    assert huge_pages.copy(small) is small
    strided = torch.randn(1024, 1024).t()  # a copy is contiguous whatever the source's layout
    assert huge_pages.copy(strided).is_contiguous() and torch.equal(huge_pages.copy(strided), strided)


def test_switch_off_gives_plain_tensors(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    assert not huge_pages.enabled()
    t = huge_pages.empty((huge_pages.HUGE_PAGE,), torch.float32)
    assert t.untyped_storage().nbytes() == t.numel() * 4  # no slack: torch.empty itself
    big = torch.ones(huge_pages.HUGE_PAGE)
    assert huge_pages.copy(big) is big


def test_small_buffers_are_plain():
    t = huge_pages.empty((16, 16), torch.float32)
    assert t.untyped_storage().nbytes() == 16 * 16 * 4
