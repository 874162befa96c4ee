"""The scheduler's settings and what it hands the model each step (torch-free; cluster/scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.speculative import SpeculativeConfig


class AdmissionError(ValueError):
    """A request can never fit the engine's limits (context length or KV-cache budget)."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_blocks: int = 512
    max_model_len: int = 2048
    prefix_caching: bool = False
    # Register a block when the step that computes it is scheduled, so that requests admitted in the
    # same step share it: right when one forward pass writes every layer's K/V before attending (the
    # in-process model), not when a step runs as micro-batches, one attending before another writes.
    share_within_step: bool = False
    # False: a request waits until blocks for its whole length are free (never preempted; fewer run)
    partial_admission: bool = True
    # Attention workers, each with its own prefix cache: a sequence matches and registers blocks only
    # on the worker it starts on (router.shuffle.start_worker), which holds their K/V.
    attention_workers: int = 1
    speculative: SpeculativeConfig = SpeculativeConfig()  # draft tokens for sequences that allow them

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks", "max_model_len",
                     "attention_workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Run `token_ids` at positions start.. of `seq_id`; sample the next token when `sample`. With
    `prompt_targets`, rows prompt_from.. of the chunk also score the prompt tokens that follow them.
    The last `num_draft` tokens are drafts (cluster/speculative.py): each of the last num_draft + 1
    rows gives the token after it."""

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    block_ids: tuple[int, ...]
    sample: bool
    prompt_from: int = 0
    prompt_targets: tuple[int, ...] = ()
    num_draft: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
