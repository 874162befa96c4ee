"""EngineConfig: everything the engine needs, validated once (torch-free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from cluster.speculative import SpeculativeConfig
from experts.cache_policy import ONLINE_POLICIES  # both torch-free
from experts.cost_model import SCHEDULES
from router.shuffle import MAX_LOAD_RATIO

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
BACKENDS = ("auto", "torch", "triton")
ENGINES = ("inprocess", "ray")
TRANSPORTS = ("tcp", "gloo")  # the cluster's data plane (cluster/socket_transport.py, cluster/transport.py)
# Settings of the actors and the data plane, which an in-process engine does not have.
RAY_ONLY = ("cluster", "address", "num_attention_workers", "num_expert_shards", "microbatches",
            "min_microbatch_tokens", "actor_threads", "transport_timeout_s", "transport")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    kernel_backend: str = "auto"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings, at most kv_cache_tokens
    kv_cache_tokens: int = 16384  # KV-cache budget in tokens, over all sequences
    block_size: int = 16
    enable_prefix_caching: bool = False  # reuse the K/V of prompt blocks other sequences computed
    show_progress: bool = False
    record_trace: str | None = None  # JSONL file that receives every routing decision
    route_prediction: bool = False  # run the route predictors live; recall to the metrics
    expert_cache_fraction: float | None = None  # share of each layer's experts kept resident (ray: each shard's)
    expert_cache_policy: str = "adaptive"  # lru | lfu | score | adaptive
    expert_cache_prefetch: bool = False  # load the experts pre-gating predicts for the next layer ahead
    expert_cache_schedule: str = "auto"  # auto (cost model) | load (every miss) | cpu (every miss computed in place)
    num_speculative_tokens: int = 0  # draft tokens per decode step by prompt lookup (cluster/speculative.py); 0: off
    prompt_lookup_max: int = 4  # longest n-gram looked up for drafts
    prompt_lookup_min: int = 2  # shortest
    # ---- cluster mode (engine="ray") ----
    engine: str = "inprocess"  # "inprocess": one process, no Ray; "ray": actors on a Ray cluster
    cluster: str | None = None  # cluster description file (or built-in name); None: from the live nodes
    address: str | None = None  # Ray address to join; None: the running one, else start a local one
    num_attention_workers: int = 1
    num_expert_shards: int | None = None  # None: one per eligible node kind instance
    microbatches: int = 2  # ping-pong micro-batches per attention worker (1 = off)
    min_microbatch_tokens: int = 32  # split a worker's batch only when each half gets at least this many
    replan_every_steps: int | None = None  # re-plan expert placement from live routing every N steps
    request_shuffling: bool = False  # move sequences to the attention worker beside their predicted shards
    shuffle_max_load: float = MAX_LOAD_RATIO  # request shuffling: sequences per attention worker, max / mean
    expert_replicas: int = 0  # at each re-plan, copy per layer and node this many remote experts its tokens use
    actor_threads: int = 1  # torch threads (and Ray CPUs) per actor
    transport_timeout_s: float = 30.0  # a data-plane peer silent this long is declared failed
    transport: str = "tcp"  # the data plane: "tcp" (sockets driven by the waiting thread) or "gloo"
    max_step_retries: int = 2  # consecutive failed steps recovered before requests end with an error

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"kernel_backend must be one of {', '.join(BACKENDS)}, got {self.kernel_backend!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.microbatches not in (1, 2):
            raise ValueError(f"microbatches must be 1 or 2, got {self.microbatches}")
        if self.engine != "ray":
            self._refuse_ray_only()
        if self.replan_every_steps is not None and self.replan_every_steps <= 0:
            raise ValueError(f"replan_every_steps must be > 0, got {self.replan_every_steps}")
        if self.replan_every_steps is not None and self.engine != "ray":
            raise ValueError("replan_every_steps needs engine='ray' (it moves experts between shards)")
        if self.expert_replicas < 0:
            raise ValueError(f"expert_replicas must be >= 0, got {self.expert_replicas}")
        if self.expert_replicas and self.replan_every_steps is None:
            raise ValueError("expert_replicas is applied by re-planning: set replan_every_steps")
        if self.request_shuffling and self.engine != "ray":
            raise ValueError("request_shuffling needs engine='ray' (it moves sequences between attention workers)")
        if self.shuffle_max_load != MAX_LOAD_RATIO and not self.request_shuffling:
            raise ValueError("shuffle_max_load limits request shuffling: set request_shuffling")
        if self.shuffle_max_load < 1.0:
            raise ValueError(f"shuffle_max_load must be >= 1, got {self.shuffle_max_load}")
        if self.num_expert_shards is not None and self.num_expert_shards <= 0:
            raise ValueError(f"num_expert_shards must be > 0, got {self.num_expert_shards}")
        if self.transport_timeout_s <= 0 or self.max_step_retries < 0:
            raise ValueError("transport_timeout_s must be > 0 and max_step_retries >= 0")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "block_size",
                     "num_attention_workers", "actor_threads", "min_microbatch_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.expert_cache_fraction is not None:
            if not 0.0 < self.expert_cache_fraction <= 1.0:
                raise ValueError(f"expert_cache_fraction must be in (0, 1], got {self.expert_cache_fraction}")
        if self.expert_cache_policy not in ONLINE_POLICIES:
            raise ValueError(f"expert_cache_policy must be one of {', '.join(ONLINE_POLICIES)}, "
                             f"got {self.expert_cache_policy!r}")
        if self.expert_cache_schedule not in SCHEDULES:
            raise ValueError(f"expert_cache_schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.expert_cache_schedule!r}")
        self.speculative  # checks its settings
        if self.num_speculative_tokens and (self.record_trace or self.route_prediction):
            raise ValueError("num_speculative_tokens cannot be combined with record_trace or route_prediction "
                             "(the routes of drafts the model rejects would be recorded)")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")

    def _refuse_ray_only(self) -> None:
        """An in-process engine would silently ignore these: name each one set away from its default."""
        set_ = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                if f.name in RAY_ONLY and getattr(self, f.name) != f.default]
        if set_:
            raise ValueError(f"{', '.join(set_)} only apply with engine='ray' (the in-process engine has no "
                             f"actors or data plane)")

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_cache_tokens // self.block_size)

    @property
    def speculative(self) -> SpeculativeConfig:
        return SpeculativeConfig(self.num_speculative_tokens, self.prompt_lookup_max, self.prompt_lookup_min)


def expert_cache_config(config: EngineConfig):
    """The engine's expert-cache settings as an experts.expert_cache.ExpertCacheConfig (None: no cache)."""
    if config.expert_cache_fraction is None:
        return None
    from experts.expert_cache import ExpertCacheConfig

    return ExpertCacheConfig(config.expert_cache_fraction, config.expert_cache_policy, config.expert_cache_prefetch,
                             schedule=config.expert_cache_schedule)


def context_length(config: EngineConfig, max_positions: int) -> int:
    """The engine's max_model_len: the configured one, checked against the model's positions and the
    KV cache (a longer context could never be admitted); by default the model's positions, capped at
    the KV cache's tokens."""
    kv = config.num_blocks * config.block_size
    if config.max_model_len is None:
        if max_positions > kv:
            log.warning("max_model_len set to %d, the KV cache's tokens (kv_cache_tokens), below the model's "
                        "%d positions; raise kv_cache_tokens for longer contexts", kv, max_positions)
        return min(max_positions, kv)
    if config.max_model_len > max_positions:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                         f"{max_positions}")
    if config.max_model_len > kv:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the KV cache's {kv} tokens: raise "
                         f"kv_cache_tokens or lower max_model_len")
    return config.max_model_len
