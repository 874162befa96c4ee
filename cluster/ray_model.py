"""RayModel: the engine's model on a Ray cluster (attention workers + expert shards as actors).

One engine step = one Ray call per actor: attention workers get their micro-batches, shards get
the number of micro-batches to serve; hidden states move over the data plane (cluster/transport).
A sequence starts on attention worker seq_id mod A, whose KV cache holds it; with request shuffling
(router/shuffle.py) it may move, between two steps, to the worker whose node hosts the shards its
tokens are predicted to reach, its KV copied there first. When a step
fails (an actor died, the data plane timed out), the dead actors are recreated (reloading their
weights), the data plane is rebuilt, and `ClusterRecovered` tells the engine to recompute.
"""

from __future__ import annotations

import logging
import time
import uuid
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from cluster.actors import StepResult, Topology
from cluster.batch import build_batch
from cluster.builder import start_attention, start_shard
from cluster.errors import ClusterRecovered
from cluster.live_placement import LivePlacement
from cluster.ray_model_config import RayModelConfig, TrafficTotals
from cluster.plan_cli import DTYPE_BYTES, footprint_of
from cluster.scheduler_config import ScheduledChunk, SchedulerOutput
from cluster.sequence_homes import KVMove, SequenceHomes, prompt_score_order, row_order
from experts.config import ModelSpec
from experts.cache_stats import CacheStats
from router.replicas import Replicas
from router.shuffle import RequestShuffler, ShuffleGeometry

log = logging.getLogger(__name__)


class RayModel(LivePlacement):
    def __init__(self, spec: ModelSpec, config: RayModelConfig) -> None:
        self.spec, self.config = spec, config
        self.plan = config.plan
        self.prefix = f"moe-{uuid.uuid4().hex[:8]}"
        self.shard_experts = [{layer: tuple(ids) for layer, ids in s.experts.items()} for s in self.plan.expert_shards]
        self.expert_totals: dict[int, list[int]] = {}  # MoE layer -> tokens routed to each expert, all steps
        self.worker_expert_totals: list[dict[int, list[int]]] = [{} for _ in self.plan.attention_workers]
        self.replicas: Replicas = [{} for _ in self.plan.expert_shards]  # per shard: layer -> experts it copies
        self.attention = [self._start_attention(i) for i in range(len(self.plan.attention_workers))]
        self.shards = [self._start_shard(i) for i in range(len(self.plan.expert_shards))]
        self.owner = self._owner_table()
        self.traffic = TrafficTotals()
        self.last_step: dict = {}
        self.recoveries = 0
        self.record_routes = False  # keep the last step's routes for take_routes()
        self.pregate = False  # also return pre-gating guesses (take_pregate())
        self._rows: list[tuple[int, int, int]] = []  # engine row order of the last step: (result, mb, row)
        self._score_rows: list[tuple[int, int, int, int]] = []  # its prompt scores: (result, mb, first, count)
        self._results: list[StepResult] = []
        self.homes = SequenceHomes(len(self.attention), config.block_size)  # sequence -> attention worker
        self._migrated = self._moved = 0  # KV bytes copied across nodes, and sequences moved, not yet reported
        self.moved: tuple[int, ...] = ()  # the sequences the last step moved to another attention worker
        if config.shuffle is not None:
            self.shuffler = RequestShuffler(config.shuffle)
        self._connect()

    @property
    def shuffler(self):
        """The request-shuffling policy (router/shuffle.py, or anything with observe / plan / forget)."""
        return self.homes.shuffler

    @shuffler.setter
    def shuffler(self, policy) -> None:
        self.homes.shuffler = policy

    @property
    def kv_at(self) -> dict[int, int]:
        return self.homes.kv_at

    # ---- actors ------------------------------------------------------------------------------
    def _start_attention(self, i: int):
        w = self.plan.attention_workers[i]
        return start_attention(self.plan.actor_options(w.name), self.config.actor,
                               f"{self.prefix}-{w.name}", self.config.num_kv_slots)

    def _start_shard(self, i: int):
        s = self.plan.expert_shards[i]
        return start_shard(self.plan.actor_options(s.name), self.config.actor, f"{self.prefix}-{s.name}",
                           self.shard_experts[i])

    def _owner_table(self) -> dict[int, tuple[int, ...]]:
        owner = {layer: [-1] * self.spec.num_experts for layer in self.spec.moe_layers}
        for s, experts in enumerate(self.shard_experts):
            for layer, ids in experts.items():
                for e in ids:
                    owner[layer][e] = s
        missing = [(layer, e) for layer, o in owner.items() for e, s in enumerate(o) if s < 0]
        if missing:
            raise ValueError(f"placement leaves experts without a shard: {missing[:8]}")
        return {layer: tuple(o) for layer, o in owner.items()}

    @property
    def actors(self) -> list:
        return self.attention + self.shards

    def _connect(self) -> None:
        actors = self.actors
        nodes = ray.get([a.node_id.remote() for a in actors], timeout=self.config.start_timeout_s)
        master = ray.get(actors[0].endpoint.remote())
        topo = Topology(master, tuple(nodes), len(self.attention), self.owner)
        ray.get([a.connect.remote(rank, topo) for rank, a in enumerate(actors)],
                timeout=self.config.start_timeout_s)
        self.topology = topo
        if any(self.replicas):
            self._send_tables()
        self.homes.geometry = self.shuffle_geometry()  # a restarted actor may sit on another node

    def shuffle_geometry(self) -> ShuffleGeometry:
        """Where the attention workers and shards run, and the bytes a token and a KV position take."""
        nodes, a, dtype = self.topology.node_of, len(self.attention), self.config.actor.dtype
        return ShuffleGeometry(tuple(nodes[:a]), tuple(nodes[a:]), self.spec.hidden_size * DTYPE_BYTES[dtype],
                               footprint_of(self.spec, dtype).kv_bytes_per_token)

    # ---- one step ----------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, tuple[int, ...]]:
        """-> (logits [S, V] float32, the sequence of each row)."""
        try:
            moves = self.homes.place(out.chunks)
            self.moved = tuple(m.seq_id for m in moves)
            self._move_kv(moves)
        except (RayError, TimeoutError) as exc:
            self._recover([], exc)
            raise ClusterRecovered(f"moving a sequence's KV cache failed and was recovered: {_reason(exc)}") from exc
        per_worker = self.homes.split(out.chunks, self._parts)
        calls, seq_order, mbs, placed, max_tokens = [], [], [0] * len(self.attention), [], 0
        called = []
        for a, microbatches in enumerate(per_worker):
            if not microbatches:
                continue
            called.append(a)
            batches = [build_batch(SchedulerOutput(tuple(mb)), self.config.block_size, self.spec.sliding_window,
                                   torch.device("cpu")) for mb in microbatches]
            seq_order.extend(sid for b in batches for sid in b.sample_seq_ids)
            mbs[a] = len(batches)
            max_tokens = max(max_tokens, *(b.input_ids.numel() for b in batches))
            placed.append(microbatches)
            calls.append(self.attention[a].step.remote(batches, self.record_routes, self.pregate,
                                                       self.shuffler is not None))
        if self.record_routes or self.pregate:
            self._rows = row_order(out.chunks, placed)
        self._score_rows = prompt_score_order(out.chunks, placed)
        shard_calls = [s.serve_step.remote(mbs, max_tokens) for s in self.shards]
        try:
            results: list[StepResult] = ray.get(calls)
            shard_stats = ray.get(shard_calls)
        except (RayError, TimeoutError) as exc:
            self._recover(calls + shard_calls, exc)
            raise ClusterRecovered(f"cluster step failed and was recovered: {_reason(exc)}") from exc
        self._account(results, shard_stats, called)
        self._results = results
        self.homes.observe_step(placed, [r.shard_hits for r in results])
        every = self.config.replan_every_steps
        if every is not None and self.traffic.steps % every == 0:
            log.info("re-planned expert placement: %s", self.replan_experts())
        return torch.cat([r.logits for r in results]), tuple(seq_order)

    def _move_kv(self, moves: list[KVMove]) -> None:
        """Copy each moving sequence's KV to its new attention worker (worker to worker, through Ray)."""
        writes = [self.attention[m.dst].import_kv.remote(m.slots, self.attention[m.src].export_kv.remote(m.slots))
                  for m in moves]
        ray.get(writes, timeout=self.config.start_timeout_s)
        # Counted once copied: a step that then fails has still moved them (reported with the next step).
        copied = sum(m.cross_node_bytes for m in moves)
        self.traffic.migrate_bytes += copied
        self.traffic.sequences_moved += len(moves)
        self._migrated += copied
        self._moved += len(moves)

    def release(self, seq_id: int) -> None:
        """The engine finished (or aborted) the sequence: forget where it was."""
        self.homes.release(seq_id)

    def _parts(self, chunks: list[ScheduledChunk]) -> int:
        """Ping-pong only pays when each micro-batch's work outweighs the extra round trip per layer."""
        tokens = sum(len(c.token_ids) for c in chunks)
        return self.config.microbatches if tokens >= 2 * self.config.min_microbatch_tokens else 1

    def _account(self, results: list[StepResult], shard_stats: list[dict], called: list[int]) -> None:
        self.traffic.steps += 1
        counts: dict[int, list[int]] = {}
        for r, worker in zip(results, called):
            self.traffic.add(r.traffic)
            mine = self.worker_expert_totals[worker]
            for layer, c in r.expert_tokens.items():
                counts[layer] = [a + b for a, b in zip(counts.get(layer, [0] * len(c)), c)]
                mine[layer] = [a + b for a, b in zip(mine.get(layer, [0] * len(c)), c)]
        for layer, c in counts.items():
            self.expert_totals[layer] = [a + b for a, b in zip(self.expert_totals.get(layer, [0] * len(c)), c)]
        self.last_step = {"traffic": [r.traffic for r in results], "shard_traffic": shard_stats,
                          "expert_tokens": counts, "round_trip_ms": [r.round_trip_ms for r in results],
                          "migrate_bytes": self._migrated, "sequences_moved": self._moved}
        self._migrated = self._moved = 0

    def step_stats(self) -> dict:
        """The last step's MoE statistics, as cluster.metrics reads them: tokens per (layer, expert) and
        the bytes that crossed node boundaries, attention -> shards (dispatch) and back (combine),
        and (with request shuffling) KV copied to another attention worker (migrate)."""
        step = self.last_step
        if not step:
            return {}
        stats = {"expert_tokens": step["expert_tokens"],
                 "cross_node_bytes": {"dispatch": sum(t["cross_bytes_sent"] for t in step["traffic"]),
                                      "combine": sum(t["cross_bytes_sent"] for t in step["shard_traffic"])}}
        if self.shuffler is not None:
            stats["cross_node_bytes"]["migrate"] = step["migrate_bytes"]
            stats["sequences_moved"] = step["sequences_moved"]
        caches = [t["expert_cache"] for t in step["shard_traffic"] if "expert_cache" in t]
        if caches:  # the shards' expert caches, summed
            total = CacheStats.summed(caches).as_dict()
            stats["expert_cache"] = total
            if total["hit_rate"] is not None:
                stats["expert_cache_hit_rate"] = total["hit_rate"]
        return stats

    def take_routes(self) -> dict[int, tuple[list[list[int]], list[list[float]]]]:
        """The last step's routes in the engine's row order (record_routes must be on):
        MoE layer -> ([T][k] experts, [T][k] weights), as InProcessModel.take_routes."""
        out: dict[int, tuple[list, list]] = {}
        for r, m, row in self._rows:
            for layer, (ids, weights) in self._results[r].routes[m].items():
                acc = out.setdefault(layer, ([], []))
                acc[0].append(ids[row])
                acc[1].append(weights[row])
        return out

    def take_prompt_scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last step's prompt scores (AttentionWorker.prompt_scores) in the engine's chunk order,
        as InProcessModel.take_prompt_scores."""
        parts = [tuple(t[first:first + n] for t in self._results[r].prompt_scores[m])
                 for r, m, first, n in self._score_rows]
        return tuple(torch.cat(p) for p in zip(*parts))

    def take_pregate(self) -> dict[int, list[list[int]]]:
        """The last step's pre-gating guesses in the engine's row order (pregate must be on)."""
        out: dict[int, list] = {}
        for r, m, row in self._rows:
            for layer, ids in self._results[r].pregate[m].items():
                out.setdefault(layer, []).append(ids[row])
        return out

    # ---- failures ----------------------------------------------------------------------------
    def _recover(self, refs: list, exc: BaseException) -> None:
        log.warning("cluster step failed (%s); recovering", _reason(exc))
        t0 = time.monotonic()
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.config.actor.transport_timeout_s + 10)
        for i, actor in enumerate(self.attention):
            if not _alive(actor):
                ray.kill(actor)
                self.attention[i] = self._start_attention(i)
        for i, actor in enumerate(self.shards):
            if not _alive(actor):
                ray.kill(actor)
                self.shards[i] = self._start_shard(i)
        self._connect()
        self.recoveries += 1
        log.warning("cluster recovered in %.1f s", time.monotonic() - t0)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def _alive(actor, timeout_s: float = 10.0) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=timeout_s)
        return True
    except (RayActorError, GetTimeoutError):
        return False


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]
