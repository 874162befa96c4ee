"""ShardActor: an expert shard as a plain class (cluster/builder.py makes it a Ray actor).

It serves one engine step per Ray call: for every MoE layer and micro-batch it receives tokens from
each attention worker over the data plane, runs its experts (all resident, or a CachedExperts over a
slow tier) and sends their outputs back. cluster/actors.py has the attention side and the base.
"""

from __future__ import annotations

import time

import torch

from cluster.actors import ActorConfig, BaseActor
from cluster.moe_dispatch import (ABORT, fold_outputs, max_message_nbytes, read_header, received_nbytes, unpack,
                                  unpack_hint)
from cluster.transport import wait
from experts.expert_bank import ExpertBank
from experts.expert_cache import CachedExperts
from experts.loader import expert_views, load_experts
from experts.shard import ExpertShard


class ShardActor(BaseActor):
    def __init__(self, cfg: ActorConfig, experts: dict[int, tuple[int, ...]]) -> None:
        super().__init__(cfg)
        self.experts = {layer: tuple(ids) for layer, ids in experts.items()}
        self.cache: CachedExperts | None = None
        if cfg.expert_cache is not None:  # a fast-tier budget over this shard's experts
            self.cache = CachedExperts(self.ckpt, self.spec, self.dtype, self.device, self.ops, cfg.expert_cache,
                                       owned=self.experts)
            return
        banks = {layer: load_experts(self.ckpt, self.spec, layer, ids, self.dtype, self.device)
                 for layer, ids in experts.items()}
        self.shard = ExpertShard(banks, self.ops)

    def nbytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else self.shard.nbytes()

    def set_experts(self, experts: dict[int, tuple[int, ...]]) -> int:
        """Hold exactly `experts` (layer -> ids) from now on: kept experts are copied row by row, new
        ones read from the checkpoint, dropped ones freed. -> bytes read from the checkpoint (with an
        expert cache: 0, the new experts are moved in on demand)."""
        if self.cache is not None:
            self.cache.set_owned(experts)
            self.experts = {layer: tuple(ids) for layer, ids in experts.items()}
            return 0
        read = 0
        for layer, ids in experts.items():
            old = self.shard.banks[layer]
            bank = ExpertBank.empty(layer, tuple(ids), self.spec.num_experts, self.spec.hidden_size,
                                    self.spec.expert_intermediate, self.dtype, self.device)
            for row, e in enumerate(ids):
                src = int(old.slot_of[e])
                if src >= 0:
                    bank.buffer[row].copy_(old.buffer[src])
                else:
                    bank.set_expert(row, *expert_views(self.ckpt, self.spec, layer, e))
                    read += bank.buffer[row].numel() * bank.buffer.element_size()
            self.shard.banks[layer] = bank
        self.experts = {layer: tuple(ids) for layer, ids in experts.items()}
        return read

    @torch.inference_mode()
    def serve_step(self, microbatches: list[int], max_tokens: int) -> dict:
        """Serve every MoE layer of one engine step; microbatches[a] = micro-batches attention
        worker a runs this step (0: it sits the step out), none with more than `max_tokens` tokens.
        -> this rank's traffic stats."""
        h, k = self.spec.hidden_size, self.spec.top_k
        self._inbox = torch.empty(max_message_nbytes(max_tokens, k, h, self.dtype, self.spec.num_experts),
                                  dtype=torch.uint8)
        sends: list = []
        self._compute_ms: dict[int, float] = {}
        try:
            for layer in self.spec.moe_layers:
                hints: list[list[int]] = []
                for mb in range(max(microbatches, default=0)):
                    for src, count in enumerate(microbatches):
                        if mb < count and not self._serve_one(layer, src, sends, hints):
                            return self._finish(sends)
                if hints and self.cache is not None:  # while the attention workers attend the next layer
                    self.cache.prefetch(layer + 1, [sum(c) for c in zip(*hints)])
            return self._finish(sends)
        except Exception:
            self.transport.close()
            raise

    def _serve_one(self, layer: int, src: int, sends: list, hints: list[list[int]]) -> bool:
        h = self.spec.hidden_size
        message = self.transport.recv_message(self._inbox, src, layer, lambda m: received_nbytes(m, h, self.dtype))
        n, p, e = read_header(message)
        if (n, p) == ABORT:
            return False
        if e:
            hints.append(unpack_hint(message, n, p, e, h, self.dtype))
        if n == 0:
            return True
        x, pair_row, pair_expert, fold, weight = (t.to(self.device) for t in unpack(message, n, p, h, self.dtype))
        start = time.perf_counter()
        pairs = (self.cache.pair_outputs(layer, x, pair_row, pair_expert, weight) if self.cache is not None
                 else self.shard.pair_outputs(layer, x, pair_row, pair_expert))
        out = fold_outputs(pairs, pair_row, pair_expert, fold, weight).cpu()  # the data plane carries host memory
        self._compute_ms[layer] = self._compute_ms.get(layer, 0.0) + 1e3 * (time.perf_counter() - start)
        sends.append((self.transport.isend(out, src, layer), out))
        return True

    def _finish(self, sends: list) -> dict:
        for work, _ in sends:
            wait(work)
        cache = {} if self.cache is None else {"expert_cache": self.cache.take_step_stats()}
        return {**self.transport.take_stats().to_dict(), "compute_ms": self._compute_ms, **cache}
