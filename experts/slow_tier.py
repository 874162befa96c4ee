"""The slow tier under an expert cache: where every expert lies, how one is moved into a fast-tier
row, and how experts are computed where they lie (on the CPU).

- CheckpointTier (CPU-only node): the memory-mapped checkpoint itself, so a node serves more experts
  than its RAM budget holds (the page cache over the file is the OS's to reclaim). A move copies
  the expert's tensors from the mapping into the row (one copy each, converting the dtype where the
  file's differs); computing in place copies them the same way into a bank of its own first, since
  the BLAS's bits depend on the weights' alignment (MKL's kernels for a few rows gave other bits
  for weights not 16-byte aligned; safetensors aligns data to 8 bytes) and an expert must give the
  same bits wherever it is computed. The cost model charges it a move plus a computation.
- HostTier (GPU fast tier): every expert in host memory, pinned, in the bank's row layout, so a
  move is one contiguous copy, issued on a separate CUDA stream that runs beside the computation.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from experts.checkpoint import Checkpoint
from experts.config import ModelSpec
from experts.expert_bank import ExpertBank
from experts.loader import expert_views, load_experts
from kernels.dispatch import KernelOps, select_kernels

CPU = torch.device("cpu")


class SlowTier(Protocol):
    name: str
    compute_is_a_move: bool  # the cost model charges computing in place as a move plus a computation

    def copy_into(self, bank: ExpertBank, row: int, layer: int, expert: int) -> None:
        """Write `expert` of `layer` into `bank`'s row (asynchronous on a CUDA copy stream if current)."""

    def compute(self, layer: int, experts: list[int], x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """The weighted outputs of `experts` only, computed on the CPU where they lie; on x's device."""

    def pair_outputs(self, layer: int, x: torch.Tensor, pair_row: torch.Tensor,
                     pair_expert: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs [P, H] of (row of x, expert) pairs, computed on the CPU; on x's device."""

    def set_owned(self, owned: dict[int, tuple[int, ...]]) -> None:
        """The experts (layer -> ids) the cache above serves from now on."""


def _weighted(bank: ExpertBank, experts: list[int], x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor, ops: KernelOps) -> torch.Tensor:
    """SlowTier.compute on a CPU bank holding `experts`: only their weighted outputs, on x's device,
    through the CPU's own MoE path (the C kernel for a few float32 tokens, as the fast tier on a CPU node)."""
    ids_cpu = ids.to(CPU)
    keep = torch.isin(ids_cpu, torch.tensor(experts, dtype=ids_cpu.dtype))
    rows = torch.where(keep, bank.slot_of[ids_cpu.clamp(min=0)], -1)  # [T, K] bank rows, -1 elsewhere
    return ops.fused_moe(x.to(CPU), bank.w_gate_up, bank.w_down, rows, weights.to(CPU)).to(x.device)


def _pairs(bank: ExpertBank, x: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
           ops: KernelOps) -> torch.Tensor:
    """SlowTier.pair_outputs on a CPU bank holding every expert of `pair_expert`, on x's device."""
    rows = bank.slot_of[pair_expert.to(CPU)]
    return ops.pair_outputs(x.to(CPU), bank.w_gate_up, bank.w_down, pair_row.to(CPU), rows).to(x.device)


class CheckpointTier:
    name = "checkpoint"
    compute_is_a_move = True  # computing in place copies the expert out of the mapping as a move does

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype) -> None:
        self.ckpt, self.spec, self.dtype = ckpt, spec, dtype
        self.ops = select_kernels(CPU, "torch", dtype)

    def copy_into(self, bank: ExpertBank, row: int, layer: int, expert: int) -> None:
        bank.set_expert(row, *expert_views(self.ckpt, self.spec, layer, expert))

    def compute(self, layer: int, experts: list[int], x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return _weighted(load_experts(self.ckpt, self.spec, layer, experts, self.dtype, CPU), experts, x, ids,
                         weights, self.ops)

    def pair_outputs(self, layer: int, x: torch.Tensor, pair_row: torch.Tensor,
                     pair_expert: torch.Tensor) -> torch.Tensor:
        needed = sorted(set(pair_expert.tolist()))
        return _pairs(load_experts(self.ckpt, self.spec, layer, needed, self.dtype, CPU), x, pair_row, pair_expert,
                      self.ops)

    def set_owned(self, owned: dict[int, tuple[int, ...]]) -> None:
        pass  # every expert is in the checkpoint


class HostTier:
    name = "host"
    compute_is_a_move = False

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype, pin: bool,
                 owned: dict[int, tuple[int, ...]] | None = None,
                 progress: Callable[[int], object] | None = None) -> None:
        """`owned`: layer -> the experts held (default: all of every MoE layer)."""
        self.ckpt, self.spec, self.dtype, self.pin = ckpt, spec, dtype, pin
        self.ops = select_kernels(CPU, "torch", dtype)
        self.banks: dict[int, ExpertBank] = {}
        owned = owned if owned is not None else {layer: tuple(range(spec.num_experts)) for layer in spec.moe_layers}
        for layer, ids in owned.items():
            self.banks[layer] = self._bank(layer, tuple(ids))
            if progress is not None:
                progress(1)

    def _bank(self, layer: int, ids: tuple[int, ...]) -> ExpertBank:
        bank = load_experts(self.ckpt, self.spec, layer, ids, self.dtype, CPU)
        if self.pin:
            bank.buffer = bank.buffer.pin_memory()
        return bank

    def set_owned(self, owned: dict[int, tuple[int, ...]]) -> None:
        for layer, ids in owned.items():
            if tuple(ids) != self.banks[layer].expert_ids:
                self.banks[layer] = self._bank(layer, tuple(ids))

    def copy_into(self, bank: ExpertBank, row: int, layer: int, expert: int) -> None:
        src = self.banks[layer]
        bank.buffer[row].copy_(src.buffer[int(src.slot_of[expert])], non_blocking=True)

    def compute(self, layer: int, experts: list[int], x: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        return _weighted(self.banks[layer], experts, x, ids, weights, self.ops)

    def pair_outputs(self, layer: int, x: torch.Tensor, pair_row: torch.Tensor,
                     pair_expert: torch.Tensor) -> torch.Tensor:
        return _pairs(self.banks[layer], x, pair_row, pair_expert, self.ops)


def slow_tier_for(ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                  owned: dict[int, tuple[int, ...]] | None = None,
                  progress: Callable[[int], object] | None = None) -> SlowTier:
    """Pinned host memory under a GPU fast tier (the `owned` experts); the memory-mapped checkpoint
    on a CPU-only node."""
    if device.type == "cuda":
        return HostTier(ckpt, spec, dtype, pin=True, owned=owned, progress=progress)
    return CheckpointTier(ckpt, spec, dtype)
