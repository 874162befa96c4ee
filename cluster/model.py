"""The in-process model: one AttentionWorker, one Gate and one ExpertShard holding every expert
(or CachedExperts holding a fraction of them over a slow tier; it prints its calibrated cost model).

This is the reference path (and the fallback with no Ray): the per-layer flow is
attention worker -> router -> expert shard -> combine, the same calls the cluster makes remotely.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cluster.attention_worker import AttentionWorker
from cluster.batch import StepBatch, build_batch
from cluster.sampling_params import MAX_LOGPROBS
from cluster.scheduler_config import SchedulerOutput
from experts.checkpoint import Checkpoint
from experts.config import ModelSpec, load_spec
from experts.expert_cache import CachedExperts, ExpertCacheConfig
from experts.loader import load_dense, load_experts
from experts.shard import ExpertShard
from kernels.dispatch import KernelOps
from router.gating import Gate


class InProcessModel:
    def __init__(self, spec: ModelSpec, attention: AttentionWorker, gate: Gate,
                 experts: ExpertShard | CachedExperts, block_size: int) -> None:
        self.spec, self.attention, self.gate, self.experts = spec, attention, gate, experts
        self.block_size = block_size
        self._step_ids: dict[int, torch.Tensor] = {}  # MoE layer -> [T, k] experts chosen, last step
        self.record_routes = False  # keep the last step's routes for take_routes()
        self.pregate = False  # also apply each next MoE layer's gate to this layer's input (take_pregate())
        self._pregate: dict[int, torch.Tensor] = {}  # target layer -> [T, k] predicted experts
        self._routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> ([T, k] ids, weights)
        self._prompt_scores = None  # the last step's prompt scores (take_prompt_scores())
        self.moved: tuple[int, ...] = ()  # sequences the last step moved to another attention worker: never here

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype, device: torch.device, num_kv_slots: int,
             ops: KernelOps, block_size: int, show_progress: bool = False,
             expert_cache: ExpertCacheConfig | None = None) -> "InProcessModel":
        """`expert_cache`: keep that fraction of each layer's experts resident; None: all of them."""
        spec = load_spec(Path(model_dir))
        ckpt = Checkpoint(model_dir)
        bar = tqdm(total=2 * spec.num_layers, desc="loading", unit="layer", disable=not show_progress)
        dense = load_dense(ckpt, spec, dtype, device, progress=bar.update)
        if expert_cache is not None:
            start = bar.n
            experts = CachedExperts(ckpt, spec, dtype, device, ops, expert_cache, progress=bar.update)
            bar.update(len(spec.moe_layers) - (bar.n - start))  # a checkpoint tier loads nothing up front
            if show_progress:
                tqdm.write(experts.cost.describe(), file=sys.stderr)
        else:
            banks = {}
            for layer in spec.moe_layers:
                banks[layer] = load_experts(ckpt, spec, layer, range(spec.num_experts), dtype, device)
                bar.update(1)
            experts = ExpertShard(banks, ops)
        bar.close()
        attention = AttentionWorker(spec, dense, num_kv_slots, dtype, device, ops)
        gate = Gate(spec, [lw.router for lw in dense.layers], ops)
        return cls(spec, attention, gate, experts, block_size)

    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, tuple[int, ...]]:
        """-> (logits [S, V] float32, the sequence of each row)."""
        batch = build_batch(out, self.block_size, self.spec.sliding_window, self.attention.device)
        return self.forward(batch), batch.sample_seq_ids

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits [S, V] float32 for the batch's sampled rows."""
        h = self.attention.embed(batch)
        for layer in range(self.spec.num_layers):
            h, x = self.attention.attention(layer, h, batch)
            y = self.attention.dense_ffn(layer, x)
            if self.spec.sparse_layers[layer]:
                route = self.gate.route(layer, x)
                self._step_ids[layer] = route.ids  # counted in step_stats
                if self.record_routes:
                    self._routes[layer] = (route.ids, route.weights)
                moe = self.experts.forward(layer, x, route.ids, route.weights)
                self._look_ahead(layer, x)
                y = moe if y is None else moe + y
            h = h + y
        if batch.prompt_rows is not None:
            self._prompt_scores = self.attention.prompt_scores(h, batch, MAX_LOGPROBS)
        return self.attention.logits(h, batch)

    def take_prompt_scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last step's prompt scores (AttentionWorker.prompt_scores), in the batch's chunk order."""
        scores, self._prompt_scores = self._prompt_scores, None
        return scores

    def _look_ahead(self, layer: int, x: torch.Tensor) -> None:
        """Pre-gating: the next MoE layer's gate on this layer's input, for the live route predictors
        and the expert cache's prefetch."""
        prefetch = isinstance(self.experts, CachedExperts) and self.experts.config.prefetch
        nxt = layer + 1
        if not (self.pregate or prefetch) or nxt >= self.spec.num_layers or not self.spec.sparse_layers[nxt]:
            return
        ids = self.gate.route(nxt, x).ids  # [T, k]
        if self.pregate:
            self._pregate[nxt] = ids
        if prefetch:
            self.experts.prefetch(nxt, torch.bincount(ids.reshape(-1), minlength=self.spec.num_experts).tolist())

    def step_stats(self) -> dict:
        """The last step's MoE statistics, as cluster.metrics reads them."""
        e = self.spec.num_experts
        stats = {"expert_tokens": {layer: np.bincount(ids.reshape(-1).cpu().numpy(), minlength=e).tolist()
                                   for layer, ids in self._step_ids.items()}}
        if isinstance(self.experts, CachedExperts):
            cache = self.experts.take_step_stats()
            stats["expert_cache"] = cache
            if cache["hit_rate"] is not None:
                stats["expert_cache_hit_rate"] = cache["hit_rate"]
        return stats

    def take_routes(self) -> dict[int, tuple[list[list[int]], list[list[float]]]]:
        """The last step's routes (record_routes must be on): layer -> ([T][k] experts, [T][k] weights)."""
        routes, self._routes = self._routes, {}
        return {layer: (ids.tolist(), w.float().tolist()) for layer, (ids, w) in routes.items()}

    def take_pregate(self) -> dict[int, list[list[int]]]:
        """The last step's pre-gating guesses (pregate must be on): target layer -> [T][k] experts."""
        guesses, self._pregate = self._pregate, {}
        return {layer: ids.tolist() for layer, ids in guesses.items()}
