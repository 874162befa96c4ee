"""Per-request token state, shared by the scheduler and the engine (torch-free)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.speculative import NgramIndex


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Invariant: tokens [0, num_computed) have their K/V in the cache blocks `block_ids`."""

    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    prompt_logits: bool = False  # score every prompt token (prompt logprobs): no prefix-cache hits
    speculate: bool = False  # decode steps may carry draft tokens (cluster/speculative.py)
    num_drafted: int = 0  # draft tokens in the step being scheduled: their slots are in use
    draft_pause: tuple[int, int] = (0, 0)  # (decode steps left without drafts, the last pause): speculative.py
    draft_counts: tuple[float, float] = (0.0, 0.0)  # its drafts (kept, missed), decayed: speculative.py
    ngrams: NgramIndex | None = None  # its tokens' n-grams for draft proposals, built at its first draft
    num_prompt_scored: int = 0  # prompt positions 1..this already scored (by a step that finished)
    num_cached_blocks: int = 0  # leading blocks matched in or registered with the prefix cache
    cache_node: int | None = 0  # the prefix cache's node of the last of them (or its worker's root:
    # prefix_cache.root_of); None: it registers no more blocks (its K/V moved to another worker)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Tokens whose K/V may ever be cached: the prompt plus all but the last output token."""
        return len(self.prompt_ids) + max(self.max_tokens - 1, 0)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    def token(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        return [self.token(p) for p in range(start, end)]
