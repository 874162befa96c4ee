"""Speculative decoding by prompt lookup (n-gram drafts), torch-free.

A decoding sequence gets up to K draft tokens per step: the tokens that followed the latest earlier
occurrence of its last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) in its
prompt and output. The step runs the last token and the drafts as one chunk, which yields the
model's token after each of them, picked as decoding picks it (greedy, or drawn with the request's
uniform for that output position: cluster/sampler.py `TokenRandom`); the drafts are kept up to the
first one that differs from the model's, and the model's token at that point is added (so a step
yields 1 to K + 1 tokens). Each kept token is therefore the token decoding without drafts would
have produced at its position: the greedy output, and a seeded request's sampled output, are the
same with or without speculation. (For a sampled request this is rejection sampling against a
draft that proposes a single token: a draft is kept with the model's probability of it, and on a
miss the token drawn is distributed as the model's distribution without the draft.) The K/V
written for the dropped drafts lies beyond the sequence's computed positions and is overwritten by
the next step. The logit adjustments that depend on the output so far (penalties, min_tokens) see,
at a draft's row, the drafts before it (`row_outputs`), so each row's token is the one decoding
would have picked there. A step whose drafts are all dropped costs more than a plain decode step
and gives no more, so a sequence whose drafts miss pauses drafting (`next_pause`): 1 step after a
miss, doubling with each miss in a row up to MAX_PAUSE, back to none after a step keeps a draft.
And each draft costs a row of the step (in a MoE model, its own experts too), so a sequence drafts
only as many tokens as are likely to be kept (`draft_limit`): with its drafts kept at an estimated
rate a each (`next_acceptance`), the i-th draft is proposed while a^i, the chance that it and every
draft before it are kept, is at least `min_keep_chance`. Where not even one qualifies, the sequence
pauses as after a miss, and the step that ends a pause proposes one draft whatever the estimate, so
the estimate follows the sequence. A greedy request that repeats itself keeps drafting K tokens; a
sampled one, whose drafts the model seldom draws, one now and then (the demo model at temperature
0.7 kept 7% of 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    num_speculative_tokens: int = 0  # draft tokens per step at most; 0: no speculation
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up
    prompt_lookup_min: int = 2  # shortest
    min_keep_chance: float = 0.3  # a draft is proposed while the chance it and those before it are kept is >= this

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if not 0.0 <= self.min_keep_chance < 1.0:
            raise ValueError(f"min_keep_chance must be in [0, 1), got {self.min_keep_chance}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} "
                             f"and {self.prompt_lookup_max}")


def propose(tokens: Seq[int], k: int, max_n: int, min_n: int) -> tuple[int, ...]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram of
    `tokens` (max_n >= n >= min_n); () when no such n-gram occurs earlier."""
    if k <= 0 or len(tokens) <= min_n:
        return ()
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = arr[size - n:]
        match = arr[:size - n] == suffix[0]  # [size - n] candidate starts, each followed by a token
        for j in range(1, n):
            match &= arr[j:size - n + j] == suffix[j]
        found = np.flatnonzero(match)
        if found.size:
            start = int(found[-1]) + n
            return tuple(int(t) for t in arr[start:start + k])
    return ()


class NgramIndex:
    """`propose` kept up as a sequence grows: the latest start of every n-gram (min_n <= n <= max_n)
    that has a token after it, so a proposal costs O(max_n) instead of a pass over the whole context
    (`propose` took 17 us at 150 tokens and grows with the context). Tokens are only ever appended."""

    __slots__ = ("max_n", "min_n", "tokens", "latest")

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start with a token after it

    def extend(self, tokens: Seq[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the new token's position: the n-grams ending just before it now have one after
            self.tokens.append(token)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.latest[tuple(self.tokens[end - n:end])] = end - n

    def propose(self, k: int) -> tuple[int, ...]:
        """What `propose(tokens, k, max_n, min_n)` gives for the tokens so far."""
        size = len(self.tokens)
        if k <= 0 or size <= self.min_n:
            return ()
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            start = self.latest.get(tuple(self.tokens[size - n:]))
            if start is not None:
                return tuple(self.tokens[start + n:start + n + k])
        return ()


def accept(drafts: Seq[int], targets: Seq[int]) -> list[int]:
    """The step's new tokens: the drafts up to the first that differs from the model's token at its
    row (targets[i]: the model's token after the chunk's row i), then the model's token there."""
    kept = 0
    while kept < len(drafts) and drafts[kept] == targets[kept]:
        kept += 1
    return list(drafts[:kept]) + [targets[kept]]


MAX_PAUSE = 16  # decode steps without drafts after several misses in a row at most


def next_pause(pause: tuple[int, int], drafted: int, kept: int) -> tuple[int, int]:
    """A sequence's draft pause (steps left, last pause) after a step that drafted `drafted` tokens
    and kept `kept` of them: a miss pauses drafting for twice the last pause (1 at first, at most
    MAX_PAUSE), a kept draft ends the pausing."""
    if not drafted:
        return pause
    if kept:
        return 0, 0
    length = min(max(1, 2 * pause[1]), MAX_PAUSE)
    return length, length


ACCEPT_DECAY = 0.8  # weight of the past in a sequence's acceptance estimate, per step that drafted


def next_acceptance(counts: tuple[float, float], drafted: int, kept: int) -> tuple[float, float]:
    """A sequence's (kept, missed) draft counts, each decayed by ACCEPT_DECAY per step that drafted,
    after a step that drafted `drafted` tokens and kept `kept`: the drafts are kept in turn until the
    first miss, so a step adds `kept` keeps and one miss unless it kept them all; kept / (kept +
    missed) is then the decayed estimate of the chance that a draft is kept, given those before it."""
    if not drafted:
        return counts
    return ACCEPT_DECAY * counts[0] + kept, ACCEPT_DECAY * counts[1] + (kept < drafted)


def draft_limit(counts: tuple[float, float], k: int, min_keep_chance: float) -> int:
    """How many drafts (0..k) to propose at an estimated keep rate a = kept / (kept + missed): the
    i-th while a^i >= min_keep_chance; k before any draft has been judged."""
    seen = counts[0] + counts[1]
    if k <= 0 or not seen:
        return max(k, 0)
    rate, chain, n = counts[0] / seen, 1.0, 0
    while n < k and chain * rate >= min_keep_chance:
        chain, n = chain * rate, n + 1
    return n


def draft_tokens(chunks) -> dict[int, tuple[int, ...]]:
    """seq_id -> the drafts of its chunk, for the chunks that carry drafts (ScheduledChunk)."""
    return {c.seq_id: c.token_ids[len(c.token_ids) - c.num_draft:] for c in chunks if c.num_draft}


def row_outputs(seq_ids: Seq[int], outputs: Seq[Seq[int]],
                drafts: dict[int, tuple[int, ...]]) -> list[Seq[int]]:
    """For each logits row (seq_ids[i], its sequence's output so far outputs[i]; a draft chunk's rows
    are consecutive): the output as it stands at that row, with the drafts before the row."""
    rows, prev, i = [], None, 0
    for sid, output in zip(seq_ids, outputs):
        i = i + 1 if sid == prev else 0
        prev = sid
        rows.append([*output, *drafts[sid][:i]] if i else output)
    return rows
