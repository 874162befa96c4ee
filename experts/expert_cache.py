"""CachedExperts: every MoE layer's experts on a fast-tier budget over a slow tier (experts.slow_tier).

A drop-in for ExpertShard: `forward` in the in-process model, `pair_outputs` in an expert shard
actor (serving that shard's own experts). Each MoE layer keeps `slots` experts resident in
one ExpertBank (a row per expert, so a move is one row write). At every layer, the experts the
step's tokens need that are resident are hits; for the missing ones the intra-layer schedule
(experts.cost_model.plan_layer, under the cost model calibrated at start-up) decides per expert:
load it into the policy's victim's row (never one the layer still needs) and compute it in the fast
tier, or compute it on the CPU where it lies without keeping it. With a CUDA fast tier, moves run on
a separate stream: the resident experts compute while the missing ones are in flight, and the CPU's
share computes beside both. The routed tokens and their weights are the same as with every expert
resident; only where the weights are read from differs.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from experts.cache_policy import ONLINE_POLICIES, online_policy
from experts.cache_stats import CacheStats
from experts.calibrate import calibrate
from experts.checkpoint import Checkpoint
from experts.config import ModelSpec
from experts.cost_model import SCHEDULES, ExpertCostModel, plan_layer
from experts.expert_bank import ExpertBank
from experts.slow_tier import SlowTier, slow_tier_for
from kernels.dispatch import KernelOps

log = logging.getLogger(__name__)
MIN_PREFETCH_USES = 1.0  # predicted uses by the step's tokens below which an expert is not loaded ahead


@dataclass(frozen=True, slots=True)
class ExpertCacheConfig:
    capacity_fraction: float  # of each MoE layer's experts resident in the fast tier, in (0, 1]
    policy: str = "adaptive"
    prefetch: bool = False  # load the experts pre-gating predicts for the next layer ahead of it
    cost_model: ExpertCostModel | None = None  # None: calibrate at start-up
    schedule: str = "auto"  # auto: the cost model decides; load: every miss is loaded (on-demand
    # caching, as mixtral-offloading); cpu: every miss is computed where it lies (as Fiddler)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"expert cache schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.capacity_fraction <= 1.0:
            raise ValueError(f"expert cache capacity must be in (0, 1], got {self.capacity_fraction}")
        if self.policy not in ONLINE_POLICIES:
            raise ValueError(f"expert cache policy must be one of {', '.join(ONLINE_POLICIES)}, got {self.policy!r}")

    def slots(self, num_experts: int) -> int:
        return max(1, round(self.capacity_fraction * num_experts))


@dataclass(slots=True)
class _Layer:
    bank: ExpertBank  # slots rows; bank.slot_of maps resident experts to rows, -1 otherwise
    free: list[int]
    owned: frozenset[int]  # the experts this cache serves (a shard's share of the layer)
    resident: dict[int, int] = field(default_factory=dict)  # expert -> row
    prefetched: set[int] = field(default_factory=set)  # loaded ahead, not used since
    last_use: object = None  # CUDA event after the last computation that read the bank

    @property
    def slots(self) -> int:
        return len(self.free) + len(self.resident)


class CachedExperts:
    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 ops: KernelOps, config: ExpertCacheConfig, tier: SlowTier | None = None,
                 owned: dict[int, tuple[int, ...]] | None = None, progress: Callable[[int], object] | None = None) -> None:
        """`tier`: where the experts lie (default: slow_tier_for the device); `owned`: MoE layer ->
        the experts served (an expert shard's; default: all), the budget a fraction of those;
        `progress(n)`: n more layers of the slow tier are in place (a pinned host tier loads them)."""
        self.spec, self.dtype, self.device, self.ops, self.config = spec, dtype, device, ops, config
        owned = owned if owned is not None else {layer: tuple(range(spec.num_experts)) for layer in spec.moe_layers}
        self.tier = tier if tier is not None else slow_tier_for(ckpt, spec, dtype, device, owned, progress)
        self.layers = {layer: self._empty_layer(layer, ids) for layer, ids in owned.items()}
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        sample = next(((layer, ids) for layer, ids in owned.items() if ids), None)
        if sample is None:
            raise ValueError("an expert cache needs at least one expert to serve")
        self.cost = config.cost_model or calibrate(self.tier, spec, dtype, device, ops, *sample)
        log.info("%s", self.cost.describe())
        self.policy = online_policy(config.policy, ticks_per_step=len(spec.moe_layers),  # one tick per layer
                                    capacity=self._slots)
        self.stats, self.step_stats = CacheStats(), CacheStats()
        self._clock = 0

    def _empty_layer(self, layer: int, owned: tuple[int, ...]) -> _Layer:
        slots = self.config.slots(max(1, len(owned)))
        bank = ExpertBank.empty(layer, (), self.spec.num_experts, self.spec.hidden_size, self.spec.expert_intermediate,
                                self.dtype, self.device, rows=slots)
        return _Layer(bank, list(range(slots)), frozenset(owned))

    def _slots(self, layer: int) -> int:
        """The layer's fast-tier rows (the adaptive policy's shadow tiers follow re-placements)."""
        lay = self.layers.get(layer)
        return lay.slots if lay is not None else 0

    def set_owned(self, owned: dict[int, tuple[int, ...]]) -> None:
        """Serve `owned` (layer -> experts) from now on (a re-placement): experts no longer owned
        leave the fast tier; the new ones are moved in on demand."""
        self.tier.set_owned(owned)
        for layer, ids in owned.items():
            self.layers[layer] = self._empty_layer(layer, tuple(ids))

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; ids/weights: [T, K] global expert ids -> [T, H], as ExpertShard.forward."""
        loaded, on_cpu = self._prepare(layer, ids.reshape(-1), weights.reshape(-1))
        out = self._compute(self.layers[layer], x, ids, weights, loaded, on_cpu, layer)
        self._computed(self.layers[layer])
        return out

    def pair_outputs(self, layer: int, x: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
                     pair_weight: torch.Tensor | None = None) -> torch.Tensor:
        """As ExpertShard.pair_outputs: x [n, H]; pair_row/pair_expert [P] (owned experts) -> [P, H]
        unweighted; `pair_weight` [P] only feeds the policy's gate scores."""
        lay = self.layers[layer]
        foreign = sorted(set(pair_expert.tolist()) - lay.owned)
        if foreign:
            raise ValueError(f"layer {layer}: experts {foreign} are not on this shard")
        weight = pair_weight if pair_weight is not None else torch.ones(pair_expert.numel())
        loaded, on_cpu = self._prepare(layer, pair_expert, weight)
        out = x.new_empty(pair_row.numel(), x.shape[1])
        cpu = torch.isin(pair_expert, torch.tensor(on_cpu, dtype=pair_expert.dtype, device=pair_expert.device))
        if on_cpu:
            out[cpu] = self.tier.pair_outputs(layer, x, pair_row[cpu], pair_expert[cpu])
        if self.copy_stream is not None and loaded:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        here = ~cpu
        if bool(here.any()):
            out[here] = self.ops.pair_outputs(x, lay.bank.w_gate_up, lay.bank.w_down, pair_row[here],
                                              lay.bank.slot_of[pair_expert[here]])
        self._computed(lay)
        return out

    def _computed(self, lay: _Layer) -> None:
        if self.copy_stream is not None:
            lay.last_use = torch.cuda.current_stream(self.device).record_event()

    def _prepare(self, layer: int, flat: torch.Tensor, weights: torch.Tensor) -> tuple[list[int], list[int]]:
        """Count the layer's lookups, schedule its misses and start the loads; -> (loaded, on the CPU).
        flat/weights: [N] expert id (-1: none) and gate weight of every (token, expert) pair."""
        lay, now = self.layers[layer], self._clock
        self._clock += 1
        ids, w = flat.cpu().numpy(), weights.float().cpu().numpy()  # numpy: a few pairs a layer at decode
        used = ids >= 0
        chosen, e = ids[used], self.spec.num_experts
        counts = np.bincount(chosen, minlength=e).tolist()  # [E]
        gate_mass = np.bincount(chosen, weights=w[used], minlength=e).tolist()
        tokens = {e: c for e, c in enumerate(counts) if c}
        hits = [e for e in tokens if e in lay.resident]
        used_prefetch = sum(e in lay.prefetched for e in hits)
        lay.prefetched.difference_update(hits)
        reusable = len(lay.free) + sum(e not in tokens for e in lay.resident)
        to_load, to_cpu = self._schedule(tokens, lay, reusable)
        loaded = [e for e in to_load if self._load(layer, lay, e, set(tokens), now, admit=True)]
        on_cpu = [*to_cpu, *(e for e in to_load if e not in loaded)]
        self._count(hits=len(hits), misses=len(tokens) - len(hits), prefetch_used=used_prefetch, loads=len(loaded),
                    cpu_computed=len(on_cpu))
        for e in tokens:
            self.policy.touch((layer, e), now, gate_mass[e])
        return loaded, on_cpu

    def _schedule(self, tokens: dict[int, int], lay: _Layer, reusable: int) -> tuple[list[int], list[int]]:
        """(missing experts to load, missing experts to compute where they lie)."""
        missing = sorted((e for e in tokens if e not in lay.resident), key=lambda e: (-tokens[e], e))
        if not missing:
            return [], []
        if self.config.schedule == "load":
            return missing[:reusable], missing[reusable:]
        if self.config.schedule == "cpu":
            return [], missing
        plan = plan_layer(tokens, set(lay.resident), self.cost, max_loads=reusable)
        return list(plan.load), list(plan.slow)

    def _compute(self, lay: _Layer, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 loaded: list[int], on_cpu: list[int], layer: int) -> torch.Tensor:
        bank, rows = lay.bank, lay.bank.slot_of[ids]
        host = (x.cpu(), ids.cpu(), weights.cpu()) if on_cpu else None  # before any GPU work is queued
        if self.copy_stream is None or not loaded:  # moves are done (CPU) or there are none
            out = self.ops.fused_moe(x, bank.w_gate_up, bank.w_down, rows, weights)
        else:  # the resident experts now, the loaded ones once their copies land
            in_flight = torch.isin(ids, torch.tensor(loaded, device=ids.device))
            out = self.ops.fused_moe(x, bank.w_gate_up, bank.w_down, torch.where(in_flight, -1, rows), weights)
        if host is not None:  # on the CPU while the GPU runs the queued work
            out = out + self.tier.compute(layer, on_cpu, *host).to(x.device)
        if self.copy_stream is not None and loaded:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            out = out + self.ops.fused_moe(x, bank.w_gate_up, bank.w_down, torch.where(in_flight, rows, -1), weights)
        return out

    def prefetch(self, layer: int, expected: list[float]) -> None:
        """Load `layer`'s experts ahead of it, by how much each would cut the layer's expected time
        (expected[e]: predicted uses of expert e by the step's tokens, at least MIN_PREFETCH_USES),
        at most one layer's slots; with CUDA the copies run beside the computation."""
        lay, now = self.layers[layer], self._clock
        gain = {e: self._miss_cost(u) for e, u in enumerate(expected) if u >= MIN_PREFETCH_USES and e in lay.owned}
        protect = set(gain) & set(lay.resident)  # a prediction never evicts another predicted expert
        for e in sorted(gain, key=lambda e: -gain[e])[:lay.slots]:
            if gain[e] <= 0:
                break
            if e not in lay.resident and self._load(layer, lay, e, protect, now):
                lay.prefetched.add(e)
                self._count(prefetches=1)
            protect.add(e)
            self.policy.touch((layer, e), now, 0.0, demand=False)

    def _miss_cost(self, uses: float) -> float:
        """Time a miss adds over a hit for an expert with `uses` tokens, under the cost model."""
        tokens = max(1, round(uses))
        fast = self.cost.fast.at(tokens)
        return min(self.cost.transfer_s + fast, self.cost.slow.at(tokens)) - fast

    def _load(self, layer: int, lay: _Layer, expert: int, protect: set[int], now: int, admit: bool = False) -> bool:
        """Move `expert` into a free row or the policy's victim's (never one in `protect`); with
        `admit` (a demand miss) the policy may keep it out instead."""
        if not lay.free:
            candidates = [(layer, e) for e in lay.resident if e not in protect]
            if not candidates:
                return False
            chosen = self.policy.victim(candidates, now, (layer, expert) if admit else None)
            if chosen == (layer, expert):
                return False
            _, victim = chosen
            row = lay.resident.pop(victim)
            lay.bank.slot_of[victim] = -1
            lay.prefetched.discard(victim)
            lay.free.append(row)
        row = lay.free.pop()
        with self._copying(lay):
            self.tier.copy_into(lay.bank, row, layer, expert)
        lay.resident[expert] = row
        lay.bank.slot_of[expert] = row
        self._count(bytes_moved=lay.bank.buffer[row].numel() * lay.bank.buffer.element_size())
        return True

    def _copying(self, lay: _Layer):
        """The copy stream, after the last computation that read this layer's rows (CUDA); else nothing."""
        if self.copy_stream is None:
            return nullcontext()
        if lay.last_use is not None:
            self.copy_stream.wait_event(lay.last_use)
        return torch.cuda.stream(self.copy_stream)

    def _count(self, **added: int) -> None:
        self.stats.add(added)
        self.step_stats.add(added)

    def take_step_stats(self) -> dict:
        out, self.step_stats = self.step_stats.as_dict(), CacheStats()
        return out

    def nbytes(self) -> int:
        return sum(lay.bank.nbytes() for lay in self.layers.values())
