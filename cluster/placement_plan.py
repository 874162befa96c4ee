"""The placement planner's inputs and its plan (torch-free, ray-free): a model's footprint, the
planner's settings, where each attention worker and expert shard goes, and each node's bytes.

Invariants of a plan: every (layer, expert) is owned by exactly one shard; no node's used bytes
exceed its budget. A shard's "time" in a layer is its expected load / its speed; a layer's
imbalance is its busiest shard's time over the ideal (layer load / total speed), so 1.0 is perfect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Assignment = dict[int, list[list[int]]]  # MoE layer -> per shard -> global expert ids


@dataclass(frozen=True, slots=True)
class ModelFootprint:
    """Bytes of one model in one dtype, as the planner sees it."""

    moe_layers: tuple[int, ...]  # layer indices that have routed experts
    num_experts: int  # routed experts per MoE layer
    expert_bytes: int  # one expert's gate, up and down matrices
    dense_bytes: int  # everything else: embeddings, attention, norms, routers, shared/dense MLPs, LM head
    kv_bytes_per_token: int  # K and V of one token over all layers

    def __post_init__(self) -> None:
        if not self.moe_layers or len(set(self.moe_layers)) != len(self.moe_layers) or min(self.moe_layers) < 0:
            raise ValueError(f"moe_layers must be distinct layer indices >= 0, got {self.moe_layers!r}")
        if self.num_experts <= 0 or self.expert_bytes <= 0:
            raise ValueError("num_experts and expert_bytes must be > 0")
        if self.dense_bytes < 0 or self.kv_bytes_per_token < 0:
            raise ValueError("dense_bytes and kv_bytes_per_token must be >= 0")

    @property
    def total_expert_bytes(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.expert_bytes


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    num_attention_workers: int = 1
    num_expert_shards: int | None = None  # default: one per expert-eligible node
    kv_cache_tokens: int = 16384  # KV cache reserved by each attention worker, in tokens
    expert_load: dict[tuple[int, int], float] | None = None  # (layer, expert) -> expected load; missing = 0
    max_load_ratio: float = 1.25  # a layer more imbalanced than this gets a warning in the plan

    def __post_init__(self) -> None:
        if self.num_attention_workers < 1:
            raise ValueError(f"num_attention_workers must be >= 1, got {self.num_attention_workers}")
        if self.num_expert_shards is not None and self.num_expert_shards < 1:
            raise ValueError(f"num_expert_shards must be >= 1, got {self.num_expert_shards}")
        if self.kv_cache_tokens < 0:
            raise ValueError(f"kv_cache_tokens must be >= 0, got {self.kv_cache_tokens}")
        if not self.max_load_ratio >= 1.0:
            raise ValueError(f"max_load_ratio must be >= 1.0, got {self.max_load_ratio}")
        for key, value in (self.expert_load or {}).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"expert_load[{key}] must be a finite number >= 0, got {value!r}")


class PlacementError(ValueError):
    """The model does not fit the cluster, or no node may take a role; the message names the nodes,
    the bytes needed and free, and the shortfall."""


def fmt_bytes(n: int, exact: bool = False) -> str:
    """Binary units with two decimals; `exact` appends the byte count."""
    text = f"{n} B"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            text = f"{n / size:.2f} {unit}"
            break
    return f"{text} ({n} bytes)" if exact and abs(n) >= 1024 else text


@dataclass(frozen=True, slots=True)
class WorkerPlacement:
    name: str  # attn-<i>
    kind: str
    node_index: int  # within its kind
    bytes: int  # reserved: dense weights + KV cache
    kv_cache_tokens: int


@dataclass(frozen=True, slots=True)
class ShardPlacement:
    name: str  # shard-<i>
    kind: str
    node_index: int  # within its kind
    experts: dict[int, tuple[int, ...]]  # MoE layer -> global expert ids, ascending
    bytes: int
    load_share: float  # expected fraction of each layer's load, averaged over MoE layers
    target_share: float  # speed / total shard speed
    speed: float  # its node's speed divided over the shards on that node

    @property
    def num_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())


@dataclass(frozen=True, slots=True)
class NodeUsage:
    kind: str
    index: int
    role: str
    device: str
    speed: float
    budget_bytes: int
    used_bytes: int
    actors: tuple[str, ...]
    resources: dict[str, float]  # requested by each actor placed on this kind

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.index}]"


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    label_key: str
    nodes: tuple[NodeUsage, ...]  # every node instance, in cluster file order
    attention_workers: tuple[WorkerPlacement, ...]
    expert_shards: tuple[ShardPlacement, ...]
    layer_imbalance: dict[int, float]  # MoE layer -> busiest shard's time / ideal time (>= 1)
    warnings: tuple[str, ...] = ()

    def shard_table(self, layer: int) -> tuple[int, ...]:
        """[E] index of the shard owning each expert of `layer`."""
        owner = {e: s for s, shard in enumerate(self.expert_shards) for e in shard.experts.get(layer, ())}
        if not owner:
            raise ValueError(f"layer {layer} is not a MoE layer of this plan ({sorted(self.layer_imbalance)})")
        return tuple(owner[e] for e in range(len(owner)))

    def shard_of(self, layer: int, expert: int) -> int:
        table = self.shard_table(layer)
        if not 0 <= expert < len(table):
            raise ValueError(f"expert {expert} out of range [0, {len(table)})")
        return table[expert]

    def actor_options(self, name: str) -> dict:
        """Ray scheduling options for one actor: its kind's label selector and custom resources."""
        actor = self._actor(name)
        options: dict = {"label_selector": {self.label_key: actor.kind}}
        resources = next(n.resources for n in self.nodes if n.kind == actor.kind)
        if resources:
            options["resources"] = dict(resources)
        return options

    def _actor(self, name: str) -> WorkerPlacement | ShardPlacement:
        for actor in (*self.attention_workers, *self.expert_shards):
            if actor.name == name:
                return actor
        raise ValueError(f"no actor {name!r} in this plan")

    def to_dict(self) -> dict:
        return {
            "label_key": self.label_key,
            "nodes": [{"kind": n.kind, "index": n.index, "role": n.role, "device": n.device, "speed": n.speed,
                       "budget_bytes": n.budget_bytes, "used_bytes": n.used_bytes, "actors": list(n.actors),
                       "resources": dict(n.resources)} for n in self.nodes],
            "attention_workers": [{"name": w.name, "kind": w.kind, "node_index": w.node_index,
                                   "bytes": w.bytes, "kv_cache_tokens": w.kv_cache_tokens}
                                  for w in self.attention_workers],
            "expert_shards": [{"name": s.name, "kind": s.kind, "node_index": s.node_index, "bytes": s.bytes,
                               "experts": {str(layer): list(ids) for layer, ids in s.experts.items()},
                               "load_share": s.load_share, "target_share": s.target_share, "speed": s.speed}
                              for s in self.expert_shards],
            "layer_imbalance": {str(layer): r for layer, r in self.layer_imbalance.items()},
            "warnings": list(self.warnings),
        }

    def describe(self) -> str:
        """A table: one row per node (role, device, speed, bytes used / budget, actors), then totals."""
        rows = [f"placement: {len(self.attention_workers)} attention worker(s), {len(self.expert_shards)} "
                f"expert shard(s) on {len(self.nodes)} node(s) (label {self.label_key})",
                f"{'node':<18}{'role':<11}{'device':<8}{'speed':>6}  {'used / budget':<30}actors"]
        for n in self.nodes:
            used = f"{fmt_bytes(n.used_bytes)} / {fmt_bytes(n.budget_bytes)} ({n.used_bytes / n.budget_bytes:.0%})"
            actors = ", ".join(self._actor_text(a) for a in n.actors) or "-"
            speed = "-" if n.role == "none" else f"{n.speed:g}"
            rows.append(f"{n.name:<18}{n.role:<11}{n.device:<8}{speed:>6}  {used:<30}{actors}")
        return "\n".join(rows + self._totals() + [f"warning: {w}" for w in self.warnings])

    def _actor_text(self, name: str) -> str:
        actor = self._actor(name)
        if isinstance(actor, WorkerPlacement):
            return f"{name} (dense + KV {fmt_bytes(actor.bytes)})"
        return (f"{name} ({actor.num_experts} experts, {fmt_bytes(actor.bytes)}, load {actor.load_share:.1%}"
                f" vs speed share {actor.target_share:.1%})")

    def _totals(self) -> list[str]:
        used, budget = sum(n.used_bytes for n in self.nodes), sum(n.budget_bytes for n in self.nodes)
        shards = self.expert_shards
        shares = [s.load_share for s in shards]
        per_speed = [s.load_share / s.target_share for s in shards]
        worst = max(self.layer_imbalance, key=lambda layer: (self.layer_imbalance[layer], -layer))
        return [f"total: {fmt_bytes(used)} used of {fmt_bytes(budget)} ({used / budget:.0%}); "
                f"{sum(s.num_experts for s in shards)} experts over {len(shards)} shard(s)",
                f"load share: max {max(shares):.1%}, mean {sum(shares) / len(shares):.1%}; per unit speed "
                f"max/mean {max(per_speed) / (sum(per_speed) / len(per_speed)):.2f}; worst layer {worst} at "
                f"{self.layer_imbalance[worst]:.2f}x the ideal time (1.00 = balanced)"]
