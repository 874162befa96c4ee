"""StepBatch: the tensors one engine step needs, built once from the scheduler's output."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from cluster.block_manager import context_slots
from cluster.scheduler_config import SchedulerOutput


@dataclass(slots=True)
class StepBatch:
    """T new tokens of B sequences, padded to [B, max_q] queries over [B, max_k] cached keys."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot each new token is written to
    kv_index: torch.Tensor  # [B, max_k] int64: flat KV slot of each key (padding -> slot 0)
    attn_mask: torch.Tensor  # [B, 1, max_q, max_k] bool
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

    def to(self, device: torch.device) -> "StepBatch":
        """The same batch with its tensors on `device` (itself when they are there already)."""
        if self.input_ids.device == device:
            return self
        moved = {f: getattr(self, f).to(device) for f in ("input_ids", "positions", "slot_mapping", "kv_index",
                                                          "attn_mask", "q_dest", "logit_rows", "prompt_rows",
                                                          "prompt_targets") if getattr(self, f) is not None}
        return replace(self, **moved)


def build_batch(out: SchedulerOutput, block_size: int, sliding_window: int | None,
                device: torch.device) -> StepBatch:
    chunks = out.chunks
    lens = [len(c.token_ids) for c in chunks]
    max_q, max_k = max(lens), max(c.start + n for c, n in zip(chunks, lens))
    ids, pos, dest, qpos, rows, seq_ids, prompt_rows, targets = [], [], [], [], [], [], [], []
    kv = np.zeros((len(chunks), max_k), dtype=np.int64)  # padding keys read slot 0
    for b, (c, n) in enumerate(zip(chunks, lens)):
        first = len(ids) + c.prompt_from
        prompt_rows.extend(range(first, first + len(c.prompt_targets)))
        targets.extend(c.prompt_targets)
        ids.extend(c.token_ids)
        pos.extend(range(c.start, c.start + n))
        dest.extend(range(b * max_q, b * max_q + n))
        kv[b, :c.start + n] = context_slots(c.block_ids, c.start + n, block_size)
        qpos.append(list(range(c.start, c.start + n)) + [0] * (max_q - n))
        if c.sample:  # the last row, and each draft's row before it
            rows.extend(range(len(ids) - 1 - c.num_draft, len(ids)))
            seq_ids.extend([c.seq_id] * (c.num_draft + 1))
    kv_lens = [c.start + n for c, n in zip(chunks, lens)]
    consecutive = all(_consecutive(c.block_ids[:-(-n // block_size)]) for c, n in zip(chunks, kv_lens))
    kv_t = torch.from_numpy(kv)
    positions = torch.tensor(pos, dtype=torch.int64)
    slot_mapping = kv_t.view(-1)[torch.tensor(dest, dtype=torch.int64) // max_q * max_k + positions]
    mask = _mask(torch.tensor(qpos, dtype=torch.int64), max_k, sliding_window)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=positions.to(device), slot_mapping=slot_mapping.to(device),
        kv_index=kv_t.to(device), attn_mask=mask.to(device),
        q_dest=torch.tensor(dest, dtype=torch.int64, device=device),
        q_padded=any(n != max_q for n in lens), num_seqs=len(chunks), max_q=max_q,
        logit_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        sample_seq_ids=tuple(seq_ids), q_lens=tuple(lens), kv_lens=tuple(kv_lens),
        kv_runs=tuple(int(kv[b, 0]) for b in range(len(chunks))) if consecutive else None,
        sliding_window=sliding_window,
        prompt_rows=torch.tensor(prompt_rows, dtype=torch.int64, device=device) if prompt_rows else None,
        prompt_targets=torch.tensor(targets, dtype=torch.int64, device=device) if prompt_rows else None)


def _consecutive(blocks: tuple[int, ...]) -> bool:
    return all(b - a == 1 for a, b in zip(blocks, blocks[1:]))


def _mask(qpos: torch.Tensor, max_k: int, window: int | None) -> torch.Tensor:
    """qpos: [B, max_q] -> [B, 1, max_q, max_k]: key j visible to a query at p iff j <= p (within window)."""
    keys = torch.arange(max_k)[None, None, :]
    visible = keys <= qpos[:, :, None]
    if window:
        visible &= keys > qpos[:, :, None] - window
    return visible[:, None]
