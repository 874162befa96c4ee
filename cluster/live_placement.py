"""Expert placement changed while serving: RayModel's methods that move experts between shards,
make copies of experts (replicas) and re-plan both from live routing statistics.

A mixin of cluster/ray_model.RayModel, which provides the actors (`attention`, `shards`), the tables
(`owner`, `shard_experts`, `replicas`), the statistics (`expert_totals`, `worker_expert_totals`),
`topology`, `spec` and `config`.
"""

from __future__ import annotations

import ray

from cluster.replan import count_moves, replan, shard_assignment
from router.replicas import Replicas, plan_replicas, worker_tables


class LivePlacement:
    def move_experts(self, owner: dict[int, tuple[int, ...]], replicas: Replicas | None = None) -> dict:
        """Apply a new owner table (MoE layer -> shard of each expert) between two engine steps: shards
        load the experts they gain and drop the rest, then attention workers route by the new table.
        `replicas` (per shard: layer -> experts it also holds; default none) are copies that the
        attention workers on the shard's node use instead of the owner. Requests in flight carry on:
        outputs do not depend on which shard holds an expert."""
        shards = len(self.shards)
        replicas = replicas if replicas is not None else [{} for _ in self.shards]
        if len(replicas) != shards:
            raise ValueError(f"replicas must list {shards} shards, got {len(replicas)}")
        stray = [(layer, e) for r in replicas for layer, ids in r.items() for e in ids
                 if layer not in self.spec.moe_layers or not 0 <= e < self.spec.num_experts]
        if stray:
            raise ValueError(f"replicas name (layer, expert) pairs the model does not route to: {stray[:8]}")
        bad = [layer for layer in self.spec.moe_layers
               if len(owner.get(layer, ())) != self.spec.num_experts
               or not all(isinstance(s, int) and 0 <= s < shards for s in owner[layer])]
        if bad:
            raise ValueError(f"owner table must give every expert of layers {bad} one of {len(self.shards)} shards")
        moved = count_moves(self.owner, owner, self.spec.moe_layers, len(self.shards))
        wanted = [{layer: tuple(sorted(set(ids) | set(extra.get(layer, ())))) for layer, ids in own.items()}
                  for own, extra in zip(shard_assignment(owner, len(self.shards)), replicas)]
        changed = [i for i, w in enumerate(wanted) if w != self.shard_experts[i]]
        read = ray.get([self.shards[i].set_experts.remote(wanted[i]) for i in changed],
                       timeout=self.config.start_timeout_s)
        self.shard_experts, self.owner = wanted, {layer: tuple(owner[layer]) for layer in self.spec.moe_layers}
        self.replicas = [dict(r) for r in replicas]
        self._send_tables()
        return {"experts_moved": moved, "replicas": sum(len(ids) for r in self.replicas for ids in r.values()),
                "bytes_loaded": sum(read)}

    def local_shards(self) -> list[int | None]:
        """Per attention worker: the first expert shard on its node, or None."""
        nodes, a = self.topology.node_of, len(self.attention)
        return [next((s for s in range(len(self.shards)) if nodes[a + s] == nodes[w]), None) for w in range(a)]

    def _send_tables(self) -> None:
        tables = worker_tables(self.owner, self.replicas, self.local_shards())
        ray.get([a.set_owner.remote(t) for a, t in zip(self.attention, tables)], timeout=self.config.start_timeout_s)

    def replicate_experts(self, per_layer: int, max_load_ratio: float = 1.25) -> dict:
        """Copy to each node the `per_layer` remote experts its attention workers' tokens used most
        since the last call (planned_replicas), keeping the owner table."""
        return self.move_experts(self.owner, self.planned_replicas(per_layer, max_load_ratio))

    def planned_replicas(self, per_layer: int, max_load_ratio: float = 1.25,
                         owner: dict[int, tuple[int, ...]] | None = None) -> Replicas:
        """Replicas (router/replicas.plan_replicas) for `owner` (default: the live table) from what
        each attention worker's tokens used since the last call: worth it once request shuffling has
        gathered sequences by node."""
        counts, self.worker_expert_totals = self.worker_expert_totals, [{} for _ in self.attention]
        return plan_replicas(owner or self.owner, len(self.shards), self.local_shards(), counts, per_layer,
                             max_load_ratio)

    def replan_experts(self, max_load_ratio: float = 1.25) -> dict:
        """Re-plan the placement from the routing seen so far and move experts accordingly (with
        `replicas_per_layer` copies per layer and node when configured)."""
        owner = self.planned_owner(max_load_ratio)
        per_layer = self.config.replicas_per_layer
        replicas = self.planned_replicas(per_layer, max_load_ratio, owner) if per_layer else None
        return self.move_experts(owner, replicas)

    def planned_owner(self, max_load_ratio: float = 1.25) -> dict[int, tuple[int, ...]]:
        """The owner table grouping would choose from the routing seen since the last call
        (co-activation, transitions, load); the statistics restart."""
        co, tr = {}, {}
        for c, t in ray.get([a.take_affinity.remote() for a in self.attention]):
            for src, dst in ((c, co), (t, tr)):
                for layer, m in src.items():
                    dst[layer] = dst.get(layer, 0) + m
        totals, self.expert_totals = self.expert_totals, {}
        return replan(self.owner, self.spec.moe_layers, len(self.shards), totals, co, tr, max_load_ratio)
