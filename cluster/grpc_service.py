"""The gRPC surface: `moeserve.v1.MoeServe` plus the standard `grpc.health.v1.Health`, served two ways.

- Ray Serve's gRPC proxy calls deployment methods named after the RPCs with the request message and a
  `grpc_context` (RayServegRPCContext); `GrpcMethods` is the mixin that provides them.
- `serve_grpc` runs a standalone `grpc.aio` server (MoeServeServicer, EngineHealthServicer, reflection).

Both wrap the same engine-facing functions (generate_stream and model_info here, health_* in
cluster/grpc_health.py), which raise plain exceptions; `grpc_status` (cluster/grpc_status.py) maps them
to status codes: bad input (ValueError) -> INVALID_ARGUMENT, unknown model or health service ->
NOT_FOUND, EngineOverloaded -> RESOURCE_EXHAUSTED. When the RPC is
cancelled or its deadline passes, the engine's output stream is closed, which aborts the request.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from contextlib import aclosing, contextmanager
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.grpc_health import HEALTH_SERVICE_NAME, SERVICE_NAME, health_check, health_list, health_watch
from cluster.grpc_status import EngineUnavailable, NotFound, RequestEnded, grpc_status
from cluster.request import RequestOutput
from cluster.sampling_params import SamplingParams
from protos import moe_serve_pb2 as pb
from protos import moe_serve_pb2_grpc

if TYPE_CHECKING:
    from cluster.async_engine import AsyncLLMEngine

T = TypeVar("T")
# GenerateRequest fields that map 1:1 onto SamplingParams when set (unset: SamplingParams' default)
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_tokens", "logprobs", "prompt_logprobs")


# ---- requests in, responses out ------------------------------------------------------------------
def check_model(requested: str, served: str) -> None:
    if requested and requested != served:
        raise NotFound(f"model {requested!r} is not served here (this server serves {served!r})")


def to_engine_args(request: pb.GenerateRequest) -> tuple[str | list[int], SamplingParams]:
    """GenerateRequest -> (prompt, SamplingParams); ValueError naming the bad field."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is required: set text or token_ids")
    prompt: str | list[int] = request.text if kind == "text" else list(request.token_ids.ids)
    if not prompt:
        raise ValueError(f"prompt is empty ({kind})")
    given = {name: getattr(request, name) for name in SAMPLING_FIELDS if request.HasField(name)}
    params = SamplingParams(**given, stop=tuple(request.stop), ignore_eos=request.ignore_eos,
                            logit_bias=tuple(sorted(request.logit_bias.items())),
                            stop_token_ids=tuple(request.stop_token_ids))
    return prompt, params


def to_response(out: RequestOutput, first: bool = False) -> pb.GenerateResponse:
    """`first`: the request's first response, which carries the prompt logprobs."""
    return pb.GenerateResponse(
        request_id=out.request_id, new_token_ids=out.new_token_ids, new_text=out.new_text,
        finished=out.finished, finish_reason=out.finish_reason or "",
        usage=pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=len(out.token_ids)),
        new_logprobs=_logprobs(out.new_logprobs),
        prompt_logprobs=_logprobs(out.prompt_logprobs if first else None))


def _logprobs(lps) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps or ()]


async def generate_stream(engine: AsyncLLMEngine, model_name: str,
                          request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
    """One GenerateResponse per engine update. Closing this stream (cancel, deadline) aborts the request."""
    check_model(request.model, model_name)
    prompt, params = to_engine_args(request)
    request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
    async with aclosing(engine.generate(prompt, params, request_id)) as outputs:
        first = True
        async for out in outputs:
            if out.finish_reason in ("abort", "error"):
                raise RequestEnded(out.finish_reason, f"request {out.request_id} ended with "
                                   f"{out.finish_reason}: {out.error or 'aborted by the server'}")
            yield to_response(out, first)
            first = False


def model_info(engine: AsyncLLMEngine, model_name: str, request: pb.ModelInfoRequest) -> pb.ModelInfo:
    check_model(request.model, model_name)
    spec = engine.spec
    return pb.ModelInfo(name=model_name, family=spec.family, vocab_size=spec.vocab_size,
                        max_model_len=engine.max_model_len, num_layers=spec.num_layers,
                        num_experts=spec.num_experts, top_k=spec.top_k)


# ---- Ray Serve: deployment methods the gRPC proxy calls -------------------------------------------
@contextmanager
def _status_on(grpc_context) -> Iterator[None]:
    """Put the status of an escaping exception on Serve's context; the proxy reports it (Serve wraps
    the re-raised exception in gRPCStatusError, keeping the code and details)."""
    try:
        yield
    except Exception as exc:
        status = grpc_status(exc)
        if status is not None and grpc_context is not None:
            grpc_context.set_code(status[0])
            grpc_context.set_details(status[1])
        raise


class GrpcMethods:
    """Mixin for the Serve deployment (Serve passes `grpc_context`: RayServegRPCContext).

    Expects `self.engine: AsyncLLMEngine` and `self.model_name: str`. Method names are RPC names:
    MoeServe's Generate / GetModelInfo and grpc.health.v1's Check / List / Watch."""

    engine: AsyncLLMEngine
    model_name: str

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        with _status_on(grpc_context):
            async for response in generate_stream(self.engine, self.model_name, request):
                yield response

    async def GetModelInfo(self, request: pb.ModelInfoRequest, grpc_context=None) -> pb.ModelInfo:
        with _status_on(grpc_context):
            return model_info(self.engine, self.model_name, request)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context=None) -> health_pb2.HealthCheckResponse:
        with _status_on(grpc_context):
            return health_check(self.engine, request)

    async def List(self, request: health_pb2.HealthListRequest,
                   grpc_context=None) -> health_pb2.HealthListResponse:
        return health_list(self.engine)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context=None) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for response in health_watch(lambda: self.engine, request):
            yield response


# ---- standalone grpc.aio server -----------------------------------------------------------------
async def _unary(call: Callable[[], T], context: grpc.aio.ServicerContext) -> T:
    try:
        return call()
    except Exception as exc:
        await _abort(context, exc)
        raise


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    status = grpc_status(exc)
    if status is not None:
        await context.abort(*status)  # raises


def loaded(source: AsyncLLMEngine | asyncio.Future) -> AsyncLLMEngine | None:
    """The engine, or None while its loading future is pending or has failed."""
    if not isinstance(source, asyncio.Future):
        return source
    if not source.done() or source.cancelled() or source.exception() is not None:
        return None
    return source.result()


def require_engine(source: AsyncLLMEngine | asyncio.Future) -> AsyncLLMEngine:
    engine = loaded(source)
    if engine is not None:
        return engine
    if source.done() and not source.cancelled() and source.exception() is not None:
        raise EngineUnavailable(f"the model failed to load: {source.exception()}")
    raise EngineUnavailable("the model is still loading; retry when health reports SERVING")


class MoeServeServicer(moe_serve_pb2_grpc.MoeServeServicer):
    """moeserve.v1.MoeServe on a grpc.aio server; `engine` may be a future that is still loading it."""

    def __init__(self, engine: AsyncLLMEngine | asyncio.Future, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            engine = require_engine(self.engine)
            async for response in generate_stream(engine, self.model_name, request):
                yield response
        except Exception as exc:
            await _abort(context, exc)
            raise

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return await _unary(lambda: model_info(require_engine(self.engine), self.model_name, request), context)


class EngineHealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 over the engine's readiness (the server as a whole and moeserve.v1.MoeServe)."""

    def __init__(self, engine: AsyncLLMEngine | asyncio.Future) -> None:
        self.engine = engine

    async def Check(self, request, context):
        return await _unary(lambda: health_check(loaded(self.engine), request), context)

    async def List(self, request, context):
        return health_list(loaded(self.engine))

    async def Watch(self, request, context):
        async for response in health_watch(lambda: loaded(self.engine), request):
            yield response


async def serve_grpc(engine: AsyncLLMEngine | Awaitable[AsyncLLMEngine], model_name: str, port: int,
                     host: str = "[::]") -> grpc.aio.Server:
    """Start a grpc.aio server for `engine` on host:port (with health and reflection); returns it started.

    `engine` may be an awaitable that loads it (e.g. `asyncio.to_thread(AsyncLLMEngine, config)`): until
    it resolves, health reports NOT_SERVING and the MoeServe RPCs fail with UNAVAILABLE. Stop the server
    with `await server.stop(grace)`; `await server.wait_for_termination()` serves until then."""
    if inspect.isawaitable(engine):
        engine = asyncio.ensure_future(engine)
    server = grpc.aio.server()
    moe_serve_pb2_grpc.add_MoeServeServicer_to_server(MoeServeServicer(engine, model_name), server)
    health_pb2_grpc.add_HealthServicer_to_server(EngineHealthServicer(engine), server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
