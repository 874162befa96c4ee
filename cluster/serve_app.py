"""The Ray Serve application: OpenAI-compatible HTTP (FastAPI ingress) and gRPC on one deployment.

Serve config: ``import_path: cluster.serve_app:build_app`` with ``args`` as in AppArgs, e.g.

    applications:
      - name: moe-serve
        route_prefix: /
        import_path: cluster.serve_app:build_app
        args: {model: /models/olmoe, max_model_len: 4096}

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize and /detokenize (vLLM's), GET /v1/stats (engine load and metric totals), GET /health. gRPC (Serve's gRPC proxy): the
moeserve.v1.MoeServe and grpc.health.v1.Health methods of GrpcMethods.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures at run time, and
``serve.ingress`` freezes a copy of ``api`` when the class is decorated, so everything the routes
use (exception handlers, helpers) is defined above the class.
"""

import asyncio
import dataclasses
from pathlib import Path
from typing import Awaitable, Callable, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from cluster.async_engine import AsyncLLMEngine
from cluster.config import EngineConfig
from cluster.grpc_service import GrpcMethods
from cluster.openai_responses import ErrorDetail, ErrorResponse
from cluster.openai_serving import OpenAIServing
from cluster.openai_streams import OpenAIError

DEMO_SERVED_NAME = "moe-serve-demo"
MAX_BODY_BYTES = 4 << 20
ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineConfig)) - {"model"}
SERVE_HEADROOM = 16  # concurrent calls beyond engine capacity: /v1/models, /health, gRPC health


class AppArgs(BaseModel):
    """The application's arguments (Serve config ``args``); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # HF model directory; None: the built-in demo model
    served_model_name: str | None = None  # default: the directory's name, or "moe-serve-demo"
    engine: Literal["inprocess", "ray"] = "inprocess"
    cluster: str | None = None  # cluster description for engine="ray"
    transport: Literal["tcp", "gloo"] | None = None  # engine="ray": the data plane
    num_attention_workers: int | None = Field(None, ge=1)  # engine="ray"
    num_expert_shards: int | None = Field(None, ge=1)  # engine="ray"; None: one per node that may host experts
    microbatches: Literal[1, 2] | None = None  # engine="ray": ping-pong micro-batches per attention worker
    request_shuffling: bool | None = None  # engine="ray": sequences move toward their predicted shards
    shuffle_max_load: float | None = Field(None, ge=1.0)  # with request_shuffling: sequences per worker / mean
    replan_every_steps: int | None = Field(None, ge=1)  # engine="ray": re-plan expert placement every N steps
    expert_replicas: int | None = Field(None, ge=0)  # engine="ray": copies per layer and node at each re-plan
    dtype: Literal["float32", "bfloat16"] | None = None
    device: str | None = None
    kernel_backend: Literal["auto", "torch", "triton"] | None = None
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_tokens: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None  # reuse cached prompt blocks' K/V
    num_speculative_tokens: int | None = Field(None, ge=0)  # draft tokens per step by prompt lookup
    prompt_lookup_max: int | None = Field(None, ge=1)  # longest n-gram looked up for drafts
    prompt_lookup_min: int | None = Field(None, ge=1)  # shortest
    expert_cache_fraction: float | None = Field(None, gt=0.0, le=1.0)  # experts kept resident (ray: of each shard's)
    expert_cache_policy: Literal["lru", "lfu", "score", "adaptive"] | None = None
    expert_cache_prefetch: bool | None = None  # pre-gating prefetch into the cache
    expert_cache_schedule: Literal["auto", "load", "cpu"] | None = None  # where cache misses compute
    route_prediction: bool | None = None  # live route predictors, recall to the metrics
    max_waiting: int = Field(256, ge=1)  # waiting requests before new ones get 503
    stream_interval_s: float = Field(0.01, ge=0.0, le=1.0)  # min gap between a stream's messages after the first

    @classmethod
    def parse(cls, args: Optional[dict]) -> "AppArgs":
        try:
            return cls.model_validate(args or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid moe-serve application args: {problems}") from None

    @property
    def served_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return DEMO_SERVED_NAME if self.model is None else Path(self.model).resolve().name

    def resolve_model(self) -> tuple[str, str]:
        """(model directory, served model name); builds the demo model when no model is given."""
        if self.model is None:
            from cluster.demo import ensure_demo_model

            return str(ensure_demo_model()), self.served_name
        return self.model, self.served_name

    def engine_config(self, model_dir: str) -> EngineConfig:
        given = self.model_dump(exclude={"model", "served_model_name", "max_waiting", "stream_interval_s"},
                                exclude_none=True)
        unknown = set(given) - ENGINE_FIELDS
        if unknown:
            raise ValueError(f"this engine build does not support {sorted(unknown)}")
        return EngineConfig(model=model_dir, **given)

    def max_ongoing_requests(self) -> int:
        seqs = self.max_num_seqs or next(f.default for f in dataclasses.fields(EngineConfig)
                                         if f.name == "max_num_seqs")
        return seqs + self.max_waiting + SERVE_HEADROOM


# ---- HTTP plumbing -------------------------------------------------------------------------------
async def _respond(handler: Callable[[bytes], Awaitable], request: Request) -> Response:
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise OpenAIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    result = await handler(await request.body())
    if isinstance(result, BaseModel):
        return _json(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> Response:
    return _json(ErrorResponse(error=ErrorDetail(message=message, type=type, code=code)), status)


api = FastAPI(title="moe-serve", description="OpenAI-compatible API for Mixture-of-Experts models")


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError) -> Response:
    return _json(exc.body, exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


@serve.ingress(api)
class MoeServeDeployment(GrpcMethods):
    """One replica: an AsyncLLMEngine behind the OpenAI routes and the gRPC methods."""

    def __init__(self, args: dict) -> None:
        parsed = AppArgs.parse(args)
        model_dir, self.model_name = parsed.resolve_model()
        self.engine = AsyncLLMEngine(parsed.engine_config(model_dir), model_name=self.model_name,
                                     max_waiting=parsed.max_waiting, stream_interval_s=parsed.stream_interval_s)
        self.openai = OpenAIServing(self.engine, self.model_name)

    @api.get("/v1/models")
    async def list_models(self) -> Response:
        return _json(self.openai.models())

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> Response:
        return _json(self.openai.model_card(model_id))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await _respond(self.openai.completions, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await _respond(self.openai.chat, request)

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await _respond(self.openai.tokenize, request)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await _respond(self.openai.detokenize, request)

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        return self.engine.stats()

    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200 if self.engine.ready else 503)

    def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError("the engine thread is not running")

    async def __del__(self) -> None:
        """Serve's shutdown hook: stop the engine, then the ASGI wrapper's own shutdown."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        parent = getattr(super(), "__del__", None)
        if parent is not None:
            await parent()


def build_app(args: dict | None = None) -> Application:
    """Serve application builder (``import_path: cluster.serve_app:build_app``). Settings that only
    conflict together (EngineConfig's checks) are refused here too, before anything is deployed."""
    parsed = AppArgs.parse(args)
    parsed.engine_config(parsed.model or "demo")  # checks only: EngineConfig reads no file
    deployment = serve.deployment(MoeServeDeployment, name="MoeServeDeployment",
                                  max_ongoing_requests=parsed.max_ongoing_requests())
    return deployment.bind(parsed.model_dump())
