"""Start-up calibration of the expert cost model: time, on this node's own devices, moving one expert
from the slow tier into a fast-tier row, and computing one expert in each tier for a range of token
counts; fit a line per tier (experts.cost_model). A tier whose computation in place is charged as a
move (the checkpoint, on a CPU-only node: see experts.slow_tier.CheckpointTier) costs a move plus a
fast-tier computation."""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable

import torch

from experts.config import ModelSpec
from experts.cost_model import ExpertCostModel, LinearTime
from experts.expert_bank import ExpertBank
from experts.slow_tier import SlowTier
from kernels.dispatch import KernelOps

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32)
REPEATS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(tier: SlowTier, spec: ModelSpec, dtype: torch.dtype, device: torch.device, ops: KernelOps,
              layer: int | None = None, experts: tuple[int, ...] | None = None,
              token_counts: tuple[int, ...] = TOKEN_COUNTS, repeats: int = REPEATS) -> ExpertCostModel:
    """Measure on `experts` of `layer` that the tier holds (default: the first MoE layer's; moves
    cycle through up to four, so no one expert's pages are favoured); compute routes every token to
    the first of them with weight 1."""
    layer = spec.moe_layers[0] if layer is None else layer
    ids = tuple(experts if experts is not None else range(spec.num_experts))[:4]
    h = spec.hidden_size
    bank = ExpertBank.empty(layer, ids, spec.num_experts, h, spec.expert_intermediate, dtype, device)
    moves = itertools.count()

    def move() -> None:
        n = next(moves) % len(ids)
        tier.copy_into(bank, n, layer, ids[n])

    transfer_s = _seconds(move, device, max(repeats, len(ids)))
    gen = torch.Generator().manual_seed(0)
    fast, slow = [], []
    for t in token_counts:
        x = (torch.randn(t, h, generator=gen) * 0.1).to(device=device, dtype=dtype)
        route = torch.full((t, 1), ids[0], dtype=torch.int64, device=device)
        weights = torch.ones(t, 1, dtype=torch.float32, device=device)
        fast.append((t, _seconds(lambda: ops.fused_moe(x, bank.w_gate_up, bank.w_down, bank.slot_of[route], weights),
                                 device, repeats)))
        if not tier.compute_is_a_move:
            slow.append((t, _seconds(lambda: tier.compute(layer, [ids[0]], x, route, weights), device, repeats)))
    fast_fit = LinearTime.fit(fast)
    slow_fit = (LinearTime(transfer_s + fast_fit.fixed_s, fast_fit.per_token_s) if tier.compute_is_a_move
                else LinearTime.fit(slow))
    return ExpertCostModel(expert_bytes=bank.buffer[0].numel() * bank.buffer.element_size(), transfer_s=transfer_s,
                           fast=fast_fit, slow=slow_fit, overlap=device.type == "cuda",
                           fast_device=str(device), slow_device=f"cpu ({tier.name})")
