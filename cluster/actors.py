"""The cluster's actors as plain classes (cluster/builder.py makes them Ray actors).

AttentionActor: embeddings, attention + KV cache, norms, routers, shared/dense MLPs, LM head. Per
MoE layer it dispatches each micro-batch's tokens to the shards over the data plane and combines
their outputs. The expert shards (cluster/shard_actor.py) serve one engine step per Ray call: for
every MoE layer and micro-batch they receive tokens from each attention worker, run their experts,
and send back. Ray carries one call per actor per step; hidden states go over the data plane only
(cluster/socket_transport.py, or gloo in cluster/transport.py).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cluster.affinity import AffinityTally
from cluster.attention_worker import AttentionWorker
from cluster.batch import StepBatch
from cluster.moe_dispatch import ABORT, ShardSlice, combine, header_message, pack_parts, split_route
from cluster.sampling_params import MAX_LOGPROBS
from cluster.socket_transport import SocketTransport
from cluster.transport import Transport, free_endpoint, wait
from experts.checkpoint import Checkpoint
from experts.config import load_spec
from experts.expert_cache import ExpertCacheConfig
from experts.loader import load_dense
from kernels.dispatch import select_kernels
from router.gating import Gate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class ActorConfig:
    """What every actor needs to load its part of the model."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    kernel_backend: str = "auto"
    num_threads: int = 1
    transport_timeout_s: float = 30.0
    transport: str = "tcp"  # "tcp" (SocketTransport) or "gloo" (Transport)
    expert_cache: ExpertCacheConfig | None = None  # expert shards keep only a fraction of their experts resident

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_threads <= 0 or self.transport_timeout_s <= 0:
            raise ValueError("num_threads and transport_timeout_s must be > 0")


@dataclass(frozen=True, slots=True)
class Topology:
    """The data-plane group: ranks [0, A) are attention workers, [A, A + S) expert shards."""

    master: tuple[str, int]
    node_of: tuple[str, ...]  # Ray node id of each rank
    num_attention: int
    owner: dict[int, tuple[int, ...]] = field(default_factory=dict)  # MoE layer -> shard of each expert

    @property
    def num_shards(self) -> int:
        return len(self.node_of) - self.num_attention


@dataclass(slots=True)
class StepResult:
    logits: torch.Tensor  # [S, V] float32, rows in the order of the micro-batches' samples
    traffic: dict  # TrafficStats.to_dict() of this rank for the step
    expert_tokens: dict[int, list[int]]  # MoE layer -> tokens routed to each expert
    round_trip_ms: dict[int, list[float]]  # MoE layer -> per micro-batch: dispatch start -> outputs in
    routes: list[dict] = field(default_factory=list)  # per micro-batch: MoE layer -> ([T][k] ids, weights)
    pregate: list[dict] = field(default_factory=list)  # per micro-batch: target layer -> [T][k] guessed ids
    shard_hits: list[np.ndarray] = field(default_factory=list)  # per micro-batch: [T, S] MoE layers reaching shard s
    prompt_scores: list[tuple | None] = field(default_factory=list)  # per micro-batch: AttentionWorker.prompt_scores


class BaseActor:
    """What both kinds of actor share: the model's spec and checkpoint, kernels, the data plane."""

    def __init__(self, cfg: ActorConfig) -> None:
        torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.dtype, self.device = DTYPES[cfg.dtype], torch.device(cfg.device)
        self.spec = load_spec(Path(cfg.model))
        self.ckpt = Checkpoint(cfg.model)
        self.ops = select_kernels(self.device, cfg.kernel_backend, self.dtype)
        self.transport: Transport | None = None
        self.topology: Topology | None = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def endpoint(self) -> tuple[str, int]:
        return free_endpoint()

    def connect(self, rank: int, topology: Topology) -> None:
        self.topology = topology
        if self.transport is not None:
            self.transport.close()
        kind = SocketTransport if self.cfg.transport == "tcp" else Transport
        self.transport = kind(rank, list(topology.node_of), self.cfg.transport_timeout_s)
        self.transport.connect(topology.master)
        # What the actor holds from now on lives as long as it does: out of the collector's scans,
        # so a full collection cannot stall a step for the 0.3-0.4 s it took over all of it.
        gc.collect()
        gc.freeze()

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AttentionActor(BaseActor):
    def __init__(self, cfg: ActorConfig, num_kv_slots: int) -> None:
        super().__init__(cfg)
        dense = load_dense(self.ckpt, self.spec, self.dtype, self.device)
        self.worker = AttentionWorker(self.spec, dense, num_kv_slots, self.dtype, self.device, self.ops)
        self.gate = Gate(self.spec, [lw.router for lw in dense.layers], self.ops)
        self._owner: dict[int, np.ndarray] = {}
        self._affinity = AffinityTally(self.spec.num_experts)
        self._prefetch = cfg.expert_cache is not None and cfg.expert_cache.prefetch  # hint the shards' caches

    def connect(self, rank: int, topology: Topology) -> None:
        super().connect(rank, topology)
        self.set_owner(topology.owner)

    def take_affinity(self) -> tuple[dict, dict]:
        """(co-activation, transitions) counted since the last call, as numpy [E, E] per MoE layer."""
        return self._affinity.take()

    def set_owner(self, owner: dict[int, tuple[int, ...]]) -> None:
        """Experts moved between shards: route each layer's tokens by the new owner table."""
        self._owner = {layer: np.array(o, dtype=np.int64) for layer, o in owner.items()}

    @torch.inference_mode()
    def step(self, batches: list[StepBatch], record_routes: bool = False, pregate: bool = False,
             shard_hits: bool = False) -> StepResult:
        """Run every layer for the micro-batches, overlapping one's attention with the other's experts.
        `record_routes`: return every MoE layer's routes; `pregate`: also apply each next MoE layer's
        gate to this layer's input and return the guesses (the live route predictors); `shard_hits`:
        for each token, at how many MoE layers it reached each shard (request shuffling)."""
        counts: dict[int, list[int]] = {}
        self._round_trips: dict[int, list[float]] = {}
        self._record, self._pregate = record_routes, pregate
        self._routes: list[dict] = [{} for _ in batches]
        self._guesses: list[dict] = [{} for _ in batches]
        self._hits: list[np.ndarray] | None = (
            [np.zeros((b.input_ids.numel(), self.topology.num_shards), dtype=np.int16) for b in batches]
            if shard_hits else None)
        self._affinity.new_step(len(batches))
        batches = [b.to(self.device) for b in batches]  # the driver builds them in host memory
        try:
            hs = [self.worker.embed(b) for b in batches]
            for layer in range(self.spec.num_layers):
                pending = [self._attend(layer, m, hs, b, counts) for m, b in enumerate(batches)]
                for m, p in enumerate(pending):
                    if p is not None:
                        hs[m] = hs[m] + self._combine(layer, *p)
        except Exception:
            self._abort_shards()
            self.transport.close()  # peers see the broken group at once, not at their timeout
            raise
        logits = torch.cat([self.worker.logits(h, b) for h, b in zip(hs, batches)]).cpu()
        scores = [None if b.prompt_rows is None else self.worker.prompt_scores(h, b, MAX_LOGPROBS)
                  for h, b in zip(hs, batches)]
        return StepResult(logits, self.transport.take_stats().to_dict(), counts, self._round_trips,
                          self._routes if record_routes else [], self._guesses if pregate else [],
                          self._hits if self._hits is not None else [],
                          scores if any(s is not None for s in scores) else [])

    def export_kv(self, slots: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (K, V) rows at `slots`, in host memory (a sequence moving to another worker)."""
        index = torch.from_numpy(slots).to(self.device)
        return [(k[index].cpu(), v[index].cpu()) for k, v in zip(self.worker.k_cache, self.worker.v_cache)]

    def import_kv(self, slots: np.ndarray, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write another worker's export_kv rows at the same `slots` (slots are global to the engine)."""
        index = torch.from_numpy(slots).to(self.device)
        for (k, v), k_cache, v_cache in zip(kv, self.worker.k_cache, self.worker.v_cache):
            k_cache[index] = k.to(self.device)
            v_cache[index] = v.to(self.device)

    def _attend(self, layer: int, m: int, hs: list[torch.Tensor], batch: StepBatch, counts: dict):
        hs[m], x = self.worker.attention(layer, hs[m], batch)
        dense = self.worker.dense_ffn(layer, x)
        if not self.spec.sparse_layers[layer]:
            hs[m] = hs[m] + dense
            return None
        route = self.gate.route(layer, x)
        flat = route.ids.reshape(-1)
        tally = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        counts[layer] = [a + b for a, b in zip(counts.get(layer, [0] * len(tally)), tally)]
        self._affinity.add(m, layer, route.ids)
        if self._record:
            self._routes[m][layer] = (route.ids.tolist(), route.weights.float().tolist())
        nxt, hint = layer + 1, None
        if (self._pregate or self._prefetch) and nxt < self.spec.num_layers and self.spec.sparse_layers[nxt]:
            guess = self.gate.route(nxt, x).ids  # pre-gating: the next layer's gate on this layer's input
            if self._pregate:
                self._guesses[m][nxt] = guess.tolist()
            if self._prefetch:
                hint = torch.bincount(guess.reshape(-1), minlength=self.spec.num_experts)
        # The data plane carries host memory: a GPU worker stages its tokens and route there (no copy on CPU).
        ids, weights = route.ids.cpu(), route.weights.cpu()
        hits = self._hits[m] if self._hits is not None else None
        return (time.perf_counter(), self._dispatch(layer, x.cpu(), ids, weights, hint, hits)), (ids, weights), dense

    def _dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  hint: torch.Tensor | None, hits: np.ndarray | None) -> list:
        """Send each shard its tokens (and the next layer's `hint` for its cache); post the receives of
        their outputs; count in `hits` [T, S] the tokens each shard gets. -> [(slice, out, works)]"""
        top = self.topology
        pending = []
        for s, sl in enumerate(split_route(ids, weights, self._owner[layer], top.num_shards)):
            if hits is not None:
                hits[sl.rows_np, s] += 1  # rows_np: each token once
            dst = top.num_attention + s
            message, works, out = pack_parts(x, sl, hint), [], None
            if sl.rows_np.size > 0:  # the receive of its outputs is posted before the tokens leave
                out = torch.empty(sl.out_rows, x.shape[1], dtype=x.dtype)
                works.append(self.transport.irecv(out, dst, layer))
            works.append(self.transport.isend_parts(message, dst, layer))
            pending.append((sl, out, works, message))  # tensors stay alive until waited
        return pending

    def _combine(self, layer: int, sent: tuple[float, list], route: tuple[torch.Tensor, torch.Tensor],
                 dense: torch.Tensor | None) -> torch.Tensor:
        """route: the layer's (ids, weights) [T, K] in host memory."""
        start, pending = sent
        outputs: list[tuple[ShardSlice, torch.Tensor]] = []
        for sl, out, works, *_keepalive in pending:
            for w in works:
                wait(w)
            if out is not None:
                outputs.append((sl, out))
        self._round_trips.setdefault(layer, []).append(1e3 * (time.perf_counter() - start))
        moe = combine(outputs, *route, self.dtype).to(self.device)
        return moe if dense is None else moe + dense

    def _abort_shards(self) -> None:
        """Best effort: tell every shard the step is over so none waits for its timeout."""
        if self.transport is None or self.topology is None:
            return
        for s in range(self.topology.num_shards):
            try:
                wait(self.transport.isend(header_message(*ABORT), self.topology.num_attention + s))
            except Exception:  # the shard may be the one that failed
                pass
