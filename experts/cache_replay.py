"""Expert-cache replay (torch-free): every policy, with and without prefetch, over a routing trace.

The fast tier holds `capacity` experts (a fraction of all layers' experts). Tokens are decoded in
steps (one token of every request per step, in position order); at each MoE layer a step needs the
union of its tokens' experts. A needed expert in the fast tier is a hit; otherwise a demand miss
loads it (evicting the policy's victim, never another expert the same step and layer needs: the
router has chosen them all before the layer runs, as in the engine's cache) unless the policy does
not admit it (static), in which case it is computed where it lies. With prefetch, once layer l is
routed the route predictor (inter-layer affinity x the token's previous route) scores layer l+1's
experts for the step's tokens, and the likeliest missing ones are loaded ahead, best first, while
the link has time left over from demand loads (the link idles while experts compute; that time
accrues as credit, at most this layer's idle time or one transfer, whichever is longer). Prefetched experts never evict ones the current
step still needs. "+oracle prefetch" rows prefetch what layer l+1 will really need, a perfect
predictor: how far better predictions could go within the link's time.

Time per token under the cost model (experts.cost_model; measured on a node by `moe-serve
calibrate`, or DEFAULT_COST): per layer, the dense work, then the intra-layer schedule of the step's
experts (plan_layer: hits compute in the fast tier; each miss is loaded or computed where it lies,
whichever ends the layer sooner; tokens of a step share one pass over an expert's weights). Which
experts enter the fast tier is the policy's choice alone, so hit rates compare policies; a load the
schedule did not ask for runs on the link in the background.
The first `fit_fraction` of every request's tokens warm the caches, the predictor and the static
policy's popularity; everything is counted on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from experts.cache_policy import (ONLINE_POLICIES, POLICIES, BeladyPolicy, CachePolicy, Key, StaticPolicy,
                                  most_popular, online_policy)
from experts.cache_steps import Step, decode_steps, oracle_next, predict_next
from experts.cost_model import ExpertCostModel, LinearTime, plan_layer
from router.traces import RouteRecord


# Mixtral-8x7B bf16 experts (3 x 4096 x 14336 x 2 B) under an H100 (3,000 GB/s; 2 GFLOP per token at
# ~400 TFLOP/s) over PCIe 4.0 x16 (25 GB/s), beside a host CPU (60 GB/s; ~1 TFLOP/s): the model a
# replay uses unless it is given one measured by `moe-serve calibrate --json`.
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
DEFAULT_COST = ExpertCostModel(
    expert_bytes=MIXTRAL_EXPERT_BYTES, transfer_s=MIXTRAL_EXPERT_BYTES / 25e9,
    fast=LinearTime(MIXTRAL_EXPERT_BYTES / 3000e9, 2 * 3 * 4096 * 14336 / 400e12),
    slow=LinearTime(MIXTRAL_EXPERT_BYTES / 60e9, 2 * 3 * 4096 * 14336 / 1e12),
    overlap=True, fast_device="cuda (H100, assumed)", slow_device="cpu (assumed)")
DENSE_LAYER_S = 5e-5  # a layer's work besides its experts (attention, norms: ~0.05 ms on an H100)
ORACLE_PREFETCH_POLICIES = ("lru", "adaptive")  # also replayed with a perfect next-layer predictor


@dataclass(slots=True)
class Tally:
    accesses: int = 0
    hits: int = 0
    demand_loads: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0
    time_s: float = 0.0
    tokens: int = 0

    def report(self, cost: ExpertCostModel) -> dict[str, float]:
        misses = self.accesses - self.hits
        tokens = max(self.tokens, 1)
        return {"accesses": self.accesses, "hits": self.hits, "hit_rate": self.hits / max(self.accesses, 1),
                "demand_misses_per_token": misses / tokens,
                "bytes_moved_per_token": (self.demand_loads + self.prefetch_loads) * cost.expert_bytes / tokens,
                "prefetch_accuracy": self.prefetch_used / self.prefetch_loads if self.prefetch_loads else None,
                "time_per_token_s": self.time_s / tokens}


@dataclass(slots=True)
class ExpertCache:
    """The fast tier's contents under one policy, and what happened to them."""

    policy: CachePolicy
    capacity: int
    resident: set[Key] = field(default_factory=set)
    prefetched: set[Key] = field(default_factory=set)  # loaded ahead and not used since
    tally: Tally = field(default_factory=Tally)

    def use(self, key: Key, now: int, weight: float, protect: set[Key]) -> None:
        """`protect`: the other experts the same step and layer needs (a load never evicts them)."""
        self.tally.accesses += 1
        if key in self.resident:
            self.tally.hits += 1
            if key in self.prefetched:
                self.prefetched.discard(key)
                self.tally.prefetch_used += 1
        else:
            if self.policy.admits(key) and self._make_room(now, protect, incoming=key):
                self.resident.add(key)
                self.tally.demand_loads += 1
        self.policy.touch(key, now, weight)

    def prefetch(self, key: Key, now: int, weight: float, protect: set[Key]) -> bool:
        if key in self.resident or not self.policy.admits(key) or not self._make_room(now, protect):
            return False
        self.resident.add(key)
        self.prefetched.add(key)
        self.tally.prefetch_loads += 1
        self.policy.touch(key, now, weight, demand=False)
        return True

    def _make_room(self, now: int, protect: set[Key], incoming: Key | None = None) -> bool:
        """Evict one key if the tier is full; False when nothing may go (or the policy keeps `incoming` out)."""
        if len(self.resident) < self.capacity:
            return True
        candidates = [k for k in self.resident if k not in protect]
        if not candidates:
            return False
        victim = self.policy.victim(candidates, now, incoming)
        if victim == incoming:
            return False
        self.resident.discard(victim)
        self.prefetched.discard(victim)
        return True


# ---- one policy over the trace -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReplayPlan:
    steps: list[Step]
    num_layers: int
    num_experts: int
    capacity: int
    fit_steps: int
    cost: ExpertCostModel
    dense_layer_s: float = DENSE_LAYER_S
    min_prefetch_uses: float = 0.25  # expected uses below which an expert is not worth a transfer

    def clock(self, step: int, layer: int, expert: int) -> int:
        """The policies' time: one tick per (step, layer, expert) access, in replay order."""
        return (step * self.num_layers + layer) * self.num_experts + expert


def run_policy(plan: ReplayPlan, policy: CachePolicy, predictions: list | None) -> Tally:
    """Replays every step; counters restart after the fit steps. `predictions` None: no prefetch."""
    cache, credit = ExpertCache(policy, plan.capacity), 0.0
    for s, step in enumerate(plan.steps):
        if s == plan.fit_steps:
            cache.tally = Tally()
        for layer in range(plan.num_layers):
            resident = {e for e in step.counts[layer] if (layer, e) in cache.resident}
            schedule = plan_layer(step.counts[layer], resident, plan.cost)
            cache.tally.time_s += plan.dense_layer_s + schedule.time_s
            needed = {(layer, e) for e in step.needs[layer]}
            for e, weight in sorted(step.needs[layer].items()):
                cache.use((layer, e), plan.clock(s, layer, e), weight, needed)
            if predictions is not None and predictions[s][layer] is not None:
                link_idle = max(0.0, plan.dense_layer_s + schedule.time_s - len(schedule.load) * plan.cost.transfer_s)
                credit = min(credit + link_idle, max(link_idle, plan.cost.transfer_s))
                now = plan.clock(s, layer, plan.num_experts - 1)
                credit = _prefetch(cache, plan, predictions[s][layer], layer + 1, now, credit)
        cache.tally.tokens += len(step.tokens) if s >= plan.fit_steps else 0
    return cache.tally


def _prefetch(cache: ExpertCache, plan: ReplayPlan, expected: np.ndarray, layer: int, now: int, credit: float) -> float:
    """Loads layer's likeliest missing experts, best first, while the link's credit lasts."""
    protect = {k for k in cache.resident if k[0] == layer}
    for e in np.argsort(-expected, kind="stable"):
        if expected[e] < plan.min_prefetch_uses or credit < plan.cost.transfer_s:
            break
        key = (layer, int(e))
        if key in cache.resident:
            continue
        if cache.prefetch(key, now, float(expected[e]), protect):
            protect.add(key)
            credit -= plan.cost.transfer_s
    return credit


def make_policy(name: str, plan: ReplayPlan) -> CachePolicy:
    if name in ONLINE_POLICIES:
        return online_policy(name, ticks_per_step=plan.num_layers * plan.num_experts, capacity=plan.capacity)
    if name == "static":
        counts: dict[Key, float] = {}
        for step in plan.steps[:plan.fit_steps]:
            for layer, needs in enumerate(step.needs):
                for e in needs:
                    counts[(layer, e)] = counts.get((layer, e), 0) + 1
        return StaticPolicy(most_popular(counts, plan.capacity))
    if name == "belady":
        uses: dict[Key, list[int]] = {}
        for s, step in enumerate(plan.steps):
            for layer, needs in enumerate(step.needs):
                for e in needs:
                    uses.setdefault((layer, e), []).append(plan.clock(s, layer, e))
        return BeladyPolicy(uses)
    raise ValueError(f"unknown cache policy {name!r} (known: {', '.join(POLICIES)})")


def replay_cache(records: Iterable[RouteRecord], capacity_fraction: float, cost: ExpertCostModel | None = None,
                 fit_fraction: float = 0.5, dense_layer_s: float = DENSE_LAYER_S) -> dict:
    """Every policy with and without prefetch (Belady: without, it is the limit of demand caching)."""
    if not 0.0 < capacity_fraction <= 1.0 or not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"need 0 < capacity <= 1 and 0 < fit_fraction < 1, got {capacity_fraction}, {fit_fraction}")
    steps, num_layers, num_experts = decode_steps(records)
    fit_steps = int(len(steps) * fit_fraction)
    if not 0 < fit_steps < len(steps):
        raise ValueError(f"the trace has {len(steps)} decode steps: too few to split for fitting and reporting")
    capacity = max(1, round(capacity_fraction * num_layers * num_experts))
    if dense_layer_s < 0:
        raise ValueError(f"dense_layer_s must be >= 0, got {dense_layer_s}")
    plan = ReplayPlan(steps, num_layers, num_experts, capacity, fit_steps, cost or DEFAULT_COST, dense_layer_s)
    predictions = predict_next(steps, num_layers, num_experts)
    policies = {}
    for name in POLICIES:
        policies[name] = run_policy(plan, make_policy(name, plan), None).report(plan.cost)
        if name != "belady":
            policies[f"{name}+prefetch"] = run_policy(plan, make_policy(name, plan), predictions).report(plan.cost)
    oracle = oracle_next(steps, num_layers, num_experts)
    for name in ORACLE_PREFETCH_POLICIES:
        policies[f"{name}+oracle prefetch"] = run_policy(plan, make_policy(name, plan), oracle).report(plan.cost)
    return {"capacity_fraction": capacity_fraction, "capacity_experts": capacity,
            "policies": policies,
            "trace": {"steps": len(steps), "fit_steps": fit_steps, "layers": num_layers, "experts": num_experts,
                      "report_tokens": sum(len(s.tokens) for s in steps[fit_steps:])},
            "cost_model": plan.cost.as_dict() | {"dense_layer_s": dense_layer_s}}


def cache_summary(report: dict) -> str:
    """A human-readable table of a replay_cache report."""
    t, c = report["trace"], report["cost_model"]
    cost = ExpertCostModel.from_dict(c)
    lines = [f"cache replay: {report['capacity_experts']} of {t['layers'] * t['experts']} experts in the fast tier, "
             f"{t['report_tokens']} reported tokens; time per token under the",
             cost.describe(),
             f"{'policy':24} {'hit rate':>8} {'misses/token':>12} {'bytes moved/token':>17} {'prefetch acc':>12} "
             f"{'us/token':>10}"]
    for name, p in report["policies"].items():
        acc = "-" if p["prefetch_accuracy"] is None else f"{p['prefetch_accuracy']:.1%}"
        lines.append(f"{name:24} {p['hit_rate']:8.1%} {p['demand_misses_per_token']:12.2f} "
                     f"{p['bytes_moved_per_token']:17.3g} {acc:>12} {p['time_per_token_s'] * 1e6:10,.0f}")
    return "\n".join(lines)
