"""Stateless torch building blocks: rotary embeddings, paged attention, gated MLP (RMSNorm: kernels/norm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.batch import StepBatch


def rope_table(head_dim: int, theta: float, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_pos, D] float32, HF layout (frequencies repeated over both halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, n, D]; cos/sin: [T, D] already in x.dtype. The reference form (HF's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [.., D] with its first half negated, for `apply_rope_rolled`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in 4 ops instead of 9, the same bits: x: [T, n, D]; cos, sin_signed: [T, 1, D]
    (`signed_sin`). rotate_half(x) * sin = roll(x, D/2) * sin_signed, since -(a * b) = a * (-b)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


def _gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache [slots, nkv, D], index [B, Lk] -> [B, Lk, nkv, D]. `index_select` copies whole rows: for
    32 sequences of 100 keys it took 0.13 ms where `cache[index]` took 0.82 ms (2 threads)."""
    return cache.index_select(0, index.reshape(-1)).view(*index.shape, *cache.shape[1:])


ATTEND_MAX_QUERIES = 8  # a sequence's new queries up to which `attend` serves it (decode, draft chunks);
# it reads the keys once per query, where SDPA's blocks share them
GATHER_MAX_BYTES = 8 * 2**20  # keys (or values) gathered per layer above which a batch is attended in place


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: StepBatch, scale: float, attend=None) -> torch.Tensor:
    """q: [T, nh, D] new tokens; caches: [slots, nkv, D] already holding these tokens' K/V.

    Returns [T, nh * D]. When every sequence's keys sit in consecutive slots (as the block manager
    hands them out), a lone sequence, or on CPU a batch whose padded gather would be large (a GPU
    gathers at its bandwidth, where a call per sequence costs a launch each), is attended
    where its keys lie, one sequence at a time; otherwise the batch's keys are gathered into
    [B, longest] (padded) and attended at once. The gather copies B x longest keys (one long
    context among short ones makes every sequence's copy long) and can slow sharply past a few MiB
    (fresh pages); the loop costs a call per sequence. On the 2-core VM, one layer (8 KV heads of
    64), gathered against in place: 32 sequences of 64 keys 0.36 against 0.76 ms, of 128 keys
    1.16-6.74 (two runs) against 1.32, of 256 keys 3.85 against 2.86; 8 of 256 0.32 against 0.32,
    8 of 1,000 2.53-3.87 against 2.22; 31 of 64 keys beside one of 2,000 94-102 against 1.03.
    `attend` (kernels/cpu_attention.py `attend_native`), where given, attends the in-place path's
    sequences of up to ATTEND_MAX_QUERIES queries (decode, draft chunks) outside a sliding window's reach."""
    large = q.device.type == "cpu" and _gather_bytes(k_cache, batch) > GATHER_MAX_BYTES
    if batch.kv_runs is not None and (batch.num_seqs == 1 or large):
        return _attention_in_place(q, k_cache, v_cache, batch, scale, attend)
    return _attention_gathered(q, k_cache, v_cache, batch, scale)


def _gather_bytes(cache: torch.Tensor, batch: StepBatch) -> int:
    return batch.num_seqs * batch.max_k * cache[0].numel() * cache.element_size()


def _attention_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        batch: StepBatch, scale: float, attend=None) -> torch.Tensor:
    """Each sequence's queries over a view of its keys: no copy of the keys, one call per sequence.
    The view has the gathered copy's layout, so a lone sequence gets the gathered path's bits (tests/
    cluster/test_layers.py). A single query that sees all its keys goes without a mask (adding an
    all-visible mask's zeros changes no bit), and the views are made in one op each: half the
    per-sequence cost (32 sequences of 64 keys: 0.67 instead of 1.18 ms a layer)."""
    nh, d = q.shape[1], q.shape[2]
    out = q.new_empty(q.shape[0], nh * d)
    window, row = batch.sliding_window, 0
    for b, (n, keys, first) in enumerate(zip(batch.q_lens, batch.kv_lens, batch.kv_runs)):
        unwindowed = window is None or keys <= window
        if attend is not None and n <= ATTEND_MAX_QUERIES and unwindowed:
            attend(q[row:row + n], k_cache, v_cache, first, keys, scale, out[row:row + n])
            row += n
            continue
        sees_all = n == 1 and unwindowed
        k, v = (_seq_view(cache, first, keys) for cache in (k_cache, v_cache))  # [1, nkv, keys, D]
        qb = _seq_view(q, row, n)  # [1, nh, n, D]
        mask = None if sees_all else batch.attn_mask[b:b + 1, :, :n, :keys]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[row:row + n] = o.transpose(1, 2).reshape(n, nh * d)
        row += n
    return out


def _seq_view(t: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """Rows first..first+n of t [rows, heads, D] as [1, heads, n, D], without a copy."""
    s0, s1, s2 = t.stride()
    return t.as_strided((1, t.shape[1], n, t.shape[2]), (0, s1, s0, s2), t.storage_offset() + first * s0)


def _attention_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        batch: StepBatch, scale: float) -> torch.Tensor:
    """Sequences padded to [B, Lq] queries x [B, Lk] keys; the mask lets query i of a sequence see
    keys at positions <= its own (and inside the sliding window)."""
    b, lq = batch.num_seqs, batch.max_q
    nh, d = q.shape[1], q.shape[2]
    k, v = (_gather(cache, batch.kv_index).transpose(1, 2) for cache in (k_cache, v_cache))  # [B, nkv, Lk, D]
    if batch.q_padded:
        qp = q.new_zeros(b * lq, nh, d)
        qp[batch.q_dest] = q
        qp = qp.view(b, lq, nh, d)
    else:
        qp = q.view(b, lq, nh, d)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=batch.attn_mask,
                                         scale=scale, enable_gqa=True)  # [B, nh, Lq, D]
    out = out.transpose(1, 2).reshape(b * lq, nh * d)
    return out[batch.q_dest] if batch.q_padded else out


def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, linear=F.linear) -> torch.Tensor:
    """x: [T, H]; gate_up: [2I, H]; down: [H, I] -> [T, H]."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)
