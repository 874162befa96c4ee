"""Continuous-batching scheduler (torch-free).

Every step: running sequences that decode get one token each (with speculative decoding, followed
by draft tokens in slots they hold: cluster/speculative.py), partly prefilled prompts continue, then
waiting requests are admitted first-come-first-served while a sequence slot, the token budget and
KV blocks are available.

KV blocks: a request admitted while blocks for its whole length (prompt + max_tokens) are free
reserves them all, in consecutive blocks where it can (attention then reads its keys in place), and
is never short of cache. When they are not, it is admitted with blocks for its prompt alone, taken
from what is free and from the unused reserved tails of the running sequences (the latest admitted
first), as long as a watermark of free blocks remains; such a sequence, and any whose tail was
taken, grows a block at a time as it decodes. When a growing sequence finds no free block and no
tail to take, the latest admitted sequences are preempted: their blocks are freed and they wait at
the head of the queue, to be recomputed (prompt and output so far) when readmitted. The oldest
request always progresses, since a request that could not fit the whole cache alone is refused.

With prefix caching, a sequence admitted with a prompt whose leading full blocks are cached (on the
attention worker it starts on) shares those blocks and starts computing after them; each block a
sequence completes is registered, until it moves to another worker.
"""

from __future__ import annotations

from collections import deque

from cluster.block_manager import BlockManager
from cluster.prefix_cache import root_of
from cluster.scheduler_config import (AdmissionError, ScheduledChunk, SchedulerConfig,  # noqa: F401
                                      SchedulerOutput)
from cluster.sequence import Sequence, SeqStatus
from cluster.speculative import NgramIndex, draft_limit, next_acceptance, next_pause
from router.shuffle import start_worker


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.prefix_caching)
        self.watermark = max(1, config.num_blocks // 100)  # free blocks a partial admission leaves
        self.num_preemptions = 0
        self.preempted: list[int] = []  # sequences preempted by the last schedule()
        self.prefix_hit_tokens = 0  # prompt tokens whose K/V came from the prefix cache, over all admissions
        self.prefix_query_tokens = 0  # prompt tokens admitted with prefix caching on
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}

    def check_fits(self, num_prompt: int, max_tokens: int) -> None:
        """Raise AdmissionError when a request of this size could never be scheduled."""
        total = num_prompt + max_tokens
        if num_prompt == 0:
            raise AdmissionError("prompt is empty")
        if total > self.config.max_model_len:
            raise AdmissionError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                f"max_model_len {self.config.max_model_len}")
        need = self.blocks.blocks_for(num_prompt + max_tokens - 1)
        if need > self.config.num_blocks:
            raise AdmissionError(
                f"request needs {need} KV blocks; the KV cache has {self.config.num_blocks} in total")

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_ids), seq.max_tokens)
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        self.preempted = []
        for seq in self.running:
            seq.num_drafted = 0
        self._grow()
        decoding = [s for s in self.running if s.num_pending == 1]
        prefilling = [s for s in self.running if s.num_pending > 1]
        for seq in decoding + prefilling:
            budget = self._take(seq, budget, chunks)
        if not self.preempted:  # after a preemption, admitting would only preempt again
            while self.waiting and budget > 0 and self._admit(self.waiting[0]):
                budget = self._take(self.waiting.popleft(), budget, chunks)
        return SchedulerOutput(tuple(chunks))

    # ---- KV blocks -----------------------------------------------------------------------------
    def _admit(self, seq: Sequence) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        caching = self.config.prefix_caching
        hits = self.blocks.cached_prefix(seq.tokens(0, seq.num_tokens), self._root(seq)) \
            if caching and not seq.prompt_logits else []
        shared = [block for block, _ in hits]
        whole = self.blocks.blocks_for(seq.max_len) - len(shared)
        now = self.blocks.blocks_for(seq.num_tokens) - len(shared)  # every token to compute has its slot
        free = self.blocks.num_free - self.blocks.num_evictable(shared)
        if whole <= free:
            fresh = whole
        elif self.config.partial_admission and \
                now + self.watermark <= free + sum(len(self._tail(s)) for s in self.running):
            self._trim_tails(now + self.watermark - free)
            fresh = now
        else:
            return False
        self.blocks.acquire(shared)
        # after a cached prefix, its own blocks right behind it when free: its keys stay consecutive
        fresh_ids = self.blocks.allocate_after(shared[-1], fresh) if shared and fresh else None
        seq.block_ids = shared + (fresh_ids or self.blocks.allocate_blocks(fresh))
        seq.num_cached_blocks, seq.cache_node = len(shared), hits[-1][1] if hits else self._root(seq)
        seq.num_computed = len(shared) * self.config.block_size
        if caching:
            self.prefix_hit_tokens += seq.num_computed
            self.prefix_query_tokens += seq.num_tokens
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return True

    def _root(self, seq: Sequence) -> int:
        """The prefix-cache root of the attention worker the sequence starts on."""
        return root_of(start_worker(seq.seq_id, self.config.attention_workers))

    def _grow(self) -> None:
        """Give each running sequence the blocks its pending tokens need (a decoding one crossing into a
        new block needs one): free ones, else reserved tails, else preempt the latest admitted."""
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:  # preempted to make room for an earlier one
                continue
            need = self.blocks.blocks_for(seq.num_tokens) - len(seq.block_ids)
            if need > 0 and self._make_room(need, seq):
                seq.block_ids += self.blocks.allocate_after(seq.block_ids[-1], need)

    def _make_room(self, n: int, seq: Sequence) -> bool:
        """At least n free blocks for `seq`; False when `seq` itself had to be preempted."""
        self._trim_tails(n - self.blocks.num_free)
        while self.blocks.num_free < n:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _tail(self, seq: Sequence) -> list[int]:
        """The blocks reserved past the sequence's last token and the step's drafts: no K/V yet, so they
        can be taken back."""
        return seq.block_ids[self.blocks.blocks_for(seq.num_tokens + seq.num_drafted):]

    def _trim_tails(self, n: int) -> None:
        """Free n blocks (if n > 0) from the reserved tails of running sequences, the latest admitted first."""
        for seq in reversed(self.running):
            if n <= 0:
                return
            give = self._tail(seq)[-n:]
            if give:
                del seq.block_ids[len(seq.block_ids) - len(give):]
                self.blocks.free(give)
                n -= len(give)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first, to recompute its prompt and output so far."""
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = seq.num_cached_blocks = 0
        seq.cache_node = self._root(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self.preempted.append(seq.seq_id)

    def _take(self, seq: Sequence, budget: int, chunks: list[ScheduledChunk]) -> int:
        n = min(seq.num_pending, budget)
        if n <= 0:
            return budget
        start = seq.num_computed
        prompt_from, targets = self._prompt_targets(seq, start, n) if seq.prompt_logits else (0, ())
        drafts = self._drafts(seq, budget - n) if seq.speculate and seq.num_pending == 1 else ()
        seq.num_drafted = len(drafts)
        chunks.append(ScheduledChunk(seq.seq_id, tuple(seq.tokens(start, start + n)) + drafts, start,
                                     tuple(seq.block_ids), start + n == seq.num_tokens, prompt_from, targets,
                                     len(drafts)))
        if self.config.prefix_caching and self.config.share_within_step:
            self._register_blocks(seq, start + n)
        return budget - n - len(drafts)

    def _drafts(self, seq: Sequence, budget: int) -> tuple[int, ...]:
        """Draft tokens for a decoding sequence: within the token budget, the slots it holds, and its
        max_tokens (the step adds one token beyond the drafts it keeps)."""
        spec = self.config.speculative
        left, last = seq.draft_pause
        if left:  # its recent drafts missed, or were unlikely to be kept (speculative.next_pause)
            seq.draft_pause = (left - 1, last)
            return ()
        k = draft_limit(seq.draft_counts, spec.num_speculative_tokens, spec.min_keep_chance)
        if not k and not last:  # not worth a row: pause as after a miss
            seq.draft_pause = next_pause(seq.draft_pause, 1, 0)
            return ()
        room = len(seq.block_ids) * self.config.block_size - seq.num_tokens
        k = min(max(k, 1), budget, room, seq.max_tokens - len(seq.output_ids) - 1)  # 1 ends a pause
        if k <= 0:
            return ()
        if seq.ngrams is None:
            seq.ngrams = NgramIndex(spec.prompt_lookup_max, spec.prompt_lookup_min)
        seq.ngrams.extend(seq.tokens(len(seq.ngrams.tokens), seq.num_tokens))
        return seq.ngrams.propose(k)

    @staticmethod
    def _prompt_targets(seq: Sequence, start: int, n: int) -> tuple[int, tuple[int, ...]]:
        """The prompt tokens a chunk of positions start..start+n-1 scores (the one after each row),
        skipping those a finished step has scored (a recomputed sequence); -> (first row, tokens)."""
        lo = max(start + 1, seq.num_prompt_scored + 1)
        hi = min(start + n, len(seq.prompt_ids) - 1)
        if lo > hi:
            return 0, ()
        return lo - 1 - start, tuple(seq.prompt_ids[lo:hi + 1])

    def update(self, output: SchedulerOutput, sampled: dict[int, int],
               accepted: dict[int, tuple[int, ...]] | None = None) -> None:
        """Advance computed counts and append each sampled token (seq_id -> token), after the drafts
        the step kept (`accepted`: seq_id -> those drafts, whose K/V is then valid)."""
        for chunk in output.chunks:
            seq = self.seqs.get(chunk.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            kept = accepted.get(chunk.seq_id, ()) if accepted else ()
            seq.draft_pause = next_pause(seq.draft_pause, chunk.num_draft, len(kept))
            seq.draft_counts = next_acceptance(seq.draft_counts, chunk.num_draft, len(kept))
            seq.num_computed = chunk.start + len(chunk.token_ids) - chunk.num_draft + len(kept)
            seq.output_ids.extend(kept)
            if chunk.prompt_targets:  # scored now; a step that failed scores them again when recomputed
                seq.num_prompt_scored = chunk.start + chunk.prompt_from + len(chunk.prompt_targets)
            if chunk.seq_id in sampled:
                seq.output_ids.append(sampled[chunk.seq_id])
            if self.config.prefix_caching:
                self._register_blocks(seq, seq.num_computed)

    def stop_caching(self, seq_id: int) -> None:
        """The sequence's K/V moved to another attention worker (request shuffling): the blocks it
        completes from now on lie there, not on the worker whose cached blocks it continues, so they
        are not registered. The blocks registered before stay valid where they were computed."""
        seq = self.seqs.get(seq_id)
        if seq is not None:
            seq.cache_node = None

    def _register_blocks(self, seq: Sequence, computed: int) -> None:
        """Register with the prefix cache the blocks whose K/V the sequence's first `computed` tokens fill."""
        if seq.cache_node is None:
            return
        bs = self.config.block_size
        while (seq.num_cached_blocks + 1) * bs <= computed:
            i = seq.num_cached_blocks
            tokens = tuple(seq.tokens(i * bs, (i + 1) * bs))
            seq.cache_node = self.blocks.register(seq.block_ids[i], seq.cache_node, tokens)
            seq.num_cached_blocks += 1

    def discard_step(self) -> None:
        """The step failed: blocks registered for it may hold no K/V, so the prefix cache starts empty."""
        self.blocks.clear_cache()

    def recompute_running(self) -> None:
        """Forget every running sequence's cached K/V (its cache was lost): the next steps
        prefill prompt + output so far again, into the blocks it already holds. The prefix cache,
        whose blocks were lost too, starts empty."""
        self.blocks.clear_cache()
        for seq in self.running:
            seq.num_computed = seq.num_cached_blocks = 0
            seq.cache_node = self._root(seq)

    def finish(self, seq_id: int, reason: str) -> Sequence | None:
        """Finish (or abort) a sequence wherever it is, freeing its blocks; None if unknown."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.block_ids)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        return seq
