"""The torch-free continuous-batching scheduler and KV block accounting."""

from __future__ import annotations

import sys

import pytest

from cluster.scheduler import AdmissionError, Scheduler, SchedulerConfig
from cluster.sequence import Sequence, SeqStatus


def make(max_num_seqs=4, budget=64, block_size=4, num_blocks=16, max_model_len=64):
    return Scheduler(SchedulerConfig(max_num_seqs, budget, block_size, num_blocks, max_model_len))


def seq(i, n_prompt, max_tokens):
    return Sequence(i, list(range(1, n_prompt + 1)), max_tokens)


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    s.update(out, {c.seq_id: token for c in out.chunks if c.sample})
    return out


def test_scheduler_imports_neither_torch_nor_ray():
    import subprocess
    code = ("import cluster.scheduler, cluster.detokenizer, cluster.prefix_cache, router.shuffle, sys; "
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_new_requests_join_while_others_decode():
    s = make()
    s.add(seq(0, 5, 4))
    first = run_step(s)
    assert [(c.seq_id, c.start, len(c.token_ids), c.sample) for c in first.chunks] == [(0, 0, 5, True)]
    s.add(seq(1, 3, 4))
    second = run_step(s)
    assert [(c.seq_id, c.start, len(c.token_ids)) for c in second.chunks] == [(0, 5, 1), (1, 0, 3)]
    assert second.chunks[0].token_ids == (7,)  # the token sampled in step 1


def test_chunked_prefill_respects_token_budget():
    s = make(budget=4)
    s.add(seq(0, 10, 2))
    chunks = [run_step(s).chunks[0] for _ in range(3)]
    assert [(c.start, len(c.token_ids), c.sample) for c in chunks] == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert s.seqs[0].output_ids == [7]


def test_admission_waits_for_blocks_and_slots():
    s = make(max_num_seqs=2, block_size=4, num_blocks=4)
    s.add(seq(0, 4, 5))  # reserves ceil(8 / 4) = 2 blocks
    s.add(seq(1, 4, 5))
    s.add(seq(2, 1, 1))
    run_step(s)
    assert [q.seq_id for q in s.running] == [0, 1] and s.blocks.num_free == 0
    s.finish(0, "stop")
    assert s.blocks.num_free == 2
    run_step(s)
    assert [q.seq_id for q in s.running] == [1, 2]


def test_requests_that_can_never_fit_are_rejected():
    s = make(num_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(AdmissionError, match="needs 3 KV blocks; the KV cache has 2"):
        s.add(seq(0, 8, 2))
    with pytest.raises(AdmissionError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70 exceeds max_model_len 64"):
        s.add(seq(1, 60, 10))
    with pytest.raises(AdmissionError, match="prompt is empty"):
        s.add(seq(2, 0, 1))
    assert not s.has_unfinished()


def test_finish_frees_blocks_and_abort_of_waiting():
    s = make(max_num_seqs=1)
    s.add(seq(0, 3, 3))
    s.add(seq(1, 3, 3))
    run_step(s)
    assert s.finish(1, "abort").status is SeqStatus.FINISHED  # still waiting
    assert s.finish(0, "length").finish_reason == "length"
    assert s.blocks.num_free == 16 and not s.has_unfinished()
    assert s.finish(0, "stop") is None


def test_decode_never_runs_out_of_reserved_blocks():
    s = make(block_size=2, num_blocks=8)
    s.add(seq(0, 3, 6))
    for _ in range(6):
        out = run_step(s)
        c = out.chunks[0]
        assert c.start + len(c.token_ids) <= len(c.block_ids) * 2


def test_blocks_are_handed_out_as_the_lowest_long_enough_run_when_there_is_one():
    from cluster.block_manager import BlockManager

    blocks = BlockManager(10, 4)
    a, b, c = blocks.allocate_blocks(2), blocks.allocate_blocks(3), blocks.allocate_blocks(1)
    assert (a, b, c) == ([0, 1], [2, 3, 4], [5])
    blocks.free(a)
    blocks.free(c)  # free: 0, 1, 5, 6, 7, 8, 9
    assert blocks.allocate_blocks(3) == [5, 6, 7]  # 0-1 is too short; 5-9 is the lowest run that fits
    assert blocks.allocate_blocks(1) == [0]
    assert blocks.allocate_blocks(3) == [1, 8, 9]  # no run of 3 is left: the lowest free blocks
    assert blocks.num_free == 0
    with pytest.raises(RuntimeError, match="need 1 blocks, 0 free"):
        blocks.allocate_blocks(1)
    blocks.free(b)
    with pytest.raises(RuntimeError, match="freed twice"):
        blocks.free([2])
    assert blocks.num_free == 3 and blocks.blocks_for(12) == 3 and blocks.blocks_for(13) == 4


def _drive(s: Scheduler) -> tuple[int, dict[int, list[int]], dict[int, list[tuple[int, int]]]]:
    """Run to completion, finishing each sequence at max_tokens, checking the block accounting at every
    step; -> (the most sequences running at once, each one's output, each one's chunks (start, length))."""
    most, done, chunks = 0, {}, {}
    while s.has_unfinished():
        out = run_step(s)
        most = max(most, len(s.running))
        for c in out.chunks:  # every chunk's positions have their slots
            assert c.start + len(c.token_ids) <= len(c.block_ids) * s.config.block_size
            chunks.setdefault(c.seq_id, []).append((c.start, len(c.token_ids)))
        held = [b for q in s.running for b in q.block_ids]
        assert len(held) == len(set(held)) and len(held) + s.blocks.num_free == s.config.num_blocks
        for q in list(s.running):
            if len(q.output_ids) >= q.max_tokens:
                done[q.seq_id] = list(q.output_ids)
                s.finish(q.seq_id, "length")
    return most, done, chunks


def test_without_room_for_whole_reservations_requests_share_the_cache_and_grow():
    s = make(block_size=4, num_blocks=8, max_model_len=32)  # watermark: 1 block
    s.add(seq(0, 4, 12))  # 15 tokens: 4 blocks, reserved whole
    s.add(seq(1, 4, 12))  # 4 more: the cache is full
    s.add(seq(2, 4, 12))  # no room for 4: admitted with 1 block, taking 2 from 1's unused tail (1 stays free)
    run_step(s)
    assert [len(q.block_ids) for q in s.running] == [4, 2, 1] and s.blocks.num_free == 1
    most, done, _ = _drive(s)
    assert most == 3 and done == {i: [7] * 12 for i in range(3)}
    whole = Scheduler(SchedulerConfig(4, 64, 4, 8, 32, partial_admission=False))
    for i in range(3):
        whole.add(seq(i, 4, 12))
    most, done, _ = _drive(whole)
    assert most == 2 and done == {i: [7] * 12 for i in range(3)} and whole.num_preemptions == 0


def test_preempted_requests_are_recomputed_with_their_output_and_finish():
    s = make(block_size=4, num_blocks=8, max_model_len=32)
    for i in range(3):
        s.add(seq(i, 4, 20))  # 23 tokens: 6 blocks each, three of them in 8 blocks
    _, done, chunks = _drive(s)
    assert s.num_preemptions > 0 and done == {i: [7] * 20 for i in range(3)}
    restarts = {i: [n for start, n in c if start == 0][1:] for i, c in chunks.items()}
    assert any(restarts.values())  # a preempted sequence started again at position 0 ...
    assert all(n > 4 for r in restarts.values() for n in r)  # ... with its output so far, not only its prompt
    assert 0 not in {i for i, r in restarts.items() if r}  # the oldest request is never preempted


def test_prompt_scores_of_a_failed_step_are_scheduled_again_and_finished_ones_never():
    s = make(budget=4)
    s.add(Sequence(0, list(range(1, 11)), 3, prompt_logits=True))
    first = run_step(s).chunks[0]
    assert (first.prompt_from, first.prompt_targets) == (0, (2, 3, 4, 5))  # rows 0-3 score tokens 2-5
    failed = s.schedule().chunks[0]  # the step fails before update: the cluster recovers, all is recomputed
    assert failed.prompt_targets == (6, 7, 8, 9)
    s.recompute_running()
    redo = [run_step(s).chunks[0] for _ in range(3)]  # positions 0-3 (scored), 4-7, 8-9
    assert [(c.start, c.prompt_from, c.prompt_targets) for c in redo] == [(0, 0, ()), (4, 0, (6, 7, 8, 9)),
                                                                         (8, 0, (10,))]
