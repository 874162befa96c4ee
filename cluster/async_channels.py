"""What passes between AsyncLLMEngine's consumers (asyncio loops) and its engine thread: the commands
on the engine's inbox, each request's stream back, and how outputs waiting in a stream are joined."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field

from cluster.request import RequestOutput
from cluster.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class Stream:
    """One request's channel from the engine thread to the consumer's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of RequestOutput
    accepted: asyncio.Future  # resolved once the engine took (or refused) the request
    arrival: float = field(default_factory=time.monotonic)
    first_at: float | None = None
    last_at: float | None = None


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: Stream


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One update equal to `a` followed by `b` (same request): deltas joined, totals from `b`."""
    logprobs = None if a.new_logprobs is None and b.new_logprobs is None else (
        (a.new_logprobs or ()) + (b.new_logprobs or ()))
    return dataclasses.replace(b, new_token_ids=a.new_token_ids + b.new_token_ids, new_text=a.new_text + b.new_text,
                               new_logprobs=logprobs)


def settle(future: asyncio.Future, exc: BaseException | None, undo) -> None:
    """On the consumer's loop: resolve `future`; if its consumer already left, undo the add."""
    if future.cancelled():
        if undo is not None:
            undo()
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(None)
