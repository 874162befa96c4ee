"""StepBatch: the tensors one engine step needs, built once from the scheduler's output."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cluster.block_manager import context_slots
from cluster.scheduler_config import SchedulerOutput


@dataclass(slots=True)
class StepBatch:
    """T new tokens of B sequences, padded to [B, max_q] queries over [B, max_k] cached keys.

    `kv_index` and `attn_mask`, which grow with the context, are built on first use: a lone
    sequence's decode step, attended where its keys lie, never reads them (at batch 1 they were
    half of the 50 us a batch took to build)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot each new token is written to
    q_dest: torch.Tensor  # [T] int64: row of each token in the padded [B * max_q] layout
    q_padded: bool  # False when every sequence has exactly max_q new tokens
    num_seqs: int
    max_q: int
    logit_rows: torch.Tensor  # [S] int64: rows of T whose next token is sampled (a draft chunk: its last num_draft + 1)
    sample_seq_ids: tuple[int, ...]  # [S] the sequence of each of those rows
    q_lens: tuple[int, ...] = ()  # [B] new tokens of each sequence (its rows of T, in order)
    kv_lens: tuple[int, ...] = ()  # [B] keys of each sequence (its context, new tokens included)
    kv_runs: tuple[int, ...] | None = None  # [B] each sequence's first slot, when every sequence's
    # keys sit in consecutive slots (attention can then read them in place)
    sliding_window: int | None = None  # the model's, which attn_mask applies
    prompt_rows: torch.Tensor | None = None  # [P] int64: rows of T that score the prompt token after them
    prompt_targets: torch.Tensor | None = None  # [P] int64: those tokens
    block_ids: tuple[tuple[int, ...], ...] = ()  # [B] each sequence's KV blocks (for kv_index)
    block_size: int = 1
    device: torch.device = torch.device("cpu")
    _kv_index: torch.Tensor | None = None
    _attn_mask: torch.Tensor | None = None

    @property
    def max_k(self) -> int:
        return max(self.kv_lens)

    @property
    def kv_index(self) -> torch.Tensor:
        """[B, max_k] int64: flat KV slot of each key (padding -> slot 0)."""
        if self._kv_index is None:
            kv = np.zeros((self.num_seqs, self.max_k), dtype=np.int64)
            for b, (blocks, keys) in enumerate(zip(self.block_ids, self.kv_lens)):
                kv[b, :keys] = context_slots(blocks, keys, self.block_size)
            self._kv_index = torch.from_numpy(kv).to(self.device)
        return self._kv_index

    @property
    def attn_mask(self) -> torch.Tensor:
        """[B, 1, max_q, max_k] bool: key j visible to a query at position p iff j <= p (within the window)."""
        if self._attn_mask is None:
            qpos = np.zeros((self.num_seqs, self.max_q), dtype=np.int64)
            for b, (n, keys) in enumerate(zip(self.q_lens, self.kv_lens)):
                qpos[b, :n] = np.arange(keys - n, keys)
            self._attn_mask = _mask(torch.from_numpy(qpos), self.max_k, self.sliding_window).to(self.device)
        return self._attn_mask

    def to(self, device: torch.device) -> "StepBatch":
        """The same batch with its tensors on `device` (itself when they are there already)."""
        if self.input_ids.device == device:
            return self
        moved = {f: getattr(self, f).to(device) for f in ("input_ids", "positions", "slot_mapping", "q_dest",
                                                          "logit_rows", "prompt_rows", "prompt_targets",
                                                          "_kv_index", "_attn_mask") if getattr(self, f) is not None}
        return replace(self, device=device, **moved)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of `values` (through numpy: a third of torch.tensor's cost on a short list)."""
    t = torch.from_numpy(np.array(values, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device)


def build_batch(out: SchedulerOutput, block_size: int, sliding_window: int | None,
                device: torch.device) -> StepBatch:
    chunks = out.chunks
    lens = [len(c.token_ids) for c in chunks]
    max_q = max(lens)
    ids, pos, slots, dest, rows, seq_ids, prompt_rows, targets = [], [], [], [], [], [], [], []
    for b, (c, n) in enumerate(zip(chunks, lens)):
        first = len(ids) + c.prompt_from
        prompt_rows.extend(range(first, first + len(c.prompt_targets)))
        targets.extend(c.prompt_targets)
        ids.extend(c.token_ids)
        pos.extend(range(c.start, c.start + n))
        slots.extend(c.block_ids[p // block_size] * block_size + p % block_size for p in range(c.start, c.start + n))
        dest.extend(range(b * max_q, b * max_q + n))
        if c.sample:  # the last row, and each draft's row before it
            rows.extend(range(len(ids) - 1 - c.num_draft, len(ids)))
            seq_ids.extend([c.seq_id] * (c.num_draft + 1))
    kv_lens = tuple(c.start + n for c, n in zip(chunks, lens))
    consecutive = all(_consecutive(c.block_ids[:-(-n // block_size)]) for c, n in zip(chunks, kv_lens))
    return StepBatch(
        input_ids=_ints(ids, device), positions=_ints(pos, device), slot_mapping=_ints(slots, device),
        q_dest=_ints(dest, device), q_padded=any(n != max_q for n in lens), num_seqs=len(chunks), max_q=max_q,
        logit_rows=_ints(rows, device), sample_seq_ids=tuple(seq_ids), q_lens=tuple(lens), kv_lens=kv_lens,
        kv_runs=tuple(c.block_ids[0] * block_size for c in chunks) if consecutive else None,
        sliding_window=sliding_window,
        prompt_rows=_ints(prompt_rows, device) if prompt_rows else None,
        prompt_targets=_ints(targets, device) if prompt_rows else None,
        block_ids=tuple(c.block_ids for c in chunks), block_size=block_size, device=device)


def _consecutive(blocks: tuple[int, ...]) -> bool:
    return all(b - a == 1 for a, b in zip(blocks, blocks[1:]))


def _mask(qpos: torch.Tensor, max_k: int, window: int | None) -> torch.Tensor:
    """qpos: [B, max_q] -> [B, 1, max_q, max_k]: key j visible to a query at p iff j <= p (within window)."""
    keys = torch.arange(max_k)[None, None, :]
    visible = keys <= qpos[:, :, None]
    if window:
        visible &= keys > qpos[:, :, None] - window
    return visible[:, None]
