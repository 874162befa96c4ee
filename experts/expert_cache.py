"""CachedExperts: every MoE layer's experts on a fast-tier budget over the checkpoint (the slow tier).

A drop-in for ExpertShard in the in-process model. Each MoE layer keeps `slots` experts resident in
one ExpertBank (a row per expert, so a load is one row write). At every layer the experts the
step's tokens need are looked up: a resident one is a hit; a missing one is read from the
checkpoint (safetensors memory-maps it, so on a CPU node the slow tier is the page cache over the
file) into the slot of the policy's victim, never one the step still needs. When a step needs more
experts than a layer has slots, the rest are read and computed once without being kept. The
routed tokens and their weights are the same as with every expert resident; only where the
weights are read from differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from experts.cache_policy import ONLINE_POLICIES, online_policy
from experts.checkpoint import Checkpoint
from experts.config import ModelSpec
from experts.expert_bank import ExpertBank
from experts.loader import load_experts, read_expert
from kernels.dispatch import KernelOps

MIN_PREFETCH_USES = 1.0  # predicted uses by the step's tokens below which an expert is not loaded ahead


@dataclass(frozen=True, slots=True)
class ExpertCacheConfig:
    capacity_fraction: float  # of each MoE layer's experts resident in the fast tier, in (0, 1]
    policy: str = "score"
    prefetch: bool = False  # load the experts pre-gating predicts for the next layer ahead of it

    def __post_init__(self) -> None:
        if not 0.0 < self.capacity_fraction <= 1.0:
            raise ValueError(f"expert cache capacity must be in (0, 1], got {self.capacity_fraction}")
        if self.policy not in ONLINE_POLICIES:
            raise ValueError(f"expert cache policy must be one of {', '.join(ONLINE_POLICIES)}, got {self.policy!r}")

    def slots(self, num_experts: int) -> int:
        return max(1, round(self.capacity_fraction * num_experts))


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0  # misses kept in the fast tier
    bytes_moved: int = 0
    prefetches: int = 0  # experts loaded ahead of their layer
    prefetch_used: int = 0  # of those, used before being evicted

    def as_dict(self) -> dict:
        looked_up = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "loads": self.loads, "bytes_moved": self.bytes_moved,
                "hit_rate": self.hits / looked_up if looked_up else None, "prefetches": self.prefetches,
                "prefetch_accuracy": self.prefetch_used / self.prefetches if self.prefetches else None}


@dataclass(slots=True)
class _Layer:
    bank: ExpertBank  # slots rows; bank.slot_of maps resident experts to rows, -1 otherwise
    free: list[int]
    resident: dict[int, int] = field(default_factory=dict)  # expert -> row
    prefetched: set[int] = field(default_factory=set)  # loaded ahead, not used since


class CachedExperts:
    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 ops: KernelOps, config: ExpertCacheConfig) -> None:
        self.ckpt, self.spec, self.dtype, self.device, self.ops = ckpt, spec, dtype, device, ops
        self.config = config
        slots = config.slots(spec.num_experts)
        self.layers = {layer: _Layer(ExpertBank.empty(layer, (), spec.num_experts, spec.hidden_size,
                                                      spec.expert_intermediate, dtype, device, rows=slots),
                                     list(range(slots)))
                       for layer in spec.moe_layers}
        self.policy = online_policy(config.policy, ticks_per_step=len(spec.moe_layers))  # one tick per layer
        self.stats, self.step_stats = CacheStats(), CacheStats()
        self._clock = 0

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; ids/weights: [T, K] global expert ids -> [T, H], as ExpertShard.forward."""
        lay, now = self.layers[layer], self._clock
        self._clock += 1
        gate_mass = torch.zeros(self.spec.num_experts).index_add_(
            0, ids.reshape(-1).cpu(), weights.reshape(-1).float().cpu()).tolist()  # [E]
        needed = [e for e in ids.unique().tolist() if e >= 0]
        passing = [e for e in needed if not self._ensure(layer, lay, e, set(needed), now)]
        for e in needed:
            self.policy.touch((layer, e), now, gate_mass[e])
        out = self.ops.fused_moe(x, lay.bank.w_gate_up, lay.bank.w_down, lay.bank.slot_of[ids], weights)
        if passing:  # more experts than slots: compute the rest once from a temporary bank
            temp = load_experts(self.ckpt, self.spec, layer, passing, self.dtype, self.device)
            out = out + self.ops.fused_moe(x, temp.w_gate_up, temp.w_down, temp.slot_of[ids], weights)
            self._count(bytes_moved=temp.nbytes())
        return out

    def _ensure(self, layer: int, lay: _Layer, expert: int, needed: set[int], now: int) -> bool:
        """Make `expert` resident; False when every slot holds an expert this step needs."""
        if expert in lay.resident:
            self._count(hits=1, prefetch_used=int(expert in lay.prefetched))
            lay.prefetched.discard(expert)
            return True
        self._count(misses=1)
        if not self._load(layer, lay, expert, needed, now):
            return False
        self._count(loads=1)
        return True

    def prefetch(self, layer: int, expected: list[float]) -> None:
        """Load `layer`'s likeliest experts ahead of it, best first: expected[e] = predicted uses of
        expert e by the step's tokens (at least MIN_PREFETCH_USES), at most one layer's slots."""
        lay, now, protect = self.layers[layer], self._clock, set()
        for e in sorted(range(len(expected)), key=lambda e: -expected[e])[:len(lay.bank.buffer)]:
            if expected[e] < MIN_PREFETCH_USES:
                break
            if e not in lay.resident and self._load(layer, lay, e, protect, now):
                lay.prefetched.add(e)
                self._count(prefetches=1)
            protect.add(e)
            self.policy.touch((layer, e), now, 0.0)

    def _load(self, layer: int, lay: _Layer, expert: int, protect: set[int], now: int) -> bool:
        """Read `expert` into a free row or the policy's victim's (never one in `protect`)."""
        if not lay.free:
            candidates = [(layer, e) for e in lay.resident if e not in protect]
            if not candidates:
                return False
            _, victim = self.policy.victim(candidates, now)
            row = lay.resident.pop(victim)
            lay.bank.slot_of[victim] = -1
            lay.prefetched.discard(victim)
            lay.free.append(row)
        row = lay.free.pop()
        lay.bank.set_expert(row, *read_expert(self.ckpt, self.spec, layer, expert, self.dtype))
        lay.resident[expert] = row
        lay.bank.slot_of[expert] = row
        self._count(bytes_moved=lay.bank.buffer[row].numel() * lay.bank.buffer.element_size())
        return True

    def _count(self, **added: int) -> None:
        for stats in (self.stats, self.step_stats):
            for name, value in added.items():
                setattr(stats, name, getattr(stats, name) + value)

    def take_step_stats(self) -> dict:
        out, self.step_stats = self.step_stats.as_dict(), CacheStats()
        return out

    def nbytes(self) -> int:
        return sum(lay.bank.nbytes() for lay in self.layers.values())
