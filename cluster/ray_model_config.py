"""The cluster model's typed config and its cross-node traffic totals (cluster/ray_model.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.actors import ActorConfig
from router.shuffle import ShuffleConfig


@dataclass(frozen=True, slots=True)
class RayModelConfig:
    actor: ActorConfig
    plan: object  # cluster.placement.PlacementPlan
    num_kv_slots: int
    block_size: int
    microbatches: int = 2  # per attention worker; 1 switches ping-pong pipelining off
    min_microbatch_tokens: int = 32  # below 2x this many tokens a worker's batch is not split
    replan_every_steps: int | None = None  # re-plan and move experts every N steps (None: never)
    shuffle: ShuffleConfig | None = None  # move sequences toward their predicted shards (None: never)
    replicas_per_layer: int = 0  # expert copies per layer and node made at each periodic re-plan
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.microbatches not in (1, 2):
            raise ValueError(f"microbatches must be 1 or 2, got {self.microbatches}")


@dataclass(slots=True)
class TrafficTotals:
    """Cross-node data-plane traffic seen by the attention workers (dispatch = sent, combine = received)."""

    steps: int = 0
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    migrate_bytes: int = 0  # KV copied across nodes when a sequence moved to another attention worker
    sequences_moved: int = 0
    messages: int = 0
    per_layer: dict[int, list[int]] = field(default_factory=dict)  # layer -> [dispatch, combine, msgs]

    def add(self, traffic: dict) -> None:
        self.dispatch_bytes += traffic["cross_bytes_sent"]
        self.combine_bytes += traffic["cross_bytes_recv"]
        self.messages += traffic["cross_messages"]
        for layer, row in traffic["per_layer"].items():
            acc = self.per_layer.setdefault(int(layer), [0, 0, 0])
            for i, v in enumerate(row):
                acc[i] += v
