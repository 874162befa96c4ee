"""The expert cost model and the intra-layer schedule it drives (torch-free).

For one MoE layer, given the experts its tokens need (with token counts) and which of them the fast
tier holds, each missing expert is either loaded (one transfer over the link, then computed in the
fast tier) or computed where it lies (on the CPU, over the slow tier), HybriMoE's per-expert choice.
The model times each: `transfer_s` per expert, and a linear fit of compute time against token count
on each tier (`fast`, `slow`), measured at start-up (experts.calibrate).

With `overlap` (a GPU fast tier), the link, the GPU and the CPU work at once: resident experts
compute while the missing ones are in flight, and the CPU's experts compute beside both; the layer
takes as long as the busiest of them. Without it (a CPU-only node, where both tiers are read by the
same cores) the times add.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

SCHEDULES = ("auto", "load", "cpu")  # an expert cache's choice per miss: the cost model, always load, always CPU

TIE_TOLERANCE = 0.05  # options within 5% count as a tie, and a tie loads: a loaded expert stays cached,
# which the layer's own time does not count (and timing noise should not flip)


@dataclass(frozen=True, slots=True)
class LinearTime:
    """seconds = fixed_s + per_token_s * tokens."""

    fixed_s: float
    per_token_s: float

    def at(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]]) -> "LinearTime":
        """Least squares over (tokens, seconds), both coefficients clamped to >= 0."""
        if len({t for t, _ in samples}) < 2:
            raise ValueError("fitting a time per token needs samples at two token counts or more")
        n = len(samples)
        mean_t = sum(t for t, _ in samples) / n
        mean_s = sum(s for _, s in samples) / n
        var = sum((t - mean_t) ** 2 for t, _ in samples)
        slope = max(0.0, sum((t - mean_t) * (s - mean_s) for t, s in samples) / var)
        return cls(max(0.0, mean_s - slope * mean_t), slope)


@dataclass(frozen=True, slots=True)
class ExpertCostModel:
    expert_bytes: int
    transfer_s: float  # one expert, slow tier -> fast tier
    fast: LinearTime  # computing one expert in the fast tier
    slow: LinearTime  # computing one expert where it lies
    overlap: bool  # link, fast-tier and slow-tier compute run at once (GPU fast tier)
    fast_device: str = "cpu"
    slow_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.expert_bytes <= 0 or self.transfer_s < 0:
            raise ValueError("expert_bytes must be > 0 and transfer_s >= 0")

    @property
    def transfer_gbps(self) -> float:
        return self.expert_bytes / self.transfer_s / 1e9 if self.transfer_s else float("inf")

    def scaled(self, expert_bytes: int) -> "ExpertCostModel":
        """The same bandwidths and per-byte compute for experts of another size (replaying a trace of
        a bigger model with what was measured on this node)."""
        r = expert_bytes / self.expert_bytes
        return ExpertCostModel(expert_bytes, self.transfer_s * r, LinearTime(self.fast.fixed_s * r, self.fast.per_token_s * r),
                               LinearTime(self.slow.fixed_s * r, self.slow.per_token_s * r), self.overlap,
                               self.fast_device, self.slow_device)

    def as_dict(self) -> dict:
        return asdict(self) | {"transfer_gbps": self.transfer_gbps}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ExpertCostModel":
        try:
            return cls(int(d["expert_bytes"]), float(d["transfer_s"]), LinearTime(**d["fast"]),
                       LinearTime(**d["slow"]), bool(d["overlap"]), str(d.get("fast_device", "cpu")),
                       str(d.get("slow_device", "cpu")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an expert cost model ({exc!r}); write one with `moe-serve calibrate --json`") from exc

    def describe(self) -> str:
        us = 1e6
        lines = [f"expert cost model ({self.expert_bytes:,} B per expert; "
                 f"{'link, fast and slow compute overlap' if self.overlap else 'one processor: times add'}):",
                 f"  transfer {self.slow_device} -> {self.fast_device}: {self.transfer_s * us:,.1f} us "
                 f"({self.transfer_gbps:.2f} GB/s)",
                 f"  compute in the fast tier ({self.fast_device}): {self.fast.fixed_s * us:,.1f} us "
                 f"+ {self.fast.per_token_s * us:,.2f} us/token",
                 f"  compute where it lies ({self.slow_device}): {self.slow.fixed_s * us:,.1f} us "
                 f"+ {self.slow.per_token_s * us:,.2f} us/token"]
        cross = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                 if self.transfer_s + self.fast.at(t) <= self.slow.at(t)]
        lines.append(f"  a missing expert is worth loading from {cross[0]} token{'s' * (cross[0] > 1)}" if cross
                     else "  a missing expert is never worth loading for its own layer (up to 256 tokens)")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class LayerPlan:
    load: tuple[int, ...]  # missing experts to load, in transfer order
    slow: tuple[int, ...]  # missing experts to compute where they lie
    time_s: float  # the layer's expert time under the model


def layer_time(tokens: Mapping[int, int], resident: set[int], load: Sequence[int], slow: Sequence[int],
               model: ExpertCostModel) -> float:
    """The layer's expert time when `load` are moved (in that order) and `slow` computed in place."""
    fast_busy = sum(model.fast.at(tokens[e]) for e in tokens if e in resident)
    slow_busy = sum(model.slow.at(tokens[e]) for e in slow)
    if not model.overlap:
        return fast_busy + slow_busy + sum(model.transfer_s + model.fast.at(tokens[e]) for e in load)
    link = 0.0
    for e in load:
        link += model.transfer_s
        fast_busy = max(fast_busy, link) + model.fast.at(tokens[e])
    return max(fast_busy, slow_busy)


def plan_layer(tokens: Mapping[int, int], resident: set[int], model: ExpertCostModel,
               max_loads: int | None = None) -> LayerPlan:
    """Where each missing expert is computed. `tokens`: needed expert -> its token count; at most
    `max_loads` are loaded (the fast tier's rows that hold no expert this layer needs).

    Greedy, as HybriMoE: missing experts by token count, most first, each where the layer would end
    soonest (within TIE_TOLERANCE it loads); the result is never worse than loading all of them or
    computing all of them in place by more than that tolerance."""
    missing = sorted((e for e in tokens if e not in resident), key=lambda e: (-tokens[e], e))
    limit = len(missing) if max_loads is None else max(0, max_loads)
    load: list[int] = []
    slow: list[int] = []
    for e in missing:
        if len(load) < limit and (layer_time(tokens, resident, [*load, e], slow, model)
                                  <= (1 + TIE_TOLERANCE) * layer_time(tokens, resident, load, [*slow, e], model)):
            load.append(e)
        else:
            slow.append(e)
    best, best_s = (load, slow), layer_time(tokens, resident, load, slow, model)
    for other in ((missing[:limit], missing[limit:]), ([], missing)):
        other_s = layer_time(tokens, resident, other[0], other[1], model)
        if (1 + TIE_TOLERANCE) * other_s < best_s:
            best, best_s = other, other_s
    return LayerPlan(tuple(best[0]), tuple(best[1]), best_s)
