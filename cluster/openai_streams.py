"""The OpenAI server's errors and stream plumbing: OpenAI error objects for engine exceptions and bad
bodies, and the engine-request streams behind one HTTP request (run to their ends, or merged in
arrival order for server-sent events)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from pydantic import BaseModel, ValidationError

from cluster.async_engine import EngineOverloaded, EngineStopped
from cluster.openai_responses import ErrorDetail, ErrorResponse, Usage
from cluster.request import RequestOutput
from cluster.sampling_params import SamplingParams

DONE = "data: [DONE]\n\n"
Stream = tuple[RequestOutput, AsyncIterator[RequestOutput]]  # (first output, the rest)


class OpenAIError(Exception):
    """An error answered with OpenAI's error object and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) or None
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:3])
        raise OpenAIError(400, detail, param=where) from None


def error_for(exc: BaseException) -> OpenAIError | None:
    """The OpenAI error for an engine exception; None for a bug (answered as a 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return OpenAIError(503, str(exc), type="server_error", code="overloaded")
    if isinstance(exc, EngineStopped):
        return OpenAIError(503, str(exc), type="server_error", code="unavailable")
    if isinstance(exc, ValueError):  # AdmissionError, SamplingParams, token ids, chat template
        return OpenAIError(400, str(exc))
    return None


def sampling_params(**fields) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from None


def ended(out: RequestOutput) -> OpenAIError:
    if out.finish_reason == "abort":
        return OpenAIError(503, out.error or "the request was aborted by the server", type="server_error")
    return OpenAIError(500, f"generation failed: {out.error}", type="server_error")


def usage(prompt_tokens: int, finals: list[RequestOutput]) -> Usage:
    completion = sum(len(f.token_ids) for f in finals)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def finals(streams: list[Stream]) -> list[RequestOutput]:
    """Run every stream to its end; an error or abort ending is an OpenAIError."""
    async def last(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
        out = first
        if not out.finished:
            async for out in rest:
                pass
        return out

    finals = await asyncio.gather(*(last(f, r) for f, r in streams))
    for f in finals:
        if f.finish_reason in ("error", "abort"):
            raise ended(f)
    return finals


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) in arrival order; leaving early cancels the readers (aborting requests)."""
    merged: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(i: int, rest: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in rest:
                merged.put_nowait((i, out))
        finally:
            merged.put_nowait((i, None))

    readers = [asyncio.create_task(pump(i, rest)) for i, (first, rest) in enumerate(streams) if not first.finished]
    try:
        for i, (first, _) in enumerate(streams):
            yield i, first
        remaining = len(readers)
        while remaining:
            i, out = await merged.get()
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for task in readers:
            task.cancel()
