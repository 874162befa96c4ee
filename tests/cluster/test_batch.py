"""build_batch: the tensors of one step, against a layout worked out by hand (3 sequences, block size 4)."""

from __future__ import annotations

import torch

from cluster.batch import build_batch
from cluster.scheduler_config import ScheduledChunk, SchedulerOutput


def _batch(window=None, second=(9, 10)):
    chunks = (ScheduledChunk(0, (7,), 5, (3, 4), True),  # decode at position 5: slots 12..17
              ScheduledChunk(1, (8, 9, 10), 2, second, True, num_draft=2),  # a token and 2 drafts at 2..4
              ScheduledChunk(2, (11, 12), 0, (6,), False, prompt_from=0, prompt_targets=(12,)))  # a prompt's start
    return build_batch(SchedulerOutput(chunks), 4, window, torch.device("cpu"))


def test_rows_slots_and_samples():
    b = _batch()
    assert b.input_ids.tolist() == [7, 8, 9, 10, 11, 12]
    assert b.positions.tolist() == [5, 2, 3, 4, 0, 1]
    assert b.slot_mapping.tolist() == [17, 38, 39, 40, 24, 25]  # block of the position * 4 + offset
    assert b.q_lens == (1, 3, 2) and b.kv_lens == (6, 5, 2) and b.max_q == 3 and b.max_k == 6 and b.q_padded
    assert b.q_dest.tolist() == [0, 3, 4, 5, 6, 7]
    assert b.logit_rows.tolist() == [0, 1, 2, 3] and b.sample_seq_ids == (0, 1, 1, 1)
    assert b.prompt_rows.tolist() == [4] and b.prompt_targets.tolist() == [12]
    assert b.kv_runs == (12, 36, 24)  # every sequence's blocks are consecutive: their first slots
    assert _batch(second=(9, 2)).kv_runs is None  # one is not: attention gathers


def test_keys_and_mask_are_built_on_first_use():
    b = _batch()
    assert b._kv_index is None and b._attn_mask is None
    assert b.kv_index.tolist() == [[12, 13, 14, 15, 16, 17], [36, 37, 38, 39, 40, 0], [24, 25, 0, 0, 0, 0]]
    assert b.kv_index is b.kv_index  # built once
    want = torch.zeros(3, 3, 6, dtype=torch.bool)  # query at position p sees keys 0..p
    want[:, :, 0] = True  # padding rows stand at position 0
    for s, positions in enumerate([[5], [2, 3, 4], [0, 1]]):
        for q, p in enumerate(positions):
            want[s, q, :p + 1] = True
    assert b.attn_mask.shape == (3, 1, 3, 6) and torch.equal(b.attn_mask[:, 0], want)
    windowed = _batch(window=2)  # and within the last 2 positions
    assert windowed.attn_mask[0, 0, 0].tolist() == [False, False, False, False, True, True]
    assert windowed.attn_mask[1, 0, 2].tolist() == [False, False, False, True, True, False]
