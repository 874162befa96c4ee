"""AttentionWorker: embeddings, attention with its paged KV cache, norms, dense MLPs, LM head.

The memory-bound half of the model (attention offloading). Plain class: the cluster builder turns
it into a Ray actor; the in-process engine calls it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.batch import StepBatch
from cluster.layers import (ATTEND_MAX_QUERIES, apply_rope_rolled, gated_mlp, paged_attention, rope_table,
                            signed_sin)
from experts import huge_pages
from experts.config import ModelSpec
from experts.loader import DenseWeights, LayerWeights
from kernels.dispatch import KernelOps


class AttentionWorker:
    def __init__(self, spec: ModelSpec, weights: DenseWeights, num_slots: int,
                 dtype: torch.dtype, device: torch.device, ops: KernelOps) -> None:
        self.spec, self.w, self.dtype, self.device = spec, weights, dtype, device
        self.linear, self.rms_norm, self.attend = ops.linear, ops.rms_norm, ops.attend
        self.rope_in_place, self.block = ops.rope_in_place, ops.attention_block
        self.block_weights, self._blocks = ops.block_weights, {}  # layer -> its weights for self.block
        cos, sin = rope_table(spec.head_dim, spec.rope_theta, spec.max_position_embeddings)
        self.cos, self.sin = cos.to(device, dtype), signed_sin(sin).to(device, dtype)
        self._rope_at: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # see _rope
        shape = (num_slots, spec.num_kv_heads, spec.head_dim)
        # zeros, not empty: padded keys point at slot 0 and must be finite
        self.k_cache = [huge_pages.empty(shape, dtype, device).zero_() for _ in range(spec.num_layers)]
        self.v_cache = [huge_pages.empty(shape, dtype, device).zero_() for _ in range(spec.num_layers)]
        self.scale = spec.head_dim ** -0.5

    def kv_cache_bytes(self) -> int:
        t = self.k_cache[0]
        return 2 * len(self.k_cache) * t.numel() * t.element_size()

    def embed(self, batch: StepBatch) -> torch.Tensor:  # [T, H]
        return F.embedding(batch.input_ids, self.w.embed)

    def attention(self, layer: int, h: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream h [T, H] -> (h + attention, post-attention-normed input of the FFN)."""
        lw = self.w.layers[layer]
        if self.block is not None and self._one_sequence_chunk(batch):
            return self._attention_block(layer, lw, h, batch)
        x = self.rms_norm(h, lw.input_norm, self.spec.rms_norm_eps)
        q, k, v = self._qkv(lw, x, batch)
        self.k_cache[layer][batch.slot_mapping] = k
        self.v_cache[layer][batch.slot_mapping] = v
        attn = paged_attention(q, self.k_cache[layer], self.v_cache[layer], batch, self.scale, self.attend)
        h = h + self.linear(attn, lw.o)
        return h, self.rms_norm(h, lw.post_norm, self.spec.rms_norm_eps)

    def _one_sequence_chunk(self, batch: StepBatch) -> bool:
        """A lone sequence's few new tokens (a decode token, a draft chunk, a short prompt), its keys
        consecutive and all visible to them: what the fused attention block
        (KernelOps.attention_block) computes."""
        keys = batch.kv_lens[0] if batch.kv_lens else 0
        window = batch.sliding_window
        return (batch.num_seqs == 1 and 1 <= batch.q_lens[0] <= ATTEND_MAX_QUERIES and batch.kv_runs is not None
                and (window is None or keys <= window))

    def _attention_block(self, layer: int, lw: LayerWeights, h: torch.Tensor, batch: StepBatch):
        """`attention` for a lone sequence's few new tokens in one call: the same kernels, the same bits."""
        s = self.spec
        cos, sin = self._rope(batch)
        weights = self._blocks.get(layer)
        if weights is None:
            weights = {"input_norm": lw.input_norm, "post_norm": lw.post_norm, "qkv": lw.qkv,
                       "qkv_bias": lw.qkv_bias, "q_norm": lw.q_norm, "k_norm": lw.k_norm, "o": lw.o}
            weights = self._blocks[layer] = self.block_weights(weights) if self.block_weights else weights
        return self.block(h, weights, s.rms_norm_eps, s.qk_norm, s.clip_qkv, cos, sin, self.k_cache[layer],
                          self.v_cache[layer], batch.kv_runs[0], batch.kv_lens[0], s.num_heads, self.scale)

    def _qkv(self, lw: LayerWeights, x: torch.Tensor, batch: StepBatch):
        s = self.spec
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = self.linear(x, lw.qkv, lw.qkv_bias).split([q_out, kv_out, kv_out], dim=-1)
        if s.qk_norm == "full":
            q, k = self.rms_norm(q, lw.q_norm, s.rms_norm_eps), self.rms_norm(k, lw.k_norm, s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        t = x.shape[0]
        q = q.reshape(t, s.num_heads, s.head_dim)
        k = k.reshape(t, s.num_kv_heads, s.head_dim)
        v = v.reshape(t, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = self.rms_norm(q, lw.q_norm, s.rms_norm_eps), self.rms_norm(k, lw.k_norm, s.rms_norm_eps)
        cos, sin = self._rope(batch)
        if self.rope_in_place is not None and q.stride(1) == k.stride(1) == s.head_dim:
            return self.rope_in_place(q, cos, sin), self.rope_in_place(k, cos, sin), v
        return apply_rope_rolled(q, cos, sin), apply_rope_rolled(k, cos, sin), v

    def _rope(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and signed sin at the batch's positions, gathered once per batch, not per layer.
        Keyed by the positions tensor's id (a step's micro-batches each have one); the entry holds
        the tensor, so that id cannot be reused while the entry lives."""
        pos = batch.positions
        hit = self._rope_at.get(id(pos))
        if hit is None:
            if len(self._rope_at) >= 4:
                self._rope_at.clear()
            hit = self._rope_at[id(pos)] = (pos, self.cos[pos][:, None, :], self.sin[pos][:, None, :])
        return hit[1], hit[2]

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert (sigmoid-gated) of a MoE layer or the MLP of a dense layer; None if neither."""
        lw = self.w.layers[layer]
        if lw.shared is None:
            return None
        y = gated_mlp(x, lw.shared.gate_up, lw.shared.down, self.linear)
        if lw.shared_score is not None:
            y = torch.sigmoid(F.linear(x, lw.shared_score)) * y
        return y

    def logits(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """[S, V] float32 logits of the rows whose next token is sampled."""
        return self._head(h[batch.logit_rows])

    def _head(self, rows: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [R, H] residual rows -> [R, V] float32 logits."""
        return self.linear(self.rms_norm(rows, self.w.final_norm, self.spec.rms_norm_eps), self.w.lm_head).float()

    def prompt_scores(self, h: torch.Tensor, batch: StepBatch, top: int,
                      rows_at_once: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the batch's prompt rows: (log-probability of the prompt token after each [P], the `top`
        best log-probabilities [P, top] and their token ids [P, top]), from the model's log-softmax,
        `rows_at_once` rows at a time (a whole prompt's logits would be P x vocabulary floats)."""
        parts = []
        for i in range(0, batch.prompt_rows.numel(), rows_at_once):
            rows = batch.prompt_rows[i:i + rows_at_once]
            logp = torch.log_softmax(self._head(h[rows]), dim=-1)
            best = torch.topk(logp, top, dim=-1)
            parts.append((logp.gather(1, batch.prompt_targets[i:i + rows_at_once, None]).squeeze(1),
                          best.values, best.indices))
        return tuple(torch.cat(p).cpu() for p in zip(*parts))
