"""Placement planner (torch-free, ray-free): which node hosts each attention worker, which experts
each expert shard owns.

Attention workers take role-`attention` nodes first, then role-`any` nodes by memory (largest
first); each reserves the dense weights plus its own KV cache. Expert shards take role-`experts`
nodes first, then `any`, fastest first, one shard per node by default. Every MoE layer's experts
are split over the shards so that each shard's expected load is proportional to its speed
(greedy, heaviest expert first), never beyond the memory left on its node. Ties go to lower ids.

The plan and the planner's inputs are in cluster/placement_plan.py (imported from here too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.cluster_spec import ClusterSpec, NodeKind
from cluster.placement_plan import (Assignment, ModelFootprint, NodeUsage, PlacementError,  # noqa: F401
                                    PlacementPlan, PlannerConfig, ShardPlacement, WorkerPlacement, fmt_bytes)

@dataclass(slots=True, eq=False)
class _Node:
    """Bookkeeping for one node instance while planning."""

    spec: NodeKind
    index: int
    rank: int  # position in the cluster file (kind order), for ties
    free: int  # bytes left
    actors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.spec.kind}[{self.index}]"


def plan(footprint: ModelFootprint, cluster: ClusterSpec, config: PlannerConfig | None = None,
         assignment: Assignment | None = None) -> PlacementPlan:
    """Place the model on the cluster, or raise PlacementError saying what does not fit and by how much.

    `assignment` (layer -> per shard -> expert ids) replaces the load balancer; it is checked for
    coverage and memory like the balancer's own split."""
    config = config or PlannerConfig()
    nodes = [_Node(kind, i, rank, kind.memory_bytes)
             for rank, kind in enumerate(cluster.nodes) for i in range(kind.count)]
    workers = _place_attention(footprint, config, nodes)
    hosts = _shard_hosts(config, nodes)
    speeds = [h.spec.speed / sum(1 for o in hosts if o is h) for h in hosts]
    loads = _layer_loads(footprint, config)
    if assignment is None:
        _check_fit(footprint, hosts)
        table = _balance(loads, speeds, _quotas(footprint, hosts))
    else:
        table = _checked_assignment(assignment, footprint, hosts)
    return _build(cluster, footprint, config, nodes, workers, hosts, speeds, loads, table)


def _place_attention(fp: ModelFootprint, config: PlannerConfig, nodes: list[_Node]) -> list[WorkerPlacement]:
    eligible = [n for n in nodes if n.spec.hosts_attention]
    if not eligible:
        raise PlacementError("no node can host attention workers: add a node kind with role attention or any")
    kv = fp.kv_bytes_per_token * config.kv_cache_tokens
    need = fp.dense_bytes + kv
    workers = []
    for w in range(config.num_attention_workers):
        name = f"attn-{w}"
        fits = [n for n in eligible if n.free >= need]
        if not fits:
            best = max(n.free for n in eligible)
            raise PlacementError(
                f"attention worker {name} needs {fmt_bytes(need)} (dense {fmt_bytes(fp.dense_bytes)} + KV "
                f"{fmt_bytes(kv)} for {config.kv_cache_tokens} tokens) but attention nodes "
                f"{_names(eligible)} have at most {fmt_bytes(best)} free: short by {fmt_bytes(need - best, True)}")
        node = min(fits, key=lambda n: (n.spec.role != "attention", len(n.actors), -n.spec.memory_bytes,
                                        n.rank, n.index))
        node.free -= need
        node.actors.append(name)
        workers.append(WorkerPlacement(name, node.spec.kind, node.index, need, config.kv_cache_tokens))
    return workers


def _shard_hosts(config: PlannerConfig, nodes: list[_Node]) -> list[_Node]:
    """The node of each shard: round-robin over expert nodes, role experts first, fastest first."""
    eligible = sorted((n for n in nodes if n.spec.hosts_experts),
                      key=lambda n: (n.spec.role != "experts", -n.spec.speed, n.rank, n.index))
    if not eligible:
        raise PlacementError("no node can host expert shards: add a node kind with role experts or any")
    count = config.num_expert_shards or len(eligible)
    hosts = [eligible[s % len(eligible)] for s in range(count)]
    for s, host in enumerate(hosts):
        host.actors.append(f"shard-{s}")
    return hosts


def _layer_loads(fp: ModelFootprint, config: PlannerConfig) -> dict[int, list[float]]:
    """layer -> [E] expected loads; uniform without expert_load, and for a layer it gives no load."""
    given = config.expert_load
    if given is None:
        return {layer: [1.0] * fp.num_experts for layer in fp.moe_layers}
    for layer, expert in given:
        if layer not in fp.moe_layers or not 0 <= expert < fp.num_experts:
            raise PlacementError(f"expert_load names ({layer}, {expert}), which is not a routed expert "
                                 f"(MoE layers {list(fp.moe_layers)}, {fp.num_experts} experts)")
    loads = {}
    for layer in fp.moe_layers:
        row = [float(given.get((layer, e), 0.0)) for e in range(fp.num_experts)]
        loads[layer] = row if sum(row) > 0 else [1.0] * fp.num_experts
    return loads


def _quotas(fp: ModelFootprint, hosts: list[_Node]) -> list[int]:
    """Experts each shard may hold: its node's free bytes split evenly over that node's shards."""
    quotas = []
    for s, host in enumerate(hosts):
        mine = [t for t, h in enumerate(hosts) if h is host]
        whole = host.free // fp.expert_bytes
        quotas.append(whole // len(mine) + (1 if mine.index(s) < whole % len(mine) else 0))
    return quotas


def _check_fit(fp: ModelFootprint, hosts: list[_Node]) -> None:
    unique = list(dict.fromkeys(hosts))
    usable = sum(n.free // fp.expert_bytes for n in unique) * fp.expert_bytes
    need = fp.total_expert_bytes
    if need > usable:
        raise PlacementError(
            f"experts need {fmt_bytes(need)} ({len(fp.moe_layers)} layers x {fp.num_experts} x "
            f"{fmt_bytes(fp.expert_bytes)}) but expert nodes {_names(unique)} have {fmt_bytes(usable)} free: "
            f"short by {fmt_bytes(need - usable, True)}")


def _balance(loads: dict[int, list[float]], speeds: list[float], quotas: list[int] | None) -> Assignment:
    """Split each layer's experts over shards; `quotas` (experts per shard over all layers) bound
    memory and are spread evenly over the layers still to place (sum(quotas) >= layers x E)."""
    left = list(quotas) if quotas is not None else None
    table: Assignment = {}
    layers = sorted(loads)
    for i, layer in enumerate(layers):
        caps = None if left is None else [-(-q // (len(layers) - i)) for q in left]
        table[layer] = _balance_layer(loads[layer], speeds, caps)
        if left is not None:
            left = [q - len(g) for q, g in zip(left, table[layer])]
    return table


def _balance_layer(load: list[float], speeds: list[float], caps: list[int] | None) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in speeds]
    totals = [0.0] * len(speeds)
    for e in sorted(range(len(load)), key=lambda e: (-load[e], e)):
        open_ = [s for s in range(len(speeds)) if caps is None or len(groups[s]) < caps[s]]
        s = min(open_, key=lambda s: ((totals[s] + load[e]) / speeds[s], len(groups[s]), s))
        groups[s].append(e)
        totals[s] += load[e]
    return [sorted(g) for g in groups]


def _checked_assignment(assignment: Assignment, fp: ModelFootprint, hosts: list[_Node]) -> Assignment:
    if sorted(assignment) != sorted(fp.moe_layers):
        raise PlacementError(f"assignment must cover exactly the MoE layers {sorted(fp.moe_layers)}, "
                             f"got {sorted(assignment)}")
    table: Assignment = {}
    for layer in sorted(assignment):
        groups = assignment[layer]
        if len(groups) != len(hosts):
            raise PlacementError(f"assignment layer {layer}: {len(groups)} groups for {len(hosts)} shards")
        flat = sorted(e for g in groups for e in g)
        if flat != list(range(fp.num_experts)):
            raise PlacementError(f"assignment layer {layer} must place each expert 0..{fp.num_experts - 1} "
                                 f"exactly once, got {flat}")
        table[layer] = [sorted(g) for g in groups]
    for host in dict.fromkeys(hosts):
        need = fp.expert_bytes * sum(len(g[s]) for g in table.values() for s, h in enumerate(hosts) if h is host)
        if need > host.free:
            raise PlacementError(f"assignment puts {fmt_bytes(need)} of experts on {host.name} but it has "
                                 f"{fmt_bytes(host.free)} free: short by {fmt_bytes(need - host.free, True)}")
    return table


def _imbalance(loads: dict[int, list[float]], speeds: list[float], table: Assignment) -> dict[int, float]:
    out = {}
    for layer, groups in table.items():
        times = [sum(loads[layer][e] for e in g) / v for g, v in zip(groups, speeds)]
        ideal = sum(loads[layer]) / sum(speeds)
        out[layer] = max(times) / ideal if ideal > 0 else 1.0
    return out


def _warnings(config: PlannerConfig, loads, speeds, imbalance: dict[int, float]) -> list[str]:
    over = [layer for layer, r in imbalance.items() if r > config.max_load_ratio + 1e-9]
    if not over:
        return []
    free = _imbalance(loads, speeds, _balance(loads, speeds, None))
    worst = max(over, key=lambda layer: (imbalance[layer], -layer))
    cause = ("memory limits keep experts off the fastest shards" if imbalance[worst] > free[worst] + 1e-9
             else "too few or too unevenly loaded experts per shard")
    return [f"{len(over)} MoE layer(s) exceed max_load_ratio {config.max_load_ratio:g}; worst: layer {worst} "
            f"at {imbalance[worst]:.2f}x the ideal time ({cause})"]


def _build(cluster: ClusterSpec, fp: ModelFootprint, config: PlannerConfig, nodes: list[_Node],
           workers: list[WorkerPlacement], hosts: list[_Node], speeds: list[float],
           loads: dict[int, list[float]], table: Assignment) -> PlacementPlan:
    shards = []
    for s, host in enumerate(hosts):
        experts = {layer: tuple(groups[s]) for layer, groups in table.items()}
        count = sum(len(ids) for ids in experts.values())
        host.free -= count * fp.expert_bytes
        share = sum(sum(loads[l][e] for e in ids) / sum(loads[l]) for l, ids in experts.items()) / len(table)
        shards.append(ShardPlacement(f"shard-{s}", host.spec.kind, host.index, experts, count * fp.expert_bytes,
                                     share, speeds[s] / sum(speeds), speeds[s]))
    imbalance = _imbalance(loads, speeds, table)
    warnings = _warnings(config, loads, speeds, imbalance)
    warnings += [f"{s.name} holds no experts" for s in shards if not any(s.experts.values())]
    usage = tuple(NodeUsage(n.spec.kind, n.index, n.spec.role, n.spec.device, n.spec.speed, n.spec.memory_bytes,
                            n.spec.memory_bytes - n.free, tuple(n.actors), dict(n.spec.resources)) for n in nodes)
    return PlacementPlan(cluster.label_key, usage, tuple(workers), tuple(shards), imbalance, tuple(warnings))


def _names(nodes: list[_Node]) -> str:
    return ", ".join(n.name for n in nodes)
